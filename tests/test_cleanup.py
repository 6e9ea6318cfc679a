"""cleanup keeps every reference model's outputs (within 1e-4 relative) and removes what it should."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphopt
from conftest import REFERENCE_MODELS, load_npz, ort_outputs
from graphopt.model_io import model_to_bytes
from graphopt.stats import op_histogram

DATA = {"digits_mlp": "digits_mlp_test.npz", "digits_cnn": "digits_cnn_test.npz",
        "resnet_small": "resnet_small_calib.npz", "transformer_small": "transformer_small_calib.npz"}


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_cleanup_equivalence(models_dir, name):
    inputs, _ = load_npz(models_dir / DATA[name], 8)
    result = graphopt.optimize(models_dir / f"{name}.onnx", ["cleanup"], validate=False)
    ref = ort_outputs(models_dir / f"{name}.onnx", inputs)[0]
    got = ort_outputs(model_to_bytes(result.model), inputs)[0]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale
    if name in ("digits_cnn", "resnet_small"):
        assert "BatchNormalization" not in op_histogram(result.model)


def test_fold_batchnorm_off_keeps_batchnorm(models_dir):
    result = graphopt.optimize(models_dir / "digits_cnn.onnx", ["cleanup"], validate=False,
                               options={"cleanup": {"fold_batchnorm": False}})
    assert op_histogram(result.model)["BatchNormalization"] == 3


def test_cleanup_removes_identity_dead_code_unused_initializers_and_folds_constants(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x1"]),
         helper.make_node("Add", ["c1", "c2"], ["c3"]),                 # constant: folds
         helper.make_node("MatMul", ["x1", "w"], ["y0"]),
         helper.make_node("Add", ["y0", "c3"], ["y1"]),
         helper.make_node("Relu", ["y1"], ["dead"]),                    # unused: removed
         helper.make_node("Identity", ["y1"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.ones(3, np.float32), "c1"),
         onnx.numpy_helper.from_array(np.ones(3, np.float32), "c2"),
         onnx.numpy_helper.from_array(np.ones(5, np.float32), "unused")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = graphopt.optimize(path, ["cleanup"], validate=False)
    ops = op_histogram(result.model)
    assert ops == {"MatMul": 1, "Add": 1}, ops
    assert "unused" not in result.model.graph.initializers
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_allclose(ort_outputs(model_to_bytes(result.model), {"x": x})[0], x @ w + 2, rtol=1e-6)
    assert isinstance(result.model, ir.Model)
