"""The export check: run the framework and ONNX Runtime on the same inputs and compare every output.

An exporter can succeed and still produce a graph that computes something else (a traced branch, a
specialised shape, an op lowered differently), so every export is run against its source before it is
written. Inputs are the export examples plus, when some axes are dynamic, a second set with those axes
resized, which is what proves that a "dynamic" dimension really is one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import GateFailed, UserError
from graphopt.export.inputs import InputDecl

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
#: integer inputs that feed no embedding table get values in [0, this) (masks, token types).
DEFAULT_INT_HIGH = 2


@dataclasses.dataclass
class OutputDiff:
    """How far ONNX Runtime's value of one output is from the framework's."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    ref_max_abs: float
    passed: bool
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"shape": list(self.shape)}


@dataclasses.dataclass
class CheckCase:
    label: str
    shapes: str
    outputs: list[OutputDiff]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclasses.dataclass
class ExportCheck:
    """Every comparison made for one export, with the tolerance it was held to."""

    framework: str
    atol: float
    rtol: float
    cases: list[CheckCase] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for c in self.cases for o in c.outputs), default=0.0)

    def failure_message(self) -> str:
        bad = [(c, o) for c in self.cases for o in c.outputs if not o.passed]
        if not bad:
            return ""
        case, out = max(bad, key=lambda co: co[1].max_abs if np.isfinite(co[1].max_abs) else np.inf)
        detail = out.problem or (f"max |diff| {out.max_abs:.3g} (largest |{self.framework}| value "
                                 f"{out.ref_max_abs:.3g})")
        return (f"ONNX Runtime and {self.framework} disagree beyond tolerance (atol {self.atol:g}, rtol "
                f"{self.rtol:g}): output '{out.name}' at {case.shapes}: {detail}; "
                f"{len(bad)} output check(s) failed")

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "atol": self.atol, "rtol": self.rtol, "passed": self.passed,
                "max_abs_diff": self.max_abs, "skipped": self.skipped,
                "cases": [{"label": c.label, "shapes": c.shapes, "passed": c.passed,
                           "outputs": [o.to_dict() for o in c.outputs]} for c in self.cases]}


class ExportMismatch(GateFailed):
    """The exported model's outputs are not the framework's (exit 1). ``result`` has every number."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


def random_inputs(decls: Sequence[InputDecl], *, seed: int, int_high: Mapping[str, int] | None = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Random arrays for each declared input: N(0, 1) floats, ints inside any embedding table, bools."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for d in decls:
        shape = (shapes or {}).get(d.name, d.shape)
        if d.dtype.kind == "f":
            out[d.name] = rng.standard_normal(shape).astype(d.dtype)
        elif d.dtype.kind == "b":
            out[d.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            high = (int_high or {}).get(d.name, DEFAULT_INT_HIGH)
            out[d.name] = rng.integers(0, high, size=shape).astype(d.dtype)
    return out


def varied_shapes(decls: Sequence[InputDecl], dynamic: Mapping[str, Mapping[int, str]]) -> dict[str, tuple[int, ...]]:
    """Shapes with every dynamic dimension changed (the same name changes the same way everywhere).

    A dimension shrinks by one when it can (a sequence may have a maximum length) and grows otherwise.
    """
    new_size: dict[str, int] = {}
    shapes = {}
    for d in decls:
        shape = list(d.shape)
        for axis, dim in dynamic.get(d.name, {}).items():
            size = new_size.setdefault(dim, shape[axis] - 1 if shape[axis] >= 3 else shape[axis] + 1)
            shape[axis] = size
        shapes[d.name] = tuple(shape)
    return shapes


def shapes_label(inputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in inputs.items())


def compare_outputs(names: Sequence[str], reference: Sequence[np.ndarray], got: Sequence[np.ndarray],
                    atol: float, rtol: float) -> list[OutputDiff]:
    """Element-wise ``|got - ref| <= atol + rtol * |ref|`` per output (NaN matches NaN); exact for ints."""
    diffs = []
    for i, name in enumerate(names):
        if i >= len(reference) or i >= len(got):
            diffs.append(OutputDiff(name, (), float("inf"), 0.0, False,
                                    f"{len(reference)} framework output(s) but {len(got)} ONNX output(s)"))
            continue
        ref = np.asarray(reference[i])
        out = np.asarray(got[i])
        if ref.shape != out.shape:
            diffs.append(OutputDiff(name, out.shape, float("inf"), 0.0, False,
                                    f"shape {list(out.shape)} but the framework gives {list(ref.shape)}"))
            continue
        if ref.size == 0:
            diffs.append(OutputDiff(name, out.shape, 0.0, 0.0, True))
            continue
        r = ref.astype(np.float64)
        o = out.astype(np.float64)
        exact = ref.dtype.kind in "iub" and out.dtype.kind in "iub"
        close = np.isclose(o, r, atol=0 if exact else atol, rtol=0 if exact else rtol, equal_nan=True)
        with np.errstate(invalid="ignore"):
            diff = np.abs(o - r)
        finite = diff[np.isfinite(diff)]
        max_abs = float(finite.max()) if finite.size else 0.0
        if not close.all() and finite.size < diff.size:
            max_abs = float("inf")  # a NaN or inf on one side only
        ref_abs = np.abs(r[np.isfinite(r)])
        diffs.append(OutputDiff(name, out.shape, max_abs, float(ref_abs.max()) if ref_abs.size else 0.0,
                                bool(close.all())))
    if len(got) > len(names):
        diffs.append(OutputDiff(f"#{len(names)}", (), float("inf"), 0.0, False,
                                f"{len(reference)} framework output(s) but {len(got)} ONNX output(s)"))
    return diffs


def onnx_runner(path: Path) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A CPU ONNX Runtime session on the staged export (the same factory validation uses)."""
    from graphopt.runtime import SessionFactory

    session = SessionFactory().session(path, "CPUExecutionProvider")
    names = [o.name for o in session.get_outputs()]
    # An exporter may drop an input the graph never reads (the TorchScript exporter does).
    wanted = {i.name for i in session.get_inputs()}
    return lambda inputs: session.run(names, {k: v for k, v in inputs.items() if k in wanted})


def run_check(framework: str, onnx_path: Path, output_names: Sequence[str],
              reference: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]],
              cases: Sequence[tuple[str, Mapping[str, np.ndarray]]], atol: float, rtol: float) -> ExportCheck:
    """Compare ``reference`` (the framework) with ONNX Runtime on every case.

    The first case is the export's own inputs and must run in the framework; a later case the framework
    itself rejects (e.g. a sequence longer than the model allows) is skipped with a note.
    """
    check = ExportCheck(framework, atol, rtol)
    run = onnx_runner(onnx_path)
    for i, (label, inputs) in enumerate(cases):
        shapes = shapes_label(inputs)
        try:
            ref = reference(inputs)
        except Exception as exc:  # noqa: BLE001 - the user's model raising is reported, not a crash
            if i == 0:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise UserError(f"{framework} fails on the check inputs ({shapes}): "
                                f"{type(exc).__name__}: {first[:300]}") from None
            msg = f"{label} ({shapes}): {framework} itself fails on these shapes ({type(exc).__name__}: {exc})"
            logger.info("skipped check %s", msg)
            check.skipped.append(msg.splitlines()[0])
            continue
        try:
            got = run(inputs)
        except Exception as exc:  # noqa: BLE001 - ORT rejecting a shape is a mismatch, with its message
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            check.cases.append(CheckCase(label, shapes, [OutputDiff(
                output_names[0] if output_names else "?", (), float("inf"), 0.0, False,
                f"ONNX Runtime fails on these shapes: {first[:300]}")]))
            continue
        check.cases.append(CheckCase(label, shapes, compare_outputs(output_names, ref, got, atol, rtol)))
    return check
