"""Data sources stream and re-batch; checks against the model's inputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from graphopt.data import (Batch, CallableSource, FolderSource, InputSpec, NpzSource, SyntheticSource, check_batch,
                           open_data)
from graphopt.errors import UserError
from graphopt.model_io import load_model


def test_npz_is_memory_mapped_and_rebatched(tmp_path):
    x = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    y = np.arange(100)
    np.savez(tmp_path / "d.npz", x=x, labels=y)
    src = NpzSource(tmp_path / "d.npz", chunk_rows=7)
    arrays = src._arrays()
    assert isinstance(arrays["x"], np.memmap)  # stored members are mapped, not read
    batches = list(src.batches(batch_size=16))
    assert [len(b) for b in batches] == [16] * 6 + [4]
    np.testing.assert_array_equal(np.concatenate([b.inputs["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), y)
    assert sum(len(b) for b in src.batches(batch_size=16, limit=20)) == 20


def test_compressed_npz_and_folder(tmp_path):
    (tmp_path / "f").mkdir()
    for i in range(3):
        np.savez_compressed(tmp_path / "f" / f"part{i}.npz", x=np.full((5, 2), i, np.float32))
    batches = list(FolderSource(tmp_path / "f").batches(batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert batches[-1].inputs["x"][-1, 0] == 2


def test_callable_source(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.ones((2, 2), np.float32) * i}, np.array([i, i])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = open_data("mydata:batches")
    assert isinstance(src, CallableSource)
    got = list(src.batches())
    assert len(got) == 3 and got[2].labels.tolist() == [2, 2]
    sys.modules.pop("mydata", None)


def test_check_batch_casts_within_kind_and_checks_symbols():
    specs = [InputSpec("a", np.dtype(np.float32), ("n", 2)), InputSpec("b", np.dtype(np.int64), ("n",))]
    out = check_batch(Batch({"a": np.zeros((3, 2)), "b": np.zeros(3, np.int32)}), specs, "t")
    assert out.inputs["a"].dtype == np.float32 and out.inputs["b"].dtype == np.int64
    with pytest.raises(UserError, match="dimension 'n' is 3 in one input and 4"):
        check_batch(Batch({"a": np.zeros((3, 2)), "b": np.zeros(4, np.int64)}), specs, "t")


def test_synthetic_source_uses_model_specs_and_pins(models_dir):
    model = load_model(models_dir / "transformer_small.onnx")
    src = open_data(None, model, batch_size=4)
    assert isinstance(src, SyntheticSource)
    b = next(iter(src.batches(batch_size=4)))
    assert b.inputs["input_ids"].shape == (4, 128) and b.inputs["input_ids"].dtype == np.int64
    assert b.inputs["input_ids"].max() < 1000  # stays inside the embedding table
    spec = InputSpec("x", np.dtype(np.float32), ("batch", "seq", 8))
    with pytest.raises(UserError, match="pin it with --shape x=1xNx8"):
        SyntheticSource([spec])
    src = SyntheticSource([spec], {"x": (2, 5, 8)})
    assert next(iter(src.batches())).inputs["x"].shape == (2, 5, 8)
    with pytest.raises(UserError, match="does not fit"):
        SyntheticSource([spec], {"x": (2, 5, 9)})
