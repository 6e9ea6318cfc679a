"""quant, static mode: plan → streaming calibration → QDQ rewrite (→ accuracy fallback)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt import calibrate
from graphopt.calibrate import QuantSpec
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory

from ._quant_plan import COMPUTE_OPS, PASS_THROUGH_OPS, QLINEAR_OPS, Plan, is_float32, make_plan, stem_space_to_depth
from ._quant_qdq import QuantConfig, apply_static, quantize_before_space_to_depth

if TYPE_CHECKING:
    from .quant import QuantPass

logger = logging.getLogger(__name__)


def quant_config(o: object, model: ir.Model) -> QuantConfig:
    opset = model.opset_imports.get("", 0)
    act = o.activation_type  # type: ignore[attr-defined]
    wt = o.resolved_weight_type()  # type: ignore[attr-defined]
    return QuantConfig(
        activation_type=act,
        act_spec=QuantSpec.for_type(act, o.symmetric_activations),  # type: ignore[attr-defined]
        weight_type=wt,
        weight_spec=QuantSpec.for_type(wt, o.symmetric_weights, o.reduce_range),  # type: ignore[attr-defined]
        per_channel=o.per_channel,  # type: ignore[attr-defined]
        qdq_domain="com.microsoft" if act in ("int16", "uint16") and opset < 21 else "",
    )


def fallback_tensors(model: ir.Model) -> list[str]:
    """Every tensor any plan (with any layers kept in float) may quantize, so a fallback never needs
    to calibrate again: inputs and outputs of compute ops, int8-capable neighbours and Relus."""
    ops = set(COMPUTE_OPS) | PASS_THROUGH_OPS | QLINEAR_OPS | {"Relu"}
    names: dict[str, None] = {}
    for node in model.graph:
        if node.op_type not in ops:
            continue
        for v in [*node.inputs, *node.outputs]:
            if v is not None and v.name and is_float32(v) and not v.is_initializer():
                names[v.name] = None
    return list(names)


def calibrate_model(p: QuantPass, model: ir.Model, names: list[str]) -> calibrate.CalibrationResult:
    o, ctx = p.options, p.context
    if ctx.data is None:
        raise UserError("quant.mode=static needs calibration data: give --data (an .npz with the model's "
                        "inputs), or use quant.mode=dynamic / weight_only")
    sessions = ctx.sessions or SessionFactory(work_dir=ctx.work_dir)
    histogram = o.calibration in calibrate.HISTOGRAM_METHODS
    batch = o.calib_batch_size or calibrate.auto_batch_size(model, names, ctx.batch_size, histogram=histogram)
    return calibrate.collect(model, names, ctx.data, sessions, histogram=histogram,
                             bins=o.bins or calibrate.default_bins(o.calibration), batch_size=batch,
                             max_batches=o.calib_batches,
                             provider=ctx.providers[0], progress=ctx.progress)


def build_plan(p: QuantPass, model: ir.Model, keep_float: frozenset[str] = frozenset()) -> Plan:
    o = p.options
    return make_plan(model, o.selection(keep_float), neighbours=o.neighbours, fuse_relu=not o.symmetric_activations)


def run_static(p: QuantPass, model: ir.Model) -> bool:
    o = p.options
    if o.stem_space_to_depth:
        sel = o.selection()
        count = stem_space_to_depth(model, lambda n: "Conv" in sel.op_types and sel.excluded(n) is None)
        p.details["preprocess"]["stem_space_to_depth"] = count
        if count:
            ShapeInferencePass(check_type=False, strict_mode=False)(model)
    plan = build_plan(p, model)
    p.details["skipped"] = plan.skipped
    if not plan.layers:
        p.details["message"] = "nothing to quantize: no layer qualifies (see skipped); graph only cleaned up"
        return True
    cfg = quant_config(o, model)
    names = fallback_tensors(model) if o.target_drop is not None else plan.calibrated
    missing = sorted(set(plan.calibrated) - set(names))
    names += missing
    result = calibrate_model(p, model, names)
    spec = cfg.act_spec
    ranges = {n: calibrate.compute_range(result.stats[n], o.calibration, spec, o.percentile) for n in names}
    p.details["calibration"] = {"method": o.calibration, "tensors": len(names), "batches": result.batches,
                                "samples": result.samples, "batch_size": result.batch_size,
                                "seconds": round(result.seconds, 3)}
    source = getattr(p.context.data, "description", "")
    if source == "synthetic data":
        p.details["warning"] = ("calibrated on synthetic random inputs: activation ranges will not match real "
                                "data; give --data with real samples")
    if o.target_drop is not None:
        from ._quant_fallback import run_fallback

        plan = run_fallback(p, model, plan, ranges, cfg)
    rows = apply_static(model, plan, ranges, cfg)
    if o.stem_space_to_depth:
        quantize_before_space_to_depth(model)
    p.details["layers"] = rows
    p.details["summary"] = {"quantized_layers": len(plan.layers), "int8_neighbours": len(plan.region) - len(plan.layers),
                            "qdq_tensors": len(plan.quantized), "relus_absorbed": len(plan.fused_relu),
                            "activation_type": cfg.activation_type, "weight_type": cfg.weight_type,
                            "per_channel": cfg.per_channel}
    return True
