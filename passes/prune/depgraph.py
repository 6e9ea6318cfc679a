"""DepGraph on the ONNX graph: which tensor axes must lose the same channels together.

Torch-Pruning finds coupled layers by tracing PyTorch modules; here the coupling is read off the ONNX
graph itself. Every axis of every tensor the pruner looks at is a *slot*, and every index along a slot is a
*position*. Operator rules link positions that must be removed together (a Conv filter with its bias, the
BatchNormalization parameters after it, the next layer's input channel, the block of flattened features it
owns, the offset range it fills in a Concat, the other branch of a residual Add, ...) in a union-find, so a
prunable channel is an equivalence class of positions across the whole graph, and a *group* is the set of
channels that share slots (all channels of one coupled dimension).

Positions that must keep their place are *fixed*, with the reason: model inputs and outputs, axes an
operator mixes (LayerNormalization, Softmax, reductions), and every tensor an operator without a rule
touches. A fixed position fixes its whole class, which is how an unknown op stops its group.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .layers import is_constant

logger = logging.getLogger(__name__)

#: Ops whose outputs are their inputs combined position by position (numpy broadcasting).
ELEMENTWISE = frozenset("""
Add Sub Mul Div Pow Max Min Mean Sum Mod Where PRelu BitShift And Or Xor Not Equal Less Greater LessOrEqual
GreaterOrEqual Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Erf Exp Log Sqrt Reciprocal Neg Abs Clip Elu
Selu Celu Softplus Softsign Gelu Mish ThresholdedRelu Identity Cast Dropout Floor Ceil Round Sign Sin Cos Tan
Asin Acos Atan Sinh Cosh Asinh Acosh Atanh IsNaN IsInf Shrink
""".split())
POOLS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
REDUCES = frozenset("ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
                    "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin".split())
RESHAPES = frozenset("Reshape Flatten Squeeze Unsqueeze".split())


@dataclasses.dataclass(eq=False)
class Slot:
    """One axis of one tensor: ``size`` positions with ids ``start .. start+size-1`` in the union-find."""

    value: ir.Value
    axis: int
    size: int
    start: int

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclasses.dataclass(eq=False)
class Site:
    """A contraction of a computed tensor with a constant weight (Conv, Gemm, MatMul input channels).

    The only places where a removed channel's value can reach channels that stay; its constant is
    folded into the bias here.
    """

    node: ir.Node
    act_index: int
    act_axis: int
    weight_index: int
    out_axis: int  # the output axis whose channels the weight produces


@dataclasses.dataclass(eq=False)
class WeightSlot:
    slot: Slot
    node: ir.Node
    role: str  # "out": zeroing it zeroes output channels (a producer); "in": consumes input channels


@dataclasses.dataclass
class Stop:
    """An operator that stopped channels from being pruned: shown in the report."""

    node: str
    op: str
    reason: str


class UnionFind:
    """Union-find over position ids; the root of a class is its smallest id (deterministic)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))


class DepGraph:
    """Builds slots, links and fixed positions for a model; see the module docstring.

    ``shapes`` are concrete shapes of every value for one batch size and ``dynamic`` names the
    (value, axis) pairs whose size changes with the batch (a reshape that moves them is not understood).
    """

    def __init__(self, model: ir.Model, shapes: Mapping[str, tuple[int, ...]],
                 dynamic: set[tuple[str, int]], *, prune_heads: bool = True) -> None:
        self.model = model
        self.shapes = shapes
        self.dynamic = dynamic
        self.prune_heads = prune_heads
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
        self.opset = int(opset)
        self.uf = UnionFind()
        self.slots: dict[tuple[ir.Value, int], Slot] = {}
        self.fixed: list[tuple[Slot, str]] = []
        self.weight_slots: list[WeightSlot] = []
        self.sites: list[Site] = []
        self.fixups: list[Callable[[Callable[[ir.Value, int], int]], None]] = []
        self.stops: list[Stop] = []
        self.depthwise: dict[ir.Node, int] = {}  # grouped convs whose group count follows the channels

    # ----------------------------------------------------------------- slots and links
    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(int(d) for d in value.const_value.shape)
        if value.name in self.shapes:
            return self.shapes[value.name]
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return tuple(value.shape)  # type: ignore[arg-type]
        return None

    def slot(self, value: ir.Value, axis: int) -> Slot:
        shape = self.shape(value)
        assert shape is not None
        axis = axis % len(shape)
        key = (value, axis)
        found = self.slots.get(key)
        if found is None:
            found = Slot(value, axis, shape[axis], self.uf.add(shape[axis]))
            self.slots[key] = found
        return found

    def link(self, a: Slot, a_pos: np.ndarray, b: Slot, b_pos: np.ndarray) -> None:
        for i, j in zip((a.start + np.asarray(a_pos)).tolist(), (b.start + np.asarray(b_pos)).tolist()):
            self.uf.union(i, j)

    def link_same(self, a: Slot, b: Slot) -> None:
        if a.size != b.size:
            raise ValueError(f"cannot link {a.value.name}[{a.axis}] ({a.size}) with {b.value.name}[{b.axis}] ({b.size})")
        self.link(a, np.arange(a.size), b, np.arange(b.size))

    def link_axes(self, a: ir.Value, a_axis: int, b: ir.Value, b_axis: int) -> None:
        self.link_same(self.slot(a, a_axis), self.slot(b, b_axis))

    def fix(self, value: ir.Value, reason: str, axes: Sequence[int] | None = None) -> None:
        shape = self.shape(value)
        if shape is None:
            return
        for axis in range(len(shape)) if axes is None else axes:
            self.fixed.append((self.slot(value, axis), reason))

    def fix_node(self, node: ir.Node, reason: str) -> None:
        """Leave every tensor the node touches as it is (and say why in the report)."""
        self.stops.append(Stop(node.name or "", node.op_type, reason))
        for value in list(node.inputs) + list(node.outputs):
            if value is not None:
                self.fix(value, f"{node.op_type} '{node.name}': {reason}")

    def weight(self, node: ir.Node, value: ir.Value, axis: int, role: str) -> Slot:
        slot = self.slot(value, axis)
        self.weight_slots.append(WeightSlot(slot, node, role))
        return slot

    def is_dynamic(self, value: ir.Value, axis: int) -> bool:
        return (value.name, axis) in self.dynamic

    # ----------------------------------------------------------------- building
    def build(self) -> DepGraph:
        graph = self.model.graph
        for value in graph.inputs:
            self.fix(value, f"model input '{value.name}'")
        for value in graph.outputs:
            self.fix(value, f"model output '{value.name}'")
        for node in graph:
            rule = self._rule(node)
            try:
                missing = [v for v in list(node.inputs) + list(node.outputs)
                           if v is not None and self.shape(v) is None and (v.uses() or v.is_graph_output()
                                                                          or v in node.inputs)]
                if missing:
                    self.fix_node(node, f"shape of '{missing[0].name}' is unknown")
                elif rule is None:
                    self.fix_node(node, "operator not understood by the channel pruner")
                else:
                    rule(node)
            except _Unsupported as exc:
                self.fix_node(node, str(exc))
            except (ValueError, AssertionError, IndexError, TypeError) as exc:
                # A rule meeting a case it does not cover leaves the node alone: always safe, only less pruned.
                logger.debug("prune: rule for %s '%s' failed", node.op_type, node.name, exc_info=True)
                self.fix_node(node, f"not understood here ({type(exc).__name__}: {exc})")
        return self

    def _rule(self, node: ir.Node) -> Callable[[ir.Node], None] | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return self._subgraph
        op = node.op_type
        if op in ELEMENTWISE:
            return self._elementwise
        if op in POOLS:
            return self._pool
        if op in REDUCES:
            return self._reduce
        if op in RESHAPES:
            return self._reshape
        return {
            "BatchNormalization": self._batchnorm, "InstanceNormalization": self._instancenorm,
            "LayerNormalization": self._layernorm, "Softmax": self._softmax, "LogSoftmax": self._softmax,
            "Hardmax": self._softmax, "Conv": self._conv, "ConvTranspose": self._conv_transpose,
            "Gemm": self._gemm, "MatMul": self._matmul, "Transpose": self._transpose, "Concat": self._concat,
            "Split": self._split, "Gather": self._gather, "Slice": self._slice, "Pad": self._pad,
            "Shape": self._shape_reader, "Size": self._shape_reader, "CastLike": self._castlike,
            "QuantizeLinear": self._qdq, "DequantizeLinear": self._qdq,
        }.get(op)

    # ----------------------------------------------------------------- rules
    def _broadcast(self, node: ir.Node, inputs: Sequence[ir.Value | None], out: ir.Value) -> None:
        """Link inputs to ``out`` under numpy broadcasting.

        A computed (non-constant) input broadcast along an output axis would make a removed channel's
        value depend on the data, so that output axis is fixed.
        """
        oshape = self.shape(out)
        assert oshape is not None
        r = len(oshape)
        for value in inputs:
            if value is None:
                continue
            ishape = self.shape(value)
            assert ishape is not None
            lead = r - len(ishape)
            for oa in range(r):
                ia = oa - lead
                if ia >= 0 and ishape[ia] == oshape[oa]:
                    self.link_axes(value, ia, out, oa)
                elif not is_constant(value) and oshape[oa] > 1:
                    self.fixed.append((self.slot(out, oa),
                                       f"{node.op_type} '{node.name}' broadcasts computed '{value.name}' along it"))

    def _elementwise(self, node: ir.Node) -> None:
        for out in node.outputs:
            if self.shape(out) is not None:
                self._broadcast(node, node.inputs, out)

    def _castlike(self, node: ir.Node) -> None:
        self._broadcast(node, node.inputs[:1], node.outputs[0])

    def _qdq(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        scale = node.inputs[1]
        rank = len(self.shape(x) or ())
        for a in range(rank):
            self.link_axes(x, a, y, a)
        params = [v for v in node.inputs[1:] if v is not None]
        if scale is not None and len(self.shape(scale) or ()) == 1 and (self.shape(scale) or (1,))[0] > 1:
            axis = node.attributes.get_int("axis", 1) % rank
            for p in params:
                self.link_axes(p, 0, y, axis)
        elif any(len(self.shape(p) or ()) > 1 for p in params):
            raise _Unsupported("blocked quantization parameters")

    def _batchnorm(self, node: ir.Node) -> None:
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise _Unsupported("training-mode BatchNormalization")
        x, y = node.inputs[0], node.outputs[0]
        for a in range(len(self.shape(x) or ())):
            self.link_axes(x, a, y, a)
        for p in node.inputs[1:5]:
            if p is not None:
                self.link_axes(p, 0, y, 1)

    def _instancenorm(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        for a in range(len(self.shape(x) or ())):
            self.link_axes(x, a, y, a)
        for p in node.inputs[1:3]:
            if p is not None:
                self.link_axes(p, 0, y, 1)

    def _layernorm(self, node: ir.Node) -> None:
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise _Unsupported("LayerNormalization statistics outputs are used")
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        axis = node.attributes.get_int("axis", -1) % rank
        reason = f"LayerNormalization '{node.name}' normalizes over this axis"
        for a in range(rank):
            self.link_axes(x, a, y, a)
            if a >= axis:
                self.fixed.append((self.slot(x, a), reason))
        for p in node.inputs[1:3]:
            if p is not None:
                pr = len(self.shape(p) or ())
                for k in range(pr):
                    if self.shape(p)[k] == self.shape(x)[rank - pr + k]:  # type: ignore[index]
                        self.link_axes(p, k, x, rank - pr + k)

    def _softmax(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        axis = node.attributes.get_int("axis", -1 if self.opset >= 13 else 1) % rank
        mixed = {axis} if self.opset >= 13 else set(range(axis, rank))
        for a in range(rank):
            self.link_axes(x, a, y, a)
            if a in mixed:
                self.fixed.append((self.slot(x, a), f"{node.op_type} '{node.name}' normalizes over this axis"))

    def _pool(self, node: ir.Node) -> None:
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            raise _Unsupported("MaxPool indices output is used")
        x, y = node.inputs[0], node.outputs[0]
        self.link_axes(x, 0, y, 0)
        self.link_axes(x, 1, y, 1)

    def _axes_input(self, node: ir.Node, index: int, attr: str) -> list[int] | None:
        """Constant axes from an input (newer opsets) or an attribute; [] when absent, None if unknown."""
        if len(node.inputs) > index and node.inputs[index] is not None:
            tensor = ir.convenience.get_const_tensor(node.inputs[index])
            return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
        if attr in node.attributes:
            return list(node.attributes.get_ints(attr, []))
        return []

    def _reduce(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        keepdims = node.attributes.get_int("keepdims", 1)
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [node.attributes.get_int("axis", 0)]
        else:
            axes = self._axes_input(node, 1, "axes")
            if axes is None:
                raise _Unsupported("reduction axes are computed")
            if not axes:
                axes = [] if node.attributes.get_int("noop_with_empty_axes", 0) else list(range(rank))
        reduced = {a % rank for a in axes}
        j = 0
        for a in range(rank):
            if a in reduced:
                self.fixed.append((self.slot(x, a), f"{node.op_type} '{node.name}' reduces over this axis"))
                if keepdims:
                    j += 1
                continue
            self.link_axes(x, a, y, j)
            j += 1

    def _transpose(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        perm = node.attributes.get_ints("perm", list(reversed(range(rank))))
        for i, p in enumerate(perm):
            self.link_axes(y, i, x, p)

    def _concat(self, node: ir.Node) -> None:
        y = node.outputs[0]
        rank = len(self.shape(y) or ())
        axis = node.attributes.get_int("axis", 0) % rank
        offset = 0
        out = self.slot(y, axis)
        for x in node.inputs:
            if x is None:
                continue
            xs = self.shape(x)
            assert xs is not None
            for a in range(rank):
                if a != axis:
                    self.link_axes(x, a, y, a)
            if xs[axis]:
                self.link(self.slot(x, axis), np.arange(xs[axis]), out, offset + np.arange(xs[axis]))
            offset += xs[axis]

    def _split(self, node: ir.Node) -> None:
        x = node.inputs[0]
        rank = len(self.shape(x) or ())
        axis = node.attributes.get_int("axis", 0) % rank
        if len(node.inputs) > 1 and node.inputs[1] is not None and \
                ir.convenience.get_const_tensor(node.inputs[1]) is None:
            raise _Unsupported("split sizes are computed")
        src = self.slot(x, axis)
        offset = 0
        for y in node.outputs:
            ys = self.shape(y)
            assert ys is not None
            for a in range(rank):
                if a != axis:
                    self.link_axes(x, a, y, a)
            self.link(src, offset + np.arange(ys[axis]), self.slot(y, axis), np.arange(ys[axis]))
            offset += ys[axis]

        def fixup(new_size: Callable[[ir.Value, int], int]) -> None:
            sizes = [new_size(y, axis) for y in node.outputs]
            if sizes == [self.shape(y)[axis] for y in node.outputs]:  # type: ignore[index]
                return
            if self.opset >= 13:
                if "num_outputs" in node.attributes:
                    del node.attributes["num_outputs"]
                value = new_initializer(self.model.graph, f"{node.name or 'split'}_sizes",
                                        np.array(sizes, dtype=np.int64))
                if len(node.inputs) < 2:
                    node.resize_inputs(2)
                node.replace_input_with(1, value)
            else:
                node.attributes["split"] = ir.AttrInt64s("split", sizes)

        self.fixups.append(fixup)

    def _gather(self, node: ir.Node) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ds, xs = self.shape(data), self.shape(indices)
        assert ds is not None and xs is not None
        axis = node.attributes.get_int("axis", 0) % len(ds)
        self.fixed.append((self.slot(data, axis), f"Gather '{node.name}' indexes this axis"))
        for a in range(axis):
            self.link_axes(data, a, y, a)
        for k in range(len(xs)):
            self.link_axes(indices, k, y, axis + k)
        for a in range(axis + 1, len(ds)):
            slot = self.slot(data, a)
            self.link_same(slot, self.slot(y, a - 1 + len(xs)))
            if is_constant(data) and len(ds) == 2:  # an embedding table: its columns make output channels
                self.weight_slots.append(WeightSlot(slot, node, "out"))

    def _slice(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        for v in node.inputs[1:]:
            if v is not None and ir.convenience.get_const_tensor(v) is None:
                raise _Unsupported("slice bounds are computed")
        axes = self._axes_input(node, 3, "axes") or []
        if not axes:
            starts = node.inputs[1] if len(node.inputs) > 1 else None
            n = len(ir.convenience.get_const_tensor(starts).numpy().reshape(-1)) if starts is not None else rank  # type: ignore[union-attr]
            axes = list(range(n))
        sliced = {a % rank for a in axes}
        for a in range(rank):
            if a in sliced:
                self.fixed.append((self.slot(x, a), f"Slice '{node.name}' slices this axis"))
                self.fixed.append((self.slot(y, a), f"Slice '{node.name}' slices this axis"))
            else:
                self.link_axes(x, a, y, a)

    def _pad(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x) or ())
        pads_t = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if pads_t is None:
            raise _Unsupported("pads are computed")
        pads = pads_t.numpy().reshape(-1).tolist()
        axes = self._axes_input(node, 3, "") or list(range(rank))
        padded = {a % rank for i, a in enumerate(axes) if pads[i] or pads[i + len(axes)]}
        for a in range(rank):
            if a in padded:
                self.fixed.append((self.slot(y, a), f"Pad '{node.name}' pads this axis"))
                self.fixed.append((self.slot(x, a), f"Pad '{node.name}' pads this axis"))
            else:
                self.link_axes(x, a, y, a)

    def _shape_reader(self, node: ir.Node) -> None:
        self.fix(node.inputs[0], f"{node.op_type} '{node.name}' reads its shape")  # type: ignore[arg-type]

    def _subgraph(self, node: ir.Node) -> None:
        self.fix_node(node, "control flow is not pruned through")
        for attr in node.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for sub in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for value in inner.inputs:  # values captured from the outer graph
                        if value is not None and value.graph is self.model.graph:
                            self.fix(value, f"used inside a subgraph of {node.op_type} '{node.name}'")

    def _reshape(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        xs, ys = self.shape(x), self.shape(y)
        assert xs is not None and ys is not None
        target = None
        if node.op_type == "Reshape":
            tensor = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
            if tensor is None:
                raise _Unsupported("target shape is computed")
            target = [int(t) for t in tensor.numpy().reshape(-1)]
            if node.attributes.get_int("allowzero", 0) and 0 in target:
                raise _Unsupported("allowzero with a zero in the target shape")
        groups = reshape_groups(xs, ys)
        if groups is None:
            raise _Unsupported(f"cannot match {list(xs)} to {list(ys)}")
        for gi, go in groups:
            self._reshape_group(node, x, y, gi, go)
        if target is None:
            return
        shape_value = node.inputs[1]

        def fixup(new_size: Callable[[ir.Value, int], int]) -> None:
            new = [t if t <= 0 else new_size(y, i) for i, t in enumerate(target)]
            if new != target:
                value = new_initializer(self.model.graph, f"{shape_value.name or 'shape'}_pruned",  # type: ignore[union-attr]
                                        np.array(new, dtype=np.int64))
                node.replace_input_with(1, value)

        self.fixups.append(fixup)

    def _reshape_group(self, node: ir.Node, x: ir.Value, y: ir.Value, gi: list[int], go: list[int]) -> None:
        xs, ys = self.shape(x), self.shape(y)
        assert xs is not None and ys is not None
        if len(gi) == 1 and len(go) == 1:
            self.link_axes(x, gi[0], y, go[0])
            return
        nz_in = [a for a in gi if xs[a] > 1]
        nz_out = [a for a in go if ys[a] > 1]
        dynamic = any(self.is_dynamic(x, a) for a in gi) or any(self.is_dynamic(y, a) for a in go)
        reason = f"{node.op_type} '{node.name}'"
        if dynamic or (len(nz_in) > 1 and len(nz_out) > 1):
            why = "reshapes a dynamic dimension" if dynamic else "regroups several axes"
            for a in gi:
                self.fixed.append((self.slot(x, a), f"{reason} {why}"))
            for a in go:
                self.fixed.append((self.slot(y, a), f"{reason} {why}"))
            return
        if not nz_in or not nz_out:
            return  # only size-1 axes
        if len(nz_out) == 1:  # several axes merge into one: the outer one owns blocks of the merged axis
            many, many_axes, one, one_axis, kind = x, nz_in, y, nz_out[0], "merged"
        else:  # one axis splits into several (e.g. hidden -> heads x head_dim): the outer one owns blocks
            many, many_axes, one, one_axis, kind = y, nz_out, x, nz_in[0], "split"
        outer, inner = many_axes[0], many_axes[1:]
        many_shape = self.shape(many)
        assert many_shape is not None
        if kind == "split" and inner and not self.prune_heads:
            why = f"{reason} splits this axis into heads (prune.prune_heads=false)"
            for a in many_axes:
                self.fixed.append((self.slot(many, a), why))
            self.fixed.append((self.slot(one, one_axis), why))
            return
        block = math.prod(many_shape[a] for a in inner)
        outer_slot, one_slot = self.slot(many, outer), self.slot(one, one_axis)
        pos = np.arange(outer_slot.size)
        for r in range(block):
            self.link(outer_slot, pos, one_slot, pos * block + r)
        for a in inner:
            self.fixed.append((self.slot(many, a), f"{reason}: inner part of a {kind} axis"))

    def _conv(self, node: ir.Node) -> None:
        x, w, b = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        if not is_constant(w) or is_constant(x):
            raise _Unsupported("weights are not a constant")
        assert w is not None and x is not None
        ws = self.shape(w)
        assert ws is not None
        group = node.attributes.get_int("group", 1)
        cin, cout, cin_g = self.shape(x)[1], ws[0], ws[1]  # type: ignore[index]
        self.link_axes(x, 0, y, 0)
        out = self.weight(node, w, 0, "out")
        self.link_same(out, self.slot(y, 1))
        if b is not None:
            self.link_axes(b, 0, y, 1)
        if group == 1:
            self.link_same(self.slot(x, 1), self.weight(node, w, 1, "in"))
            self.sites.append(Site(node, 0, 1, 1, 1))
        elif cin_g == 1:  # depthwise (times a multiplier): input channel i makes outputs i*m .. i*m+m-1
            m = cout // group
            for j in range(m):
                self.link(self.slot(x, 1), np.arange(cin), out, np.arange(cin) * m + j)
            self.depthwise[node] = group
        else:  # grouped: local index j of every group goes together, so groups shrink alike
            cout_g = cout // group
            xin, win = self.slot(x, 1), self.weight(node, w, 1, "in")
            for g in range(group):
                self.link(xin, g * cin_g + np.arange(cin_g), win, np.arange(cin_g))
                self.link(out, g * cout_g + np.arange(cout_g), out, np.arange(cout_g))
            self.sites.append(Site(node, 0, 1, 1, 1))

    def _conv_transpose(self, node: ir.Node) -> None:
        x, w, b = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        if not is_constant(w) or is_constant(x) or node.attributes.get_int("group", 1) != 1:
            raise _Unsupported("only ungrouped ConvTranspose with constant weights is pruned")
        assert w is not None and x is not None
        self.link_axes(x, 0, y, 0)
        self.link_same(self.slot(x, 1), self.weight(node, w, 0, "in"))
        self.link_same(self.weight(node, w, 1, "out"), self.slot(y, 1))
        if b is not None:
            self.link_axes(b, 0, y, 1)
        self.sites.append(Site(node, 0, 1, 1, 1))

    def _gemm(self, node: ir.Node) -> None:
        a, b, c = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        assert a is not None and b is not None
        ta, tb = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
        ak, am = (0, 1) if ta else (1, 0)
        bk, bn = (1, 0) if tb else (0, 1)
        self._contract(node, a, ak, am, 0, b, bk, bn, 1)
        if c is not None:
            self._broadcast(node, [c], y)

    def _matmul(self, node: ir.Node) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        assert a is not None and b is not None
        ra, rb, ry = len(self.shape(a) or ()), len(self.shape(b) or ()), len(self.shape(y) or ())
        if ra < 2 or rb < 2:
            raise _Unsupported("MatMul of a vector")
        # batch axes broadcast like elementwise ops
        ys = self.shape(y)
        assert ys is not None
        for value, rank in ((a, ra), (b, rb)):
            vs = self.shape(value)
            assert vs is not None
            for k in range(rank - 2):
                oa = ry - 2 - (rank - 2) + k
                if vs[k] == ys[oa]:
                    self.link_axes(value, k, y, oa)
                elif not is_constant(value) and ys[oa] > 1:
                    self.fixed.append((self.slot(y, oa), f"MatMul '{node.name}' broadcasts '{value.name}' along it"))
        self._contract(node, a, ra - 1, ra - 2, ry - 2, b, rb - 2, rb - 1, ry - 1)

    def _contract(self, node: ir.Node, a: ir.Value, ak: int, am: int, ym: int, b: ir.Value, bk: int, bn: int,
                  yn: int) -> None:
        """Y[.., m, n] = sum_k A[.., m, k] B[.., k, n], with either operand a constant weight."""
        y = node.outputs[0]
        ca, cb = is_constant(a), is_constant(b)
        if ca and cb:
            raise _Unsupported("both operands are constants")
        a_k = self.weight(node, a, ak, "in") if ca else self.slot(a, ak)
        b_k = self.weight(node, b, bk, "in") if cb else self.slot(b, bk)
        self.link_same(a_k, b_k)
        self.link_same(self.weight(node, a, am, "out") if ca else self.slot(a, am), self.slot(y, ym))
        self.link_same(self.weight(node, b, bn, "out") if cb else self.slot(b, bn), self.slot(y, yn))
        if cb:
            self.sites.append(Site(node, 0, ak, 1, yn))
        elif ca:
            self.sites.append(Site(node, 1, bk, 0, ym))
        else:
            self.fixed.append((a_k, f"{node.op_type} '{node.name}' contracts two computed tensors over it"))


class _Unsupported(Exception):
    pass


def reshape_groups(xs: Sequence[int], ys: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes whose sizes multiply to the same number."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    while i < len(xs) or j < len(ys):
        gi: list[int] = []
        go: list[int] = []
        pi = pj = 1
        if i < len(xs):
            gi.append(i)
            pi *= xs[i]
            i += 1
        if j < len(ys):
            go.append(j)
            pj *= ys[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(xs):
                gi.append(i)
                pi *= xs[i]
                i += 1
            elif pj < pi and j < len(ys):
                go.append(j)
                pj *= ys[j]
                j += 1
            else:
                return None
        groups.append((gi, go))
    return groups


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register a constant under a name not yet used in the graph."""
    name, n = base, 1
    while name in graph.initializers:
        n += 1
        name = f"{base}_{n}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
