"""Get a student ready for onnxruntime-training 1.19.2 (graphopt side, onnx_ir).

What the training API needs and what graphopt does about it, on a copy (the pipeline's model is only
touched later, when the trained values are written back into its initializers):

- IR version <= 10 and an opset it knows (<= 21): lowered / refused with a clear message.
- Only float parameters may require gradients: the trainable set is every float32 initializer that a node
  uses as a weight (not BatchNorm statistics, shape-like operands or scalars), narrowed by the options.
- BatchNormalization: ORT trains it with batch statistics and never updates the running ones, so the
  trained model would be evaluated with statistics it was not trained with. graphopt instead freezes the
  statistics: each BatchNorm becomes ``(x * invstd - mean * invstd) * reshape(scale) + reshape(bias)`` with
  the same ``scale``/``bias`` parameters, which is exactly BatchNorm in inference mode, in training too.
- Initializers listed as graph inputs are made plain initializers (onnxblock would list them twice).
- LayerNormalization and Dropout get their optional extra outputs declared: ORT's gradient builders read
  them and fail on a node that does not have them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserError

logger = logging.getLogger(__name__)

MAX_IR_VERSION = 10
MAX_OPSET = 21  # onnxruntime-training 1.19.2
MIN_OPSET = 13  # axes as inputs, SoftmaxCrossEntropyLoss

#: Operand positions that are never weights to learn, by op type (None: every operand).
_NOT_WEIGHTS: dict[str, set[int] | None] = {
    "BatchNormalization": {3, 4}, "InstanceNormalization": set(), "Resize": {1, 2, 3}, "Upsample": {1},
    "Clip": {1, 2}, "Pad": {1, 2, 3}, "Slice": {1, 2, 3, 4}, "Expand": {1}, "Tile": {1}, "Reshape": {1},
    "Pow": {1}, "Range": None, "ConstantOfShape": None, "Where": {0}, "TopK": {1}, "Dropout": {1, 2},
    "ReduceSum": {1}, "ReduceMean": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Gather": {1}, "Split": {1},
}


@dataclasses.dataclass
class Preparation:
    model: ir.Model
    requires_grad: list[str]
    batchnorm_frozen: int
    batchnorm_left: list[str]
    trainable_elements: int


def _is_weight_use(node: ir.Node, index: int) -> bool:
    denied = _NOT_WEIGHTS.get(node.op_type, set()) if node.domain in ("", "ai.onnx") else set()
    return denied is not None and index not in denied


def default_trainable(model: ir.Model) -> list[str]:
    """Float32 initializers with more than one element that some node uses only as a weight."""
    names = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if value.dtype != ir.DataType.FLOAT or tensor is None or tensor.size <= 1:
            continue
        uses = list(value.uses())
        if uses and all(_is_weight_use(use.node, use.idx) for use in uses):
            names.append(name)
    return names


def select_parameters(model: ir.Model, trainable: Sequence[str], frozen: Sequence[str]) -> list[str]:
    """The names to train: the default set (or the initializers matching ``trainable``) minus ``frozen``.

    Patterns are shell-style (``fc*``, ``features.0.*``); a pattern that matches nothing is an error, so a
    typo does not silently train everything or nothing.
    """
    inits = model.graph.initializers
    if trainable:
        chosen = []
        for pattern in trainable:
            hits = [n for n in inits if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise UserError(f"option distill.trainable: '{pattern}' matches no initializer of the student")
            for name in hits:
                if inits[name].dtype != ir.DataType.FLOAT:
                    raise UserError(f"option distill.trainable: initializer '{name}' is "
                                    f"{inits[name].dtype}; only float32 initializers can be trained")
                if name not in chosen:
                    chosen.append(name)
    else:
        chosen = default_trainable(model)
    for pattern in frozen:
        hits = [n for n in chosen if fnmatch.fnmatchcase(n, pattern)]
        if not hits and not any(fnmatch.fnmatchcase(n, pattern) for n in inits):
            raise UserError(f"option distill.frozen: '{pattern}' matches no initializer of the student")
        chosen = [n for n in chosen if n not in hits]
    if not chosen:
        raise UserError("the student has no float32 weights to train (after distill.trainable/frozen); "
                        "distill a float model (run distill before quant)")
    return chosen


def _unique(graph: ir.Graph, base: str) -> str:
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    return name


def _const(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=_unique(graph, base), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def freeze_batchnorm(model: ir.Model, requires_grad: Sequence[str]) -> tuple[int, list[str]]:
    """Rewrite inference-mode BatchNorms with constant statistics as frozen-statistics affine maps."""
    graph = model.graph
    done = 0
    left: list[str] = []
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x, scale, bias, mean, var = (list(node.inputs) + [None] * 5)[:5]
        label = node.name or node.outputs[0].name or "BatchNormalization"
        training = node.attributes.get_int("training_mode", 0)
        extra_used = any(out.uses() or out.is_graph_output() for out in node.outputs[1:])
        stats = [v.const_value if v is not None else None for v in (mean, var)]
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if training or extra_used or None in stats or rank is None or rank < 2 or scale is None or bias is None:
            left.append(label)
            continue
        eps = node.attributes.get_float("epsilon", 1e-5)
        mu = stats[0].numpy().astype(np.float64)
        inv = 1.0 / np.sqrt(stats[1].numpy().astype(np.float64) + eps)
        c = mu.shape[0]
        bshape = (c,) + (1,) * (rank - 2)
        inv_v = _const(graph, f"{label}.graphopt_invstd", inv.reshape(bshape).astype(np.float32))
        shift_v = _const(graph, f"{label}.graphopt_shift", (-mu * inv).reshape(bshape).astype(np.float32))
        shape_v = _const(graph, f"{label}.graphopt_shape", np.asarray(bshape, dtype=np.int64))
        mul = ir.node("Mul", [x, inv_v])
        norm = ir.node("Add", [mul.outputs[0], shift_v])
        s = ir.node("Reshape", [scale, shape_v])
        b = ir.node("Reshape", [bias, shape_v])
        scaled = ir.node("Mul", [norm.outputs[0], s.outputs[0]])
        out = ir.node("Add", [scaled.outputs[0], b.outputs[0]])
        out.outputs[0].dtype = node.outputs[0].dtype
        out.outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [mul, norm, s, b, scaled, out],
                                                [node.outputs[0]], [out.outputs[0]])
        for v in (mean, var):
            if v is not None and v.is_initializer() and not v.uses() and v.name not in requires_grad:
                graph.initializers.pop(v.name, None)
        done += 1
    if left:
        logger.warning("BatchNormalization nodes kept as they are (ORT trains them with batch statistics): %s",
                       ", ".join(left))
    return done, left


#: Ops whose gradient in ORT training reads outputs an inference graph usually leaves out (LayerNorm's
#: mean and inverse std, Dropout's mask): the training copy declares them, unused.
_GRADIENT_OUTPUTS = {"LayerNormalization": 3, "Dropout": 2}


def declare_gradient_outputs(model: ir.Model) -> int:
    changed = 0
    for node in model.graph:
        want = _GRADIENT_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if want is not None and len(node.outputs) < want:
            first = node.outputs[0].name or node.name or node.op_type
            node.resize_outputs(want)
            for i, out in enumerate(node.outputs):
                if not out.name:  # an unnamed output is not written at all
                    out.name = f"{first}.graphopt_out{i}"
            changed += 1
    return changed


def opset_of(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def training_copy(model: ir.Model, requires_grad: Sequence[str]) -> Preparation:
    """A copy of ``model`` that onnxruntime-training 1.19.2 accepts, with the trainable set checked."""
    opset = opset_of(model)
    if opset > MAX_OPSET or opset < MIN_OPSET:
        raise UserError(f"the student uses ONNX opset {opset}; distillation (onnxruntime-training 1.19.2) "
                        f"needs opset {MIN_OPSET}..{MAX_OPSET}: convert it with onnx.version_converter first")
    copy = model.clone()
    copy.ir_version = min(copy.ir_version, MAX_IR_VERSION)
    graph = copy.graph
    as_inputs = [v for v in graph.inputs if v.is_initializer()]
    for value in as_inputs:
        graph.inputs.remove(value)
    done, left = freeze_batchnorm(copy, requires_grad)
    declare_gradient_outputs(copy)
    kept = [n for n in requires_grad if n in graph.initializers and graph.initializers[n].uses()]
    dropped = [n for n in requires_grad if n not in kept]
    if dropped:  # e.g. BatchNorm statistics named in distill.trainable: they are always frozen
        logger.warning("not training %s: frozen BatchNorm statistics or unused", ", ".join(dropped))
    if not kept:
        raise UserError("none of the chosen initializers can be trained (BatchNorm statistics are always "
                        "frozen); check distill.trainable")
    elements = sum(graph.initializers[n].const_value.size for n in kept)  # type: ignore[union-attr]
    return Preparation(copy, kept, done, left, int(elements))
