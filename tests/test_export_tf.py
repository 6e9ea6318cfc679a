"""graphopt export tf / graphopt.export.from_tf: Keras and SavedModel models exported with tf2onnx must
compute what TensorFlow computes. Each test re-checks the written file itself (ONNX Runtime vs the Keras
model, at a batch size the export was not checked at).

TensorFlow is an extra that does not live in the dev environment (.venv): these tests run under
`make test-tf` in .venv-tf (pip install -e '.[tf]' pytest) and skip, saying so, everywhere else. The
missing-extra test at the end runs everywhere.

Tolerance: |onnx - tf| <= 1e-4 + 1e-3 * |tf| (float32, small models).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ort_outputs

HAVE_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tf2onnx") is not None
needs_tf = pytest.mark.skipif(
    not HAVE_TF, reason=f"tensorflow/tf2onnx are not importable in this interpreter ({sys.executable}); the TF "
                        "export tests run with `make test-tf` in .venv-tf (pip install -e '.[tf]' pytest)")
ATOL, RTOL = 1e-4, 1e-3


def _keras():
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


@pytest.fixture(scope="module")
def keras_cnn():
    """A small Keras CNN with non-trivial BatchNorm statistics (a plain Sequential, the hard case for from_keras)."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3), name="image"),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    bn = model.layers[1]
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8), rng.normal(0, 0.5, 8), rng.uniform(0.5, 2, 8)])
    return model


@pytest.fixture(scope="module")
def saved(keras_cnn, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras")
    paths = {"keras": folder / "cnn.keras", "h5": folder / "cnn.h5", "saved_model": folder / "cnn_saved_model"}
    keras_cnn.save(paths["keras"])
    keras_cnn.save(paths["h5"])
    keras_cnn.export(str(paths["saved_model"]), verbose=False)
    return paths


def assert_matches_keras(onnx_path: Path, model, batch: int, seed: int = 9) -> None:
    x = np.random.default_rng(seed).standard_normal((batch, 16, 16, 3)).astype(np.float32)
    ref = np.asarray(model(x, training=False))
    (got,) = ort_outputs(onnx_path, {"image": x})
    assert got.shape == ref.shape == (batch, 10)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)


def input_dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


@needs_tf
@pytest.mark.parametrize("kind", ["keras", "saved_model"])
def test_cli_keras_file_and_saved_model(cli, keras_cnn, saved, tmp_path, kind):
    out = tmp_path / f"{kind}.onnx"
    report = tmp_path / f"{kind}.json"
    r = cli("export", "tf", saved[kind], "-o", out, "--report", report)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote" in r.stdout and "max |diff|" in r.stdout
    assert input_dims(out) == {"image": ["batch", 16, 16, 3]}
    rep = json.loads(report.read_text())
    assert rep["exporter"] == "tf2onnx" and rep["opset"] == 18 and rep["check"]["passed"]
    assert [c["shapes"] for c in rep["check"]["cases"]] == ["image=2x16x16x3", "image=3x16x16x3"]
    assert rep["outputs"][0]["shape"] == ["batch", 10]
    assert_matches_keras(out, keras_cnn, batch=5)


@needs_tf
def test_api_h5_and_in_memory_model(keras_cnn, saved, tmp_path):
    from graphopt.export import from_tf

    out = tmp_path / "h5.onnx"
    result = from_tf(saved["h5"], output=out)
    assert result.written and result.check.passed and result.check.max_abs < 1e-4
    assert_matches_keras(out, keras_cnn, batch=1)
    in_memory = from_tf(keras_cnn)
    assert in_memory.path is None and not in_memory.written and in_memory.check.passed
    assert in_memory.io()["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 16, 16, 3]}]


@needs_tf
def test_unknown_sequence_needs_input_shape(tmp_path):
    """A token model with (batch, None) ids: the check shape comes from --input; the ONNX stays dynamic."""
    keras = _keras()
    from graphopt.errors import UserError
    from graphopt.export import from_tf

    keras.utils.set_random_seed(1)
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(40, 8)(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    heads = {"score": keras.layers.Dense(1)(x), "probs": keras.layers.Dense(3, activation="softmax")(x)}
    model = keras.Model(ids, heads)
    with pytest.raises(UserError, match=r"input 'ids' has unknown dimension\(s\) at axis \[1\].*--input ids=2x16"):
        from_tf(model)
    out = tmp_path / "tok.onnx"
    result = from_tf(model, input_shapes={"ids": "2x12"}, output=out)
    assert result.check.passed and [c.shapes for c in result.check.cases] == ["ids=2x12", "ids=3x12"]
    assert [o["name"] for o in result.io()["outputs"]] == ["probs", "score"]
    tokens = np.random.default_rng(2).integers(0, 40, (4, 7)).astype(np.int32)  # another sequence length
    ref = model(tokens, training=False)
    got = ort_outputs(out, {"ids": tokens})
    np.testing.assert_allclose(got[0], np.asarray(ref["probs"]), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got[1], np.asarray(ref["score"]), atol=ATOL, rtol=RTOL)


@needs_tf
def test_mismatch_is_caught(tmp_path):
    """A layer that computes something else in a graph (what tf2onnx converts) than eagerly."""
    keras = _keras()
    import tensorflow as tf

    from graphopt.export import ExportMismatch, from_tf

    class GraphOnlyScale(keras.layers.Layer):
        def call(self, x):
            return x * (1.0 if tf.executing_eagerly() else 2.0)

    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, GraphOnlyScale()(keras.layers.Dense(3)(inp)))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatch, match=r"ONNX Runtime and tensorflow disagree beyond tolerance.*max \|diff\|"):
        from_tf(model, output=out)
    assert not out.exists()


@needs_tf
def test_cli_bad_path_exits_2(cli, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    for target, message in [(tmp_path / "empty_dir", "without saved_model.pb"),
                            (tmp_path / "missing.keras", "TensorFlow model not found")]:
        r = cli("export", "tf", target, "-o", tmp_path / "m.onnx")
        assert r.returncode == 2, r.stdout + r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr
        assert not (tmp_path / "m.onnx").exists()


def test_missing_tf_names_the_pip_command(tmp_path):
    """Runs in any environment: tensorflow is hidden from the subprocess."""
    code = ("import sys; sys.modules['tensorflow'] = None; sys.argv = ['graphopt'] + sys.argv[1:]; "
            "from graphopt.cli import main; main()")
    (tmp_path / "model.keras").write_bytes(b"")  # the path is checked before tensorflow is imported
    r = subprocess.run([sys.executable, "-c", code, "export", "tf", str(tmp_path / "model.keras"), "-o",
                        str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'graphopt[tf]'" in err[0] and "tensorflow" in err[0]
