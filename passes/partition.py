"""partition: balanced contiguous stages for multi-device (or multi-machine) pipelined execution.

The nodes are laid out in a topological order; a stage is a contiguous run of that order, so every stage
only reads what earlier stages (or the model's inputs) made. The cut points are chosen by dynamic
programming, not by counting nodes: first the smallest possible cost of the most expensive stage, then,
among the splits whose most expensive stage stays within ``balance_slack`` of that, the one whose cuts
carry the fewest bytes per sample (every tensor alive across a cut counts, skip connections included).

The pass does not write files: it annotates the model (``metadata_props["graphopt.partition"]``) with the
nodes of each stage, their devices, predicted costs and the balance ratio, and leaves the model itself
whole and runnable. ``graphopt.stages.write_partitioned`` writes ``stage_0.onnx`` … and ``manifest.json``
from that annotation; ``graphopt.stages.StagePipeline`` runs them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from graphopt.data import SyntheticSource, input_specs, integer_input_ranges, open_data
from graphopt.errors import UserError
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register
from graphopt.runtime import SessionSettings, short_name
from graphopt.stages import (PLAN_FORMAT, PLAN_KEY, expand_devices, is_constant, node_dependencies,
                             parse_device, value_bytes_per_sample)
from graphopt.stats import infer_concrete_shapes, node_flops, per_sample_shapes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PartitionOptions:
    stages: int | None = opt(None, "Number of stages K. Default 2, or the fewest that fit max_stage_bytes.",
                             min=1)
    max_stage_bytes: int | None = opt(
        None, "Most bytes one stage may hold: its weights plus the tensors it makes for micro_batch "
              "samples. Without stages, decides K (the fewest stages that fit).", min=1)
    cost: str = opt("static", "Cost of a node: static (FLOPs + bytes_weight x bytes moved, from inferred "
                              "shapes) or profile (time per node from ONNX Runtime's profiler).",
                    choices=("static", "profile"))
    devices: list[str] = opt([], "Device per stage, e.g. cuda:0,cuda:1 or cuda:0,cpu (one entry: all stages). "
                                 "Default: the run's first provider.")
    balance_slack: float = opt(0.05, "How far the costliest stage may exceed the best achievable balance "
                                     "to cut fewer bytes (0.05 = 5 %).", min=0.0)
    bytes_weight: float = opt(8.0, "Static cost model: FLOP-equivalents per byte a node reads or writes.",
                              min=0.0)
    micro_batch: int = opt(1, "Samples per micro-batch the plan assumes: a node reads its weights once per "
                              "micro-batch (static cost), and activations count for this many samples in "
                              "max_stage_bytes.", min=1)
    profile_runs: int = opt(10, "cost=profile: timed runs (the median per node is used).", min=1)
    profile_batch: int = opt(8, "cost=profile: samples per profiled run.", min=1)

    def validate(self) -> None:
        if self.stages is not None and self.devices and len(self.devices) not in (1, self.stages):
            raise UserError(f"partition.devices has {len(self.devices)} entries for partition.stages="
                            f"{self.stages}; give one device for all stages or one per stage")
        for d in self.devices:
            parse_device(d)


# --------------------------------------------------------------------------------------------------------
# Node costs
# --------------------------------------------------------------------------------------------------------

def static_costs(nodes: Sequence[ir.Node], shapes: Mapping[str, tuple[int, ...]], bytes_weight: float,
                 batch: int) -> tuple[np.ndarray, bool]:
    """FLOPs + bytes_weight x bytes moved per sample (weights read once per micro-batch of ``batch``).

    Counting weights per micro-batch matters: on CPU the deep, wide layers of a CNN cost more than their
    FLOPs say, and their large weights are what makes them slow.

    Returns the costs and whether every node's shapes were known.
    """
    costs = np.zeros(len(nodes))
    exact = True
    for i, node in enumerate(nodes):
        flops = node_flops(node, shapes)
        moved = 0.0
        for v in node_dependencies(node):
            if is_constant(v):
                moved += v.const_value.nbytes / batch  # type: ignore[union-attr]
            else:
                b = value_bytes_per_sample(v, shapes)
                moved += b or 0
                exact &= b is not None
        for v in node.outputs:
            b = value_bytes_per_sample(v, shapes)
            moved += b or 0
            exact &= b is not None
        if flops is None:
            exact = False
            out = node.outputs[0] if node.outputs else None
            flops = (value_bytes_per_sample(out, shapes) or 0) // 4 if out is not None else 0
        costs[i] = flops + bytes_weight * moved
    return costs, exact


def profiled_costs(model: ir.Model, nodes: Sequence[ir.Node], pass_: GraphPass,
                   static: np.ndarray) -> tuple[np.ndarray, float]:
    """Median microseconds per node over ``profile_runs`` runs of ORT's profiler, with ORT's own graph
    optimizations on (the fused, re-laid-out kernels the stages will really run).

    ORT names a fused kernel after a graph node (``node``, ``node/FusionName/``) or after the tensor it
    makes (``tensor_nchwc``); its time is shared, in proportion to the static cost, among that node and
    the nodes fused into it (those whose outputs only it reads). Returns the costs and the share of the
    profiled time no node could be found for (it is left out).
    """
    import onnxruntime as ort

    from graphopt.model_io import EXTERNAL_DATA_THRESHOLD, model_to_bytes, save_model, weight_bytes

    ctx = pass_.context
    o: PartitionOptions = pass_.options
    provider = ctx.providers[0]
    specs = input_specs(model)
    data = ctx.data or SyntheticSource(specs, ctx.shapes, rows=o.profile_batch, batch_size=o.profile_batch,
                                       seed=ctx.seed, int_high=integer_input_ranges(model))
    batch = next(iter(open_data(data).batches(batch_size=o.profile_batch, limit=o.profile_batch, specs=specs)))
    so = SessionSettings(intra_op_threads=1).session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(ctx.work_dir / "partition-profile")
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD // 2:
        path = ctx.work_dir / "partition-profile.onnx"
        save_model(model, path, external_data=True)
        source: object = str(path)
    else:
        source = model_to_bytes(model)
    providers: list[object] = [provider] + ([] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"])
    session = ort.InferenceSession(source, so, providers=providers)
    names = [o_.name for o_ in session.get_outputs()]
    with ctx.progress.task("profiling nodes", total=o.profile_runs + 1) as task:
        for _ in range(o.profile_runs + 1):  # the first run warms up and is dropped
            session.run(names, batch.inputs)
            task.advance()
    with open(session.end_profiling()) as fh:
        trace = json.load(fh)
    # ORT writes an event when it ends: a run's kernel events come before its model_run event
    runs: list[dict[str, float]] = []
    current: dict[str, float] = collections.defaultdict(float)
    for event in trace:
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            current[name[: -len("_kernel_time")]] += float(event.get("dur", 0))
        elif event.get("cat") == "Session" and name == "model_run":
            runs.append(current)
            current = collections.defaultdict(float)
    runs = runs[1:] or runs  # drop the warm-up run
    kernels = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in set().union(*runs)} if runs else {}
    return attribute_kernel_times(kernels, nodes, static)


def attribute_kernel_times(kernels: Mapping[str, float], nodes: Sequence[ir.Node],
                           static: np.ndarray) -> tuple[np.ndarray, float]:
    """Map ORT kernel times (by kernel name) onto graph nodes; see :func:`profiled_costs`."""
    index = {node: i for i, node in enumerate(nodes)}
    by_name = {node.name: node for node in nodes if node.name}
    by_output = {v.name: node for node in nodes for v in node.outputs if v.name}
    timed = np.zeros(len(nodes))
    has_kernel = np.zeros(len(nodes), dtype=bool)
    lost = 0.0
    for kernel, us in kernels.items():
        base = kernel.split("/", 1)[0]
        node = by_name.get(kernel) or by_name.get(base)
        if node is None and base.endswith("_nchwc"):
            node = by_output.get(base[: -len("_nchwc")])
        if node is None:
            node = by_output.get(base)
        if node is None:
            lost += us
            continue
        timed[index[node]] += us
        has_kernel[index[node]] = True
    # a node with no kernel of its own whose outputs only one timed group reads was fused into that group
    group = list(range(len(nodes)))
    for node in reversed(nodes):
        i = index[node]
        if has_kernel[i]:
            continue
        readers = {group[index[c]] for v in node.outputs for c, _ in v.uses() if c in index}
        if len(readers) == 1:
            (g,) = readers
            if has_kernel[g]:
                group[i] = g
    costs = np.zeros(len(nodes))
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    for g, idx in members.items():
        if not has_kernel[g]:
            continue
        weights = np.array([static[i] for i in idx], dtype=np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
        costs[idx] = timed[g] * weights
    total = float(timed.sum()) + lost
    return costs, (lost / total if total > 0 else 0.0)


# --------------------------------------------------------------------------------------------------------
# Cut bytes, stage memory, and the dynamic programme
# --------------------------------------------------------------------------------------------------------

def cut_bytes(graph: ir.Graph, position: Mapping[ir.Node, int], n: int,
              shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """``cross[c]``: bytes per sample of every tensor alive across a cut before node ``c`` (c = 1..n-1)."""
    diff = np.zeros(n + 2)
    last: dict[ir.Value, int] = {}
    for node in graph:
        for v in node_dependencies(node):
            if not is_constant(v):
                last[v] = max(last.get(v, -1), position[node])
    for v in graph.outputs:
        last[v] = n  # model outputs travel to the end
    for v, end in last.items():
        prod = v.producer()
        start = -1 if prod is None else position[prod]
        if end <= start:
            continue
        size = value_bytes_per_sample(v, shapes) or 0
        # alive across cuts start+1 .. end (a cut c lies before node c)
        lo, hi = max(start + 1, 1), min(end, n - 1)
        if lo <= hi:
            diff[lo] += size
            diff[hi + 1] -= size
    return np.cumsum(diff)[: n + 1]


def stage_ends(nodes: Sequence[ir.Node], out_bytes: np.ndarray, limit: float) -> np.ndarray:
    """``end[a]``: the furthest exclusive end of a stage starting at node ``a`` that fits in ``limit``
    (its distinct weights plus the bytes its nodes make). Non-decreasing in ``a`` (two pointers)."""
    n = len(nodes)
    weights = [[(id(v), v.const_value.nbytes) for v in node_dependencies(node) if is_constant(v)]  # type: ignore[union-attr]
               for node in nodes]
    for i, node in enumerate(nodes):
        own = sum(dict(weights[i]).values()) + out_bytes[i]
        if own > limit:
            raise UserError(f"partition.max_stage_bytes={int(limit)} is smaller than node '{node.name}' alone "
                            f"({int(own)} bytes of weights and activations); raise it to at least {int(own)}")
    refs: collections.Counter[int] = collections.Counter()
    total = 0.0
    end = np.zeros(n, dtype=np.int64)
    b = 0
    for a in range(n):
        if b < a:
            b = a
        while b < n:
            extra = out_bytes[b] + sum(size for key, size in dict(weights[b]).items() if refs[key] == 0)
            if total + extra > limit:
                break
            for key, size in dict(weights[b]).items():
                refs[key] += 1
            total += extra
            b += 1
        end[a] = b
        for key, size in dict(weights[a]).items():  # node a leaves the window
            refs[key] -= 1
            if refs[key] == 0:
                total -= size
        total -= out_bytes[a]
    return end


def fewest_stages(end: np.ndarray) -> int:
    a, k = 0, 0
    while a < len(end):
        a = int(end[a])
        k += 1
    return k


def best_cuts(costs: np.ndarray, cross: np.ndarray, k: int, end: np.ndarray | None,
              slack: float) -> list[int]:
    """Cut points c_1 < … < c_{k-1} (stage j is nodes [c_j, c_{j+1})).

    Step 1 finds B*, the least possible cost of the costliest stage; step 2 minimises the summed cut bytes
    over the splits whose every stage costs at most B* (1 + slack). Both are O(k n) vector operations.
    """
    n = len(costs)
    if k == 1:
        return []
    prefix = np.concatenate([[0.0], np.cumsum(costs, dtype=np.float64)])
    # start[i]: smallest stage start j such that a stage [j, i) fits in memory
    start = np.zeros(n + 1, dtype=np.int64) if end is None else np.searchsorted(end, np.arange(n + 1), side="left")
    inf = np.inf

    # step 1: f[j][i] = least bottleneck splitting nodes [0, i) into j stages
    f = np.full(n + 1, inf)
    f[1:] = prefix[1:]
    if end is not None:
        f[1:][np.arange(1, n + 1) > end[0]] = inf
    for j in range(2, k + 1):
        g = np.full(n + 1, inf)
        for i in range(j, n + 1):
            lo = max(int(start[i]), j - 1)
            if lo > i - 1:
                continue
            cand = np.maximum(f[lo:i], prefix[i] - prefix[lo:i])
            g[i] = cand.min()
        f = g
    bottleneck = f[n]
    if not np.isfinite(bottleneck):
        raise UserError(f"the model cannot be split into {k} stages that each fit partition.max_stage_bytes")
    cap = bottleneck * (1.0 + slack) + 1e-9 * max(prefix[n], 1.0)

    # step 2: least summed cut bytes with every stage within cap
    h = np.full(n + 1, inf)
    ok1 = prefix[1:] <= cap
    if end is not None:
        ok1 &= np.arange(1, n + 1) <= end[0]
    h[1:][ok1] = 0.0
    back = np.zeros((k + 1, n + 1), dtype=np.int64)
    cost_start = np.searchsorted(prefix, prefix - cap, side="left")  # smallest j with prefix[i]-prefix[j] <= cap
    for j in range(2, k + 1):
        g = np.full(n + 1, inf)
        for i in range(j, n + 1):
            lo = max(int(start[i]), int(cost_start[i]), j - 1)
            if lo > i - 1:
                continue
            cand = h[lo:i] + cross[lo:i]
            best = int(np.argmin(cand))
            if np.isfinite(cand[best]):
                g[i] = cand[best]
                back[j, i] = lo + best
        h = g
    if not np.isfinite(h[n]):  # cannot happen: the step-1 split satisfies the cap
        raise RuntimeError("no split within the balance cap")
    cuts = []
    i = n
    for j in range(k, 1, -1):
        i = int(back[j, i])
        cuts.append(i)
    return sorted(cuts)


def stage_costs(costs: np.ndarray, cuts: Sequence[int]) -> list[float]:
    bounds = [0, *cuts, len(costs)]
    return [float(costs[a:b].sum()) for a, b in zip(bounds, bounds[1:])]


def balance_ratio(stage_cost: Sequence[float]) -> float:
    mean = sum(stage_cost) / len(stage_cost)
    return max(stage_cost) / mean if mean > 0 else 1.0


# --------------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------------

@register
class PartitionPass(GraphPass):
    name = "partition"
    summary = "Split into K balanced stages (min cut bytes) for pipelined multi-device execution; writes a stage directory."
    Options = PartitionOptions
    tolerance = Tolerance(rel=1e-5)  # the model itself is not changed, only annotated

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: PartitionOptions = self.options
        ctx = self.context
        NameFixPass()(model)  # stages are named by node names, so every node needs a unique one
        model.graph.sort()
        nodes = list(model.graph)
        n = len(nodes)
        position = {node: i for i, node in enumerate(nodes)}

        per_sample = per_sample_shapes(model, ctx.shapes)
        shapes = infer_concrete_shapes(model, per_sample) if per_sample is not None else {}
        cross = cut_bytes(model.graph, position, n, shapes)
        out_bytes = np.array([sum(value_bytes_per_sample(v, shapes) or 0 for v in node.outputs) for node in nodes],
                             dtype=np.float64) * o.micro_batch
        end = stage_ends(nodes, out_bytes, o.max_stage_bytes) if o.max_stage_bytes is not None else None

        if o.stages is not None:
            k = o.stages
        elif end is not None:
            k = fewest_stages(end)
        else:
            k = 2
        if k > n:
            raise UserError(f"partition.stages={k} but the model has only {n} node{'s' if n != 1 else ''}; "
                            f"use at most {n} stages")
        if end is not None and fewest_stages(end) > k:
            raise UserError(f"partition.stages={k} stages cannot each fit partition.max_stage_bytes="
                            f"{o.max_stage_bytes}; that needs at least {fewest_stages(end)} stages")
        devices = expand_devices(o.devices, k, [short_name(ctx.providers[0])])

        costs, exact = static_costs(nodes, shapes, o.bytes_weight, o.micro_batch)
        unit = "flop-equivalents"
        if o.cost == "profile":
            costs, lost = profiled_costs(model, nodes, self, costs)
            unit = "microseconds"
            self.details["profiled_time_not_attributed"] = round(lost, 4)

        cuts = best_cuts(costs, cross, k, end, o.balance_slack)
        naive = [round(n * j / k) for j in range(1, k)]
        per_stage = stage_costs(costs, cuts)
        total = sum(per_stage) or 1.0
        bounds = [0, *cuts, n]
        weights = []
        for a, b in zip(bounds, bounds[1:]):
            seen = {id(v): v.const_value.nbytes for node in nodes[a:b] for v in node_dependencies(node)  # type: ignore[union-attr]
                    if is_constant(v)}
            weights.append(int(sum(seen.values())))
        stages = []
        for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
            provider, device_id = parse_device(devices[j])
            stages.append({
                "nodes": [node.name for node in nodes[a:b]],
                "device": devices[j],
                "provider": provider,
                "predicted_cost": per_stage[j],
                "cost_share": per_stage[j] / total,
                "weight_bytes": weights[j],
                "activation_bytes": int(out_bytes[a:b].sum()),
            })
        plan = {
            "format": PLAN_FORMAT,
            "stages": stages,
            "cost_model": o.cost,
            "cost_unit": unit,
            "costs_exact": bool(exact),
            "balance_ratio": balance_ratio(per_stage),
            "cut_bytes_per_sample": [int(cross[c]) for c in cuts],
            "naive_split": {"cuts": naive, "balance_ratio": balance_ratio(stage_costs(costs, naive)),
                            "cut_bytes_per_sample": [int(cross[c]) for c in naive]},
            "shapes": {name: list(shape) for name, shape in ctx.shapes.items()},
            "max_stage_bytes": o.max_stage_bytes,
            "micro_batch": o.micro_batch,
        }
        model.metadata_props[PLAN_KEY] = json.dumps(plan)

        self.details["stages"] = [
            {"stage": j, "device": s["device"], "nodes": len(s["nodes"]), "first": s["nodes"][0],
             "last": s["nodes"][-1], "cost_share": round(s["cost_share"], 4), "weight_bytes": s["weight_bytes"],
             "cut_bytes_after": int(cross[cuts[j]]) if j < len(cuts) else None}
            for j, s in enumerate(stages)]
        self.details["balance_ratio"] = plan["balance_ratio"]
        self.details["cut_bytes_per_sample"] = int(sum(plan["cut_bytes_per_sample"]))
        self.details["naive_cut_bytes_per_sample"] = int(sum(plan["naive_split"]["cut_bytes_per_sample"]))
        self.details["naive_balance_ratio"] = plan["naive_split"]["balance_ratio"]
        if not exact:
            self.details["note"] = "some shapes were unknown: costs and bytes are approximate (pin them with --shape)"
        logger.info("partition: %d stages, balance %.3f, cut bytes/sample %s", k, plan["balance_ratio"],
                    plan["cut_bytes_per_sample"])
        return ir.passes.PassResult(model, modified=True)


__all__ = ["PartitionPass", "PartitionOptions", "best_cuts", "cut_bytes", "static_costs"]
