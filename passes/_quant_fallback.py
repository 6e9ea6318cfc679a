"""quant, accuracy-aware fallback (``target_drop``): keep the most sensitive layers in float.

Sensitivity is measured in one ONNX Runtime pass: a clone of the float model gets, beside every layer,
a shadow copy that sees the same float inputs through the Q/DQ the full plan would give them, int8
weights and (where the plan quantizes it) a Q/DQ output. Each layer's relative error (noise power over
signal power of its output) is then the error quantizing that layer alone adds, with the calibration
ranges already computed; nothing is calibrated again.

Then a binary search over k (the k most sensitive layers in float) finds the fewest float layers (the
fastest model) whose accuracy drop against the float model stays within ``target_drop``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from graphopt import calibrate
from graphopt.calibrate import quant_params
from graphopt.data import DataSource, input_specs, open_data
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory
from graphopt.validate import AgreementMeter

from ._quant_plan import Layer, Plan
from ._quant_qdq import DTYPES, Names, QuantConfig, WeightQuantizer, np_type, values_by_name, add_initializer, apply_static

if TYPE_CHECKING:
    from .quant import QuantPass

logger = logging.getLogger(__name__)


def _eval_source(p: QuantPass, model: ir.Model) -> DataSource:
    o, ctx = p.options, p.context
    if o.eval_data is not None:
        return open_data(o.eval_data, model, shapes=ctx.shapes, batch_size=ctx.batch_size, seed=ctx.seed)
    assert ctx.data is not None
    return ctx.data


def _qdq_private(graph: ir.Graph, names: Names, model: ir.Model, value: ir.Value, scale: float, zp: int,
                 cfg: QuantConfig, anchor: ir.Node, after: bool = False) -> ir.Value:
    """Q → DQ of ``value`` feeding only what the caller connects it to."""
    s = add_initializer(model, names, f"{value.name}_sens_scale", np.array(scale, np.float32))
    z = add_initializer(model, names, f"{value.name}_sens_zp", np.array(zp, np_type(cfg.activation_type)),
                        DTYPES[cfg.activation_type])
    q = ir.node("QuantizeLinear", [value, s, z], domain=cfg.qdq_domain, name=names(f"{value.name}_sens_Q"))
    q.outputs[0].name = names(f"{value.name}_sens_q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], domain=cfg.qdq_domain, name=names(f"{value.name}_sens_DQ"))
    dq.outputs[0].name = names(f"{value.name}_sens_dq")
    dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
    if after:
        graph.insert_after(anchor, [q, dq])
    else:
        graph.insert_before(anchor, [q, dq])
    return dq.outputs[0]


def rank_layers(p: QuantPass, model: ir.Model, plan: Plan, ranges: dict[str, tuple[float, float]],
                cfg: QuantConfig, data: DataSource) -> list[dict[str, Any]]:
    """Per layer: relative output error of quantizing it alone; most sensitive first."""
    o, ctx = p.options, p.context
    clone = model.clone()
    graph = clone.graph
    names = Names(clone)
    values = values_by_name(clone)
    by_name = {n.name: n for n in graph if n.name}
    weights = WeightQuantizer(clone, names, cfg)
    params = {name: quant_params(*ranges[plan.param_of[name]], cfg.act_spec) for name in plan.quantized}
    relu_of = {inner: relu_out for relu_out, inner in plan.fused_relu.items()}
    quantized = set(plan.quantized)
    graph.outputs.clear()
    pairs: list[tuple[str, str, str]] = []
    for layer in plan.layers:
        node = by_name[layer.node.name]
        copy = ir.Node(node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
                       name=names(f"{node.name}_sens"))
        copy.outputs[0].name = names(f"{node.outputs[0].name}_sens")
        graph.insert_after(node, copy)
        sx = 1.0
        for k, i in enumerate(layer.act_inputs):
            v = node.inputs[i]
            assert v is not None
            real = plan.fused_relu.get(v.name, v.name)
            scale, zp = params[real]
            if k == 0:
                sx = scale
            copy.replace_input_with(i, _qdq_private(graph, names, clone, v, scale, zp, cfg, copy))
        weights.quantize_layer(Layer(node, layer.act_inputs, layer.weight_index, layer.axis, layer.bias_index),
                               sx, copy)
        out = node.outputs[0]
        shadow = copy.outputs[0]
        reference = out
        if out.name in quantized:
            if out.name in relu_of:
                reference = values[relu_of[out.name]]
            scale, zp = params[out.name]
            shadow = _qdq_private(graph, names, clone, shadow, scale, zp, cfg, copy, after=True)
        for v in (reference, shadow):
            if v not in graph.outputs:
                graph.outputs.append(v)
        pairs.append((layer.name, reference.name, shadow.name))
    sessions = ctx.sessions or SessionFactory(work_dir=ctx.work_dir)
    session = sessions.session(clone, ctx.providers[0])
    fetch = [n for _, r, s in pairs for n in (r, s)]
    batch_size = calibrate.auto_batch_size(clone, fetch, ctx.batch_size)
    signal = np.zeros(len(pairs))
    noise = np.zeros(len(pairs))
    specs = input_specs(model)
    with ctx.progress.task("ranking layers", total=None) as task:
        for batch in data.batches(batch_size=batch_size, limit=o.eval_samples, specs=specs):
            got = dict(zip(fetch, session.run(fetch, batch.inputs)))
            for j, (_, r, s) in enumerate(pairs):
                ref = got[r].astype(np.float64)
                signal[j] += float(np.sum(ref * ref))
                noise[j] += float(np.sum((ref - got[s]) ** 2))
            task.advance()
    del session
    rows = []
    for j, layer in enumerate(plan.layers):
        rel = noise[j] / signal[j] if signal[j] > 0 else (0.0 if noise[j] == 0 else math.inf)
        snr = 10 * math.log10(1 / rel) if 0 < rel < math.inf else (math.inf if rel == 0 else -math.inf)
        rows.append({"name": layer.name, "op_type": layer.node.op_type, "relative_error": rel,
                     "snr_db": round(snr, 2) if math.isfinite(snr) else None})
    rows.sort(key=lambda r: -r["relative_error"])
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return rows


class _Evaluator:
    """Accuracy drop of candidates against the float model on fixed evaluation batches."""

    def __init__(self, p: QuantPass, model: ir.Model, data: DataSource) -> None:
        self.p, self.model, self.data = p, model, data
        ctx = p.context
        self.sessions = ctx.sessions or SessionFactory(work_dir=ctx.work_dir)
        self.provider = ctx.providers[0]
        self.specs = input_specs(model)
        session = self.sessions.session(model, self.provider)
        self.reference = [session.run(None, b.inputs) for b in self._batches()]

    def _batches(self):  # type: ignore[no-untyped-def]
        ctx = self.p.context
        return self.data.batches(batch_size=ctx.batch_size, limit=self.p.options.eval_samples, specs=self.specs)

    def drop(self, candidate: ir.Model) -> float:
        session = self.sessions.session(candidate, self.provider)
        meter = AgreementMeter()
        for batch, ref in zip(self._batches(), self.reference):
            meter.update(ref, session.run(None, batch.inputs), batch.labels)
        drop = meter.result().accuracy_drop_points
        if drop is None:
            raise UserError("quant.target_drop needs a classifier: the model's first output must hold class "
                            "scores (labels in the data give accuracy, else top-1 agreement is used)")
        return float(drop)


def run_fallback(p: QuantPass, model: ir.Model, plan: Plan, ranges: dict[str, tuple[float, float]],
                 cfg: QuantConfig) -> Plan:
    """Choose which layers stay in float; returns the plan to apply to ``model``."""
    from ._quant_static import build_plan

    o = p.options
    data = _eval_source(p, model)
    ranking = rank_layers(p, model, plan, ranges, cfg, data)
    p.details["sensitivity"] = ranking
    evaluator = _Evaluator(p, model, data)
    n = len(plan.layers)
    limit = n - 1 if o.max_float_layers is None else min(o.max_float_layers, n - 1)
    tries: dict[int, float] = {}

    def attempt(k: int) -> float:
        if k not in tries:
            keep = frozenset(r["name"] for r in ranking[:k])
            candidate = model.clone()
            apply_static(candidate, build_plan(p, candidate, keep), ranges, cfg)
            tries[k] = evaluator.drop(candidate)
            logger.info("target_drop: %d layer(s) in float -> drop %.3f points", k, tries[k])
        return tries[k]

    budget = float(o.target_drop)  # type: ignore[arg-type]
    with p.context.progress.task("accuracy fallback", total=None) as task:
        if attempt(0) <= budget:
            chosen = 0
        elif limit <= 0 or attempt(limit) > budget:
            chosen = min(tries, key=lambda k: (tries[k], k))
            p.failure = (f"target_drop {budget:g} not met: best drop {tries[chosen]:.3f} points with "
                         f"{chosen} layer(s) in float (max_float_layers {limit})")
        else:
            lo, hi = 0, limit  # attempt(lo) fails, attempt(hi) passes
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(mid) <= budget:
                    hi = mid
                else:
                    lo = mid
                task.advance()
            chosen = hi
    keep = frozenset(r["name"] for r in ranking[:chosen])
    p.details["kept_in_float"] = [dict(r) for r in ranking[:chosen]]
    p.details["fallback"] = {"target_drop": budget, "float_layers": chosen, "drop_points": tries[chosen],
                             "tries": [{"float_layers": k, "drop_points": d} for k, d in sorted(tries.items())]}
    return build_plan(p, model, keep)
