"""lowrank pass: SVD error bounds, the FLOP rule, and factorized models against the originals in ORT.

Tolerances: a weight truncated to energy e has relative Frobenius error sqrt(1 - kept) <= sqrt(1 - e)
(exact, up to float rounding). End to end, digits_mlp's logits must stay within a relative L2 error of
2·sqrt(1 - e) (measured 0.03 at e=0.95), and the test-set accuracy within 1 point at e=0.95. On the
random-weight transformer_small, errors compound through 4 blocks, so its bound is looser: relative L2
error of the logits <= 3·sqrt(1 - e) and cosine >= 0.8 at e=0.9 (measured 0.55 and 0.90 there).
Weights that are exactly low-rank factorize losslessly: 1e-4 relative.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import load_npz, ort_outputs, to_bytes

from graphopt.context import PassContext
from graphopt.data import open_data
from graphopt.options import build
from graphopt.passes.lowrank import break_even_rank, rank_for_energy, truncated_factors
from graphopt.registry import get
from graphopt.runtime import SessionFactory


def run_lowrank(model: ir.Model, data=None, **options: object):
    cls = get("lowrank")
    ctx = PassContext(sessions=SessionFactory(), data=open_data(data, model) if data is not None else None)
    p = cls(build(cls.Options, "lowrank", options), ctx)
    p(model)
    return p


def rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(64, 128), (300, 40)])
def test_svd_error_within_energy_bound_and_rank_minimal(energy: float, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    # A decaying spectrum, like trained weights.
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], min(shape))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], min(shape))))
    w = (u * (0.9 ** np.arange(min(shape)))) @ v.T
    s = np.linalg.svd(w, compute_uv=False)
    rank = rank_for_energy(s, energy)
    a, b, kept = truncated_factors(w, rank)
    assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
    err = np.linalg.norm(w - a @ b) / np.linalg.norm(w)
    assert kept >= energy - 1e-12
    assert err <= math.sqrt(1 - energy) + 1e-9
    assert abs(err - math.sqrt(1 - kept)) < 1e-9
    if rank > 1:  # one rank less would miss the target: the rank is the smallest that meets it
        a2, b2, kept2 = truncated_factors(w, rank - 1)
        assert kept2 < energy
        assert np.linalg.norm(w - a2 @ b2) / np.linalg.norm(w) > math.sqrt(1 - energy)


def test_never_factorizes_where_it_adds_flops(models_dir: Path) -> None:
    # rank_ratio=1 keeps full rank: r(K+N) > KN for every layer, so nothing may change, even with min_saving=0.
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_lowrank(model, rank_ratio=1.0, min_saving=0.0)
    assert p.details["factorized"] == 0
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert all("would add FLOPs" in s["reason"] for s in p.details["skipped"])
    # At energy 0.95 fc3 (64x10) needs rank 9 >= its break-even 8.6: skipped, the others factorized.
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_lowrank(model, energy=0.95, min_saving=0.0)
    skipped = {s["layer"]: s["reason"] for s in p.details["skipped"]}
    assert "would add FLOPs" in skipped["node_linear_2"]
    for row in p.details["layers"]:
        k, n = map(int, row["shape"].split("x"))
        assert row["rank"] < break_even_rank(k, n)
        assert row["params_after"] < row["params_before"] and row["flops_after"] < row["flops_before"]


@pytest.mark.parametrize("energy", [0.9, 0.95])
def test_digits_mlp_outputs_within_energy_tolerance(models_dir: Path, energy: float) -> None:
    inputs, labels = load_npz(models_dir / "digits_mlp_test.npz")
    ref = ort_outputs(models_dir / "digits_mlp.onnx", inputs)[0]
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_lowrank(model, data=models_dir / "digits_mlp_calib.npz", energy=energy)
    out = ort_outputs(to_bytes(model), inputs)[0]
    assert p.details["factorized"] == 2
    assert rel_l2(ref, out) <= 2 * math.sqrt(1 - energy)
    if energy >= 0.95:
        assert np.mean(out.argmax(1) == labels) >= np.mean(ref.argmax(1) == labels) - 0.01
    for row in p.details["layers"]:
        assert row["energy_kept"] >= energy
        assert row["weight_rel_error"] <= math.sqrt(1 - energy) + 1e-6
        assert row["output_rel_error"] is not None and 0 < row["output_rel_error"] < 1
    assert [n.op_type for n in model.graph] == ["Gemm", "Gemm", "Relu", "Gemm", "Gemm", "Relu", "Gemm"]


def test_transformer_small_matmul_layers(models_dir: Path) -> None:
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz", 16)
    ref = ort_outputs(models_dir / "transformer_small.onnx", inputs)[0]
    model = ir.load(models_dir / "transformer_small.onnx")
    # Random weights: at e=0.9 only the 256x1024 FFN matrices fall under break-even (rank 195 < 204.8).
    p = run_lowrank(model, data=models_dir / "transformer_small_calib.npz", energy=0.9, min_saving=0.0,
                    error_samples=8, skip=["val_1(29|38)"], ops=["MatMul"])
    factorized = {r["weight"] for r in p.details["layers"]}
    assert len(factorized) == 6 and all(r["shape"] in ("256x1024", "1024x256") for r in p.details["layers"])
    assert {"val_129", "val_138"}.isdisjoint(factorized)
    assert sum(1 for s in p.details["skipped"] if s["reason"] == "skip option") == 2
    assert sum(n.op_type == "MatMul" for n in model.graph) == 32 + 6
    out = ort_outputs(to_bytes(model), inputs)[0]
    assert rel_l2(ref, out) <= 3 * math.sqrt(1 - 0.9)
    cos = np.sum(ref * out, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert np.mean(cos) >= 0.8


def _exact_low_rank(k: int, n: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) / math.sqrt(k)).astype(np.float32)


def _one_layer_model(kind: str) -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    if kind == "gemm_transA":  # Y = alpha * X^T W^T + beta * C, X given as [K, M]
        w = _exact_low_rank(48, 64, 4)  # stored [N, K] for transB=1
        x = ir.val("x", ir.DataType.FLOAT, [64, "M"])
        nodes = [ir.node("Gemm", [x, ir.val("w", const_value=ir.tensor(w)),
                                  ir.val("c", const_value=ir.tensor(rng.standard_normal(48).astype(np.float32)))],
                         {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, name="gemm")]
        feed = {"x": rng.standard_normal((64, 5)).astype(np.float32)}
    elif kind == "matmul_3d":
        w = _exact_low_rank(64, 96, 6)
        x = ir.val("x", ir.DataType.FLOAT, ["N", 7, 64])
        nodes = [ir.node("MatMul", [x, ir.val("w", const_value=ir.tensor(w))], name="mm")]
        feed = {"x": rng.standard_normal((2, 7, 64)).astype(np.float32)}
    else:  # conv1x1 with stride and bias
        w = _exact_low_rank(96, 64, 5)[:, :, None, None].copy()  # [Cout, Cin, 1, 1]
        x = ir.val("x", ir.DataType.FLOAT, ["N", 64, 8, 8])
        nodes = [ir.node("Conv", [x, ir.val("w", const_value=ir.tensor(w)),
                                  ir.val("b", const_value=ir.tensor(rng.standard_normal(96).astype(np.float32)))],
                         {"kernel_shape": [1, 1], "strides": [2, 2]}, name="conv")]
        feed = {"x": rng.standard_normal((2, 64, 8, 8)).astype(np.float32)}
    inits = [v for n in nodes for v in n.inputs[1:]]
    nodes[0].outputs[0].name = "y"
    graph = ir.Graph([x], [nodes[0].outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 18},
                     name=kind)
    model = ir.Model(graph, ir_version=10)
    ir.passes.common.ShapeInferencePass()(model)
    return model, feed


@pytest.mark.parametrize("kind", ["gemm_transA", "matmul_3d", "conv1x1"])
def test_exactly_low_rank_weights_factorize_losslessly(kind: str) -> None:
    model, feed = _one_layer_model(kind)
    ref = ort_outputs(to_bytes(model), feed)[0]
    p = run_lowrank(model, data=None, energy=0.999999)
    assert p.details["factorized"] == 1
    row = p.details["layers"][0]
    assert row["rank"] == {"gemm_transA": 4, "matmul_3d": 6, "conv1x1": 5}[kind]
    assert len(model.graph) == 2 and model.graph.outputs[0].name == "y"
    assert "w" not in model.graph.initializers
    out = ort_outputs(to_bytes(model), feed)[0]
    assert out.shape == ref.shape
    assert rel_l2(ref, out) < 1e-4


def test_rank_ratio_and_rank_multiple(models_dir: Path) -> None:
    model = ir.load(models_dir / "digits_mlp.onnx")
    p = run_lowrank(model, rank_ratio=0.2, rank_multiple=8)
    ranks = {r["weight"]: r["rank"] for r in p.details["layers"]}
    assert ranks == {"fc1.weight": 16, "fc2.weight": 16}  # ceil(0.2 * 64) = 13 -> 16
    assert p.details["rank_rule"] == "rank_ratio=0.2"


def test_cli_run_and_bad_options(cli, models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp_lr.onnx"
    report = tmp_path / "r.json"
    done = cli("run", models_dir / "digits_mlp.onnx", "--passes", "lowrank", "--set", "lowrank.energy=0.9",
               "--data", models_dir / "digits_mlp_test.npz", "-o", out, "--report", report)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "node_linear" in report.read_text()
    for bad in (["--set", "lowrank.energy=1.5"], ["--set", "lowrank.energy=0.9", "--set", "lowrank.rank_ratio=0.5"],
                ["--set", "lowrank.skip=(unclosed"], ["--set", "lowrank.ops=Conv,Add"]):
        target = tmp_path / "bad.onnx"
        done = cli("run", models_dir / "digits_mlp.onnx", "--passes", "lowrank", *bad, "-o", target)
        assert done.returncode == 2, (bad, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "lowrank" in lines[0], (bad, done.stderr)
        assert not target.exists()
