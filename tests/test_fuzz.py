"""Hostile input: the crafted corpus through the CLI, and random mutations of a real model through the loader.

Every case must end in a one-line error with exit 2 (or, for files that are in fact valid, success) within
a time bound and under a memory limit: never a crash, a hang, or an allocation that takes the machine down.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from graphopt.errors import UserError

CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"
VALID_IN_CORPUS = {"deep_nesting.onnx"}  # well-formed, if odd: running it is fine
# well-formed for inspection: only their synthetic data, or ORT, refuses them
VALID_FOR_INSPECT = VALID_IN_CORPUS | {"absurd_input_dims.onnx", "unknown_domain_imported.onnx"}
MEMORY_LIMIT = 3 << 30  # any attempt to allocate what a crafted header claims fails far below this


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run_limited(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=_limit_memory)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.onnx")))
def test_corpus_file_is_refused_cleanly(name, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _run_limited("run", str(CORPUS / name), "--passes", "cleanup", "-o", str(out), "-q", "--no-latency",
                        "--eval-samples", "4")
    assert "Traceback" not in proc.stderr, proc.stderr
    if name in VALID_IN_CORPUS:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not out.exists()


def test_inspect_refuses_corpus_cleanly():
    """What `graphopt inspect` computes, in-process: the corpus raises UserError and nothing else."""
    from graphopt.describe import describe_model

    _limit_memory_soft = resource.getrlimit(resource.RLIMIT_AS)
    for path in sorted(CORPUS.glob("*.onnx")):
        if path.name in VALID_FOR_INSPECT:
            describe_model(path)
            continue
        with pytest.raises(UserError):
            describe_model(path)
    assert resource.getrlimit(resource.RLIMIT_AS) == _limit_memory_soft


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:  # flip bytes
        for i in rng.integers(0, len(buf), size=int(rng.integers(1, 16))):
            buf[i] = int(rng.integers(0, 256))
    elif kind == 1:  # truncate
        buf = buf[: int(rng.integers(0, len(buf)))]
    elif kind == 2:  # duplicate a slice
        a = int(rng.integers(0, len(buf)))
        b = min(len(buf), a + int(rng.integers(1, 64)))
        buf[a:a] = buf[a:b]
    else:  # varint bombs: set high bits on a run of bytes
        a = int(rng.integers(0, len(buf) - 8))
        for i in range(a, a + 8):
            buf[i] |= 0x80
    return bytes(buf)


def test_random_mutations_only_raise_user_errors(models_dir, tmp_path):
    """Seeded mutations of digits_mlp.onnx: the loader and `inspect`'s analysis either accept a file or raise
    UserError. Bounded to 20 s."""
    from graphopt.describe import describe_model
    from graphopt.model_io import load_model

    original = (models_dir / "digits_mlp.onnx").read_bytes()
    rng = np.random.default_rng(1234)
    deadline = time.monotonic() + 20
    tried = refused = 0
    path = tmp_path / "m.onnx"
    while time.monotonic() < deadline and tried < 400:
        path.write_bytes(_mutate(original, rng))
        tried += 1
        try:
            load_model(path)
            describe_model(path)
        except UserError:
            refused += 1
    assert tried >= 50 and refused > 0
