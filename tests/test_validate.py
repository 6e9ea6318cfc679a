"""Validation figures against hand-computed values, and the one-session-at-a-time path for big models."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import graphopt
from graphopt import api
from graphopt.validate import AgreementMeter, evaluate_gates


def test_agreement_meter_against_numpy():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 4)).astype(np.float32)
    cand = ref.copy()
    cand[:3] = -cand[:3]  # three samples disagree completely
    labels = ref.argmax(1)
    labels[9] = (labels[9] + 1) % 4
    meter = AgreementMeter()
    meter.update([ref[:6]], [cand[:6]], labels[:6])  # streamed in two parts
    meter.update([ref[6:]], [cand[6:]], labels[6:])
    got = meter.result()
    cos = np.sum(ref * cand, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    assert got.samples == 10
    assert got.mean_cosine == pytest.approx(cos.mean(), rel=1e-6)
    assert got.max_abs_diff == pytest.approx(np.abs(ref - cand).max(), rel=1e-6)
    assert got.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert got.reference_accuracy == pytest.approx(0.9)
    assert got.candidate_accuracy == pytest.approx(np.mean(cand.argmax(1) == labels))
    assert got.accuracy_drop_points == pytest.approx(100 * (got.reference_accuracy - got.candidate_accuracy))
    gates = evaluate_gates(got, [], max_accuracy_drop=1.0, max_latency_ratio=None)
    assert gates[0].passed is False


def test_sequential_validation_matches_interleaved(models_dir, monkeypatch):
    kwargs = dict(passes=["cleanup"], data=models_dir / "digits_cnn_test.npz", latency_batches=[2])
    normal = graphopt.optimize(models_dir / "digits_cnn.onnx", **kwargs).report["validation"]
    monkeypatch.setattr(api, "SEQUENTIAL_VALIDATION_BYTES", 0)
    seq = graphopt.optimize(models_dir / "digits_cnn.onnx", **kwargs).report["validation"]
    assert seq["latency"][0]["mode"] == "sequential" and normal["latency"][0]["mode"] == "interleaved"
    for key in ("samples", "max_abs_diff", "mean_cosine", "top1_agreement", "candidate_accuracy"):
        assert seq["agreement"][key] == pytest.approx(normal["agreement"][key]), key


def test_interleaved_order_gives_every_session_every_position_and_predecessor():
    """Latency comparisons rotate the run order: a session always run right after a long one is
    measurably faster or slower with several thread pools on few cores."""
    from graphopt.runtime import interleaved_order

    for n in (1, 2, 3, 4, 5, 6):
        period = n if n % 2 == 0 else 2 * n
        rounds = [interleaved_order(n, i) for i in range(period)]
        assert all(sorted(r) == list(range(n)) for r in rounds)
        for s in range(n):  # every position, equally often
            positions = collections.Counter(r.index(s) for r in rounds)
            assert set(positions) == set(range(n)) and len(set(positions.values())) == 1
        pairs = collections.Counter((a, b) for r in rounds for a, b in zip(r, r[1:]))
        assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}  # every predecessor
        assert len(set(pairs.values())) <= 1  # equally often
        assert interleaved_order(n, period) == rounds[0]
    assert interleaved_order(0, 3) == []
