"""Runs passes in order and records what each did.

Around every pass: wall time, before/after statistics, the ONNX checker, shape inference, and, with
``check_each_pass``, a numeric check of the model after the pass against the model before it (in ONNX
Runtime, on the data), so a pass that moves outputs beyond its tolerance is named right away.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.context import PassContext
from graphopt.data import DataSource, input_specs
from graphopt.errors import GateFailed, GraphoptError, PassFailed
from graphopt.model_io import call_on_skeleton, save_model
from graphopt.options import to_dict
from graphopt.registry import GraphPass, Tolerance
from graphopt.runtime import Runner
from graphopt.stats import ModelStats, model_stats
from graphopt.validate import Agreement, compare

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    before: ModelStats
    after: ModelStats
    details: dict[str, Any]
    check: dict[str, Any] | None = None
    failure: str | None = None
    peak_rss_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "seconds": self.seconds,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "details": self.details, "check": self.check, "failure": self.failure,
                "peak_rss_bytes": self.peak_rss_bytes}


def peak_rss() -> int | None:
    """This process's peak resident memory so far (bytes), where the platform reports it."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def check_model(model: ir.Model) -> None:
    """ONNX checker on the graph structure (weights are not copied for it)."""
    call_on_skeleton(lambda proto: onnx.checker.check_model(proto, full_check=False), model)


def within(agreement: Agreement, tol: Tolerance) -> bool:
    ok = True
    if tol.rel is not None:
        ok &= agreement.max_abs_diff <= tol.rel * max(agreement.reference_max_abs, 1e-6)
    if tol.min_cosine is not None:
        ok &= agreement.mean_cosine >= tol.min_cosine
    return bool(ok)


class Pipeline:
    def __init__(self, passes: list[GraphPass], context: PassContext, *, check_each_pass: bool = False,
                 check_data: DataSource | None = None, check_tolerance: Tolerance | None = None,
                 check_samples: int = 256) -> None:
        self.passes = passes
        self.context = context
        self.check_each_pass = check_each_pass
        self.check_data = check_data
        self.check_tolerance = check_tolerance
        self.check_samples = check_samples

    def run(self, model: ir.Model, stats: ModelStats | None = None) -> tuple[ir.Model, list[PassRecord]]:
        """Run the passes; ``stats`` are the input model's, when the caller has them already."""
        records: list[PassRecord] = []
        stats = stats or model_stats(model, self.context.shapes)
        for index, p in enumerate(self.passes):
            before_path = None
            if self.check_each_pass:
                before_path = self.context.work_dir / f"before_{index}_{p.name}.onnx"
                save_model(model, before_path)
            logger.info("running pass %s", p.name)
            t0 = time.perf_counter()
            try:
                result = p(model)
            except GraphoptError:
                raise
            except Exception as exc:
                logger.debug("pass %s failed", p.name, exc_info=True)
                raise PassFailed(p.name, exc) from exc
            seconds = time.perf_counter() - t0
            model = result.model
            try:
                check_model(model)
            except Exception as exc:
                raise PassFailed(p.name, RuntimeError(f"the model it produced is invalid: {exc}")) from exc
            ShapeInferencePass(check_type=False, strict_mode=False)(model)
            after = model_stats(model, self.context.shapes)
            check = None
            if before_path is not None:
                check = self._check(p, before_path, model)
            records.append(PassRecord(p.name, to_dict(p.options), seconds, stats, after, p.details, check,
                                      p.failure, peak_rss()))
            stats = after
        return model, records

    def _check(self, p: GraphPass, before_path: Any, model: ir.Model) -> dict[str, Any]:
        tol = self.check_tolerance or p.tolerance
        sessions = self.context.sessions
        assert sessions is not None and self.check_data is not None
        provider = self.context.providers[0]
        ref = Runner(sessions.session(before_path, provider))
        cand = Runner(sessions.session(model, provider))
        specs = input_specs(model)
        agreement = compare(ref, cand, self.check_data, specs, limit=self.check_samples,
                            batch_size=self.context.batch_size)
        ok = within(agreement, tol)
        result = {"tolerance": tol.describe(), "max_abs_diff": agreement.max_abs_diff,
                  "reference_max_abs": agreement.reference_max_abs, "mean_cosine": agreement.mean_cosine,
                  "passed": ok}
        if not ok:
            raise GateFailed(
                f"--check-each-pass: pass '{p.name}' moved the outputs beyond its tolerance "
                f"({tol.describe()}): max abs diff {agreement.max_abs_diff:.3g} "
                f"(reference max {agreement.reference_max_abs:.3g}), mean cosine {agreement.mean_cosine:.6f}")
        return result
