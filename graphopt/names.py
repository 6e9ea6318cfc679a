"""Fresh names for values and nodes a pass adds, never clashing with what the graph already uses."""

from __future__ import annotations

import onnx_ir as ir


class UniqueNames:
    """Call with a base name; returns it, or ``base_1``, ``base_2``... if taken (subgraphs included)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.used.add(node.name or "")
            self.used.update(o.name or "" for o in node.outputs)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name
