"""One way in for data: batches of ``{input_name: ndarray}`` plus optional labels.

Sources: a ``.npz`` file (keys are input names, ``labels`` optional), a folder of them, a Python callable
``module:function`` returning an iterable of batches, in-memory arrays, or synthetic inputs made from the
model's input specs. Everything streams: uncompressed ``.npz`` members are memory-mapped, and batches are
cut from chunks as they are needed, so neither a data set nor activations are ever held whole.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserError

LABELS_KEY = "labels"


@dataclasses.dataclass
class Batch:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        """Rows in the batch; 0-d inputs (scalars such as flags) are shared by every row."""
        rows = [len(v) for v in self.inputs.values() if np.ndim(v) > 0]
        return max(rows) if rows else 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: rank unknown; str: symbolic dim; None dim: unknown


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise UserError(f"model input '{value.name}' has no element type")
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


def _fmt_shape(shape: Iterable[Any] | None) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def check_batch(batch: Batch, specs: list[InputSpec], source: str) -> Batch:
    """Check names, dtypes and shapes against the model; cast within a dtype kind (float64→float32)."""
    names = {s.name for s in specs}
    extra = sorted(set(batch.inputs) - names)
    if extra:
        raise UserError(f"{source}: key '{extra[0]}' is not a model input; the model's inputs are "
                        f"{', '.join(sorted(names))} (labels go under '{LABELS_KEY}')")
    symbols: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in batch.inputs:
            raise UserError(f"{source}: no array for model input '{spec.name}' "
                            f"(found keys: {', '.join(sorted(batch.inputs)) or 'none'})")
        arr = np.asarray(batch.inputs[spec.name])
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                arr = arr.astype(spec.dtype)
            else:
                raise UserError(f"{source}: input '{spec.name}' has dtype {arr.dtype}, "
                                f"the model expects {spec.dtype}")
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise UserError(f"{source}: input '{spec.name}' has shape {_fmt_shape(arr.shape)}, "
                                f"the model expects {_fmt_shape(spec.shape)} (rank {len(spec.shape)})")
            for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(want, int) and got != want:
                    raise UserError(f"{source}: input '{spec.name}' has shape {_fmt_shape(arr.shape)}, "
                                    f"the model expects {_fmt_shape(spec.shape)} (axis {axis})")
                if isinstance(want, str):
                    if symbols.setdefault(want, got) != got:
                        raise UserError(f"{source}: dimension '{want}' is {symbols[want]} in one input and "
                                        f"{got} in '{spec.name}'")
        out[spec.name] = arr
    n = {len(a) for a in out.values() if a.ndim > 0}
    labels = batch.labels
    if labels is not None:
        labels = np.asarray(labels)
        if len(n) == 1 and labels.ndim > 0 and len(labels) != next(iter(n)):
            raise UserError(f"{source}: '{LABELS_KEY}' has {len(labels)} rows, the inputs have {next(iter(n))}")
    return Batch(out, labels)


class DataSource:
    """Base of all data sources: yields natural chunks; :meth:`batches` re-cuts them to a batch size."""

    description = "data"

    def chunks(self) -> Iterator[Batch]:
        raise NotImplementedError

    def batches(self, batch_size: int | None = None, limit: int | None = None,
                specs: list[InputSpec] | None = None) -> Iterator[Batch]:
        """Stream batches of ``batch_size`` rows (the last may be smaller), at most ``limit`` rows in all."""
        produced = 0
        pending: list[Batch] = []
        pending_rows = 0
        empty = True
        for chunk in self.chunks():
            if specs is not None:
                chunk = check_batch(chunk, specs, self.description)
            if len(chunk) == 0:
                continue
            empty = False
            if batch_size is None:
                parts = [chunk]
            else:
                pending.append(chunk)
                pending_rows += len(chunk)
                parts = []
                while pending_rows >= batch_size:
                    merged = _concat(pending)
                    parts.append(_slice(merged, 0, batch_size))
                    rest = _slice(merged, batch_size, len(merged))
                    pending = [rest] if len(rest) else []
                    pending_rows = len(rest)
            for part in parts:
                if limit is not None and produced + len(part) > limit:
                    part = _slice(part, 0, limit - produced)
                if len(part):
                    produced += len(part)
                    yield part
                if limit is not None and produced >= limit:
                    return
        if pending_rows:
            part = _concat(pending)
            if limit is not None:
                part = _slice(part, 0, limit - produced)
            if len(part):
                yield part
        if empty:
            raise UserError(f"{self.description} holds no samples")

    def first(self, specs: list[InputSpec] | None = None, batch_size: int | None = None) -> Batch:
        return next(iter(self.batches(batch_size=batch_size, limit=batch_size, specs=specs)))


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    inputs = {k: (np.concatenate([p.inputs[k] for p in parts]) if np.ndim(parts[0].inputs[k]) else parts[0].inputs[k])
              for k in parts[0].inputs}
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels for p in parts])  # type: ignore[misc]
    return Batch(inputs, labels)


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch({k: (np.ascontiguousarray(v[start:stop]) if np.ndim(v) else v) for k, v in batch.inputs.items()},
                 None if batch.labels is None else np.asarray(batch.labels[start:stop]))


def _npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map a stored (uncompressed) .npy member of an .npz; read compressed ones normally."""
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            header = fh.read(30)
            name_len = int.from_bytes(header[26:28], "little")
            extra_len = int.from_bytes(header[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        if dtype.hasobject:
            raise UserError(f"{path}: member {info.filename} holds Python objects; only numeric arrays are read")
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran else "C")
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


class NpzSource(DataSource):
    """An .npz file; each key an input name, ``labels`` optional. Streams in chunks of ``chunk_rows``."""

    def __init__(self, path: str | Path, chunk_rows: int = 256) -> None:
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        self.description = f"data file {self.path}"
        if not self.path.is_file():
            raise UserError(f"data file not found: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [i.filename for i in zf.infolist()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{self.path} is not a readable .npz file ({exc})") from None
        if not names:
            raise UserError(f"{self.description} holds no arrays")

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    arrays[key] = _npz_member(self.path, zf, info)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise UserError(f"{self.path} is not a readable .npz file ({exc})") from None
        return arrays

    def chunks(self) -> Iterator[Batch]:
        arrays = self._arrays()
        labels = arrays.pop(LABELS_KEY, None)
        if not arrays:
            raise UserError(f"{self.description} has only labels, no input arrays")
        lengths = {k: (len(v) if v.ndim else 1) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise UserError(f"{self.description}: arrays have different numbers of rows: {lengths}")
        n = next(iter(lengths.values()))
        for start in range(0, n, self.chunk_rows):
            stop = min(n, start + self.chunk_rows)
            yield Batch({k: np.asarray(v[start:stop]) for k, v in arrays.items()},
                        None if labels is None else np.asarray(labels[start:stop]))


class FolderSource(DataSource):
    """A folder of .npz files, read in name order, one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"data folder {self.path}"
        self.files = sorted(self.path.glob("*.npz"))
        if not self.files:
            raise UserError(f"{self.description} contains no .npz files")

    def chunks(self) -> Iterator[Batch]:
        for f in self.files:
            yield from NpzSource(f).chunks()


def _as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, Batch):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Mapping):
        return Batch({k: np.asarray(v) for k, v in item[0].items()}, None if item[1] is None else np.asarray(item[1]))
    if isinstance(item, Mapping):
        inputs = {k: np.asarray(v) for k, v in item.items() if k != LABELS_KEY}
        labels = item.get(LABELS_KEY)
        return Batch(inputs, None if labels is None else np.asarray(labels))
    raise UserError(f"{where} must yield dicts of arrays (optionally with '{LABELS_KEY}') or (inputs, labels) "
                    f"tuples; got {type(item).__name__}")


class CallableSource(DataSource):
    """``module:function`` (or a Python callable) returning an iterable of batches."""

    def __init__(self, target: str | Callable[[], Iterable[Any]]) -> None:
        if callable(target):
            self.fn = target
            self.description = f"data function {getattr(target, '__name__', target)!s}"
            return
        module_name, _, func_name = target.partition(":")
        self.description = f"data function {target}"
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise UserError(f"cannot import module '{module_name}' for --data {target}: {exc}") from None
        fn = getattr(module, func_name, None)
        if not callable(fn):
            raise UserError(f"module '{module_name}' has no function '{func_name}' (from --data {target})")
        self.fn = fn

    def chunks(self) -> Iterator[Batch]:
        try:
            items = self.fn()
        except Exception as exc:
            raise UserError(f"{self.description} raised {type(exc).__name__}: {exc}") from None
        if isinstance(items, Mapping):
            items = [items]
        for item in items:
            yield _as_batch(item, self.description)


class ArraySource(DataSource):
    """Arrays already in memory (Python API): a dict of arrays, possibly with ``labels``."""

    def __init__(self, arrays: Mapping[str, Any], chunk_rows: int = 256) -> None:
        self.batch = _as_batch(arrays, "data")
        self.chunk_rows = chunk_rows
        self.description = "in-memory data"

    def chunks(self) -> Iterator[Batch]:
        n = len(self.batch)
        for start in range(0, n, self.chunk_rows):
            yield _slice(self.batch, start, min(n, start + self.chunk_rows))


def integer_input_ranges(model: ir.Model) -> dict[str, int]:
    """Upper bounds for integer inputs that index an embedding table (Gather on an initializer)."""
    highs: dict[str, int] = {}
    for value in model.graph.inputs:
        for node, index in value.uses():
            if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
                table = node.inputs[0]
                if table.shape is not None and isinstance(table.shape[0], int):
                    highs[value.name] = min(highs.get(value.name, table.shape[0]), table.shape[0])
    return highs


class SyntheticSource(DataSource):
    """Random inputs shaped by the model's input specs (``--shape`` pins symbolic dimensions).

    The first symbolic dimension of each input is the batch; any other symbolic dimension must be pinned.
    Integer inputs that feed an embedding Gather stay inside the table.
    """

    def __init__(self, specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None,
                 rows: int = 64, batch_size: int = 8, seed: int = 0,
                 int_high: Mapping[str, int] | None = None) -> None:
        self.specs = specs
        self.rows = rows
        self.chunk = batch_size
        self.seed = seed
        self.int_high = dict(int_high or {})
        self.description = "synthetic data"
        self.shapes: dict[str, tuple[int, ...]] = {}
        shapes = dict(shapes or {})
        unknown = sorted(set(shapes) - {s.name for s in specs})
        if unknown:
            raise UserError(f"--shape names '{unknown[0]}', which is not a model input "
                            f"(inputs: {', '.join(s.name for s in specs)})")
        for spec in specs:
            self.shapes[spec.name] = self._resolve(spec, shapes.get(spec.name))

    def _resolve(self, spec: InputSpec, pinned: tuple[int, ...] | None) -> tuple[int, ...]:
        if pinned is not None:
            if spec.shape is not None:
                if len(pinned) != len(spec.shape):
                    raise UserError(f"--shape {spec.name}={'x'.join(map(str, pinned))} has rank {len(pinned)}, "
                                    f"the model expects {_fmt_shape(spec.shape)}")
                for got, want in zip(pinned, spec.shape):
                    if isinstance(want, int) and got != want:
                        raise UserError(f"--shape {spec.name}={'x'.join(map(str, pinned))} does not fit the "
                                        f"model's {_fmt_shape(spec.shape)}")
            return tuple(pinned)
        if spec.shape is None:
            raise UserError(f"input '{spec.name}' has unknown rank; give its shape with --shape {spec.name}=AxBx...")
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(-1)  # the batch
            else:
                raise UserError(f"input '{spec.name}' has a symbolic dimension {d or '?'} at axis {axis}; "
                                f"pin it with --shape {spec.name}=" + "x".join(
                                    "1" if i == 0 else (str(x) if isinstance(x, int) else "N")
                                    for i, x in enumerate(spec.shape)))
        return tuple(dims)

    #: Most elements one synthetic batch may hold (a crafted model can declare absurd input shapes).
    max_elements = 1 << 28

    def chunks(self) -> Iterator[Batch]:
        for spec in self.specs:
            elements = self.chunk * abs(int(np.prod([d for d in self.shapes[spec.name]], dtype=np.float64)))
            if elements > self.max_elements:
                raise UserError(f"input '{spec.name}' of shape {self.shapes[spec.name]} would need "
                                f"{elements:.3g} elements per synthetic batch; give real data with --data or a "
                                f"smaller --shape")
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.rows, self.chunk):
            n = min(self.chunk, self.rows - start)
            inputs = {}
            for spec in self.specs:
                shape = tuple(n if d == -1 else d for d in self.shapes[spec.name])
                if spec.dtype.kind == "f":
                    inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind in "iu":
                    high = self.int_high.get(spec.name, 2)
                    inputs[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    inputs[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
                else:
                    raise UserError(f"cannot synthesize data for input '{spec.name}' of dtype {spec.dtype}; "
                                    "give data with --data")
            yield Batch(inputs)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224``."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if not sep or not name or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise UserError(f"--shape expects NAME=DxDx... with positive integers (e.g. input=1x3x224x224); "
                        f"got {text!r}") from None
    return name.strip(), shape


def open_data(spec: Any, model: ir.Model | None = None, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
              synthetic_rows: int = 64, batch_size: int = 8, seed: int = 0) -> DataSource:
    """Turn what a user gave (path, folder, ``module:function``, dict, callable, None) into a DataSource."""
    if isinstance(spec, DataSource):
        return spec
    if spec is None:
        if model is None:
            raise UserError("no data given and no model to synthesize inputs from")
        return SyntheticSource(input_specs(model), shapes, rows=synthetic_rows, batch_size=batch_size,
                               seed=seed, int_high=integer_input_ranges(model))
    if isinstance(spec, Mapping):
        return ArraySource(spec)
    if callable(spec):
        return CallableSource(spec)
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if path.suffix == ".npz" or path.exists():
        return NpzSource(path)
    if ":" in text and not text.startswith("/"):
        return CallableSource(text)
    raise UserError(f"data {text!r} is neither an .npz file, a folder of .npz files, nor module:function")
