"""tune: search ONNX Runtime settings for the model as it leaves the pipeline (run it last).

The graph is not changed. The pass measures execution-provider and session settings on the in-memory
model (see ``graphopt.tune``) and leaves the best ones, per provider and batch size, in
``details["settings"]`` and in ``model.metadata_props["graphopt.ort_settings"]``. The saving code turns
that metadata into ``OUTPUT.ort.json`` beside the written model (``graphopt.tune.write_settings_from_metadata``),
removing it from the model. A pass after ``tune`` would make the settings stale, so put it last.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import onnx_ir as ir

from graphopt.data import SyntheticSource, input_specs, integer_input_ranges
from graphopt.errors import UserError
from graphopt.model_io import save_model
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register
from graphopt.tune import METADATA_KEY, SearchConfig, all_dimension_names, default_tolerance, tune
from graphopt.validate import latency_inputs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TuneOptions:
    providers: str = opt("", "Providers to tune, e.g. cpu,cuda (empty: the run's --providers). A provider this "
                             "onnxruntime lacks is recorded as skipped.")
    batches: list[int] = opt([1], "Batch sizes to tune for, e.g. 1,8,64.", min=1)
    budget_s: float = opt(60.0, "Time budget for the whole search, in seconds.", min=0.0, min_exclusive=True)
    warmup: int = opt(5, "Untimed runs per candidate before timing.", min=1)
    repeat: int = opt(30, "Most timed runs per candidate (fewer when the budget is short).", min=3)
    min_repeat: int = opt(5, "Fewest timed runs per candidate before the budget may cut a comparison short.", min=1)
    min_gain: float = opt(0.03, "How much faster (fraction) a setting must be to replace the best so far.",
                          min=0.0, max=1.0, max_exclusive=True)
    tolerance: float | None = opt(None, "Most max-abs output difference allowed, relative to the outputs' largest "
                                        "magnitude (default 1e-3; 1e-2 for float16 models).", min=0.0)
    search: list[str] = opt([], "Only these dimensions (default: all for each provider); e.g. "
                                "intra_op_threads,graph_optimization_level. copy_stream is searched only if named.")

    def validate(self) -> None:
        unknown = sorted(set(self.search) - set(all_dimension_names()))
        if unknown:
            raise UserError(f"option tune.search: unknown dimension '{unknown[0]}'; known: "
                            f"{', '.join(all_dimension_names())}")
        if self.min_repeat > self.repeat:
            raise UserError(f"option tune.min_repeat ({self.min_repeat}) must not exceed tune.repeat ({self.repeat})")


@register
class TunePass(GraphPass):
    name = "tune"
    summary = "Find the fastest ORT provider/session settings and IO binding per provider and batch (run last)."
    Options = TuneOptions
    tolerance = Tolerance(rel=1e-6)  # the graph is untouched

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: TuneOptions = self.options
        ctx = self.context
        path = ctx.work_dir / "tune-candidate.onnx"
        save_model(model, path)  # ORT loads each candidate session from this copy
        specs = input_specs(model)
        source = ctx.data or SyntheticSource(specs, ctx.shapes, rows=max(o.batches), batch_size=max(o.batches),
                                             seed=ctx.seed, int_high=integer_input_ranges(model))
        cache: dict[int, dict] = {}

        def inputs_for(batch: int) -> dict:
            if batch not in cache:
                cache[batch] = latency_inputs(source, specs, batch)
            return cache[batch]

        config = SearchConfig(budget_s=o.budget_s, warmup=o.warmup, repeat=o.repeat, min_repeat=o.min_repeat,
                              min_gain=o.min_gain,
                              tolerance=o.tolerance if o.tolerance is not None else default_tolerance(model),
                              only=o.search or None)
        result = tune(path, o.providers or ctx.providers, o.batches, inputs_for, config, progress=ctx.progress)
        doc = result.settings_document()
        doc["model"] = None  # the output's name is only known when it is saved
        self.details["results"] = [g.summary() for g in result.groups]
        self.details["candidates"] = [r.to_dict() for g in result.groups for r in g.records]
        self.details["budget_s"] = result.budget_s
        self.details["elapsed_s"] = round(result.elapsed_s, 3)
        self.details["settings"] = doc
        for g in result.groups:
            if g.status != "tuned":
                logger.warning("tune: %s at batch %d skipped: %s", g.provider, g.batch, g.reason)
        if not result.tuned:
            self.details["note"] = "nothing could be tuned; no settings are written"
            return ir.passes.PassResult(model, modified=False)
        model.metadata_props[METADATA_KEY] = json.dumps(doc)
        return ir.passes.PassResult(model, modified=True)
