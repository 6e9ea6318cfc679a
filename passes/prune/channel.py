"""Structured channel pruning: choose whole channels by group importance and remove them everywhere.

The dependency graph (``depgraph``) says which positions of which tensors make up each channel. This
module scores channels (L1/L2 norm of every weight slice they own, producers and consumers alike),
chooses what to remove (the same fraction of every group, or one global ranking of scores normalized
per group), and then edits the graph: every initializer loses the removed positions on every coupled
axis, value shapes and shape constants follow, depthwise ``group`` attributes follow, and the constants
the removed channels carried are folded into the consumers' biases (``compensate``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserError
from graphopt.stats import infer_concrete_shapes, per_sample_shapes

from .depgraph import DepGraph, Slot, Stop, UnionFind, WeightSlot
from .layers import LayerFilter, weight_layers

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Group:
    """One coupled channel dimension: its prunable channels (by class root) and what was chosen."""

    index: int
    roots: np.ndarray  # prunable channel classes, in the order of the first producer's channels
    scores: np.ndarray
    fixed: int  # channels of the group that must stay
    layers: list[str]  # producer layers (nodes whose output channels these are)
    unit: int  # positions one channel owns in the first producer's weight (a head owns head_dim)
    reasons: list[str]
    removed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def size(self) -> int:
        return len(self.roots) + self.fixed


@dataclasses.dataclass
class ChannelPlan:
    graph: DepGraph
    roots: dict[Slot, np.ndarray]  # class root of every position of every slot
    groups: list[Group]
    stopped: list[dict[str, object]]  # groups that could not be pruned at all, with the reasons
    removed_roots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def removed_positions(self, slot: Slot | None) -> np.ndarray:
        if slot is None or not len(self.removed_roots):
            return np.zeros(0, dtype=np.int64)
        return np.nonzero(np.isin(self.roots[slot], self.removed_roots))[0]

    def slot_of(self, value: ir.Value, axis: int) -> Slot | None:
        shape = self.graph.shape(value)
        if shape is None:
            return None
        return self.graph.slots.get((value, axis % len(shape)))

    @property
    def zeroed(self) -> list[tuple[str, int, list[int]]]:
        """(initializer, axis, indices) of the producer weights whose channels are removed.

        Zeroing exactly these in the original model gives the model the pruned one must equal.
        """
        out = []
        seen = set()
        for ws in self.graph.weight_slots:
            if ws.role != "out" or ws.slot in seen:
                continue
            seen.add(ws.slot)
            removed = self.removed_positions(ws.slot)
            if len(removed):
                out.append((ws.slot.value.name or "", ws.slot.axis, removed.tolist()))
        return out


def concrete_shapes(model: ir.Model, pins: Mapping[str, tuple[int, ...]]
                    ) -> tuple[dict[str, tuple[int, ...]], set[tuple[str, int]]]:
    """Shapes of every value at batch 2, and the (value, axis) pairs that follow the batch size."""
    base = per_sample_shapes(model, pins)
    if base is None:
        raise UserError("prune.mode=channel needs concrete input shapes: pin symbolic dimensions other than "
                        "the batch with --shape NAME=DxDx...")
    dynamic_inputs = {v.name for v in model.graph.inputs
                      if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)}

    def at(batch: int) -> dict[str, tuple[int, ...]]:
        pinned = {k: ((batch, *s[1:]) if k in dynamic_inputs and s else s) for k, s in base.items()}
        return infer_concrete_shapes(model, pinned)

    two, three = at(2), at(3)
    dynamic = {(name, a) for name, s in two.items() if name in three and len(three[name]) == len(s)
               for a in range(len(s)) if s[a] != three[name][a]}
    return two, dynamic


def _norms(array: np.ndarray, axis: int, importance: str) -> np.ndarray:
    """Per-position L1 norm or squared L2 norm of the slices of ``array`` along ``axis``."""
    a = np.moveaxis(np.abs(array.astype(np.float64)), axis, 0).reshape(array.shape[axis], -1)
    return a.sum(axis=1) if importance == "l1" else (a * a).sum(axis=1)


def analyze(model: ir.Model, *, shapes: Mapping[str, tuple[int, ...]], dynamic: set[tuple[str, int]],
            importance: str, skip: Sequence[str], keep_first: bool, keep_last: bool,
            prune_heads: bool) -> ChannelPlan:
    """Build the dependency graph and the channel groups with their importance scores."""
    g = DepGraph(model, shapes, dynamic, prune_heads=prune_heads).build()
    layers = weight_layers(model.graph)
    flt = LayerFilter(layers, skip, keep_first, keep_last)
    for layer in layers:
        why = flt.reason(layer)
        if why is not None:
            g.stops.append(Stop(layer.name, layer.node.op_type, why))
            for ws in g.weight_slots:
                if ws.node is layer.node:
                    g.fixed.append((ws.slot, f"{layer.node.op_type} '{layer.name}': {why}"))

    roots = {slot: g.uf.roots(slot.ids) for slot in g.slots.values()}
    fixed_roots = {r for slot, _ in g.fixed for r in np.unique(roots[slot]).tolist()}
    producer_slots = [ws for ws in g.weight_slots if ws.role == "out"]
    producer_roots = np.unique(np.concatenate([roots[ws.slot] for ws in producer_slots])) \
        if producer_slots else np.zeros(0, dtype=np.int64)

    # channels that share a slot belong to one group
    groups_uf = UnionFind()
    groups_uf.add(len(g.uf.parent))
    for slot in g.slots.values():
        r = np.unique(roots[slot])
        for other in r[1:].tolist():
            groups_uf.union(int(r[0]), other)

    scores = np.zeros(len(producer_roots))
    for ws in g.weight_slots:
        idx = np.searchsorted(producer_roots, roots[ws.slot])
        ok = (idx < len(producer_roots)) & (producer_roots[np.minimum(idx, len(producer_roots) - 1)] == roots[ws.slot])
        tensor = ws.slot.value.const_value
        assert tensor is not None
        norms = _norms(tensor.numpy(), ws.slot.axis, importance)
        np.add.at(scores, idx[ok], norms[ok])
    if importance == "l2":
        scores = np.sqrt(scores)

    group_reasons: dict[int, dict[str, None]] = {}
    for slot, reason in g.fixed:
        for r in np.unique(roots[slot]).tolist():
            group_reasons.setdefault(groups_uf.find(r), {})[reason] = None
    by_group: dict[int, list[int]] = {}
    for i, r in enumerate(producer_roots.tolist()):
        by_group.setdefault(groups_uf.find(r), []).append(i)
    first_slot: dict[int, WeightSlot] = {}
    for ws in producer_slots:  # graph order: the first producer names and orders the group
        for r in np.unique(roots[ws.slot]).tolist():
            first_slot.setdefault(groups_uf.find(r), ws)
    groups: list[Group] = []
    stopped: list[dict[str, object]] = []
    node_index = {node: i for i, node in enumerate(model.graph)}
    for gid, members in sorted(by_group.items(), key=lambda kv: node_index.get(first_slot[kv[0]].node, 1 << 30)):
        layer_names = []
        for ws in producer_slots:
            if groups_uf.find(int(roots[ws.slot][0])) == gid:
                name = ws.node.name or ws.slot.value.name or ws.node.op_type
                if name not in layer_names:
                    layer_names.append(name)
        head = first_slot[gid]
        head_roots = roots[head.slot]
        order = {r: i for i, r in enumerate(dict.fromkeys(head_roots.tolist()))}
        member_roots = producer_roots[members]
        prunable = np.array([r not in fixed_roots for r in member_roots.tolist()], dtype=bool)
        reasons = list(group_reasons.get(gid, {}))
        keep = np.array(members)[prunable]
        sort = sorted(range(len(keep)), key=lambda i: order.get(int(producer_roots[keep[i]]), len(order) + i))
        keep = keep[sort] if len(keep) else keep
        unit = int(np.count_nonzero(head_roots == head_roots[0]))
        group = Group(len(groups), producer_roots[keep], scores[keep], int((~prunable).sum()), layer_names, unit,
                      reasons)
        if not len(group.roots):
            stopped.append({"layers": short_list(layer_names), "channels": group.size, "reason": "; ".join(reasons[:3])})
        groups.append(group)
    return ChannelPlan(g, roots, groups, stopped)


def short_list(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def select(plan: ChannelPlan, *, sparsity: float, allocation: str, round_to: int,
           max_group_sparsity: float) -> None:
    """Choose channels to remove; fills ``group.removed`` and ``plan.removed_roots``.

    No slot may lose all its positions (a Concat input, a Conv) and no group more than
    ``max_group_sparsity`` of its prunable channels under global allocation.
    """
    slot_classes: dict[int, list[Slot]] = {}
    remaining: dict[Slot, int] = {}
    for slot, r in plan.roots.items():
        uniq = np.unique(r)
        remaining[slot] = len(uniq)
        for root in uniq.tolist():
            slot_classes.setdefault(root, []).append(slot)

    def try_remove(root: int) -> bool:
        slots = slot_classes.get(root, [])
        if any(remaining[s] <= 1 for s in slots):
            return False
        for s in slots:
            remaining[s] -= 1
        return True

    def restore(root: int) -> None:
        for s in slot_classes.get(root, []):
            remaining[s] += 1

    for group in plan.groups:
        group.removed = np.zeros(len(group.roots), dtype=bool)
    if allocation == "global":
        candidates = []
        for gi, group in enumerate(plan.groups):
            if len(group.roots):
                norm = group.scores / max(float(group.scores.mean()), 1e-12)
                candidates += [(float(s), gi, i) for i, s in enumerate(norm)]
        quota = int(round(sparsity * len(candidates)))
        cap = {gi: int(math.floor(max_group_sparsity * len(g.roots))) for gi, g in enumerate(plan.groups)}
        taken = 0
        for _, gi, i in sorted(candidates):
            if taken >= quota:
                break
            group = plan.groups[gi]
            if int(group.removed.sum()) >= cap[gi]:
                continue
            if try_remove(int(group.roots[i])):
                group.removed[i] = True
                taken += 1
    else:
        for group in plan.groups:
            n = len(group.roots)
            want = int(round(sparsity * n))
            for i in np.argsort(group.scores, kind="stable"):
                if int(group.removed.sum()) >= want:
                    break
                if try_remove(int(group.roots[i])):
                    group.removed[i] = True
    if round_to > 1:  # keep a multiple of round_to channels: give back the best removed ones
        for group in plan.groups:
            kept = group.size - int(group.removed.sum())
            target = min(group.size, int(math.ceil(kept / round_to)) * round_to)
            back = np.nonzero(group.removed)[0]
            back = back[np.argsort(-group.scores[back], kind="stable")]
            for i in back[: target - kept]:
                group.removed[i] = False
                restore(int(group.roots[i]))
    removed = [g.roots[g.removed] for g in plan.groups if len(g.roots)]
    plan.removed_roots = np.sort(np.concatenate(removed)) if removed else np.zeros(0, dtype=np.int64)


def apply(model: ir.Model, plan: ChannelPlan) -> dict[Slot, np.ndarray]:
    """Remove the chosen positions from every initializer and value shape; rewrite shape constants.

    Returns the removed positions of every slot that lost some.
    """
    g = plan.graph
    removed_by_slot = {slot: plan.removed_positions(slot) for slot in g.slots.values()}
    removed_by_slot = {s: r for s, r in removed_by_slot.items() if len(r)}
    new_arrays: dict[ir.Value, np.ndarray] = {}
    for slot, removed in removed_by_slot.items():
        value = slot.value
        if value.const_value is not None:
            array = new_arrays.get(value)
            if array is None:
                array = value.const_value.numpy()
            new_arrays[value] = np.delete(array, removed, axis=slot.axis)
        elif value.shape is not None and len(value.shape) > slot.axis:
            dims = list(value.shape)
            dims[slot.axis] = slot.size - len(removed)
            value.shape = ir.Shape(dims)
    for value, array in new_arrays.items():
        array = np.ascontiguousarray(array)
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)

    def new_size(value: ir.Value, axis: int) -> int:
        shape = g.shape(value)
        assert shape is not None
        slot = g.slots.get((value, axis % len(shape)))
        return shape[axis] - (len(removed_by_slot.get(slot, ())) if slot is not None else 0)

    for fixup in g.fixups:
        fixup(new_size)
    for node, group in g.depthwise.items():
        x = node.inputs[0]
        assert x is not None
        channels = new_size(x, 1)
        if channels != group:
            node.attributes["group"] = ir.AttrInt64("group", channels)
    return removed_by_slot


@dataclasses.dataclass
class _Copy:
    node: ir.Node
    index: int
    original: ir.Value
    copy: ir.Value


def unshare_vectors(model: ir.Model) -> list[_Copy]:
    """Give every user of a shared per-channel constant its own copy.

    Deduplication makes unrelated layers share identical vectors (BatchNorm variances of 1, zero
    biases); left shared they would couple those layers' channels. Weights with two real axes stay
    shared: tied weights are meant to be one tensor.
    """
    from .depgraph import new_initializer

    copies = []
    graph = model.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        if sum(1 for d in tensor.shape.numpy() if d > 1) != 1:
            continue
        uses = list(value.uses())
        for use in uses[1:]:
            copy = new_initializer(graph, f"{value.name}_use", np.array(tensor.numpy()))
            use.node.replace_input_with(use.idx, copy)
            copies.append(_Copy(use.node, use.idx, value, copy))
    return copies


def reshare(model: ir.Model, copies: Sequence[_Copy]) -> None:
    """Undo :func:`unshare_vectors` where the copy still equals the original."""
    for c in copies:
        a, b = c.original.const_value, c.copy.const_value
        if a is None or b is None or c.node.inputs[c.index] is not c.copy:
            continue
        if tuple(a.shape.numpy()) == tuple(b.shape.numpy()) and np.array_equal(a.numpy(), b.numpy()):
            c.node.replace_input_with(c.index, c.original)
            if not c.copy.uses():
                del model.graph.initializers[c.copy.name]  # type: ignore[arg-type]
