"""Prove a candidate against its reference in ONNX Runtime: output agreement, accuracy, latency, size.

Agreement streams over the evaluation data batch by batch (only running sums are kept). Latency runs the
two models interleaved on the same inputs so that noise on a shared machine hits both alike, and is
reported as a ratio. The gates turn these figures into a pass/fail verdict for deployment pipelines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.context import NullProgress, ProgressReporter
from graphopt.data import DataSource, InputSpec
from graphopt.runtime import Runner, Timing, short_name, time_interleaved

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Agreement:
    samples: int
    max_abs_diff: float
    mean_cosine: float
    top1_agreement: float | None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    reference_max_abs: float = 0.0

    @property
    def accuracy_drop_points(self) -> float | None:
        """Accuracy lost in percentage points (labels), else top-1 disagreement in points."""
        if self.reference_accuracy is not None and self.candidate_accuracy is not None:
            return 100.0 * (self.reference_accuracy - self.candidate_accuracy)
        if self.top1_agreement is not None:
            return 100.0 * (1.0 - self.top1_agreement)
        return None


class AgreementMeter:
    """Streaming comparison of two models' outputs (first output decides top-1 and accuracy)."""

    def __init__(self) -> None:
        self.samples = 0
        self.max_abs = 0.0
        self.ref_max_abs = 0.0
        self.cos_sum = 0.0
        self.cos_n = 0
        self.top1_same = 0
        self.top1_n = 0
        self.ref_correct = 0
        self.cand_correct = 0
        self.labelled = 0
        self.nonfinite = False

    def update(self, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        n = len(ref[0]) if ref[0].ndim else 1
        self.samples += n
        for r, c in zip(ref, cand):
            r = np.asarray(r, dtype=np.float64)
            c = np.asarray(c, dtype=np.float64)
            if r.shape != c.shape:
                raise ValueError(f"output shapes differ: reference {r.shape}, candidate {c.shape}")
            if not np.all(np.isfinite(c)):
                self.nonfinite = True
            if r.size:
                self.max_abs = max(self.max_abs, float(np.nanmax(np.abs(r - c))) if np.all(np.isfinite(c)) else float("inf"))
                self.ref_max_abs = max(self.ref_max_abs, float(np.max(np.abs(r))))
            rr = r.reshape(n, -1) if r.ndim else r.reshape(1, -1)
            cc = c.reshape(n, -1) if c.ndim else c.reshape(1, -1)
            denom = np.linalg.norm(rr, axis=1) * np.linalg.norm(cc, axis=1)
            same = np.all(rr == cc, axis=1)
            cos = np.where(denom > 0, np.sum(rr * cc, axis=1) / np.where(denom > 0, denom, 1), same.astype(float))
            self.cos_sum += float(np.nansum(cos))
            self.cos_n += len(cos)
        first_r, first_c = np.asarray(ref[0]), np.asarray(cand[0])
        if first_r.ndim >= 2 and first_r.shape[-1] > 1:
            ar = first_r.reshape(-1, first_r.shape[-1]).argmax(-1)
            ac = first_c.reshape(-1, first_c.shape[-1]).argmax(-1)
            self.top1_same += int(np.sum(ar == ac))
            self.top1_n += len(ar)
            if labels is not None and first_r.ndim == 2 and labels.shape == (len(ar),):
                self.ref_correct += int(np.sum(ar == labels))
                self.cand_correct += int(np.sum(ac == labels))
                self.labelled += len(ar)

    def result(self) -> Agreement:
        return Agreement(
            samples=self.samples,
            max_abs_diff=self.max_abs,
            mean_cosine=self.cos_sum / self.cos_n if self.cos_n else 1.0,
            top1_agreement=self.top1_same / self.top1_n if self.top1_n else None,
            reference_accuracy=self.ref_correct / self.labelled if self.labelled else None,
            candidate_accuracy=self.cand_correct / self.labelled if self.labelled else None,
            reference_max_abs=self.ref_max_abs,
        )


def compare(reference: Runner, candidate: Runner, data: DataSource, specs: list[InputSpec], *,
            batch_size: int = 64, limit: int | None = 2000,
            progress: ProgressReporter | None = None) -> Agreement:
    meter = AgreementMeter()
    progress = progress or NullProgress()
    with progress.task("comparing outputs", total=limit) as task:
        for batch in data.batches(batch_size=batch_size, limit=limit, specs=specs):
            meter.update(reference.run(batch.inputs), candidate.run(batch.inputs), batch.labels)
            task.advance(len(batch))
    return meter.result()


def compare_sequential(make_reference: Any, make_candidate: Any, data: DataSource, specs: list[InputSpec],
                       spill_dir: Any, *, batch_size: int = 64, limit: int | None = 2000,
                       progress: ProgressReporter | None = None) -> Agreement:
    """Like :func:`compare`, with one session alive at a time: for models whose weights do not fit twice.

    The reference's outputs are spilled to ``spill_dir`` batch by batch, its session is dropped, and the
    candidate then runs over the same batches.
    """
    progress = progress or NullProgress()
    runner = make_reference()
    count = 0
    with progress.task("reference outputs", total=limit) as task:
        for i, batch in enumerate(data.batches(batch_size=batch_size, limit=limit, specs=specs)):
            np.savez(f"{spill_dir}/ref_{i}.npz", *runner.run(batch.inputs))
            count = i + 1
            task.advance(len(batch))
    getattr(runner, "close", lambda: None)()
    del runner
    runner = make_candidate()
    meter = AgreementMeter()
    with progress.task("comparing outputs", total=limit) as task:
        for i, batch in enumerate(data.batches(batch_size=batch_size, limit=limit, specs=specs)):
            if i >= count:
                break
            with np.load(f"{spill_dir}/ref_{i}.npz") as z:
                ref = [z[f"arr_{j}"] for j in range(len(z.files))]
            meter.update(ref, runner.run(batch.inputs), batch.labels)
            task.advance(len(batch))
    getattr(runner, "close", lambda: None)()
    return meter.result()


@dataclasses.dataclass
class LatencyResult:
    provider: str
    batch: int
    reference: Timing
    candidate: Timing

    @property
    def ratio(self) -> float:
        return self.candidate.p50_ms / self.reference.p50_ms if self.reference.p50_ms > 0 else float("nan")

    #: "interleaved" (both sessions alive, alternating runs) or "sequential" (one at a time: big models)
    mode: str = "interleaved"

    def to_dict(self) -> dict[str, Any]:
        return {"provider": short_name(self.provider), "batch": self.batch,
                "reference_ms": dataclasses.asdict(self.reference),
                "candidate_ms": dataclasses.asdict(self.candidate), "ratio": self.ratio, "mode": self.mode}


def latency_inputs(data: DataSource, specs: list[InputSpec], batch: int) -> dict[str, np.ndarray]:
    """A fixed input batch of exactly ``batch`` rows (rows repeat if the data has fewer)."""
    first = data.first(specs, batch_size=batch)
    out = {}
    for name, arr in first.inputs.items():
        if np.ndim(arr) and len(arr) < batch:
            reps = -(-batch // len(arr))
            arr = np.concatenate([arr] * reps)[:batch]
        out[name] = np.ascontiguousarray(arr)
    return out


def measure_latency(reference: Runner, candidate: Runner, inputs: dict[str, np.ndarray], *, repeat: int = 50,
                    budget_s: float = 20.0) -> LatencyResult:
    """Interleaved timing of two runners (sessions or stage pipelines) on the same inputs."""
    try:
        t_ref, t_cand = time_interleaved([reference, candidate], inputs, repeat=repeat, budget_s=budget_s)
    finally:
        for r in (reference, candidate):
            getattr(r, "close", lambda: None)()
    return LatencyResult(reference.provider, len(next(iter(inputs.values()))), t_ref, t_cand)


def measure_latency_sequential(make_reference: Any, make_candidate: Any, inputs: dict[str, np.ndarray], *,
                               repeat: int = 20, budget_s: float = 30.0) -> LatencyResult:
    """Time the two models one after the other (each session dropped before the next is made)."""
    timings = []
    provider = ""
    for make in (make_reference, make_candidate):
        runner = make()
        provider = runner.provider
        (t,) = time_interleaved([runner], inputs, repeat=repeat, budget_s=budget_s, warmup=2)
        getattr(runner, "close", lambda: None)()
        del runner
        timings.append(t)
    return LatencyResult(provider, len(next(iter(inputs.values()))), timings[0], timings[1], mode="sequential")


@dataclasses.dataclass
class Gate:
    name: str
    limit: float
    value: float | None
    passed: bool
    detail: str = ""


def evaluate_gates(agreement: Agreement | None, latencies: Sequence[LatencyResult], *,
                   max_accuracy_drop: float | None, max_latency_ratio: float | None) -> list[Gate]:
    gates = []
    if max_accuracy_drop is not None:
        drop = agreement.accuracy_drop_points if agreement is not None else None
        basis = ("accuracy" if agreement is not None and agreement.reference_accuracy is not None
                 else "top-1 agreement")
        gates.append(Gate("max_accuracy_drop", max_accuracy_drop, drop,
                          drop is not None and drop <= max_accuracy_drop + 1e-9,
                          f"points of {basis}" if drop is not None else "no classification output to compare"))
    if max_latency_ratio is not None:
        for lat in latencies:
            gates.append(Gate(f"max_latency_ratio[{short_name(lat.provider)},b{lat.batch}]", max_latency_ratio,
                              lat.ratio, lat.ratio <= max_latency_ratio, "candidate p50 / reference p50"))
    return gates
