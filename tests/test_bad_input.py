"""Every bad input a user can give: one line saying what was expected, exit 2, no traceback, no output."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import assert_user_error
from typer.testing import CliRunner

import graphopt
from graphopt.errors import GateFailed
from graphopt.registry import GraphPass, _REGISTRY, register


def _digits(models_dir: Path) -> Path:
    return models_dir / "digits_mlp.onnx"


def test_missing_file(cli, tmp_path):
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", tmp_path / "nope.onnx", "--passes", "cleanup", "-o", out), out, "not found")


def test_not_onnx(cli, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 50)
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", bad, "--passes", "cleanup", "-o", out), out, "ONNX")


def test_truncated_model(cli, models_dir, tmp_path):
    data = (models_dir / "digits_cnn.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", bad, "--passes", "cleanup", "-o", out), out, "truncated")


def _external_copy(models_dir: Path, folder: Path) -> Path:
    model = ir.load(models_dir / "digits_mlp.onnx")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ext.onnx"
    ir.save(model, path, external_data="ext.onnx.data", size_threshold_bytes=0)
    return path


def test_external_data_roundtrip_works(cli, models_dir, tmp_path):
    path = _external_copy(models_dir, tmp_path / "m")
    out = tmp_path / "out" / "o.onnx"
    proc = cli("run", path, "--passes", "cleanup", "-o", out, "--no-latency", "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (out.parent / "o.onnx.data").is_file()  # external in, external out


def test_missing_external_data(cli, models_dir, tmp_path):
    path = _external_copy(models_dir, tmp_path / "m")
    (path.parent / "ext.onnx.data").unlink()
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", path, "--passes", "cleanup", "-o", out), out, "missing")


def test_external_data_outside_model_folder(cli, models_dir, tmp_path):
    path = _external_copy(models_dir, tmp_path / "m")
    shutil.move(path.parent / "ext.onnx.data", tmp_path / "secret.data")
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save(proto, str(path))
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", path, "--passes", "cleanup", "-o", out), out, "outside the model's folder")


@pytest.mark.parametrize("args, needles", [
    (["--passes", "cleanup,frobnicate"], ["unknown pass 'frobnicate'", "cleanup"]),
    (["--passes", "cleanup", "--set", "cleanup.colour=blue"], ["unknown option 'cleanup.colour'", "fold_batchnorm"]),
    (["--passes", "cleanup", "--set", "cleanup.iterations=many"], ["cleanup.iterations", "integer"]),
    (["--passes", "cleanup", "--set", "cleanup.iterations=0"], ["cleanup.iterations", ">= 1"]),
    (["--passes", "cleanup", "--set", "cleanup.fold_batchnorm=perhaps"], ["true or false"]),
    (["--passes", "cleanup", "--set", "iterations=2"], ["PASS.OPTION=VALUE"]),
    (["--passes", "cleanup", "--providers", "cuda"], ["'cuda' is not available", "cpu"]),
    (["--passes", "cleanup", "--shape", "input=1xfoo"], ["--shape"]),
])
def test_bad_usage(cli, models_dir, tmp_path, args, needles):
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", _digits(models_dir), *args, "-o", out), out, *needles)


@pytest.mark.parametrize("arrays, needles", [
    ({"pixels": np.zeros((4, 64), np.float32)}, ["'pixels' is not a model input", "input"]),
    ({"input": np.zeros((4, 63), np.float32)}, ["shape", "[4,63]", "[batch,64]"]),
    ({"input": np.zeros((4, 8, 8), np.float32)}, ["rank 2"]),
    ({"input": np.zeros((4, 64), np.int64)}, ["dtype int64", "float32"]),
    ({"input": np.zeros((4, 64), np.float32), "labels": np.zeros(3, np.int64)}, ["labels", "3 rows"]),
])
def test_data_that_does_not_fit(cli, models_dir, tmp_path, arrays, needles):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", _digits(models_dir), "--passes", "cleanup", "--data", data, "-o", out), out, *needles)


def test_bad_data_sources(cli, models_dir, tmp_path):
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", _digits(models_dir), "--passes", "cleanup", "--data", tmp_path / "none.npz",
                          "-o", out), out, "not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("run", _digits(models_dir), "--passes", "cleanup", "--data", tmp_path / "empty",
                          "-o", out), out, "no .npz")
    assert_user_error(cli("run", _digits(models_dir), "--passes", "cleanup", "--data", "no_such_module:fn",
                          "-o", out), out, "cannot import")
    np.savez(tmp_path / "zero.npz", input=np.zeros((0, 64), np.float32))
    assert_user_error(cli("run", _digits(models_dir), "--passes", "cleanup", "--data", tmp_path / "zero.npz",
                          "-o", out), out, "no samples")


def test_bad_config_file(cli, models_dir, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('passes = ["cleanup"]\n[validate]\nmax_acuracy_drop = 1\n')
    out = tmp_path / "o.onnx"
    assert_user_error(cli("run", _digits(models_dir), "--config", cfg, "-o", out), out, "max_acuracy_drop")
    cfg.write_text("passes = [\n")
    assert_user_error(cli("run", _digits(models_dir), "--config", cfg, "-o", out), out, "TOML")


def test_existing_output_and_input_untouched_on_error(cli, models_dir, tmp_path):
    src = tmp_path / "in.onnx"
    shutil.copy(_digits(models_dir), src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous good model")
    proc = cli("run", src, "--passes", "cleanup", "--set", "cleanup.iterations=x", "-o", out)
    assert proc.returncode == 2
    assert out.read_bytes() == b"previous good model"
    proc = cli("run", src, "--passes", "cleanup", "-o", out, "-q", "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(str(out)).graph.node  # replaced by a complete model
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


class _Explodes(GraphPass):
    name = "test_explodes"

    def call(self, model):
        raise ZeroDivisionError("boom")


class _Perturbs(GraphPass):
    name = "test_perturbs"

    def call(self, model):
        for value in model.graph.initializers.values():
            arr = value.const_value.numpy()
            if arr.dtype == np.float32 and arr.ndim == 2:
                value.const_value = ir.tensor(arr * 1.5, name=value.name)
        return ir.passes.PassResult(model, modified=True)


@pytest.fixture
def test_passes():
    register(_Explodes)
    register(_Perturbs)
    yield
    _REGISTRY.pop("test_explodes", None)
    _REGISTRY.pop("test_perturbs", None)


def test_pass_that_raises_exits_3_naming_it(models_dir, tmp_path, test_passes):
    from graphopt.cli import app

    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(app, ["run", str(_digits(models_dir)), "--passes", "cleanup,test_explodes",
                                      "-o", str(out), "-q"])
    assert result.exit_code == 3
    assert "pass 'test_explodes' failed" in result.output and "boom" in result.output
    assert not out.exists()


def test_check_each_pass_names_the_pass(models_dir, tmp_path, test_passes):
    with pytest.raises(GateFailed, match="pass 'test_perturbs' moved the outputs"):
        graphopt.optimize(_digits(models_dir), ["cleanup", "test_perturbs"], data=models_dir / "digits_mlp_test.npz",
                          check_each_pass=True, output=tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    result = graphopt.optimize(_digits(models_dir), ["cleanup"], data=models_dir / "digits_mlp_test.npz",
                               check_each_pass=True, measure_speed=False)
    check = result.report["passes"][0]["check"]
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 * check["reference_max_abs"]
