"""fp16 pass: converted models run in ONNX Runtime (CPU) and agree with float32 within a stated tolerance.

Tolerance on the reference models (float16 keeps ~3 significant digits): max |fp16 - fp32| <= 5e-3 x max
|fp32 output| and top-1 agreement >= 98%. Measured (onnxruntime 1.32 CPU): 1e-4 .. 6e-4 relative.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.options import build
from graphopt.registry import get
from conftest import REFERENCE_MODELS, load_npz, ort_outputs, to_bytes

REL_TOL = 5e-3
LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def run_fp16(model: ir.Model, **options: object):
    cls = get("fp16")
    p = cls(build(cls.Options, "fp16", {k: v for k, v in options.items()}))
    p(model)
    return p


def sample_inputs(models_dir: Path, name: str) -> dict[str, np.ndarray]:
    if name.startswith("digits"):
        return load_npz(models_dir / f"{name}_test.npz", 64)[0]
    return load_npz(models_dir / f"{name}_calib.npz", 2 if name == "resnet_small" else 8)[0]


def cast_pairs(model: ir.Model) -> list[str]:
    return [n.name for n in model.graph if n.op_type == "Cast" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "Cast"]


def assert_close(ref: np.ndarray, out: np.ndarray, rel: float = REL_TOL) -> None:
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    err = float(np.max(np.abs(out - ref)))
    assert err <= rel * float(np.max(np.abs(ref))), f"max abs diff {err} > {rel} x {np.max(np.abs(ref))}"
    if ref.ndim == 2 and ref.shape[1] > 1:
        assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.98


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_models_cuda_policy_run_on_cpu_and_agree(models_dir: Path, name: str) -> None:
    model = ir.load(models_dir / f"{name}.onnx")
    p = run_fp16(model)  # default provider policy: cuda
    inputs = sample_inputs(models_dir, name)
    ref = ort_outputs(models_dir / f"{name}.onnx", inputs)[0]
    out = ort_outputs(to_bytes(model), inputs)[0]
    assert_close(ref, out)
    # float32 I/O kept, every weight matrix in float16, compute in float16, no Cast pairs.
    assert [v.dtype for v in model.graph.inputs] == [v.dtype for v in ir.load(models_dir / f"{name}.onnx").graph.inputs]
    assert all(v.dtype == ir.DataType.FLOAT for v in model.graph.outputs)
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype.is_floating_point())
    assert cast_pairs(model) == []
    heavy = [n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert heavy and all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in heavy)
    assert p.details["nodes_low_precision"] >= len(heavy)
    assert p.details["casts_inserted"] <= 2  # one at the input, one at the output


@pytest.mark.parametrize("name", ["digits_cnn", "transformer_small"])
def test_cpu_policy_stores_weights_low_and_computes_float32(models_dir: Path, name: str) -> None:
    model = ir.load(models_dir / f"{name}.onnx")
    run_fp16(model, provider="cpu")
    inputs = sample_inputs(models_dir, name)
    ref = ort_outputs(models_dir / f"{name}.onnx", inputs)[0]
    out = ort_outputs(to_bytes(model), inputs)[0]
    assert_close(ref, out)
    heavy = [n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul", "Add", "LayerNormalization")]
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT for n in heavy)
    weights = [v for v in model.graph.initializers.values() if v.const_value.dtype.is_floating_point()]
    assert weights and all(v.dtype == ir.DataType.FLOAT16 for v in weights)
    assert cast_pairs(model) == []


def test_low_precision_io_validates_through_the_cli(cli, models_dir: Path, tmp_path: Path) -> None:
    # The validation feeds the float32 data to the float16-input model (Runner adapts float inputs).
    out = tmp_path / "io16.onnx"
    done = cli("run", models_dir / "digits_mlp.onnx", "--passes", "fp16", "--set", "fp16.keep_io_types=false",
               "--data", models_dir / "digits_mlp_test.npz", "--max-accuracy-drop", "0.5", "-o", out)
    assert done.returncode == 0, done.stderr
    assert ir.load(out).graph.inputs[0].dtype == ir.DataType.FLOAT16


def test_low_precision_io_when_asked(models_dir: Path) -> None:
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_fp16(model, keep_io_types=False)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert p.details["casts_inserted"] == 0
    inputs = sample_inputs(models_dir, "digits_mlp")
    ref = ort_outputs(models_dir / "digits_mlp.onnx", inputs)[0]
    out = ort_outputs(to_bytes(model), {"input": inputs["input"].astype(np.float16)})[0]
    assert out.dtype == np.float16
    assert_close(ref, out.astype(np.float32))


def test_bf16_cpu_policy_runs_and_cuda_policy_is_well_formed(models_dir: Path) -> None:
    inputs = sample_inputs(models_dir, "digits_mlp")
    ref = ort_outputs(models_dir / "digits_mlp.onnx", inputs)[0]
    model = ir.load(models_dir / "digits_mlp.onnx")
    run_fp16(model, provider="cpu", bf16=True)
    # bfloat16 keeps ~2-3 significant digits: a looser bound than float16's.
    assert_close(ref, ort_outputs(to_bytes(model), inputs)[0], rel=3e-2)
    assert all(v.dtype == ir.DataType.BFLOAT16 for v in model.graph.initializers.values())

    # The CPU EP has no bfloat16 Gemm, so the GPU-policy model is only checked for form here (the GPU
    # benchmark runs it).
    model = ir.load(models_dir / "digits_mlp.onnx")
    run_fp16(model, bf16=True)
    to_bytes(model)
    assert all(n.outputs[0].dtype == ir.DataType.BFLOAT16 for n in model.graph if n.op_type in ("Gemm", "Relu"))
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT and cast_pairs(model) == []
    # The CUDA EP has no bfloat16 Conv or MaxPool: those stay float32 under bf16, Gemm and Relu do not.
    model = ir.load(models_dir / "digits_cnn.onnx")
    run_fp16(model, bf16=True)
    to_bytes(model)
    dtypes = {n.op_type: n.outputs[0].dtype for n in model.graph}
    assert dtypes["Conv"] == dtypes["MaxPool"] == dtypes["BatchNormalization"] == ir.DataType.FLOAT
    assert dtypes["Gemm"] == dtypes["Relu"] == ir.DataType.BFLOAT16
    assert cast_pairs(model) == []
    # The Relus between float32 Convs are islands: they stay float32 rather than cost two Casts each.
    relus = [n for n in model.graph if n.op_type == "Relu"]
    assert [r.outputs[0].dtype for r in relus[:2]] == [ir.DataType.FLOAT] * 2
    assert sum(n.op_type == "Cast" for n in model.graph) == 2


def test_auto_provider_and_allow_ops(models_dir: Path) -> None:
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_fp16(model, provider="auto", allow_ops=["Gemm"])  # the default context's provider is the CPU
    assert p.details["provider_policy"] == "cpu"
    assert [n.outputs[0].dtype for n in model.graph if n.op_type == "Gemm"] == [ir.DataType.FLOAT16] * 3
    assert [n.outputs[0].dtype for n in model.graph if n.op_type == "Relu"] == [ir.DataType.FLOAT] * 2
    assert cast_pairs(model) == []
    inputs = sample_inputs(models_dir, "digits_mlp")
    assert_close(ort_outputs(models_dir / "digits_mlp.onnx", inputs)[0], ort_outputs(to_bytes(model), inputs)[0])


def _toy_model(weight: np.ndarray) -> ir.Model:
    """x(int64) -> Cast(float) -> {Relu, Sigmoid}, and x' -> MatMul(W) + Relu: exercises casts and clamping."""
    ids = ir.val("ids", ir.DataType.INT64, ["N", 4])
    x = ir.val("x", ir.DataType.FLOAT, ["N", 4])
    w = ir.val("big_weight", ir.DataType.FLOAT, [4, 4], const_value=ir.tensor(weight))
    cast = ir.node("Cast", [ids], {"to": ir.DataType.FLOAT}, name="to_float")
    relu = ir.node("Relu", [cast.outputs[0]], name="relu")
    sig = ir.node("Sigmoid", [cast.outputs[0]], name="sigmoid_kept")
    mm = ir.node("MatMul", [x, w], name="matmul")
    add = ir.node("Add", [mm.outputs[0], relu.outputs[0]], name="add")
    for n, out in ((sig, "s"), (add, "y")):
        n.outputs[0].name = out
    graph = ir.Graph([ids, x], [add.outputs[0], sig.outputs[0]], nodes=[cast, relu, sig, mm, add],
                     initializers=[w], opset_imports={"": 18}, name="toy")
    model = ir.Model(graph, ir_version=10)
    ir.passes.common.ShapeInferencePass()(model)
    return model


def test_cast_pairs_fused_blocked_nodes_and_outputs() -> None:
    weight = np.eye(4, dtype=np.float32) * 0.5
    model = _toy_model(weight)
    inputs = {"ids": np.array([[1, 2, 3, 4]], dtype=np.int64), "x": np.ones((1, 4), np.float32)}
    ref = ort_outputs(to_bytes(model), inputs)
    p = run_fp16(model, block_nodes=["sigmoid_.*"])
    out = ort_outputs(to_bytes(model), inputs)
    # The Cast(int->float) feeds a float16 Relu and a float32 Sigmoid: no Cast reads a Cast.
    assert cast_pairs(model) == []
    nodes = {n.name: n for n in model.graph}
    assert nodes["sigmoid_kept"].outputs[0].dtype == ir.DataType.FLOAT
    assert nodes["relu"].outputs[0].dtype == ir.DataType.FLOAT16
    assert [v.name for v in model.graph.outputs] == ["y", "s"]
    assert all(v.dtype == ir.DataType.FLOAT for v in model.graph.outputs)
    assert {"reason": "block_nodes", "op": "Sigmoid", "nodes": 1} in p.details["kept_float32"]
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o, r, rtol=1e-3, atol=1e-3)


def test_out_of_range_initializers_are_clamped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    weight = np.eye(4, dtype=np.float32)
    weight[0, 1] = 1e6
    weight[2, 3] = -7e4
    model = _toy_model(weight)
    with caplog.at_level(logging.WARNING, logger="graphopt.passes.fp16"):
        p = run_fp16(model)
    assert any("big_weight" in r.getMessage() and "clamped" in r.getMessage() for r in caplog.records)
    assert p.details["clamped_initializers"][0]["name"] == "big_weight"
    assert p.details["clamped_initializers"][0]["values_clamped"] == 2
    stored = model.graph.initializers["big_weight"].const_value.numpy()
    assert stored.dtype == np.float16 and stored[0, 1] == 65504 and stored[2, 3] == -65504
    out = ort_outputs(to_bytes(model), {"ids": np.zeros((1, 4), np.int64), "x": np.eye(4, dtype=np.float32)[:1]})
    assert np.all(np.isfinite(out[0]))


def test_block_ops_keep_ops_float32(models_dir: Path) -> None:
    model = ir.load(models_dir / "transformer_small.onnx")
    p = run_fp16(model, block_ops=["Softmax", "LayerNormalization"])
    for n in model.graph:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert n.outputs[0].dtype == ir.DataType.FLOAT
    assert cast_pairs(model) == []
    assert sum(r["nodes"] for r in p.details["kept_float32"] if r["reason"] == "block_ops") == 13
    inputs = sample_inputs(models_dir, "transformer_small")
    assert_close(ort_outputs(models_dir / "transformer_small.onnx", inputs)[0], ort_outputs(to_bytes(model), inputs)[0])


def test_cli_run_and_bad_options(cli, models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp16.onnx"
    done = cli("run", models_dir / "digits_mlp.onnx", "--passes", "fp16", "--data",
               models_dir / "digits_mlp_test.npz", "-o", out, "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size < 0.6 * (models_dir / "digits_mlp.onnx").stat().st_size
    for bad in (["fp16.provider=tpu"], ["fp16.block_nodes=["], ["fp16.bf16=maybe"], ["fp16.blocked_weights=half"],
                ["fp16.bf16=true", "fp16.keep_io_types=false"]):
        target = tmp_path / "bad.onnx"
        sets = [a for item in bad for a in ("--set", item)]
        done = cli("run", models_dir / "digits_mlp.onnx", "--passes", "fp16", *sets, "-o", target)
        assert done.returncode == 2, (bad, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "fp16" in lines[0], (bad, done.stderr)
        assert not target.exists()
