"""Bring PyTorch and TensorFlow models to ONNX, checked against the framework in ONNX Runtime.

Python API::

    from graphopt.export import from_torch, from_tf
    result = from_torch(model, torch.randn(1, 3, 224, 224), dynamic_batch=True, output="model.onnx")
    print(result.exporter, result.check.max_abs)
    result = from_tf("saved_model_dir", output="model.onnx")

Neither framework is imported until it is used: ``graphopt[torch]`` and ``graphopt[tf]`` are extras, and a
missing one is a ``UserError`` naming the pip command. ``load_source`` turns ``torch:MODULE:FACTORY`` or
``tf:PATH`` into an ONNX file, which is how ``graphopt run`` accepts framework models.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from graphopt.errors import UserError
from graphopt.export.check import ExportCheck, ExportMismatch
from graphopt.export.inputs import InputDecl, decls_from_shapes, parse_dynamic, parse_input
from graphopt.export.result import ExportResult
from graphopt.export.tf import from_tf
from graphopt.export.torch import export_factory, from_torch

SOURCE_PREFIXES = ("torch:", "tf:")

__all__ = ["ExportCheck", "ExportMismatch", "ExportResult", "InputDecl", "export_factory", "from_tf", "from_torch",
           "is_source", "load_source", "parse_dynamic", "parse_input", "source_stem"]


def is_source(spec: str | os.PathLike) -> bool:
    """True when ``spec`` names a framework model (``torch:...`` or ``tf:...``) rather than an ONNX file."""
    return isinstance(spec, str) and spec.startswith(SOURCE_PREFIXES)


def source_stem(spec: str) -> str:
    """A file-name stem for outputs: ``torch:models/net.py:build`` → ``net_build``; ``tf:dir/m.keras`` → ``m``."""
    if spec.startswith("torch:"):
        module, _, factory = spec[len("torch:"):].rpartition(":")
        stem = f"{Path(module).stem if module.endswith('.py') else module.rsplit('.', 1)[-1]}_{factory}"
    else:
        stem = Path(spec[len("tf:"):].rstrip("/\\")).stem or "model"
    return re.sub(r"[^\w.-]", "_", stem)


def load_source(spec: str, shapes: Mapping[str, tuple[int, ...] | str] | None, work_dir: str | os.PathLike, *,
                dtypes: Mapping[str, str] | None = None, dynamic_batch: bool = True, opset: int = 18,
                check: bool = True, seed: int = 0) -> Path:
    """Export a framework model named on the command line to ``WORK_DIR/<stem>.onnx``; returns the path.

    - ``torch:MODULE:FACTORY`` (MODULE importable from the cwd, or a ``.py`` path): ``shapes`` declares the
      forward arguments in order, ``{"input": (1, 3, 224, 224)}`` (float32) or ``{"input_ids": "1x128:int64"}``
      (``dtypes`` may give ``{"input_ids": "int64"}`` instead). Without shapes the factory must return
      ``(module, example_inputs)``. Axis 0 is exported as the symbolic ``batch`` (``dynamic_batch``), so
      calibration and latency can use any batch size.
    - ``tf:PATH`` (SavedModel folder, ``.keras``, ``.h5``): ``shapes`` only pins unknown non-batch dimensions
      for the check.

    The export is checked against the framework; a mismatch raises ``ExportMismatch`` (exit 1), a bad spec
    or missing extra a ``UserError`` (exit 2).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{source_stem(spec)}.onnx"
    if spec.startswith("torch:"):
        decls = decls_from_shapes(shapes or {}, dtypes)
        export_factory(spec[len("torch:"):], decls or None, dynamic_batch=dynamic_batch, opset=opset, output=out,
                       check=check, seed=seed)
    elif spec.startswith("tf:"):
        if dtypes:
            raise UserError("dtypes cannot be given for tf: sources; the SavedModel/Keras signature has them")
        from_tf(spec[len("tf:"):], input_shapes=shapes, opset=opset, output=out, check=check, seed=seed)
    else:
        raise UserError(f"expected a framework source torch:MODULE:FACTORY or tf:PATH; got {spec!r}")
    return out
