"""Shared test fixtures: the reference models (built by `make models`), a CLI runner and ORT helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"
REFERENCE_MODELS = ["digits_mlp", "digits_cnn", "resnet_small", "transformer_small"]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS / "digits_cnn.onnx").is_file():
        pytest.fail("reference models are missing: run `make models` (make test does it)")
    return MODELS


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `graphopt ARGS...` as a subprocess, the way a user or a pipeline does."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


@pytest.fixture
def cli():
    return run_cli


def ort_outputs(model: Path | str | bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def load_npz(path: Path, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as z:
        labels = z["labels"][:n] if "labels" in z.files else None
        return {k: z[k][:n] for k in z.files if k != "labels"}, labels


def assert_user_error(proc: subprocess.CompletedProcess[str], out: Path | None, *needles: str) -> None:
    """A user error as the CLI must report it: exit 2, one line starting 'error: ', no traceback, no output."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(".graphopt-*"))


def to_bytes(model: ir.Model) -> bytes:
    """Serialize an onnx_ir model for ORT after the full ONNX checker (shape inference included)."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()
