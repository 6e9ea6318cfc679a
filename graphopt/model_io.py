"""Loading and saving models: the only place that touches model files.

Loading turns every way a file can be wrong (missing, not ONNX, truncated, external data missing or
pointing outside the model's folder) into a ``UserError`` that says what was expected. Saving writes to a
temporary folder beside the target and renames, so an existing output is only ever replaced by a complete
new file. Large weights stay lazy: onnx_ir memory-maps external data and only reads what a pass touches.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt.errors import UserError

logger = logging.getLogger(__name__)
_R = TypeVar("_R")

#: Protobuf cannot serialize a message over 2 GiB; above this many weight bytes we write external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [t for t in _all_tensors(model) if isinstance(t, ir.ExternalTensor)]


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external data that is missing, too short, or resolves outside the model's folder."""
    root = base_dir.resolve()
    for tensor in _external_tensors(model):
        location = str(tensor.location)
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise UserError(
                f"external data of tensor '{tensor.name}' points outside the model's folder "
                f"({location!r}); external data must be a relative path inside {root}"
            )
        if not target.is_file():
            raise UserError(
                f"external data file {location!r} of tensor '{tensor.name}' is missing "
                f"(expected it next to the model in {root})"
            )
        size = target.stat().st_size
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if offset + length > size:
            raise UserError(
                f"external data file {location!r} is too short for tensor '{tensor.name}' "
                f"(needs bytes {offset}..{offset + length}, file has {size})"
            )


def _all_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    found: list[ir.TensorProtocol] = []
    for graph in model.graphs():
        found += [v.const_value for v in graph.initializers.values() if v.const_value is not None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                found.append(attr.value)
            elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
                found.extend(attr.value)
    return found


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def check_tensor_sizes(model: ir.Model) -> None:
    """Refuse tensors whose stored data does not match their declared shape.

    A crafted file can declare a 10^12-element tensor backed by a few bytes; nothing may ever allocate
    what the shape claims before this check has compared it with the bytes that are really there.
    """
    for tensor in _all_tensors(model):
        try:
            _check_tensor_size(tensor)
        except UserError:
            raise
        except Exception as exc:  # undefined dtypes and other malformations surface in many ways
            raise UserError(f"tensor '{tensor.name}' is malformed: {exc}") from None


def _check_tensor_size(tensor: ir.TensorProtocol) -> None:
    if tensor.shape is not None and any(d < 0 for d in tensor.shape.numpy()):
        raise UserError(f"tensor '{tensor.name}' has a negative dimension {tensor.shape}")
    if isinstance(tensor, ir.ExternalTensor):
        if tensor.length is not None and tensor.length < tensor.nbytes:
            raise UserError(f"external tensor '{tensor.name}' declares {tensor.nbytes} bytes by its shape "
                            f"but stores {tensor.length}")
        return
    proto = getattr(tensor, "raw", None)
    if not isinstance(proto, onnx.TensorProto) or proto.data_type == onnx.TensorProto.STRING:
        return
    if proto.HasField("raw_data"):
        stored = len(proto.raw_data)
        if stored != tensor.nbytes:
            raise UserError(f"tensor '{tensor.name}' declares shape {list(proto.dims)} "
                            f"({tensor.nbytes} bytes) but stores {stored} bytes")
    else:
        count = sum(len(getattr(proto, f)) for f in _TYPED_FIELDS)
        elements = tensor.size
        if count and count < elements and proto.data_type not in (onnx.TensorProto.COMPLEX64,
                                                                 onnx.TensorProto.COMPLEX128):
            raise UserError(f"tensor '{tensor.name}' declares {elements} elements but stores {count}")


def check_structure(model: ir.Model, path: Path) -> None:
    """The ONNX checker on the graph (cycles, duplicate names, unknown domains...), weights not copied."""
    try:
        call_on_skeleton(lambda proto: onnx.checker.check_model(proto, full_check=False), model)
    except Exception as exc:  # checker verdicts, and serializer failures on malformed fields
        first = " ".join(str(exc).split())
        raise UserError(f"{path} is not a valid ONNX model: {first[:400]}") from None


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir, keeping external tensors lazy (memory-mapped on first use)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{path} is not a readable ONNX model (protobuf parse failed: {exc}); "
                        "is the file truncated or of another format?") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise UserError(f"{path} is not an ONNX model (no graph, IR version or opset imports found)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # a malformed graph fails in many ways inside the deserializer
        raise UserError(f"{path} is not a valid ONNX model: {type(exc).__name__}: {exc}") from None
    del proto
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    check_external_data(model, path.parent)
    check_tensor_sizes(model)
    check_structure(model, path)
    return model


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; returns the path.

    ``external_data=None`` chooses: external data (``PATH.data`` beside the model) when the model already
    had external tensors or its weights would not fit in one protobuf, inline otherwise.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    has_external = bool(_external_tensors(model))
    if external_data is None:
        external_data = has_external or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    elif not external_data and weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        logger.warning("weights exceed 2 GB; writing external data despite external_data=False")
        external_data = True
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=parent))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            written: list[ir.TensorProtocol] = []

            def unmap_previous(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
                # Called before each tensor is written: the one before it is on disk, so its mapped pages
                # can leave this process (it maps again if used later). Keeps saving a model larger than
                # memory at one tensor's worth of resident weights.
                if written and isinstance(written[-1], ir.ExternalTensor):
                    written[-1].release()
                written.append(tensor)

            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024, callback=unmap_previous)
            release_external(model)
        else:
            if has_external:
                # Inline what was lazy, or the saved file would point at the input's data file.
                ir.external_data.load_to_model(model)
            ir.save(model, tmp_model)
        if external_data:
            os.replace(tmp_dir / data_name, parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def release_external(model: ir.Model) -> None:
    """Unmap every external tensor (each maps again on its next use), so its pages leave this process."""
    for tensor in _external_tensors(model):
        tensor.release()


class TensorSpill:
    """Scratch file for weights a pass produces: each goes to disk as it is made and comes back as a lazy
    external tensor, so a pass over a model larger than memory never holds all its new weights at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="spill-", suffix=".data", dir=self.folder)
        os.close(fd)
        self.path = Path(name)
        self.offset = 0

    def put(self, array: Any, name: str) -> ir.ExternalTensor:
        import numpy as np

        array = np.ascontiguousarray(array)
        with open(self.path, "ab") as fh:
            array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(fh)
        tensor = ir.ExternalTensor(self.path.name, self.offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                   shape=ir.Shape(array.shape), name=name, base_dir=str(self.folder))
        self.offset += array.nbytes
        return tensor


#: Weights at least this large that a pass produces go through a TensorSpill (when the pass has a work dir).
SPILL_MIN_BYTES = 64 << 20


def model_to_bytes(model: ir.Model) -> bytes:
    """Serialize a (small) model for an in-memory ONNX Runtime session."""
    return ir.serde.serialize_model(model).SerializeToString()


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model, its external data files included (all files, for a stage directory)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    total = path.stat().st_size
    seen: set[Path] = set()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            data = (path.parent / info.location).resolve()
            if data not in seen and data.is_file():
                seen.add(data)
                total += data.stat().st_size
    return total


def call_on_skeleton(func: Callable[[onnx.ModelProto], _R], model: ir.Model, keep_bytes: int = 1024) -> _R:
    """Call an onnx C API (checker, shape inference) on the model without copying its weights.

    Initializers larger than ``keep_bytes`` become typed graph inputs for the call; small ones (shape
    constants that shape inference needs) are passed by value, read from external data if need be. The
    model is restored afterwards whatever happens.
    """
    graph = model.graph
    saved_inputs = list(graph.inputs)
    saved_inits = list(graph.initializers.values())
    saved_values = {id(v): v.const_value for v in saved_inits}
    try:
        for value in saved_inits:
            tensor = value.const_value
            if tensor is None:
                continue
            if value.shape is None:
                value.shape = tensor.shape
            if value.dtype is None:
                value.dtype = tensor.dtype
            if tensor.nbytes > keep_bytes:
                graph.initializers.pop(value.name)  # type: ignore[arg-type]
                if value not in graph.inputs:
                    graph.inputs.append(value)
            elif isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.tensor(tensor.numpy(), name=value.name)
        proto = ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(saved_inputs)
        for value in saved_inits:
            value.const_value = saved_values[id(value)]
            if value.name not in graph.initializers:
                graph.initializers.add(value)
    return func(proto)
