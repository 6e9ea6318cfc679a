"""quant, part 1: get the graph ready and decide which nodes run in int8 and which tensors carry Q/DQ.

The plan follows what ONNX Runtime's QDQ fusions need to turn a quantized graph into int8 kernels:
- compute layers (Conv, ConvTranspose, Gemm, MatMul) get DequantizeLinear on their activation inputs and
  weights, and Conv a QuantizeLinear on its output (QLinearConv produces int8); MatMul/Gemm outputs are
  quantized only when the next node runs in int8 too (otherwise ORT makes MatMulIntegerToFloat / a float
  QGemm output, which is both faster and more accurate than a Q/DQ round trip);
- a Relu right after a quantized layer is absorbed: the layer's output is quantized with the Relu's range
  and a zero point at the bottom of the type, which clamps exactly as the Relu did;
- between quantized layers, the ops ORT has int8 kernels or QDQ-dropping rules for (Add → QLinearAdd,
  GlobalAveragePool, AveragePool, Concat; MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze keep
  their input's scale) run in int8 too, so no float round trip sits between two int8 kernels.
Everything is keyed by value name; the plan is computed on the preprocessed float model, which is also
the model calibrated.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from graphopt.passes.cleanup import CleanupOptions, CleanupPass

logger = logging.getLogger(__name__)

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: int8 through these keeps the input's scale and zero point (ORT drops their Q/DQ pair).
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
#: int8 kernels with their own output scale.
QLINEAR_OPS = frozenset({"Add", "GlobalAveragePool", "AveragePool", "Concat"})
#: Ops that only appear in models that are quantized already.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm", "QLinearAdd", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QAttention", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "MatMulBnb4", "GatherBlockQuantized",
})


def quantized_op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is an initializer (what cleanup turns every constant into)."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


# --- preprocessing ------------------------------------------------------------------------------------

def _reduce_mean_to_gap(model: ir.Model) -> int:
    """ReduceMean over H and W of an NCHW tensor (keepdims) → GlobalAveragePool, which ORT runs in int8."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x is None or x.shape is None or len(x.shape) != 4 or _int_attr(node, "keepdims", 1) != 1:
            continue
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = constant_array(node.inputs[1])
        else:
            attr = node.attributes.get("axes")
            axes = None if attr is None else np.asarray(attr.value)
        if axes is None or sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) != [2, 3]:
            continue
        gap = ir.node("GlobalAveragePool", [x], name=node.name or None)
        out = node.outputs[0]
        gap.outputs[0].name, gap.outputs[0].type, gap.outputs[0].shape = None, out.type, out.shape
        model.graph.insert_after(node, gap)
        name = out.name
        out.replace_all_uses_with(gap.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        gap.outputs[0].name = name
        count += 1
    return count


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.value]


def stem_space_to_depth(model: ir.Model, eligible: Callable[[ir.Node], bool]) -> int:
    """Rewrite stride-2 convolutions with few input channels (the 7x7 stem of ImageNet CNNs) as
    Pad → SpaceToDepth(2) → stride-1 convolution on 4x the channels with a half-size kernel.

    Exact (the same sums; the kernel is zero-extended to an even size). Why: ORT's int8 convolution is
    inefficient with 3 input channels and a 7x7x3 = 147-long dot product; on 12 channels it runs ~30%
    faster (resnet_small: the stem goes from ~19% to ~14% of int8 time at batch 8).
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not eligible(node):
            continue
        x, w_value = node.inputs[0], node.inputs[1]
        w = constant_array(w_value)
        if x is None or w is None or w.ndim != 4 or x.shape is None or len(x.shape) != 4:
            continue
        m, c, kh, kw = w.shape
        h_in, w_in = x.shape[2], x.shape[3]
        if (c > 4 or kh != kw or kh < 5 or not isinstance(h_in, int) or not isinstance(w_in, int)
                or _int_attr(node, "group", 1) != 1 or _ints(node, "strides", [1, 1]) != [2, 2]
                or _ints(node, "dilations", [1, 1]) != [1, 1]
                or (node.attributes.get("auto_pad") is not None
                    and node.attributes["auto_pad"].value not in ("NOTSET", b"NOTSET"))):
            continue
        pt, pl, pb, pr = _ints(node, "pads", [0, 0, 0, 0])
        extra = []
        for size, lo, hi in ((h_in, pt, pb), (w_in, pl, pr)):
            padded = size + lo + hi
            if kh % 2 == 0 and padded % 2:
                break  # would need cropping; leave it
            extra.append(1 if padded % 2 else 0)
        if len(extra) != 2:
            continue
        k8 = kh + kh % 2
        w8 = np.zeros((m, c, k8, k8), w.dtype)
        w8[:, :, :kh, :kw] = w
        # SpaceToDepth puts input pixel (2i+p, 2j+q) of channel c at channel (p*2+q)*C + c.
        w2 = w8.reshape(m, c, k8 // 2, 2, k8 // 2, 2).transpose(0, 3, 5, 1, 2, 4).reshape(m, 4 * c, k8 // 2, k8 // 2)
        graph = model.graph
        pads = ir.Value(name=f"{node.name}_s2d_pads", const_value=ir.tensor(
            np.array([0, 0, pt, pl, 0, 0, pb + extra[0], pr + extra[1]], np.int64)))
        weight = ir.Value(name=f"{w_value.name}_s2d", const_value=ir.tensor(np.ascontiguousarray(w2)))
        for v in (pads, weight):
            v.type, v.shape = ir.TensorType(v.const_value.dtype), v.const_value.shape  # type: ignore[union-attr]
            graph.register_initializer(v)
        pad = ir.node("Pad", [x, pads], {"mode": "constant"}, name=f"{node.name}_s2d_Pad")
        s2d = ir.node("SpaceToDepth", [pad.outputs[0]], {"blocksize": 2}, name=f"{node.name}_s2d")
        hp, wp = h_in + pt + pb + extra[0], w_in + pl + pr + extra[1]
        for out, shape in ((pad.outputs[0], [x.shape[0], c, hp, wp]), (s2d.outputs[0], [x.shape[0], 4 * c, hp // 2, wp // 2])):
            out.name = f"{x.name}_{node.name}_s2d{'_pad' if out is pad.outputs[0] else ''}"
            out.type, out.shape = x.type, ir.Shape(shape)
        inputs = [s2d.outputs[0], weight] + list(node.inputs[2:])
        conv = ir.node("Conv", inputs, {"kernel_shape": [k8 // 2, k8 // 2], "strides": [1, 1], "pads": [0, 0, 0, 0],
                                         "group": 1}, name=node.name)
        old = node.outputs[0]
        conv.outputs[0].type, conv.outputs[0].shape = old.type, old.shape
        graph.insert_before(node, [pad, s2d, conv])
        name = old.name
        old.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        conv.outputs[0].name = name
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count


def preprocess(model: ir.Model, context: object) -> dict[str, int]:
    """What ORT's quant_pre_process does, on the onnx_ir graph: fold constants and BatchNorm, drop
    Identity, infer shapes; plus ReduceMean → GlobalAveragePool. Returns counts of what changed."""
    before = sum(1 for _ in model.graph)
    bn = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
    cleanup = CleanupPass(CleanupOptions(fold_batchnorm=True, fold_size_limit=1 << 22), context)  # type: ignore[arg-type]
    cleanup(model)
    gap = _reduce_mean_to_gap(model)
    ShapeInferencePass(check_type=False, strict_mode=False)(model)
    after = sum(1 for _ in model.graph)
    return {"nodes_before": before, "nodes_after": after, "batchnorm_folded":
            bn - sum(1 for n in model.graph if n.op_type == "BatchNormalization"), "reducemean_to_gap": gap}


# --- selection ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Layer:
    """A compute node to run in int8."""

    node: ir.Node
    act_inputs: list[int]
    weight_index: int | None = None
    axis: int | None = None  # per-channel axis of the weight; None: per-tensor
    bias_index: int | None = None
    transpose_weight: bool = False  # Gemm transB=1 (dynamic / weight-only need [K, N])

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or self.node.op_type


@dataclasses.dataclass
class Selection:
    """Which nodes, excluded by the options or by what they are, and why."""

    op_types: tuple[str, ...]
    exclude_nodes: frozenset[str] = frozenset()
    exclude_op_types: frozenset[str] = frozenset()
    exclude_regex: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    matmul_activations: bool = True
    keep_float: frozenset[str] = frozenset()  # layers the accuracy fallback keeps in float

    def excluded(self, node: ir.Node) -> str | None:
        name = node.name or ""
        if node.op_type in self.exclude_op_types:
            return "excluded by op type"
        if name in self.exclude_nodes:
            return "excluded by name"
        if any(re.search(p, name) for p in self.exclude_regex):
            return "excluded by regex"
        if name in self.keep_float:
            return "kept in float by the accuracy fallback"
        return None


def _layer_for(node: ir.Node, sel: Selection) -> tuple[Layer | None, str]:
    """Describe how ``node`` is quantized, or say why it is not."""
    op = node.op_type
    x = node.inputs[0] if node.inputs else None
    if not is_float32(x):
        return None, "input is not float32"
    if op in ("Conv", "ConvTranspose"):
        w = constant_array(node.inputs[1])
        if w is None:
            return None, "weight is not a constant"
        b = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if b is not None and constant_array(node.inputs[2]) is None:
            return None, "bias is not a constant"
        # output channels: axis 0 of a Conv weight, axis 1 of a ConvTranspose's (per channel only ungrouped)
        axis = 0 if op == "Conv" else (1 if _int_attr(node, "group", 1) == 1 else None)
        return Layer(node, [0], 1, axis, b), ""
    if op == "Gemm":
        if _int_attr(node, "transA", 0) or _float_attr(node, "alpha", 1.0) != 1.0 \
                or _float_attr(node, "beta", 1.0) != 1.0:
            return None, "Gemm with transA, alpha or beta is not quantized"
        w = constant_array(node.inputs[1])
        if w is None or w.ndim != 2:
            return None, "weight is not a constant matrix"
        trans_b = bool(_int_attr(node, "transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        b = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            if c is None or c.shape != (n,):
                return None, "bias is not a constant vector of the output size"
            b = 2
        return Layer(node, [0], 1, 0 if trans_b else 1, b, transpose_weight=trans_b), ""
    if op == "MatMul":
        w = constant_array(node.inputs[1])
        if w is not None:
            if w.ndim < 2:
                return None, "weight is a vector"
            return Layer(node, [0], 1, 1 if w.ndim == 2 else None), ""
        if constant_array(node.inputs[0]) is not None:
            return None, "constant first input"
        if not sel.matmul_activations:
            return None, "both inputs are activations (static mode with matmul_activations=true quantizes these)"
        if not is_float32(node.inputs[1]):
            return None, "input is not float32"
        return Layer(node, [0, 1]), ""
    return None, f"{op} is not quantized"


def select_layers(model: ir.Model, sel: Selection) -> tuple[list[Layer], list[dict[str, str]]]:
    """Compute layers to quantize (graph order) and a row per candidate left in float with the reason."""
    layers: list[Layer] = []
    skipped: list[dict[str, str]] = []
    for node in model.graph:
        if node.op_type not in sel.op_types or node.domain not in ("", "ai.onnx"):
            continue
        reason = sel.excluded(node)
        layer = None
        if reason is None:
            layer, reason = _layer_for(node, sel)
        if layer is None:
            skipped.append({"name": node.name or "", "op_type": node.op_type, "reason": reason})
        else:
            layers.append(layer)
    for flag, index, why in ((sel.keep_first, 0, "keep_first"), (sel.keep_last, -1, "keep_last")):
        if flag and layers:
            layer = layers.pop(index)
            skipped.append({"name": layer.name, "op_type": layer.node.op_type, "reason": f"kept in float ({why})"})
    return layers, skipped


@dataclasses.dataclass
class Plan:
    layers: list[Layer]
    region: list[ir.Node]  # every node that runs in int8, graph order
    fused_relu: dict[str, str]  # Relu output absorbed -> the layer output that carries its Q instead
    quantized: list[str]  # values that get Q/DQ (after Relu absorption: the layer's own output)
    param_of: dict[str, str]  # quantized value -> value (in the float model) whose range sets its params
    skipped: list[dict[str, str]]

    @property
    def calibrated(self) -> list[str]:
        return sorted(set(self.param_of.values()))


def _sole_relu(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type == "Relu" and node.domain in ("", "ai.onnx") and not node.outputs[0].is_graph_output():
        return node
    return None


def _act_inputs(node: ir.Node) -> list[ir.Value]:
    """The non-constant data inputs of a neighbour op (shape/axes inputs do not count)."""
    if node.op_type in ("Add", "Concat"):
        return [v for v in node.inputs if v is not None]
    return [node.inputs[0]] if node.inputs and node.inputs[0] is not None else []


def make_plan(model: ir.Model, sel: Selection, *, neighbours: bool, fuse_relu: bool) -> Plan:
    """Decide the int8 region and the tensors that carry Q/DQ (see the module docstring)."""
    layers, skipped = select_layers(model, sel)
    layer_nodes = {id(layer.node) for layer in layers}
    region: set[int] = set(layer_nodes)
    order = {id(n): i for i, n in enumerate(model.graph)}

    def eff_out(node: ir.Node) -> ir.Value:
        out = node.outputs[0]
        relu = _sole_relu(out) if fuse_relu and node.op_type not in PASS_THROUGH_OPS else None
        return relu.outputs[0] if relu is not None else out

    def produced_in_region(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None:
            return False
        if id(producer) in region:
            return True
        if producer.op_type == "Relu" and fuse_relu and producer.inputs[0] is not None:
            inner = producer.inputs[0].producer()
            return inner is not None and id(inner) in region and eff_out(inner) is value
        return False

    if neighbours:
        candidates = [n for n in model.graph if n.domain in ("", "ai.onnx") and
                      (n.op_type in PASS_THROUGH_OPS or n.op_type in QLINEAR_OPS) and sel.excluded(n) is None]
        changed = True
        while changed:
            changed = False
            for node in candidates:
                if id(node) in region:
                    continue
                acts = _act_inputs(node)
                if node.op_type == "Add" and len(acts) != 2:
                    continue
                if acts and all(is_float32(v) and constant_array(v) is None and produced_in_region(v) for v in acts):
                    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) <= 1:
                        region.add(id(node))
                        changed = True
        # Drop neighbours that feed nothing int8: they would only add a Q/DQ round trip.
        changed = True
        while changed:
            changed = False
            for node in candidates:
                if id(node) in region and not any(id(c) in region for c in eff_out(node).consumers()):
                    region.discard(id(node))
                    changed = True

    nodes = sorted((n for n in model.graph if id(n) in region), key=lambda n: order[id(n)])
    quantized: dict[str, None] = {}
    param_of: dict[str, str] = {}
    fused: dict[str, str] = {}  # relu output -> the layer output its Q moves to

    def real(value: ir.Value) -> str:
        return fused.get(value.name, value.name)

    for node in nodes:
        out = node.outputs[0]
        is_layer = id(node) in layer_nodes
        target = eff_out(node)
        # A MatMul/Gemm followed by a Relu gets its output quantized too (Relu absorbed): left in float,
        # ORT would fuse Gemm+Relu into a float FusedGemm before its QDQ fusion sees the pattern.
        needs_q = not is_layer or node.op_type in ("Conv", "ConvTranspose") or target is not out or any(
            id(c) in region for c in target.consumers())
        if not needs_q:
            continue
        if target is not out:
            fused[target.name] = out.name
        quantized[out.name] = None
        if node.op_type in PASS_THROUGH_OPS:
            inp = real(_act_inputs(node)[0])
            param_of[out.name] = param_of.get(inp, inp)
        else:
            param_of[out.name] = target.name
    # Activation inputs: of int8 neighbours they are region outputs already; of layers they may be float
    # values (a graph input, a LayerNorm output) that get a Q/DQ of their own.
    inputs = [v for n in nodes if id(n) not in layer_nodes for v in _act_inputs(n)]
    inputs += [layer.node.inputs[i] for layer in layers for i in layer.act_inputs]  # type: ignore[misc]
    for value in inputs:
        name = real(value)
        if name not in param_of:
            quantized[name] = None
            param_of[name] = value.name
    return Plan(layers, nodes, fused, list(quantized), param_of, skipped)
