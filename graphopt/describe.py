"""What ``graphopt inspect`` shows: a model's interface, opsets, op histogram, size and FLOPs by op."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from graphopt.model_io import load_model, model_file_size
from graphopt.stats import count_flops, op_histogram, parameter_count


def _shape_text(value: Any) -> str:
    if value.shape is None:
        return "?"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape) + "]"


def describe_model(path: str | os.PathLike, pins: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    model = load_model(path)
    params, nbytes = parameter_count(model)
    flops = count_flops(model, pins)
    initializers = set(model.graph.initializers)
    histogram = op_histogram(model)
    return {
        "path": str(path),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": [{"name": v.name, "dtype": str(v.dtype.name if v.dtype else "?").lower(), "shape": _shape_text(v)}
                   for v in model.graph.inputs if v.name not in initializers],
        "outputs": [{"name": v.name, "dtype": str(v.dtype.name if v.dtype else "?").lower(), "shape": _shape_text(v)}
                    for v in model.graph.outputs],
        "nodes": sum(histogram.values()),
        "op_histogram": histogram,
        "parameters": params,
        "weight_bytes": nbytes,
        "file_bytes": model_file_size(path),
        "flops": flops.total if flops else None,
        "flops_exact": bool(flops and flops.exact),
        "flops_by_op": flops.by_op if flops else {},
    }
