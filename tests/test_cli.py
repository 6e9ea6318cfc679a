"""The CLI end to end, as a subprocess: run, reports, gates, passes, inspect, validate, bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import load_npz, ort_outputs


def _run_cleanup(cli, models_dir: Path, tmp_path: Path, *extra: str):
    out = tmp_path / "out.onnx"
    proc = cli("run", models_dir / "digits_cnn.onnx", "--passes", "cleanup",
               "--data", models_dir / "digits_cnn_calib.npz", "--eval-data", models_dir / "digits_cnn_test.npz",
               "-o", out, "--report", tmp_path / "r.json", "--html", tmp_path / "r.html", *extra)
    return proc, out


def test_run_writes_model_and_reports(cli, models_dir, tmp_path):
    proc, out = _run_cleanup(cli, models_dir, tmp_path, "--latency-batch", "1,4", "--max-accuracy-drop", "0.5",
                             "--markdown", tmp_path / "r.md")
    assert proc.returncode == 0, proc.stderr
    assert "Passes" in proc.stdout and "Latency" in proc.stdout and "top-1 agreement" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "graphopt.report/1"
    assert report["passed"] is True and report["exit_code"] == 0
    assert report["output"] == {"path": str(out), "written": True}
    (rec,) = report["passes"]
    assert rec["name"] == "cleanup" and rec["options"]["fold_batchnorm"] is True
    for side in ("before", "after"):
        assert set(rec[side]) >= {"nodes", "parameters", "bytes", "flops"}
    assert rec["after"]["nodes"] < rec["before"]["nodes"]  # BatchNorm folded
    v = report["validation"]
    assert v["agreement"]["samples"] == 540
    assert v["agreement"]["top1_agreement"] == 1.0
    assert v["agreement"]["reference_accuracy"] > 0.95
    assert {(x["provider"], x["batch"]) for x in v["latency"]} == {("cpu", 1), ("cpu", 4)}
    assert all(x["ratio"] > 0 for x in v["latency"])
    assert 0.5 < v["size"]["ratio"] <= 1.0
    assert report["gates"][0]["name"] == "max_accuracy_drop" and report["gates"][0]["passed"]
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Latency p50" in page
    assert "<script" not in page  # self-contained, static
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# graphopt report: PASSED") and "| cleanup |" in md and "| max_accuracy_drop |" in md

    # the written model really is the cleaned one and agrees with the input
    x, _ = load_npz(models_dir / "digits_cnn_test.npz", 64)
    ref = ort_outputs(models_dir / "digits_cnn.onnx", x)[0]
    got = ort_outputs(out, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_failed_gate_exits_1_writes_report_not_model(cli, models_dir, tmp_path):
    proc, out = _run_cleanup(cli, models_dir, tmp_path, "--max-latency-ratio", "0.0001")
    assert proc.returncode == 1, proc.stderr
    assert not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["exit_code"] == 1
    assert report["output"]["written"] is False
    assert "max_latency_ratio" in report["message"]
    assert not list(tmp_path.glob(".graphopt-*"))  # staging cleaned up


def test_keep_failed_writes_model(cli, models_dir, tmp_path):
    proc, out = _run_cleanup(cli, models_dir, tmp_path, "--max-latency-ratio", "0.0001", "--keep-failed")
    assert proc.returncode == 1
    assert out.is_file()


def test_passes_lists_options(cli):
    proc = cli("passes")
    assert proc.returncode == 0
    assert "cleanup" in proc.stdout and "cleanup.fold_batchnorm" in proc.stdout and "bool" in proc.stdout


def test_inspect(cli, models_dir):
    proc = cli("inspect", models_dir / "resnet_small.onnx")
    assert proc.returncode == 0, proc.stderr
    for text in ("IR version 10", "ai.onnx 18", "input", "[batch, 3, 224, 224]", "Conv", "BatchNormalization",
                 "parameters 11.70M", "FLOPs/sample 3.65G"):
        assert text in proc.stdout, text
    info = json.loads(cli("inspect", models_dir / "digits_mlp.onnx", "--json").stdout)
    # 64*128 + 128*64 + 64*10 multiply-adds, x2, plus bias adds and ReLUs
    assert info["flops_by_op"]["Gemm"] == 2 * (64 * 128 + 128 * 64 + 64 * 10) + (128 + 64 + 10)
    assert info["parameters"] == 17226


def test_validate_and_bench(cli, models_dir, tmp_path):
    out = tmp_path / "c.onnx"
    assert cli("run", models_dir / "digits_mlp.onnx", "--passes", "cleanup", "-o", out, "--no-validate",
               "-q").returncode == 0
    proc = cli("validate", models_dir / "digits_mlp.onnx", out, "--data", models_dir / "digits_mlp_test.npz",
               "--max-accuracy-drop", "0", "--report", tmp_path / "v.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["validation"]["agreement"]["candidate_accuracy"] == report["validation"]["agreement"]["reference_accuracy"]
    proc = cli("bench", out, "--batch", "1,16", "--repeat", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["batch"] for r in rows] == [1, 16] and all(r["p50_ms"] > 0 for r in rows)


def test_synthetic_data_and_shape_pins(cli, models_dir, tmp_path):
    proc = cli("run", models_dir / "transformer_small.onnx", "--passes", "cleanup", "-o", tmp_path / "t.onnx",
               "--report", tmp_path / "t.json", "--no-latency", "--eval-samples", "16", "--shape",
               "input_ids=2x128")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["validation"]["data"] == "synthetic data"
    assert report["validation"]["agreement"]["max_abs_diff"] < 1e-4


def test_help_teaches(cli):
    proc = cli("run", "--help")
    assert proc.returncode == 0
    for text in ("--passes", "--set", "--config", "--data", "--shape", "--providers", "--max-accuracy-drop",
                 "--keep-failed", "--check-each-pass", "Examples"):
        assert text in proc.stdout, text
