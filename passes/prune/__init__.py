"""prune: magnitude pruning, N:M sparsity, and structured channel pruning that really shrinks the graph.

``unstructured`` and ``nm`` zero weights in place (the model keeps its shapes; it compresses better and
2:4 suits sparse tensor cores). ``channel`` removes whole output channels, hidden units and attention
heads, and shrinks every tensor that depends on them, using dependency groups found on the ONNX graph
itself (``depgraph``), so parameters, FLOPs and latency drop. See docs/passes/prune.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from graphopt.errors import UserError
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register
from graphopt.runtime import SessionFactory

from . import channel, compensate
from .layers import Layer, LayerFilter, gzip_size, weight_layers
from .magnitude import LayerResult, n_of_m, unstructured

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneOptions:
    mode: str = opt("unstructured", "unstructured: zero the smallest weights; nm: N:M semi-structured "
                    "sparsity; channel: remove whole channels/units/heads and shrink the graph.",
                    choices=("unstructured", "nm", "channel"))
    sparsity: float = opt(0.5, "Fraction to prune: of the weights (unstructured) or of the channels of each "
                          "group (channel). Not used by nm.", min=0.0, max=1.0, max_exclusive=True)
    allocation: str = opt("uniform", "uniform: the same sparsity in every layer (unstructured: per-layer "
                          "threshold) or group (channel); global: one threshold over all layers, or one "
                          "ranking of channel scores normalized per group.", choices=("uniform", "global"))
    n: int = opt(2, "nm mode: weights kept in every block of m along the reduction axis.", min=1)
    m: int = opt(4, "nm mode: block length along the reduction axis.", min=2)
    importance: str = opt("l1", "channel mode: channel score, the L1 or L2 norm of all the weights it owns "
                          "(its filters and the consumers' input slices) across its group.",
                          choices=("l1", "l2"))
    skip: list[str] = opt([], "Regular expressions; layers whose node or weight name matches stay untouched.",
                         regex=True)
    keep_first: bool = opt(False, "Leave the first weight layer untouched (channel mode: keep its output "
                           "channels).")
    keep_last: bool = opt(False, "Leave the last weight layer untouched (channel mode: keep its input "
                          "channels).")
    min_size: int = opt(0, "unstructured/nm: leave weight tensors with fewer elements than this dense.", min=0)
    round_to: int = opt(1, "channel mode: keep a multiple of this many channels in each group.", min=1)
    max_group_sparsity: float = opt(0.9, "channel mode, global allocation: most of any one group that may go.",
                                    min=0.0, max=1.0, max_exclusive=True)
    compensate: str = opt("bias", "channel mode: what removed channels' constants (BatchNorm shift, bias "
                          "through ReLU) become: bias: folded into the consumer's bias (exact except at "
                          "padded Conv borders); exact: plus a constant map where borders differ; none: "
                          "dropped.", choices=("bias", "exact", "none"))
    prune_heads: bool = opt(True, "channel mode: prune whole attention heads where a Reshape splits a "
                            "projection into heads.")

    def validate(self) -> None:
        if self.mode == "nm" and self.n >= self.m:
            raise UserError(f"prune.n must be smaller than prune.m (N:M keeps n of every m weights); "
                            f"got n={self.n}, m={self.m}")


@register
class PrunePass(GraphPass):
    name = "prune"
    summary = "Magnitude pruning, N:M sparsity, or structured channel pruning that shrinks the graph."
    Options = PruneOptions
    # Pruning without retraining moves outputs by design (digits_cnn at 50 % channels: mean cosine ~0.5);
    # --check-each-pass only catches a broken graph: outputs must stay positively correlated.
    tolerance = Tolerance(rel=None, min_cosine=0.0)

    def __init__(self, options: Any = None, context: Any = None) -> None:
        super().__init__(options, context)
        self.plan: channel.ChannelPlan | None = None  # channel mode: what was removed (tests, tools)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: PruneOptions = self.options
        self.details["mode"] = o.mode
        if o.mode == "channel":
            return self._channel(model)
        return self._weights(model)

    # ------------------------------------------------------------------ unstructured / nm
    def _weights(self, model: ir.Model) -> ir.passes.PassResult:
        o: PruneOptions = self.options
        layers: list[Layer] = []
        seen: set[ir.Value] = set()
        for layer in weight_layers(model.graph):  # a shared weight is pruned once
            if layer.weight not in seen:
                seen.add(layer.weight)
                layers.append(layer)
        flt = LayerFilter(layers, o.skip, o.keep_first, o.keep_last)
        chosen, rows = [], []
        for layer in layers:
            size = int(np.prod(layer.weight.const_value.shape.numpy()))  # type: ignore[union-attr]
            why = flt.reason(layer) or (f"smaller than prune.min_size={o.min_size}" if size < o.min_size else None)
            if why is None:
                chosen.append(layer)
            else:
                zeros = int(np.count_nonzero(layer.weight.const_value.numpy() == 0))  # type: ignore[union-attr]
                rows.append(LayerResult(layer, tuple(layer.weight.const_value.shape.numpy()), zeros, zeros,  # type: ignore[union-attr]
                                        f"left dense: {why}"))
        raw, packed_before = gzip_size(model)
        if o.mode == "nm":
            results = n_of_m(chosen, o.n, o.m, store=self.set_weight)
            self.details["pattern"] = f"{o.n}:{o.m}"
        else:
            results = unstructured(chosen, o.sparsity, o.allocation == "global", store=self.set_weight) \
                if o.sparsity > 0 else \
                [LayerResult(layer, tuple(layer.weight.const_value.shape.numpy()), 0, 0) for layer in chosen]  # type: ignore[union-attr]
        _, packed_after = gzip_size(model)
        order = {id(layer): i for i, layer in enumerate(layers)}
        all_rows = sorted(results + rows, key=lambda r: order[id(r.layer)])
        pruned = [r for r in results if not r.note]
        total = sum(int(np.prod(r.shape)) for r in all_rows)
        zeros = sum(r.zeros_after for r in all_rows)
        pruned_total = sum(int(np.prod(r.shape)) for r in pruned)
        self.details.update({
            "layers": [r.row() for r in all_rows],
            "sparsity_pruned_layers": round(sum(r.zeros_after for r in pruned) / max(pruned_total, 1), 6),
            "sparsity_all_layers": round(zeros / max(total, 1), 6),
            "compressed": {"weight_bytes": raw, "gzip_before": packed_before, "gzip_after": packed_after,
                           "gzip_ratio": round(packed_after / max(packed_before, 1), 4)},
        })
        modified = any(r.zeros_after != r.zeros_before for r in results)
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------------ channel
    def _channel(self, model: ir.Model) -> ir.passes.PassResult:
        o: PruneOptions = self.options
        ctx = self.context
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        copies = channel.unshare_vectors(model)
        shapes, dynamic = channel.concrete_shapes(model, ctx.shapes)
        plan = channel.analyze(model, shapes=shapes, dynamic=dynamic, importance=o.importance, skip=o.skip,
                               keep_first=o.keep_first, keep_last=o.keep_last, prune_heads=o.prune_heads)
        channel.select(plan, sparsity=o.sparsity, allocation=o.allocation, round_to=o.round_to,
                       max_group_sparsity=o.max_group_sparsity)
        self.plan = plan
        layers = weight_layers(model.graph)
        before = {id(layer): tuple(layer.weight.const_value.shape.numpy()) for layer in layers}  # type: ignore[union-attr]
        used_before = {name for name, v in model.graph.initializers.items() if v.uses()}
        corrections: list[compensate.Correction] = []
        if len(plan.removed_roots) and o.compensate != "none":
            sessions = ctx.sessions or SessionFactory(work_dir=ctx.work_dir)
            samples = compensate.sample_inputs(model, ctx.data, ctx.shapes, ctx.seed)
            with ctx.progress.task("measuring removed channels' constants"):
                corrections = compensate.compute(model, plan, samples, mode=o.compensate, sessions=sessions)
        channel.apply(model, plan)
        folded = compensate.fold(model, plan, corrections)
        channel.reshare(model, copies)
        for name in list(model.graph.initializers):
            value = model.graph.initializers[name]
            if name in used_before and not value.uses() and not value.is_graph_input() \
                    and not value.is_graph_output():
                del model.graph.initializers[name]
        self._channel_details(plan, layers, before, folded)
        return ir.passes.PassResult(model, modified=bool(len(plan.removed_roots)))

    def _channel_details(self, plan: channel.ChannelPlan, layers: list[Layer], before: dict[int, tuple[int, ...]],
                         folded: list[dict[str, object]]) -> None:
        rows = []
        for layer in layers:
            shape0 = before[id(layer)]
            shape1 = tuple(layer.weight.const_value.shape.numpy())  # type: ignore[union-attr]
            p0, p1 = int(np.prod(shape0)), int(np.prod(shape1))
            rows.append({"layer": layer.name, "op": layer.node.op_type, "weight": layer.weight.name,
                         "shape_before": "x".join(map(str, shape0)), "shape_after": "x".join(map(str, shape1)),
                         "params_before": p0, "params_after": p1, "sparsity": round(1 - p1 / max(p0, 1), 4)})
        groups = []
        for group in plan.groups:
            if not len(group.roots):
                continue
            removed = int(group.removed.sum())
            groups.append({"group": group.index, "layers": channel.short_list(group.layers),
                           "unit": "channel" if group.unit == 1 else f"block of {group.unit}",
                           "channels": group.size, "fixed": group.fixed, "removed": removed,
                           "kept": group.size - removed, "sparsity": round(removed / max(group.size, 1), 4),
                           "note": "; ".join(group.reasons[:2]) if group.fixed else ""})
        unsupported = []
        seen = set()
        for stop in plan.graph.stops:
            key = (stop.op, stop.reason)
            if key not in seen:
                seen.add(key)
                unsupported.append({"node": stop.node, "op": stop.op, "reason": stop.reason})
        total = sum(g["channels"] for g in groups)
        removed = sum(g["removed"] for g in groups)
        self.details.update({
            "channels_removed": removed, "channels_in_prunable_groups": total,
            "layers": rows, "groups": groups, "stopped_groups": plan.stopped,
            "not_understood": unsupported[:50], "compensation": folded,
            "approximate_compensation": sum(1 for f in folded if not f["exact"]),
        })
        if removed:
            logger.info("prune: removed %d of %d channels in %d groups", removed, total, len(groups))
