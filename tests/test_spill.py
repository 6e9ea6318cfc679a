"""Weights a pass produces can be written away as they are made (TensorSpill), with the same results."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import graphopt
from conftest import load_npz, ort_outputs
from graphopt import model_io
from graphopt.model_io import model_to_bytes


def test_spilled_weights_give_the_same_model(models_dir, monkeypatch, tmp_path):
    x, _ = load_npz(models_dir / "digits_cnn_test.npz", 32)
    kwargs = dict(passes=["prune"], options={"prune": {"sparsity": 0.5}}, validate=False)
    in_memory = graphopt.optimize(models_dir / "digits_cnn.onnx", **kwargs)
    monkeypatch.setattr(model_io, "SPILL_MIN_BYTES", 0)
    spilled = graphopt.optimize(models_dir / "digits_cnn.onnx", work_dir=tmp_path / "work", **kwargs)
    spilled_weights = [v.const_value for v in spilled.model.graph.initializers.values()
                       if isinstance(v.const_value, ir.ExternalTensor)]
    pruned = [row for row in spilled.records[0].details["layers"] if row.get("sparsity", 0) > 0]
    assert len(spilled_weights) == len(pruned) == 5  # 3 Conv + 2 Gemm weights, each written away as made
    assert all(t.path.startswith(str(tmp_path / "work")) for t in spilled_weights)
    out = spilled.save(tmp_path / "out.onnx")  # external tensors are copied out of the scratch file
    np.testing.assert_array_equal(ort_outputs(out, x)[0], ort_outputs(model_to_bytes(in_memory.model), x)[0])


def test_save_unmaps_external_tensors(models_dir, tmp_path):
    model = ir.load(models_dir / "digits_mlp.onnx")
    ir.save(model, tmp_path / "ext.onnx", external_data="ext.onnx.data", size_threshold_bytes=0)
    loaded = model_io.load_model(tmp_path / "ext.onnx")
    tensors = [v.const_value for v in loaded.graph.initializers.values()]
    for t in tensors:
        t.numpy()  # map them all
    model_io.save_model(loaded, tmp_path / "copy.onnx", external_data=True)
    assert all(t.raw is None for t in tensors if isinstance(t, ir.ExternalTensor))  # released after writing
    x, _ = load_npz(models_dir / "digits_mlp_test.npz", 8)
    np.testing.assert_array_equal(ort_outputs(tmp_path / "copy.onnx", x)[0],
                                  ort_outputs(models_dir / "digits_mlp.onnx", x)[0])
