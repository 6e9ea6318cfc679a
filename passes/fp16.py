"""fp16: float16 (or bfloat16) weights and computation, for GPU deployment.

Every node is given a precision: *low* (float16/bfloat16) or *float32*. A node stays float32 when its op is
on the provider's block list (``POLICIES``; extend it with ``block_ops``, shrink it with ``allow_ops``), its
name matches ``block_nodes``, its domain is not one whose ops take float16, it holds a subgraph, or shape
inference could not type its values. Data-movement ops (Reshape, Transpose, Gather, ...) compute nothing, so
they follow the precision of their activation input instead of forcing one: converting them alone would
only add Casts. Initializers, Constant nodes and Cast-to-float nodes are "flexible": they take the
precision their consumers want, so weights are converted once, offline, and never cast at run time.

Casts go only where a value's producer and consumer disagree, one per (value, precision), and a Cast that
would read another Cast is rewired to read the first Cast's input, so no Cast pair is ever left back to
back. Model inputs and outputs keep float32 by default (a Cast at each boundary) so callers do not change.

Why the two policies differ: the CUDA EP has float16 kernels for nearly every op, so its block list is the
short one onnxruntime's own converter uses (``onnxruntime/transformers/float16.py``). ONNX Runtime's CPU EP
(1.32, x86-64) has float16 kernels only for data movement and a handful of elementwise ops; for everything
else it inserts Casts around the node at load time, and for bfloat16 it has almost nothing and refuses the
model. So the ``cpu`` policy keeps every computing op in float32 and stores weights in low precision with a
Cast after them, which onnxruntime folds when it loads the model: half the file, float32 speed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.errors import UserError
from graphopt.names import UniqueNames
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register

logger = logging.getLogger(__name__)

FLOAT = ir.DataType.FLOAT
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 5.96e-08

#: Ops that move or select data without computing: they follow their activation input's precision.
DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice", "Split",
    "Concat", "Gather", "GatherElements", "GatherND", "Tile", "Pad", "DepthToSpace", "SpaceToDepth",
    "ScatterND", "ScatterElements", "Where", "ReverseSequence", "Compress", "Dropout",
})

#: Ops worth running in low precision even alone between float32 ops (the Casts cost less than they save).
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention"})

#: Inputs that accept any element type: a value of either precision feeds them without a Cast.
ANY_TYPE_INPUTS = {("Cast", 0), ("CastLike", 0), ("Shape", 0), ("Size", 0)}

#: Inputs whose type the ONNX spec fixes to float32 whatever the data's type.
FLOAT32_INPUTS = {"Resize": {2}, "Upsample": {1}}

#: Ops with a ``dtype`` attribute that decides their output type.
DTYPE_ATTR_OPS = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                            "Bernoulli"})

#: Quantization ops keep their float32 scales (opset < 19 allows nothing else); quantized regions stay as-is.
ALWAYS_FLOAT32 = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

#: Domains whose ops take float16 (model-local functions and ai.onnx.ml ops stay float32).
LOW_PRECISION_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


@dataclasses.dataclass(frozen=True)
class ProviderPolicy:
    """Which ops an execution provider runs in low precision.

    ``block``: op types kept in float32. ``allow_only``: when set (per low dtype), every op type not in it is
    kept in float32 (used where the provider has few low-precision kernels). ``blocked_weights``: whether
    weights that only float32 ops read are still stored in low precision (with a Cast after them).
    """

    block: frozenset[str] = frozenset()
    allow_only: dict[str, frozenset[str]] | None = None
    store_blocked_weights_low: bool = False
    doc: str = ""

    def blocks(self, op_type: str, dtype_name: str) -> bool:
        if op_type in self.block:
            return True
        allowed = (self.allow_only or {}).get(dtype_name)
        return allowed is not None and op_type not in allowed


_CPU_FP16_NATIVE = frozenset({"Identity", "Transpose", "Flatten", "Concat", "Reshape", "Gather", "Slice", "Split",
                              "Squeeze", "Unsqueeze", "Expand", "ScatterND", "GatherElements", "GatherND"})

_CUDA_BF16_NATIVE = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice", "Concat", "Gather",
    "Tile", "Where", "Abs", "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Exp", "Erf", "Tanh", "Sigmoid",
    "Relu", "Gelu", "Max", "Min", "MatMul", "Gemm", "LayerNormalization", "Softmax", "ReduceMean", "ReduceSum"})

#: Per-provider policies. A plug-in may add its own: ``POLICIES["dml"] = ProviderPolicy(block=...)``.
POLICIES: dict[str, ProviderPolicy] = {
    "cuda": ProviderPolicy(
        # float16: onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST (its ai.onnx.ml ops are covered by the
        # domain rule) less Min and Max, which the CUDA EP (1.31) runs natively and exactly in float16.
        block=frozenset({"NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum", "Upsample",
                         "RandomUniformLike"}),
        # bfloat16: only ops the CUDA EP 1.31 was seen running natively (benchmarks/fp16.py --probe cuda); it
        # lacks bfloat16 Conv, pooling, BatchNormalization, comparisons, Log, Pad, Resize, ... and the CPU
        # fallback has no bfloat16 either, so anything else stays float32.
        allow_only={"bfloat16": _CUDA_BF16_NATIVE},
        doc="CUDA EP: nearly everything in float16; bfloat16 only where the EP has kernels."),
    "cpu": ProviderPolicy(
        # Measured on onnxruntime 1.32 (x86-64): the ops its CPU EP runs natively in float16 / bfloat16 without
        # inserting Casts, restricted to data movement (benchmarks/fp16.py --probe-cpu re-derives the list).
        allow_only={"float16": _CPU_FP16_NATIVE, "bfloat16": _CPU_FP16_NATIVE - {"Expand"}},
        store_blocked_weights_low=True,
        doc="CPU EP: compute stays float32 (no fast low-precision kernels); weights stored in low precision."),
    "none": ProviderPolicy(doc="No block list: every op in low precision except block_ops / block_nodes."),
}


@dataclasses.dataclass
class Fp16Options:
    provider: str = opt("cuda", "Which provider's block list to use: cuda | cpu | none, or auto (the run's first "
                                "--providers entry). cuda is the default because fp16 is for GPU deployment.")
    bf16: bool = opt(False, "Use bfloat16 instead of float16 (same range as float32, fewer mantissa bits; "
                            "needs a GPU that has it; the CPU EP cannot run bfloat16 compute).")
    keep_io_types: bool = opt(True, "Keep float32 model inputs and outputs (Casts at the boundary). false makes "
                                    "them float16/bfloat16, and callers must feed and read that type.")
    block_ops: list[str] = opt([], "More op types to keep in float32 (added to the provider's block list).")
    allow_ops: list[str] = opt([], "Op types to convert even though the provider's list keeps them float32.")
    block_nodes: list[str] = opt([], "Node names (or regular expressions matching the whole name) kept float32.",
                                regex=True)
    blocked_weights: str = opt("auto", "Weights read only by float32 ops: 'float32' keeps them, 'low' stores them "
                                       "in low precision with a Cast after (smaller file), 'auto' follows the "
                                       "provider (low for cpu).", choices=("auto", "float32", "low"))

    def validate(self) -> None:
        if self.provider != "auto" and self.provider not in POLICIES:
            raise UserError(f"option fp16.provider must be one of auto, {', '.join(POLICIES)}; got {self.provider!r}")
        if self.bf16 and not self.keep_io_types:
            raise UserError("options fp16.bf16=true and fp16.keep_io_types=false do not go together: bfloat16 "
                            "model inputs and outputs cannot be fed or read through numpy; keep float32 I/O")
        both = set(self.block_ops) & set(self.allow_ops)
        if both:
            raise UserError(f"option fp16: {', '.join(sorted(both))} is in both block_ops and allow_ops")


LOW, F32 = "low", "f32"


def _is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == FLOAT


def to_low_precision(array: np.ndarray, bf16: bool) -> tuple[np.ndarray, int, int]:
    """Convert to float16/bfloat16; returns (array, values clamped to the finite range, values that became 0)."""
    if bf16:
        low = array.astype(ml_dtypes.bfloat16)
        return low, 0, int(np.count_nonzero((low == 0) & (array != 0)))
    finite = np.isfinite(array)
    over = finite & (np.abs(array) > FP16_MAX)
    clamped = int(np.count_nonzero(over))
    if clamped:
        array = np.where(over, np.sign(array) * FP16_MAX, array)
    low = array.astype(np.float16)
    return low, clamped, int(np.count_nonzero((low == 0) & (array != 0)))




@register
class Fp16Pass(GraphPass):
    name = "fp16"
    summary = "float16 (or bfloat16) weights and compute; float32 I/O and a per-provider float32 block list."
    Options = Fp16Options
    # float16 keeps ~3 significant digits; outputs typically move by 1e-3 relative, more after deep stacks.
    tolerance = Tolerance(rel=3e-2, min_cosine=0.999)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: Fp16Options = self.options
        self.low_dtype = ir.DataType.BFLOAT16 if o.bf16 else ir.DataType.FLOAT16
        self.dtype_name = "bfloat16" if o.bf16 else "float16"
        provider = o.provider
        if provider == "auto":
            from graphopt.runtime import short_name
            provider = short_name(self.context.providers[0])
            if provider not in POLICIES:
                raise UserError(f"fp16.provider=auto: no fp16 policy for provider {provider!r}; "
                                f"set fp16.provider to one of {', '.join(POLICIES)}")
        self.policy = POLICIES[provider]
        self.store_blocked_low = (self.policy.store_blocked_weights_low if o.blocked_weights == "auto"
                                  else o.blocked_weights == "low")
        self.node_patterns = [re.compile(p) for p in o.block_nodes]
        ShapeInferencePass(check_type=False, strict_mode=False)(model)

        graph = model.graph
        self.names = UniqueNames(graph)
        self.inserted: set[int] = set()  # id() of Casts this pass added
        self.clamped: list[dict[str, object]] = []
        self.underflow = 0
        precision, reasons = self._assign(graph)
        self._rewrite(graph, precision)
        self._fuse_cast_pairs(graph)
        self._report(graph, reasons, provider)
        return ir.passes.PassResult(model, modified=True)

    # -- deciding ------------------------------------------------------------------------------------------
    def _block_reason(self, node: ir.Node) -> str | None:
        o: Fp16Options = self.options
        if node.domain not in LOW_PRECISION_DOMAINS:
            return f"domain {node.domain}"
        if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return "has a subgraph"
        if node.op_type in ALWAYS_FLOAT32:
            return "quantization op"
        if node.name and any(p.fullmatch(node.name) for p in self.node_patterns):
            return "block_nodes"
        if node.op_type in o.block_ops:
            return "block_ops"
        if node.op_type not in o.allow_ops and self.policy.blocks(node.op_type, self.dtype_name):
            return "provider block list"
        if any(v is not None and v.dtype is None for v in (*node.inputs, *node.outputs)):
            return "untyped values"
        return None

    def _flexible(self, node: ir.Node) -> bool:
        """Producers whose precision is set by their consumers (converted offline or at no cost)."""
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Constant":
            return _is_float32(node.outputs[0])
        return node.op_type == "Cast" and node.attributes.get_int("to") == FLOAT

    def _assign(self, graph: ir.Graph) -> tuple[dict[int, str], dict[str, Counter[str]]]:
        """Precision of each node (by id) in topological order; flexible producers are decided later."""
        o: Fp16Options = self.options
        io = F32 if o.keep_io_types else LOW
        precision: dict[int, str] = {}
        reasons: dict[str, Counter[str]] = {}

        def produced(v: ir.Value) -> str | None:
            """Precision of an activation value, or None for flexible / non-float ones."""
            if not _is_float32(v):
                return None
            if v.is_graph_input():  # an initializer listed as an input can be overridden in float32
                return F32 if v.is_initializer() else io
            p = v.producer()
            if p is None or self._flexible(p):
                return None
            return precision.get(id(p), F32)

        for node in graph:
            if self._flexible(node):
                continue
            reason = self._block_reason(node)
            if reason is not None:
                precision[id(node)] = F32
                if any(_is_float32(v) for v in (*node.inputs, *node.outputs)):
                    reasons.setdefault(reason, Counter())[node.op_type] += 1
                continue
            if node.op_type in DATA_MOVEMENT and node.domain in ("", "ai.onnx"):
                seen = [produced(v) for v in node.inputs if v is not None]
                seen = [s for s in seen if s is not None]
                precision[id(node)] = LOW if (not seen or LOW in seen) else F32
            else:
                precision[id(node)] = LOW
        self._drop_islands(graph, precision, produced, io)
        return precision, reasons

    def _drop_islands(self, graph: ir.Graph, precision: dict[int, str],
                      produced: Callable[[ir.Value], str | None], io: str) -> None:
        """Light ops that float32 surrounds stay float32: converting such an island would cost a Cast at each
        edge and gain nothing (e.g. an Add + Relu between Convs that bfloat16 keeps in float32).

        The islands are the largest sets of light low-precision nodes whose edges to the rest of the graph
        all carry float32: start from every light node with a float32 activation input and drop, until
        nothing changes, any node that exchanges a low-precision value with a node outside the set.
        """
        island = set()
        for node in graph:
            if precision.get(id(node)) == LOW and node.op_type not in HEAVY_OPS:
                if F32 in {produced(v) for v in node.inputs if v is not None}:
                    island.add(id(node))
        changed = True
        while changed:
            changed = False
            for node in graph:
                if id(node) not in island:
                    continue
                inside = True
                for v in node.inputs:
                    if v is None or produced(v) != LOW:
                        continue
                    p = v.producer()
                    inside &= p is not None and id(p) in island
                for out in node.outputs:
                    if not _is_float32(out):
                        continue
                    if out.is_graph_output() and io == LOW:
                        inside = False
                    for u in out.uses():
                        if self._wants(u.node, u.idx, precision) == LOW and id(u.node) not in island:
                            inside = False
                if not inside:
                    island.discard(id(node))
                    changed = True
        for node_id in island:
            precision[node_id] = F32

    def _wants(self, node: ir.Node, index: int, precision: dict[int, str]) -> str | None:
        """The precision a consumer wants for its float input ``index`` (None: either is fine)."""
        if (node.op_type, index) in ANY_TYPE_INPUTS:
            return None
        if index in FLOAT32_INPUTS.get(node.op_type, ()):
            return F32
        return precision.get(id(node), LOW if self._flexible(node) else F32)

    # -- rewriting -----------------------------------------------------------------------------------------
    def _rewrite(self, graph: ir.Graph, precision: dict[int, str]) -> int:
        o: Fp16Options = self.options
        io = F32 if o.keep_io_types else LOW
        casts: dict[tuple[int, str], ir.Value] = {}
        count = 0

        def cast_of(v: ir.Value, target: str) -> ir.Value:
            nonlocal count
            key = (id(v), target)
            if key not in casts:
                dtype = FLOAT if target == F32 else self.low_dtype
                out = ir.Value(name=self.names(f"{v.name}_{'fp32' if target == F32 else self.dtype_name}"),
                               type=ir.TensorType(dtype), shape=v.shape)
                cast = ir.node("Cast", [v], {"to": dtype}, outputs=[out], name=self.names(f"{v.name}_cast"))
                self.inserted.add(id(cast))
                producer = v.producer()
                if producer is not None:
                    graph.insert_after(producer, cast)
                elif len(graph):
                    graph.insert_before(graph.node(0), cast)
                else:
                    graph.append(cast)
                casts[key] = out
                count += 1
            return casts[key]

        def consumers(v: ir.Value) -> list[tuple[ir.Node | None, int, str | None]]:
            uses = [(u.node, u.idx, self._wants(u.node, u.idx, precision)) for u in v.uses()]
            uses += [(None, i, io) for i, out in enumerate(graph.outputs) if out is v]
            return uses

        def connect(v: ir.Value, have: str) -> None:
            """Feed every consumer of ``v`` (now of precision ``have``) what it wants."""
            for node, idx, want in consumers(v):
                if want is None or want == have:
                    continue
                if node is not None:
                    node.replace_input_with(idx, cast_of(v, want))
                else:  # a graph output: the Cast takes over the output's name
                    new = cast_of(v, want)
                    name = v.name
                    v.name = self.names(f"{name}_{'fp32' if have == F32 else self.dtype_name}")
                    new.name = name
                    graph.outputs[idx] = new

        # Decide flexible producers from their consumers, in reverse order (consumers first).
        for node in reversed(list(graph)):
            if self._flexible(node):
                wants = {w for _, _, w in consumers(node.outputs[0])}
                precision[id(node)] = LOW if LOW in wants else F32

        # Graph inputs.
        for v in list(graph.inputs):
            if _is_float32(v):
                if io == LOW and not v.is_initializer():
                    v.dtype = self.low_dtype
                connect(v, F32 if v.is_initializer() else io)

        # Initializers: converted when a low-precision consumer reads them; float32-only ones per policy.
        for name, v in list(graph.initializers.items()):
            if not _is_float32(v) or v.const_value is None or v.is_graph_input():
                continue
            wants = {w for _, _, w in consumers(v)}
            if LOW not in wants and not (self.store_blocked_low and F32 in wants):
                continue
            low_tensor = self._convert_tensor(v.const_value, name)
            if LOW in wants and F32 in wants and not self.store_blocked_low:
                twin = ir.Value(name=self.names(f"{name}_{self.dtype_name}"), type=ir.TensorType(self.low_dtype),
                                shape=v.shape, const_value=low_tensor)
                graph.register_initializer(twin)
                for node, idx, want in consumers(v):
                    if node is not None and want == LOW:
                        node.replace_input_with(idx, twin)
                continue
            v.const_value = low_tensor
            v.dtype = self.low_dtype
            connect(v, LOW)

        # Node outputs.
        for node in list(graph):
            if id(node) in self.inserted or precision.get(id(node)) != LOW:
                if id(node) not in self.inserted:
                    for out in node.outputs:
                        if _is_float32(out):
                            connect(out, F32)
                continue
            self._convert_attributes(node)
            for out in node.outputs:
                if _is_float32(out):
                    out.dtype = self.low_dtype
                    connect(out, LOW)
        return count

    def _convert_tensor(self, tensor: ir.TensorProtocol, name: str) -> ir.Tensor:
        array = tensor.numpy()
        low, clamped, zeroed = to_low_precision(array, self.options.bf16)
        self.underflow += zeroed
        if clamped:
            self.clamped.append({"name": name, "values_clamped": clamped,
                                 "max_abs": float(np.max(np.abs(array[np.isfinite(array)])))})
        return ir.Tensor(low, name=tensor.name)

    def _convert_attributes(self, node: ir.Node) -> None:
        """Attributes that fix a float32 output type (Cast.to, Constant's value, ...) follow the node."""
        op = node.op_type
        if op == "Cast":
            node.attributes["to"] = ir.AttrInt64("to", self.low_dtype)
        elif op in DTYPE_ATTR_OPS and node.attributes.get_int("dtype") == FLOAT:
            node.attributes["dtype"] = ir.AttrInt64("dtype", self.low_dtype)
        elif op in ("Constant", "ConstantOfShape"):
            label = f"{node.name or op} (Constant)"
            for key in ("value", "value_float", "value_floats"):
                attr = node.attributes.get(key)
                if attr is None:
                    continue
                if key == "value":
                    if attr.value.dtype != FLOAT:
                        continue
                    tensor = self._convert_tensor(attr.value, label)
                else:
                    tensor = self._convert_tensor(np.asarray(attr.value, dtype=np.float32), label)
                    del node.attributes[key]
                node.attributes["value"] = ir.AttrTensor("value", tensor)

    def _fuse_cast_pairs(self, graph: ir.Graph) -> None:
        """A Cast reading a Cast reads the first one's input instead (the pair only ever undoes the pass)."""
        for node in list(graph):
            if id(node) not in self.inserted:
                continue
            first = node.inputs[0].producer() if node.inputs[0] is not None else None
            if first is None or first.op_type != "Cast" or first.domain not in ("", "ai.onnx"):
                continue
            node.replace_input_with(0, first.inputs[0])
            out = first.outputs[0]
            if not out.uses() and not out.is_graph_output():
                graph.remove(first, safe=True)

    # -- reporting -----------------------------------------------------------------------------------------
    def _report(self, graph: ir.Graph, reasons: dict[str, Counter[str]], provider: str) -> None:
        """Counts are of nodes with a float output; integer-only nodes (shape arithmetic) are not counted."""
        nodes = [n for n in graph if id(n) not in self.inserted]
        casts_left = sum(1 for n in graph if id(n) in self.inserted)
        low = sum(1 for n in nodes if any(o.dtype == self.low_dtype for o in n.outputs))
        float32 = sum(1 for n in nodes if any(o.dtype == FLOAT for o in n.outputs))
        if self.clamped:
            logger.warning("fp16: %d initializer(s) outside the float16 range were clamped to +-%g: %s",
                           len(self.clamped), FP16_MAX, ", ".join(str(c["name"]) for c in self.clamped))
        if self.underflow:
            logger.info("fp16: %d nonzero weight values are below the %s range and became 0",
                        self.underflow, self.dtype_name)
        self.details.update({
            "dtype": self.dtype_name,
            "provider_policy": provider,
            "nodes_low_precision": low,
            "nodes_float32": float32,
            "casts_inserted": casts_left,
            "kept_float32": [{"reason": r, "op": op, "nodes": n}
                             for r, ops in sorted(reasons.items()) for op, n in sorted(ops.items())],
            "clamped_initializers": self.clamped,
            "weights_flushed_to_zero": self.underflow,
        })


def low_precision_nodes(model: ir.Model) -> Iterable[ir.Node]:
    """Nodes with a float16/bfloat16 output (for tests and reports)."""
    low = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return [n for n in model.graph if any(o.dtype in low for o in n.outputs)]
