"""quant, dynamic and weight-only modes: MatMul/Gemm weights only, no calibration.

dynamic: x → DynamicQuantizeLinear → MatMulInteger(x_q, W_q) → Cast → Mul(x_scale · w_scale) (+ bias),
the pattern ORT fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat; weights per output column.
weight_only: W → com.microsoft MatMulNBits (4 or 8 bits, one scale per block of ``block_size`` weights
along K), or DequantizeLinear with ``block_size`` (opset 21, int4) which ORT turns into MatMulNBits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt.calibrate import QuantSpec

from ._quant_plan import Layer, constant_array, select_layers
from ._quant_qdq import DTYPES, Names, add_initializer, quantize_weight

if TYPE_CHECKING:
    from .quant import QuantPass

logger = logging.getLogger(__name__)


def _matrix(layer: Layer) -> np.ndarray | None:
    """The layer's weight as [K, N], or None when it is not a constant matrix."""
    if layer.weight_index is None:
        return None
    w = constant_array(layer.node.inputs[layer.weight_index])
    if w is None or w.ndim != 2:
        return None
    return np.ascontiguousarray(w.T if layer.transpose_weight else w).astype(np.float32)


def _replace_output(graph: ir.Graph, node: ir.Node, new: ir.Value) -> None:
    """Make ``new`` stand for ``node``'s output everywhere (graph outputs and name included); drop node."""
    old = node.outputs[0]
    name = old.name
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    new.name = name


def _layers(p: QuantPass, model: ir.Model) -> tuple[list[tuple[Layer, np.ndarray]], list[dict[str, str]]]:
    layers, skipped = select_layers(model, p.options.selection())
    usable = []
    for layer in layers:
        w = _matrix(layer)
        if w is None:
            skipped.append({"name": layer.name, "op_type": layer.node.op_type, "reason": "weight is not a 2-D constant"})
        else:
            usable.append((layer, w))
    p.details["skipped"] = skipped
    return usable, skipped


def run_dynamic(p: QuantPass, model: ir.Model) -> bool:
    o = p.options
    graph = model.graph
    names = Names(model)
    wt = o.resolved_weight_type()
    spec = QuantSpec.for_type(wt, o.symmetric_weights, o.reduce_range)
    usable, _ = _layers(p, model)
    dql_cache: dict[str, ir.Node] = {}
    rows = []
    for layer, w in usable:
        node = layer.node
        x = node.inputs[0]
        assert x is not None
        q, scale, zp = quantize_weight(w, 1 if o.per_channel else None, spec)
        np_type = np.int8 if wt == "int8" else np.uint8
        wq = add_initializer(model, names, f"{layer.name}_weight_quantized", q.astype(np_type), DTYPES[wt])
        wz = add_initializer(model, names, f"{layer.name}_weight_zero_point", zp.astype(np_type), DTYPES[wt])
        ws = add_initializer(model, names, f"{layer.name}_weight_scale", scale)
        new_nodes = []
        if x.name not in dql_cache:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=names(f"{x.name}_DynamicQuantizeLinear"))
            for out, suffix, dt in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                       (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
                out.name, out.type = names(f"{x.name}_{suffix}"), ir.TensorType(dt)
            dql_cache[x.name] = dql
            new_nodes.append(dql)
        dql = dql_cache[x.name]
        xq, xs, xz = dql.outputs
        mmi = ir.node("MatMulInteger", [xq, wq, xz, wz], name=names(f"{layer.name}_MatMulInteger"))
        mmi.outputs[0].name, mmi.outputs[0].type = names(f"{layer.name}_int32"), ir.TensorType(ir.DataType.INT32)
        cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=names(f"{layer.name}_Cast"))
        cast.outputs[0].name = names(f"{layer.name}_cast")
        mul_s = ir.node("Mul", [xs, ws], name=names(f"{layer.name}_scales_Mul"))
        mul_s.outputs[0].name = names(f"{layer.name}_scales")
        out = ir.node("Mul", [cast.outputs[0], mul_s.outputs[0]], name=names(f"{layer.name}_Mul"))
        out.outputs[0].name = names(f"{layer.name}_float")
        new_nodes += [mul_s, mmi, cast, out]
        final = out.outputs[0]
        if layer.node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [final, node.inputs[2]], name=names(f"{layer.name}_bias_Add"))
            add.outputs[0].name = names(f"{layer.name}_biased")
            new_nodes.append(add)
            final = add.outputs[0]
        graph.insert_before(node, new_nodes)
        _replace_output(graph, node, final)
        rows.append({"name": layer.name, "op_type": node.op_type, "K": int(w.shape[0]), "N": int(w.shape[1]),
                     "per_channel": bool(o.per_channel)})
    p.details["layers"] = rows
    p.details["summary"] = {"quantized_layers": len(rows), "weight_type": wt, "mode": "dynamic"}
    if not rows:
        p.details["message"] = "nothing to quantize: no MatMul/Gemm with a constant 2-D weight"
    return bool(rows)


def block_quantize(w: np.ndarray, bits: int, block: int, signed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize [K, N] in blocks of ``block`` rows per column.

    Returns unsigned codes [N, k_blocks, block] (stored value = code), scales [N, k_blocks] and, for
    unsigned (asymmetric) quantization, zero points [N, k_blocks]. Signed quantization maps the block's
    largest-magnitude weight to -2**(bits-1) exactly (scale may be negative), with the implicit zero
    point 2**(bits-1); this keeps one more level than a positive absmax scale.
    """
    k, n = w.shape
    kb = -(-k // block)
    padded = np.zeros((kb * block, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(kb, block, n).transpose(2, 0, 1)  # [N, kb, block]
    half = 1 << (bits - 1)
    if signed:
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=2)[..., 0]
        scale = (extreme / -half).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1.0), scale)
        codes = np.clip(np.round(blocks / scale[..., None]), -half, half - 1) + half
        return codes.astype(np.uint8), scale, None
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    codes = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, qmax)
    return codes.astype(np.uint8), scale, zp.astype(np.uint8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (values < 2**bits) along the last axis, lowest bits first."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    length = codes.shape[-1]
    pad = (-length) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), codes.dtype)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per):
        out |= (grouped[..., i] << (bits * i)).astype(np.uint8)
    return out


def run_weight_only(p: QuantPass, model: ir.Model) -> bool:
    o = p.options
    wt = o.resolved_weight_type()
    bits = 4 if wt in ("int4", "uint4") else 8
    signed = wt in ("int4", "int8")
    usable, _ = _layers(p, model)
    if o.weight_only_format == "qdq" and usable and model.opset_imports.get("", 0) < 21:
        from onnxscript import version_converter

        version_converter.convert_version(model, 21)
        usable, _ = _layers(p, model)  # nodes were rebuilt by the conversion
    graph = model.graph
    names = Names(model)
    rows = []
    for layer, w in usable:
        node = layer.node
        k, n = w.shape
        codes, scale, zp = block_quantize(w, bits, o.block_size, signed)
        if o.weight_only_format == "qdq":
            final = _dq_matmul(model, names, layer, codes, scale, zp, bits, signed, k, n, o.block_size)
        else:
            final = _matmulnbits(model, names, layer, codes, scale, zp, bits, k, n, o.block_size, o.accuracy_level)
        _replace_output(graph, node, final)
        rows.append({"name": layer.name, "op_type": node.op_type, "K": int(k), "N": int(n), "bits": bits,
                     "block_size": o.block_size})
    model.opset_imports.setdefault("com.microsoft", 1)
    p.details["layers"] = rows
    p.details["summary"] = {"quantized_layers": len(rows), "weight_type": wt, "mode": "weight_only",
                            "format": o.weight_only_format, "block_size": o.block_size}
    if not rows:
        p.details["message"] = "nothing to quantize: no MatMul/Gemm with a constant 2-D weight"
    return bool(rows)


def _matmulnbits(model: ir.Model, names: Names, layer: Layer, codes: np.ndarray, scale: np.ndarray,
                 zp: np.ndarray | None, bits: int, k: int, n: int, block: int, accuracy_level: int) -> ir.Value:
    node = layer.node
    packed = pack_bits(codes, bits)  # [N, kb, block*bits/8]
    b = add_initializer(model, names, f"{layer.name}_weight_q{bits}", packed)
    s = add_initializer(model, names, f"{layer.name}_weight_scales", scale.reshape(-1))
    inputs: list[ir.Value | None] = [node.inputs[0], b, s]
    if zp is not None:
        inputs.append(add_initializer(model, names, f"{layer.name}_weight_zero_points", pack_bits(zp, bits).reshape(-1)))
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        inputs += [None] * (5 - len(inputs)) + [bias]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    mm = ir.node("MatMulNBits", inputs, attrs, domain="com.microsoft", name=names(f"{layer.name}_MatMulNBits"))
    model.graph.insert_before(node, mm)
    return mm.outputs[0]


def _dq_matmul(model: ir.Model, names: Names, layer: Layer, codes: np.ndarray, scale: np.ndarray,
               zp: np.ndarray | None, bits: int, signed: bool, k: int, n: int, block: int) -> ir.Value:
    """DequantizeLinear(int4 [K, N], scales [kb, N], axis=0, block_size) → MatMul (+ Add bias)."""
    node = layer.node
    half = 1 << (bits - 1)
    full = codes.transpose(1, 2, 0).reshape(-1, n)[:k]  # [K, N] codes
    if signed:
        import ml_dtypes

        values = (full.astype(np.int16) - half).astype(ml_dtypes.int4)
        dtype = ir.DataType.INT4
    else:
        import ml_dtypes

        values = full.astype(ml_dtypes.uint4)
        dtype = ir.DataType.UINT4
    wq = add_initializer(model, names, f"{layer.name}_weight_q4", values, dtype)
    ws = add_initializer(model, names, f"{layer.name}_weight_scales", np.ascontiguousarray(scale.T))
    inputs = [wq, ws]
    if zp is not None:
        import ml_dtypes

        inputs.append(add_initializer(model, names, f"{layer.name}_weight_zero_points",
                                      np.ascontiguousarray(zp.T).astype(ml_dtypes.uint4), ir.DataType.UINT4))
    dq = ir.node("DequantizeLinear", inputs, {"axis": 0, "block_size": block}, name=names(f"{layer.name}_weight_DQ"))
    dq.outputs[0].name = names(f"{layer.name}_weight_dequantized")
    mm = ir.node("MatMul", [node.inputs[0], dq.outputs[0]], name=names(f"{layer.name}_MatMul"))
    mm.outputs[0].name = names(f"{layer.name}_matmul")
    new = [dq, mm]
    final = mm.outputs[0]
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        add = ir.node("Add", [final, bias], name=names(f"{layer.name}_bias_Add"))
        add.outputs[0].name = names(f"{layer.name}_biased")
        new.append(add)
        final = add.outputs[0]
    model.graph.insert_before(node, new)
    return final
