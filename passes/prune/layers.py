"""The weight layers the pruner works on, and the options that exclude some of them.

A *layer* is a Conv, ConvTranspose, Gemm or MatMul node with one constant (initializer) weight operand.
All three modes agree on what a layer is, which is the first and the last one, and what ``skip``
matches, so ``keep_first`` means the same thing whether weights are zeroed or channels removed.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterable, Sequence

import onnx_ir as ir

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_constant(value: ir.Value | None) -> bool:
    """An initializer the user cannot override at run time (not also a graph input)."""
    return (value is not None and value.is_initializer() and not value.is_graph_input()
            and value.const_value is not None)


@dataclasses.dataclass(eq=False)
class Layer:
    node: ir.Node
    weight_index: int  # which input of the node is the constant weight

    @property
    def weight(self) -> ir.Value:
        value = self.node.inputs[self.weight_index]
        assert value is not None
        return value

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or self.node.op_type

    def reduction_axis(self) -> int:
        """The weight axis a dot product runs along (input channels / K), for N:M groups."""
        node, rank = self.node, len(self.weight.const_value.shape)  # type: ignore[union-attr]
        if node.op_type == "Conv":
            return 1
        if node.op_type == "ConvTranspose":
            return 0
        if node.op_type == "Gemm":
            trans = node.attributes.get_int("transB" if self.weight_index == 1 else "transA", 0)
            if self.weight_index == 1:
                return 1 if trans else 0
            return 0 if trans else 1
        # MatMul: B [.., K, N] reduces along -2; a constant A [.., M, K] along -1
        return rank - 2 if self.weight_index == 1 else rank - 1


def weight_layers(graph: ir.Graph) -> list[Layer]:
    """Layers in graph (topological) order: nodes of WEIGHT_OPS with exactly one constant weight operand."""
    layers = []
    for node in graph:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(node.inputs) > 1 and is_constant(node.inputs[1]) and not is_constant(node.inputs[0]):
                layers.append(Layer(node, 1))
            continue
        a, b = node.inputs[0], node.inputs[1]
        if is_constant(b) and not is_constant(a) and len(b.const_value.shape) >= 2:  # type: ignore[union-attr]
            layers.append(Layer(node, 1))
        elif is_constant(a) and not is_constant(b) and len(a.const_value.shape) >= 2:  # type: ignore[union-attr]
            layers.append(Layer(node, 0))
    return layers


class LayerFilter:
    """``skip`` patterns (regular expressions searched in node and weight names), first/last layer."""

    def __init__(self, layers: Sequence[Layer], skip: Iterable[str], keep_first: bool, keep_last: bool) -> None:
        self.patterns = [re.compile(p) for p in skip]
        self.first = layers[0] if layers and keep_first else None
        self.last = layers[-1] if layers and keep_last else None

    def reason(self, layer: Layer) -> str | None:
        """Why the layer is left alone, or None when it may be pruned."""
        if layer is self.first:
            return "first layer kept dense (prune.keep_first)"
        if layer is self.last:
            return "last layer kept dense (prune.keep_last)"
        for pattern in self.patterns:
            for name in (layer.node.name, layer.weight.name):
                if name and pattern.search(name):
                    return f"matches prune.skip pattern {pattern.pattern!r}"
        return None


def gzip_size(model: ir.Model, level: int = 6) -> tuple[int, int]:
    """(raw, deflate-compressed) bytes of all initializers, streamed so no second copy is held."""
    comp = zlib.compressobj(level)
    raw = packed = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is None:
                continue
            data = value.const_value.tobytes()
            raw += len(data)
            packed += len(comp.compress(data))
            del data
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()  # its pages leave this process; it maps again when used
    packed += len(comp.flush())
    return raw, packed
