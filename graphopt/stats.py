"""Model statistics: nodes, parameters, weight bytes and FLOPs per sample, overall and by op type.

FLOPs need concrete shapes, so shape inference runs on a weight-less copy of the graph with the inputs
pinned to one sample (the batch dimension set to 1, other symbolic dimensions from ``--shape``). Weights
are never copied for this: large initializers are swapped for typed graph inputs during inference.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import onnx
import onnx_ir as ir

from graphopt.model_io import call_on_skeleton

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelStats:
    nodes: int
    parameters: int
    bytes: int
    flops: int | None  # per sample; None when shapes could not be inferred
    flops_exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}") for n in _all_nodes(model))
    return dict(counts.most_common())


def parameter_count(model: ir.Model) -> tuple[int, int]:
    params = 0
    nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if t is None:
                continue
            nbytes += t.nbytes
            params += math.prod(t.shape.numpy()) if t.shape is not None else 0
    return params, nbytes


def infer_concrete_shapes(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of every value in the main graph for the given concrete input shapes (weights not copied)."""
    saved: dict[str, ir.Shape | None] = {}
    for value in model.graph.inputs:
        if value.name in input_shapes:
            saved[value.name] = value.shape
            value.shape = ir.Shape(list(input_shapes[value.name]))

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        inferred = call_on_skeleton(infer, model)
    except Exception as exc:
        logger.debug("shape inference for FLOPs failed: %s", exc)
        return {}
    finally:
        for value in model.graph.inputs:
            if value.name in saved:
                value.shape = saved[value.name]
    shapes: dict[str, tuple[int, ...]] = dict(input_shapes)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                break
        else:
            shapes.setdefault(vi.name, tuple(dims))
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.name:
            shapes[value.name] = tuple(value.const_value.shape.numpy())
    return shapes


def _shape(value: ir.Value | None, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.name in shapes:
        return shapes[value.name]
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)  # type: ignore[arg-type]
    return None


_ZERO_COST = {
    "Reshape", "Transpose", "Shape", "Gather", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Split",
    "Identity", "Constant", "ConstantOfShape", "Cast", "Expand", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeLinear", "Range", "Tile", "Pad", "Size", "GatherElements", "ScatterND", "Dropout",
}


def node_flops(node: ir.Node, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """FLOPs (multiply-adds count 2) of one node, or None when its shapes are unknown."""
    op = node.op_type
    out = _shape(node.outputs[0], shapes) if node.outputs else None
    if op in _ZERO_COST:
        return 0
    if op in ("Conv", "QLinearConv", "ConvInteger", "ConvTranspose"):
        w_index = 3 if op == "QLinearConv" else 1
        w = _shape(node.inputs[w_index], shapes)
        if w is None or out is None:
            return None
        if op == "ConvTranspose":  # each input element scatters into C_out/group x kernel outputs
            x = _shape(node.inputs[0], shapes)
            return None if x is None else 2 * math.prod(x) * w[1] * math.prod(w[2:])
        has_bias = op == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None
        return 2 * math.prod(out) * w[1] * math.prod(w[2:]) + (math.prod(out) if has_bias else 0)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = _shape(node.inputs[0], shapes)
        if a is None or out is None:
            return None
        return 2 * math.prod(out) * a[-1]
    if op == "MatMulNBits":
        if out is None:
            return None
        return 2 * math.prod(out) * node.attributes.get_int("K", 0)
    if op in ("Gemm", "QGemm"):
        a = _shape(node.inputs[0], shapes)
        if a is None or out is None:
            return None
        k = a[0] if node.attributes.get_int("transA", 0) else a[-1]
        return 2 * math.prod(out) * k + math.prod(out)
    if out is None:
        return None
    if op in ("MaxPool", "AveragePool"):
        kernel = node.attributes.get_ints("kernel_shape", [1])
        return math.prod(out) * math.prod(kernel)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax"):
        x = _shape(node.inputs[0], shapes)
        return math.prod(x) if x is not None else None
    if op in ("Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization"):
        return 5 * math.prod(out)
    return math.prod(out)


@dataclasses.dataclass
class FlopCount:
    total: int
    by_op: dict[str, int]
    exact: bool


def per_sample_shapes(model: ir.Model, pins: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]] | None:
    """Concrete one-sample input shapes: pinned ones (batch forced to 1), else the spec with batch 1."""
    pins = dict(pins or {})
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.name in pins:
            shapes[value.name] = (1, *pins[value.name][1:])
            continue
        if value.shape is None:
            return None
        dims = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(1)
            else:
                return None
        shapes[value.name] = tuple(dims)
    return shapes


def count_flops(model: ir.Model, pins: Mapping[str, tuple[int, ...]] | None = None) -> FlopCount | None:
    inputs = per_sample_shapes(model, pins)
    if inputs is None:
        return None
    shapes = infer_concrete_shapes(model, inputs)
    total = 0
    exact = True
    by_op: dict[str, int] = collections.Counter()
    for node in model.graph:  # main graph; control-flow bodies are counted as unknown
        f = node_flops(node, shapes)
        if f is None:
            exact = False
            continue
        by_op[node.op_type] += f
        total += f
    return FlopCount(int(total), dict(sorted(by_op.items(), key=lambda kv: -kv[1])), exact)


def model_stats(model: ir.Model, pins: Mapping[str, tuple[int, ...]] | None = None) -> ModelStats:
    params, nbytes = parameter_count(model)
    flops = count_flops(model, pins)
    return ModelStats(
        nodes=len(_all_nodes(model)), parameters=int(params), bytes=int(nbytes),
        flops=None if flops is None else flops.total, flops_exact=bool(flops and flops.exact))


def format_count(n: float | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{n:.0f} B"
