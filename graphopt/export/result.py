"""The part of an export that does not depend on the framework: stage, check, write.

The exported model is saved into a staging folder beside the destination, run in ONNX Runtime against
the framework, and only moved into place when the numbers agree (or ``keep_failed``), so a failed export
never leaves a file that looks like a good one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserError
from graphopt.export.check import (DEFAULT_ATOL, DEFAULT_RTOL, ExportCheck, ExportMismatch, random_inputs,
                                   run_check, varied_shapes)
from graphopt.export.inputs import InputDecl
from graphopt.model_io import save_model

logger = logging.getLogger(__name__)


def _dims(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "?"
    try:
        return np.dtype(dtype.numpy()).name
    except (TypeError, ValueError):
        return dtype.name.lower()


@dataclasses.dataclass
class ExportResult:
    """What an export produced: the model (onnx_ir), where it was written, how, and how well it matches."""

    framework: str
    exporter: str
    model: ir.Model
    path: Path | None
    written: bool
    notes: list[str]
    check: ExportCheck | None
    source: str = ""

    @property
    def opset(self) -> int | None:
        return self.model.opset_imports.get("")

    def io(self) -> dict[str, list[dict[str, Any]]]:
        def describe(values: Sequence[ir.Value]) -> list[dict[str, Any]]:
            return [{"name": v.name, "dtype": _dtype_name(v.dtype),
                     "shape": _dims(v)} for v in values]

        inits = set(self.model.graph.initializers)
        return {"inputs": describe([v for v in self.model.graph.inputs if v.name not in inits]),
                "outputs": describe(list(self.model.graph.outputs))}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "framework": self.framework, "exporter": self.exporter,
                "opset": self.opset, "output": str(self.path) if self.path else None, "written": self.written,
                "notes": self.notes, **self.io(), "check": self.check.to_dict() if self.check else None}

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def check_output_path(output: str | os.PathLike | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if path.suffix != ".onnx":
        raise UserError(f"output path {path} should end in .onnx")
    return path


def name_symbolic_batch(model: ir.Model) -> None:
    """Call a symbolic leading dimension ``batch`` on inputs and outputs (tf2onnx says ``unk__12``)."""
    inits = set(model.graph.initializers)
    for value in [v for v in model.graph.inputs if v.name not in inits] + list(model.graph.outputs):
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim("batch")
            value.shape = ir.Shape(dims)


def finish_export(model: ir.Model, *, framework: str, exporter: str, notes: list[str],
                  decls: Sequence[InputDecl], dynamic: Mapping[str, Mapping[int, str]],
                  examples: Mapping[str, np.ndarray] | None,
                  reference: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]],
                  output: Path | None, check: bool = True, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, seed: int = 0, keep_failed: bool = False,
                  source: str = "") -> ExportResult:
    """Save ``model`` to a staging folder, check it against ``reference``, then move it to ``output``.

    Raises ``ExportMismatch`` (exit 1) with the numbers when ONNX Runtime disagrees with the framework;
    the model is written anyway only with ``keep_failed``.
    """
    from graphopt.data import integer_input_ranges

    parent = output.parent if output is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".graphopt-export-", dir=parent))
    try:
        staged = stage / (output.name if output is not None else "model.onnx")
        save_model(model, staged)
        result = ExportResult(framework, exporter, model, output, False, notes, None, source)
        if check:
            int_high = integer_input_ranges(model)
            first = dict(examples) if examples is not None else random_inputs(decls, seed=seed, int_high=int_high)
            cases: list[tuple[str, Mapping[str, np.ndarray]]] = [("export inputs", first)]
            if any(dynamic.values()):
                shapes = varied_shapes(decls, dynamic)
                cases.append(("dynamic axes resized", random_inputs(decls, seed=seed + 1, int_high=int_high,
                                                                    shapes=shapes)))
            result.check = run_check(framework, staged, [v.name for v in model.graph.outputs], reference, cases,
                                     atol, rtol)
            notes.extend(f"check skipped: {s}" for s in result.check.skipped)
        passed = result.check is None or result.check.passed
        if output is not None and (passed or keep_failed):
            data = stage / (staged.name + ".data")
            if data.exists():
                os.replace(data, output.with_name(output.name + ".data"))
            os.replace(staged, output)
            result.written = True
        if not passed:
            assert result.check is not None
            tail = (f"; written anyway: {output}" if result.written
                    else "; nothing written (--keep-failed, or keep_failed=True, writes it anyway)" if output else "")
            raise ExportMismatch(result.check.failure_message() + tail, result)
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)
