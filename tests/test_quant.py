"""The quant pass: quantized models run in ORT as int8 kernels and agree with fp32 within stated bounds.

Tolerances (stated per test): digits models lose at most 1 point of test accuracy; resnet_small and
transformer_small keep mean cosine >= 0.999 with fp32 (static and dynamic) and >= 0.97 (int4 weight-only).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import api

from conftest import load_npz, ort_outputs

CONV_KERNELS = {"QLinearConv"}
GEMM_KERNELS = {"QGemm"}
MATMUL_KERNELS = {"QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger"}


def quantize(model: Path | str, out: Path, data: object = None, **options: object) -> api.OptimizeResult:
    return api.optimize(str(model), passes=["quant"], data=data, output=out, validate=False,
                        set_options={"quant": {k: str(v) for k, v in options.items()}})


def details(result: api.OptimizeResult) -> dict:
    return result.records[0].details


def optimized_ops(path: Path, tmp_path: Path) -> collections.Counter:
    """Op types in the model as ORT runs it (after its graph optimizations, QDQ fusions included)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    target = tmp_path / f"{path.stem}.ort-optimized.onnx"
    so.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(target)).graph.node)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def accuracy(model: Path, inputs: dict, labels: np.ndarray) -> float:
    return float(np.mean(ort_outputs(model, inputs)[0].argmax(1) == labels))


# --- reference models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_digits_cnn_every_method(models_dir: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "q.onnx"
    result = quantize(models_dir / "digits_cnn.onnx", out, models_dir / "digits_cnn_calib.npz", calibration=method)
    inputs, labels = load_npz(models_dir / "digits_cnn_test.npz")
    drop = accuracy(models_dir / "digits_cnn.onnx", inputs, labels) - accuracy(out, inputs, labels)
    assert drop <= 0.01, f"{method}: accuracy dropped {100 * drop:.2f} points"
    ops = optimized_ops(out, tmp_path)
    # Every Conv and Gemm runs as an int8 kernel; no float Conv/Gemm is left.
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2
    assert not {"Conv", "Gemm", "FusedConv", "FusedGemm"} & set(ops)
    d = details(result)
    assert d["summary"]["quantized_layers"] == 5 and d["calibration"]["samples"] == 200
    assert d["preprocess"]["batchnorm_folded"] == 3


def test_resnet_small_int8_kernels_and_agreement(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = quantize(models_dir / "resnet_small.onnx", out, models_dir / "resnet_small_calib.npz")
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 20 and ops["QGemm"] == 1
    assert ops["QLinearAdd"] == 8 and ops["QLinearGlobalAveragePool"] == 1  # residuals and pooling in int8
    assert ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1  # only the input is quantized in float
    assert not {"Conv", "Gemm", "FusedConv", "Relu"} & set(ops)
    d = details(result)
    assert d["summary"]["relus_absorbed"] == 17 and d["preprocess"]["batchnorm_folded"] == 20
    inputs, _ = load_npz(models_dir / "resnet_small_calib.npz", 16)
    ref, got = ort_outputs(models_dir / "resnet_small.onnx", inputs)[0], ort_outputs(out, inputs)[0]
    assert cosine(ref, got) >= 0.999
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.9


def test_transformer_small_static(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    quantize(models_dir / "transformer_small.onnx", out, models_dir / "transformer_small_calib.npz",
             calibration="percentile")
    ops = optimized_ops(out, tmp_path)
    assert sum(ops[k] for k in MATMUL_KERNELS) == 32 and ops["QGemm"] == 1
    assert ops["MatMul"] == 0 and ops["FusedMatMul"] == 0 and ops["Gemm"] == 0
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz")
    assert cosine(ort_outputs(models_dir / "transformer_small.onnx", inputs)[0], ort_outputs(out, inputs)[0]) >= 0.999


def test_transformer_small_dynamic(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = quantize(models_dir / "transformer_small.onnx", out, mode="dynamic")
    ops = optimized_ops(out, tmp_path)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 25  # 24 projections + classifier
    assert details(result)["summary"]["quantized_layers"] == 25
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz")
    assert cosine(ort_outputs(models_dir / "transformer_small.onnx", inputs)[0], ort_outputs(out, inputs)[0]) >= 0.999


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_transformer_small_weight_only_int4(models_dir: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "q.onnx"
    quantize(models_dir / "transformer_small.onnx", out, mode="weight_only", weight_only_format=fmt, block_size=32)
    ops = optimized_ops(out, tmp_path)
    assert ops["MatMulNBits"] == 24 and ops["Gemm"] == 1  # by default the classifier Gemm stays float
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz")
    assert cosine(ort_outputs(models_dir / "transformer_small.onnx", inputs)[0], ort_outputs(out, inputs)[0]) >= 0.97
    assert out.stat().st_size < 0.3 * (models_dir / "transformer_small.onnx").stat().st_size


# --- layouts and numerics on small graphs ----------------------------------------------------------------

def _model(nodes: list, inits: list, x_shape: list, tmp_path: Path, name: str = "m.onnx", y_rank: int = 2) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(y_rank)])],
                              [numpy_helper.from_array(a, n) for n, a in inits])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


LAYOUTS = {
    # op, weight shape, attributes, x shape, per-channel axis
    "conv": ("Conv", (8, 3, 3, 3), {"pads": [1, 1, 1, 1]}, ["N", 3, 6, 6], 0),
    "conv_transpose": ("ConvTranspose", (3, 5, 3, 3), {}, ["N", 3, 6, 6], 1),
    "gemm_transB": ("Gemm", (7, 12), {"transB": 1}, ["N", 12], 0),
    "gemm": ("Gemm", (12, 7), {}, ["N", 12], 1),
    "matmul": ("MatMul", (12, 7), {}, ["N", 12], 1),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_per_channel_scale_layout(tmp_path: Path, case: str) -> None:
    op, wshape, attrs, xshape, axis = LAYOUTS[case]
    rng = np.random.default_rng(4)
    w = (rng.standard_normal(wshape) * rng.uniform(0.1, 3, wshape[axis]).reshape(
        [-1 if a == axis else 1 for a in range(len(wshape))])).astype(np.float32)
    path = _model([helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)], [("w", w)], xshape, tmp_path,
                  y_rank=len(xshape))
    x = rng.standard_normal([4] + xshape[1:]).astype(np.float32)
    out = tmp_path / "q.onnx"
    quantize(path, out, {"x": x}, op_types="Conv,ConvTranspose,Gemm,MatMul")
    proto = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    layer = next(n for n in proto.graph.node if n.op_type == op)
    dq = next(n for n in proto.graph.node if n.output[0] == layer.input[1])
    assert dq.op_type == "DequantizeLinear"
    assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == axis
    scale = inits[dq.input[1]]
    others = tuple(a for a in range(w.ndim) if a != axis)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=others) / 127, rtol=1e-6)
    assert inits[dq.input[0]].dtype == np.int8 and not np.any(inits[dq.input[2]])
    ref, got = ort_outputs(path, {"x": x})[0], ort_outputs(out, {"x": x})[0]
    assert cosine(ref, got) >= 0.999


@pytest.mark.parametrize("cin,k,pad,size", [(3, 7, 3, 20), (3, 7, 3, 21), (2, 5, 2, 17), (4, 7, 0, 16)])
def test_stem_space_to_depth_is_exact(tmp_path: Path, cin: int, k: int, pad: int, size: int) -> None:
    """The stem rewrite (Pad → SpaceToDepth → stride-1 Conv) computes the same float outputs."""
    from graphopt.passes._quant_plan import stem_space_to_depth

    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    path = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="stem", strides=[2, 2],
                                    pads=[pad] * 4, kernel_shape=[k, k])],
                  [("w", w), ("b", b)], ["N", cin, size, size], tmp_path, y_rank=4)
    model = ir.load(str(path))
    assert stem_space_to_depth(model, lambda n: True) == 1
    assert [n.op_type for n in model.graph] == ["Pad", "SpaceToDepth", "Conv"]
    x = rng.standard_normal((2, cin, size, size)).astype(np.float32)
    got = ort_outputs(ir.serde.serialize_model(model).SerializeToString(), {"x": x})[0]
    np.testing.assert_allclose(got, ort_outputs(path, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_stem_quantized_before_space_to_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stem's QuantizeLinear moves in front of Pad → SpaceToDepth (uint8 data movement) and the
    outputs stay bit-identical to quantizing after them; ORT still fuses the conv into QLinearConv."""
    from graphopt.passes import _quant_static

    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3, 7, 7)).astype(np.float32)
    path = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="stem", strides=[2, 2], pads=[3] * 4,
                                    kernel_shape=[7, 7])], [("w", w)], ["N", 3, 20, 20], tmp_path, y_rank=4)
    x = rng.standard_normal((6, 3, 20, 20)).astype(np.float32)
    early, late = tmp_path / "early.onnx", tmp_path / "late.onnx"
    quantize(path, early, {"x": x}, calibration="minmax")
    ops = [n.op_type for n in onnx.load(str(early)).graph.node]
    assert ops[:3] == ["QuantizeLinear", "Pad", "SpaceToDepth"]
    monkeypatch.setattr(_quant_static, "quantize_before_space_to_depth", lambda model: 0)
    quantize(path, late, {"x": x}, calibration="minmax")
    assert [n.op_type for n in onnx.load(str(late)).graph.node][:3] == ["Pad", "SpaceToDepth", "QuantizeLinear"]
    np.testing.assert_array_equal(ort_outputs(early, {"x": x})[0], ort_outputs(late, {"x": x})[0])
    assert cosine(ort_outputs(path, {"x": x})[0], ort_outputs(early, {"x": x})[0]) >= 0.999
    assert optimized_ops(early, tmp_path)["QLinearConv"] == 1


def test_weight_only_packing_matches_numpy(tmp_path: Path) -> None:
    """MatMulNBits with our packed int4 blocks computes x @ dequantized(W) (asymmetric and symmetric)."""
    from graphopt.passes._quant_modes import block_quantize

    rng = np.random.default_rng(5)
    w = rng.standard_normal((80, 24)).astype(np.float32)  # K=80: a partial last block of 16
    path = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("w", w)], ["N", 80], tmp_path)
    x = rng.standard_normal((3, 80)).astype(np.float32)
    for wt in ("int4", "uint4", "int8"):
        out = tmp_path / f"{wt}.onnx"
        quantize(path, out, mode="weight_only", weight_type=wt, block_size=32)
        codes, scale, zp = block_quantize(w, 4 if "4" in wt else 8, 32, wt.startswith("int"))
        bits = 4 if "4" in wt else 8
        zero = (1 << (bits - 1)) if zp is None else zp[..., None]
        deq = ((codes.astype(np.float64) - zero) * scale[..., None]).reshape(24, -1)[:, :80].T
        np.testing.assert_allclose(ort_outputs(out, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
        assert np.abs(deq - w).max() <= np.abs(scale).max() * (1 if bits == 4 else 1) + 1e-6


def test_activation_int16_and_int8_types(models_dir: Path, tmp_path: Path) -> None:
    inputs, labels = load_npz(models_dir / "digits_mlp_test.npz")
    base = accuracy(models_dir / "digits_mlp.onnx", inputs, labels)
    for act in ("int16", "int8"):
        out = tmp_path / f"{act}.onnx"
        quantize(models_dir / "digits_mlp.onnx", out, models_dir / "digits_mlp_calib.npz", activation_type=act,
                 symmetric_activations="true" if act == "int16" else "false")
        assert base - accuracy(out, inputs, labels) <= 0.01


def test_selection_options(models_dir: Path, tmp_path: Path) -> None:
    model, data = models_dir / "digits_cnn.onnx", models_dir / "digits_cnn_calib.npz"
    out = tmp_path / "a.onnx"
    d = details(quantize(model, out, data, exclude_op_types="Gemm"))
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 0 and d["summary"]["quantized_layers"] == 3
    out = tmp_path / "b.onnx"
    d = details(quantize(model, out, data, keep_first="true", keep_last="true"))
    assert d["summary"]["quantized_layers"] == 3
    assert {r["reason"] for r in d["skipped"]} == {"kept in float (keep_first)", "kept in float (keep_last)"}
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
    out = tmp_path / "c.onnx"
    d = details(quantize(model, out, data, exclude_regex="Conv_[12]$", exclude_nodes="node_linear_1"))
    assert sorted(r["name"] for r in d["skipped"]) == ["node_Conv_1", "node_Conv_2", "node_linear_1"]


# --- accuracy fallback ------------------------------------------------------------------------------------

def test_target_drop_keeps_exactly_the_ranked_layers(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    # Heavy clipping (percentile 80) makes int8 lose ~9 points; the fallback must win them back.
    result = quantize(models_dir / "digits_cnn.onnx", out, models_dir / "digits_cnn_calib.npz",
                      calibration="percentile", percentile=80, target_drop=1.0,
                      eval_data=str(models_dir / "digits_cnn_test.npz"))
    d = details(result)
    ranking, kept = d["sensitivity"], d["kept_in_float"]
    assert len(ranking) == 5 and [r["rank"] for r in ranking] == [1, 2, 3, 4, 5]
    errors = [r["relative_error"] for r in ranking]
    assert errors == sorted(errors, reverse=True)
    k = d["fallback"]["float_layers"]
    assert 1 <= k <= 4 and [r["name"] for r in kept] == [r["name"] for r in ranking[:k]]
    assert d["fallback"]["drop_points"] <= 1.0 and d["fallback"]["tries"][0]["drop_points"] > 1.0
    assert d["summary"]["quantized_layers"] == 5 - k
    # The kept layers really are float: they are not int8 kernels after ORT's fusions.
    ops = optimized_ops(out, tmp_path)
    kept_ops = collections.Counter(r["op_type"] for r in kept)
    assert ops["QLinearConv"] == 3 - kept_ops["Conv"] and ops["QGemm"] == 2 - kept_ops["Gemm"]
    assert result.records[0].failure is None


def test_target_drop_unmet_exits_1_and_writes_best_model(models_dir: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "q.onnx"
    proc = cli("run", models_dir / "digits_cnn.onnx", "--passes", "quant", "--data",
               models_dir / "digits_cnn_calib.npz", "--no-latency", "-o", out, "--report", tmp_path / "r.json",
               "--set", "quant.calibration=percentile", "--set", "quant.percentile=60",
               "--set", "quant.target_drop=0", "--set", "quant.max_float_layers=1", "-q")
    assert proc.returncode == 1, proc.stderr
    assert out.is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert "target_drop" in report["message"]
    assert report["passes"][0]["details"]["fallback"]["float_layers"] <= 1


# --- left alone -------------------------------------------------------------------------------------------

def test_already_quantized_and_nothing_to_quantize(models_dir: Path, tmp_path: Path) -> None:
    once = tmp_path / "once.onnx"
    quantize(models_dir / "digits_mlp.onnx", once, models_dir / "digits_mlp_calib.npz")
    twice = tmp_path / "twice.onnx"
    result = quantize(once, twice, models_dir / "digits_mlp_calib.npz")
    assert "already quantized" in details(result)["message"]
    assert not result.records[0].details.get("layers")
    assert len(onnx.load(str(twice)).graph.node) == len(onnx.load(str(once)).graph.node)

    path = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])], [],
                  ["N", 4], tmp_path, "plain.onnx")
    result = quantize(path, tmp_path / "plain.q.onnx", {"x": np.ones((2, 4), np.float32)})
    assert "nothing to quantize" in details(result)["message"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "plain.q.onnx")).graph.node] == ["Relu", "Add"]


# --- bad input ---------------------------------------------------------------------------------------------

def _one_line_error(proc, out: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_exits_2(models_dir: Path, tmp_path: Path, cli) -> None:
    model = models_dir / "digits_cnn.onnx"
    out = tmp_path / "q.onnx"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((4, 1, 9, 9), np.float32))
    _one_line_error(cli("run", model, "--passes", "quant", "--data", wrong, "-o", out), out, "input")
    empty = tmp_path / "empty.npz"
    np.savez(empty, input=np.zeros((0, 1, 8, 8), np.float32))
    _one_line_error(cli("run", model, "--passes", "quant", "--data", empty, "-o", out), out, "no samples")
    nan = tmp_path / "nan.npz"
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[1, 0, 2, 2] = np.inf
    np.savez(nan, input=x)
    _one_line_error(cli("run", model, "--passes", "quant", "--data", nan, "-o", out), out, "NaN or Inf", "'input'")
    _one_line_error(cli("run", model, "--passes", "quant", "--set", "quant.mode=weight_only",
                        "--set", "quant.calibration=entropy", "-o", out), out, "calibration")
    _one_line_error(cli("run", model, "--passes", "quant", "--set", "quant.weight_type=int4", "-o", out), out,
                    "weight_only")
    _one_line_error(cli("run", model, "--passes", "quant", "--set", "quant.percentile=101", "-o", out), out,
                    "percentile")
    _one_line_error(cli("run", model, "--passes", "quant", "--set", "quant.mode=dynamic",
                        "--set", "quant.target_drop=1", "-o", out), out, "target_drop")
