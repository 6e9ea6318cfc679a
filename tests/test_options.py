"""Option precedence: defaults < config file < --set, in the Python API and through the CLI."""

from __future__ import annotations

import json

import pytest

from graphopt import options
from graphopt.errors import UserError
from graphopt.passes.cleanup import CleanupOptions


def test_defaults_file_set_precedence():
    o = options.build(CleanupOptions, "cleanup")
    assert (o.iterations, o.fold_batchnorm) == (2, True)
    o = options.build(CleanupOptions, "cleanup", {"iterations": 5, "fold_batchnorm": False})
    assert (o.iterations, o.fold_batchnorm) == (5, False)
    o = options.build(CleanupOptions, "cleanup", {"iterations": 5, "fold_batchnorm": False}, {"iterations": "3"})
    assert (o.iterations, o.fold_batchnorm) == (3, False)


def test_coercion_and_errors():
    from typing import Literal, Optional

    assert options.coerce("1.5", float, "x") == 1.5
    assert options.coerce("a,b", list[str], "x") == ["a", "b"]
    assert options.coerce("none", Optional[int], "x") is None
    assert options.coerce("7", Optional[int], "x") == 7
    assert options.coerce("entropy", Literal["minmax", "entropy"], "x") == "entropy"
    with pytest.raises(UserError, match="must be one of minmax, entropy"):
        options.coerce("kl", Literal["minmax", "entropy"], "x")
    with pytest.raises(UserError, match="must be an integer"):
        options.coerce(True, int, "x")
    with pytest.raises(UserError, match="unknown option 'cleanup.nope'"):
        options.build(CleanupOptions, "cleanup", {"nope": 1})


def test_parse_assignments():
    assert options.parse_assignments(["quant.calibration=entropy", "quant.bins=2048", "prune.mode=nm"]) == {
        "quant": {"calibration": "entropy", "bins": "2048"}, "prune": {"mode": "nm"}}


def test_cli_precedence_through_config_file(cli, models_dir, tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
passes = ["cleanup"]
[options.cleanup]
iterations = 4
fold_batchnorm = false
[data]
path = "{models_dir / 'digits_cnn_calib.npz'}"
eval = "{models_dir / 'digits_cnn_test.npz'}"
batch_size = 50
[validate]
max_accuracy_drop = 0.5
latency_batches = [2]
""")
    out = tmp_path / "o.onnx"
    proc = cli("run", models_dir / "digits_cnn.onnx", "--config", cfg, "--set", "cleanup.iterations=1",
               "-o", out, "--report", tmp_path / "r.json", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    opts = report["passes"][0]["options"]
    assert opts["iterations"] == 1  # --set beats the file
    assert opts["fold_batchnorm"] is False  # the file beats the default
    assert report["passes"][0]["after"]["nodes"] == report["passes"][0]["before"]["nodes"]  # BN kept
    assert report["gates"][0]["limit"] == 0.5
    assert report["validation"]["latency"][0]["batch"] == 2
    assert report["validation"]["agreement"]["samples"] == 540  # eval data from the file
    # a flag beats the file too
    proc = cli("run", models_dir / "digits_cnn.onnx", "--config", cfg, "--max-accuracy-drop", "0.25",
               "-o", out, "--report", tmp_path / "r2.json", "-q", "--no-latency")
    assert json.loads((tmp_path / "r2.json").read_text())["gates"][0]["limit"] == 0.25


def test_options_for_pass_not_in_pipeline_is_an_error(cli, models_dir, tmp_path):
    import graphopt

    from graphopt.registry import _REGISTRY, GraphPass, register

    with pytest.raises(UserError, match="unknown pass 'nosuchpass'"):
        graphopt.optimize(models_dir / "digits_mlp.onnx", ["cleanup"], set_options={"nosuchpass": {"a": 1}})

    class Other(GraphPass):
        name = "test_other"

    register(Other)
    try:
        with pytest.raises(UserError, match="options given for pass 'test_other', which is not in the pipeline"):
            graphopt.optimize(models_dir / "digits_mlp.onnx", ["cleanup"], set_options={"test_other": {}})
    finally:
        _REGISTRY.pop("test_other")
