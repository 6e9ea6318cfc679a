"""prune: unstructured and N:M magnitude pruning against numpy references, the report, and the CLI
(bad options exit 2 with one line; a channel-pruned model is written and runs)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from conftest import load_npz, ort_outputs
from graphopt.context import PassContext
from graphopt.model_io import load_model, model_to_bytes
from graphopt.options import build
from graphopt.passes.prune import PrunePass

WEIGHTS = {"digits_mlp": ["fc1.weight", "fc2.weight", "fc3.weight"],
           "digits_cnn": ["features.0.weight", "features.3.weight", "features.7.weight", "fc1.weight", "fc2.weight"]}


def prune(path, **options: object) -> tuple[ir.Model, PrunePass]:
    model = load_model(path)
    p = PrunePass(build(PrunePass.Options, "prune", options), PassContext())
    p(model)
    return model, p


def originals(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def with_weights(path, weights: dict[str, np.ndarray]) -> bytes:
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    return model.SerializeToString()


def test_unstructured_per_layer_equals_numpy_reference(models_dir) -> None:
    path = models_dir / "digits_mlp.onnx"
    model, p = prune(path, sparsity=0.7)
    expected = {}
    for name, w in originals(path).items():
        if name not in WEIGHTS["digits_mlp"]:
            continue
        ref = w.copy().reshape(-1)
        ref[np.argsort(np.abs(ref), kind="stable")[: round(0.7 * ref.size)]] = 0
        expected[name] = ref.reshape(w.shape)
        got = model.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(got, expected[name])
        assert np.count_nonzero(got == 0) == round(0.7 * w.size)  # sparsity reached exactly
    assert [r["sparsity"] for r in p.details["layers"]] == [0.7, 0.7, 0.7]
    feeds, _ = load_npz(models_dir / "digits_mlp_test.npz", 128)
    np.testing.assert_allclose(ort_outputs(model_to_bytes(model), feeds)[0],
                               ort_outputs(with_weights(path, expected), feeds)[0], rtol=1e-6, atol=1e-6)
    c = p.details["compressed"]
    assert c["gzip_after"] < 0.6 * c["gzip_before"] and c["gzip_ratio"] == round(c["gzip_after"] / c["gzip_before"], 4)


def test_unstructured_global_threshold(models_dir) -> None:
    path = models_dir / "digits_cnn.onnx"
    model, p = prune(path, sparsity=0.6, allocation="global")
    got = {n: model.graph.initializers[n].const_value.numpy() for n in WEIGHTS["digits_cnn"]}
    orig = originals(path)
    total = sum(w.size for w in got.values())
    assert sum(int(np.count_nonzero(w == 0)) for w in got.values()) == round(0.6 * total)
    zeroed = np.concatenate([np.abs(orig[n][got[n] == 0]) for n in got])
    kept = np.concatenate([np.abs(orig[n][got[n] != 0]) for n in got])
    assert zeroed.max() <= kept.min()  # one threshold across all layers
    assert len({r["sparsity"] for r in p.details["layers"]}) > 1  # so layers end up differently sparse
    assert p.details["sparsity_all_layers"] == pytest.approx(0.6, abs=1e-6)


def test_skip_keep_first_last_and_min_size(models_dir) -> None:
    path = models_dir / "digits_cnn.onnx"
    orig = originals(path)
    model, p = prune(path, sparsity=0.5, keep_first=True, keep_last=True, skip=[r"features\.3"], min_size=10000)
    dense = {"features.0.weight", "fc2.weight", "features.3.weight"}  # first, last, skipped (and small)
    for name in WEIGHTS["digits_cnn"]:
        got = model.graph.initializers[name].const_value.numpy()
        if name in dense:
            np.testing.assert_array_equal(got, orig[name])
        elif orig[name].size >= 10000:
            assert np.count_nonzero(got == 0) == round(0.5 * got.size)
    notes = {r["weight"]: r["note"] for r in p.details["layers"]}
    assert "keep_first" in notes["features.0.weight"] and "keep_last" in notes["fc2.weight"]
    assert "skip" in notes["features.3.weight"]


def test_n_of_m_along_the_reduction_axis(models_dir) -> None:
    path = models_dir / "digits_cnn.onnx"
    orig = originals(path)
    model, p = prune(path, mode="nm", n=2, m=4)
    conv = model.graph.initializers["features.3.weight"].const_value.numpy()  # [32, 16, 3, 3]: K = axis 1
    blocks = np.moveaxis(conv, 1, -1).reshape(32, 3, 3, 4, 4)
    assert (np.count_nonzero(blocks, axis=-1) == 2).all()
    ref = np.moveaxis(orig["features.3.weight"], 1, -1).reshape(32, 3, 3, 4, 4)
    kept = np.sort(np.abs(ref), axis=-1)[..., 2:]  # the two largest of every block survive
    np.testing.assert_array_equal(np.sort(np.abs(blocks), axis=-1)[..., 2:], kept)
    fc = model.graph.initializers["fc1.weight"].const_value.numpy()  # Gemm transB=1 [64, 1024]: K = axis 1
    assert (np.count_nonzero(fc.reshape(64, 256, 4), axis=-1) == 2).all()
    rows = {r["weight"]: r for r in p.details["layers"]}
    assert "not a multiple" in rows["features.0.weight"]["note"]  # 1 input channel: left dense
    np.testing.assert_array_equal(model.graph.initializers["features.0.weight"].const_value.numpy(),
                                  orig["features.0.weight"])
    assert p.details["pattern"] == "2:4" and rows["fc1.weight"]["sparsity"] == 0.5
    feeds, labels = load_npz(models_dir / "digits_cnn_test.npz")
    pruned = {n: model.graph.initializers[n].const_value.numpy() for n in WEIGHTS["digits_cnn"]}
    np.testing.assert_allclose(ort_outputs(model_to_bytes(model), feeds)[0],
                               ort_outputs(with_weights(path, pruned), feeds)[0], rtol=1e-6, atol=1e-6)


def test_zero_sparsity_is_a_no_op(models_dir) -> None:
    path = models_dir / "digits_mlp.onnx"
    model, p = prune(path, sparsity=0.0)
    for name, w in originals(path).items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), w)
    assert p.details["sparsity_pruned_layers"] == 0.0


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("sets, message", [
    (["prune.sparsity=1.5"], "prune.sparsity must be < 1"),
    (["prune.sparsity=1"], "prune.sparsity must be < 1"),
    (["prune.sparsity=-0.1"], "prune.sparsity must be >= 0"),
    (["prune.mode=nm", "prune.n=4", "prune.m=4"], "prune.n must be smaller than prune.m"),
])
def test_bad_options_exit_2_with_one_line(cli, models_dir, tmp_path, sets, message) -> None:
    out = tmp_path / "out.onnx"
    args = [a for s in sets for a in ("--set", s)]
    result = cli("run", models_dir / "digits_mlp.onnx", "--passes", "prune", *args, "-o", out, "--no-validate")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_channel_pruning_writes_a_smaller_model_that_runs(cli, models_dir, tmp_path) -> None:
    out, report = tmp_path / "cnn.onnx", tmp_path / "report.json"
    result = cli("run", models_dir / "digits_cnn.onnx", "--passes", "prune", "--set", "prune.mode=channel",
                 "--set", "prune.sparsity=0.5", "--data", models_dir / "digits_cnn_calib.npz",
                 "--eval-data", models_dir / "digits_cnn_test.npz", "--no-latency", "-o", out, "--report", report)
    assert result.returncode == 0, result.stderr
    record = json.loads(report.read_text())["passes"][0]
    assert record["details"]["channels_removed"] == 88
    assert record["after"]["parameters"] < 0.35 * record["before"]["parameters"]
    assert record["after"]["flops"] < 0.35 * record["before"]["flops"]
    feeds, _ = load_npz(models_dir / "digits_cnn_test.npz", 16)
    assert ort_outputs(out, feeds)[0].shape == (16, 10)
