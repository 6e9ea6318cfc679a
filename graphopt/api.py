"""The Python API; the CLI is a thin layer over these functions.

``optimize`` loads a model, runs the passes, stages the result beside its destination, validates it
against the untouched input in ONNX Runtime, evaluates the gates, and only then moves the staged file into
place (or drops it when a gate failed, unless ``keep_failed``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import options as options_mod
from graphopt import registry
from graphopt.context import NullProgress, PassContext, ProgressReporter
from graphopt.data import DataSource, InputSpec, input_specs, open_data
from graphopt.errors import GateFailed, UserError
from graphopt.model_io import load_model, model_file_size, save_model
from graphopt.pipeline import Pipeline, PassRecord
from graphopt.registry import GraphPass, Tolerance
from graphopt.report import Report
from graphopt.runtime import SessionFactory, resolve_providers
from graphopt.stats import model_stats
from graphopt.validate import (LatencyResult, compare, compare_sequential, evaluate_gates, latency_inputs,
                               measure_latency, measure_latency_sequential)
from graphopt.runtime import Runner

logger = logging.getLogger(__name__)

#: Above this many bytes of reference + candidate, validation keeps one ORT session alive at a time.
SEQUENTIAL_VALIDATION_BYTES = 2 << 30


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    report: Report
    records: list[PassRecord]
    output: Path | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (a stage folder for a partitioned model; MODEL.ort.json beside it when tuned)."""
        return save_candidate(self.model, Path(path))


def build_passes(names: Sequence[str], context: PassContext,
                 *layers: Mapping[str, Mapping[str, Any]]) -> list[GraphPass]:
    """Instantiate passes with options from each layer (defaults < config file < --set)."""
    if not names:
        raise UserError("no passes given; use e.g. --passes cleanup (see `graphopt passes`)")
    for layer in layers:
        for pass_name in layer:
            registry.get(pass_name)  # unknown pass names in options are errors too
            if pass_name not in names:
                raise UserError(f"options given for pass '{pass_name}', which is not in the pipeline "
                                f"({', '.join(names)})")
    built = []
    for name in names:
        cls = registry.get(name)
        opts = options_mod.build(cls.Options, name, *[layer.get(name, {}) for layer in layers])
        built.append(cls(opts, context))
    return built


FRAMEWORK_PREFIXES = ("torch:", "tf:")


def _as_model(model: Any, work_dir: Path, shapes: Mapping[str, tuple[int, ...]] | None = None
              ) -> tuple[ir.Model, Path]:
    """Load the input; returns it with a path to an untouched copy on disk (the validation reference).

    ``torch:MODULE:FACTORY`` and ``tf:PATH`` sources are exported to ONNX first (``graphopt export``).
    """
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if text.startswith(FRAMEWORK_PREFIXES):
            export = _optional("graphopt.export")
            if export is None:
                raise UserError(f"{text}: this graphopt build cannot export framework models")
            path = export.load_source(text, shapes or {}, work_dir)
            return load_model(path), path
        path = Path(model)
        return load_model(path), path
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if isinstance(model, ir.Model):
        ref = work_dir / "reference.onnx"
        save_model(model, ref)
        return load_model(ref), ref
    raise UserError(f"model must be a path, an onnx.ModelProto or an onnx_ir.Model; got {type(model).__name__}")


def _optional(module: str) -> Any:
    """A feature module that may not be present in this build (stages, tune, export)."""
    import importlib
    import importlib.util

    return importlib.import_module(module) if importlib.util.find_spec(module) is not None else None


def save_candidate(model: ir.Model, path: Path) -> Path:
    """Write a pipeline result: one model file, or a stage directory when the model was partitioned."""
    stages = _optional("graphopt.stages")
    if stages is not None and stages.is_partitioned(model):
        stages.write_partitioned(model, path)
        return path
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name (only `partition` writes a folder)")
    tune = _optional("graphopt.tune")
    if tune is not None:  # first: the settings go to MODEL.ort.json, not into the saved model
        tune.write_settings_from_metadata(model, path)
    save_model(model, path)
    return path


def make_runner(path: Path, provider: str, sessions: SessionFactory, batch: int | None = None, *,
                backend: str = "threads", replicas: int = 1) -> Any:
    """A runner for a model: an ORT session, the stitched stages of a partitioned model, or (``backend="ray"``)
    Ray actors, ``replicas`` of them sharing each batch (data-parallel evaluation)."""
    from graphopt.runtime import short_name

    is_stage_dir = path.is_dir() and (path / "manifest.json").is_file()
    if is_stage_dir or backend == "ray":
        stages = _optional("graphopt.stages")
        if stages is None:
            raise UserError(f"{path}: this graphopt build has no stage runner")
        if is_stage_dir:
            return stages.StagePipeline.from_dir(path, devices=[short_name(provider)], session_factory=sessions,
                                                 backend=backend, replicas=replicas)
        return stages.StagePipeline.from_model(path, device=short_name(provider), backend="ray",
                                               replicas=replicas, session_factory=sessions)
    if replicas != 1:
        raise UserError("--replicas needs --backend ray")
    return Runner(sessions.session(path, provider, settings=tuned_settings(path, provider, batch)))


def tuned_settings(path: Path, provider: str, batch: int | None = None) -> Any:
    """Settings from MODEL.ort.json (written by `graphopt tune`) when present, else None (defaults)."""
    tune = _optional("graphopt.tune")
    if tune is None or path.is_dir():
        return None
    return tune.load_settings(path, provider, batch)


class _Stage:
    """A temporary folder beside the destination, so the final move is a rename on one filesystem."""

    def __init__(self, output: Path | None, work_dir: Path) -> None:
        self.output = output
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".graphopt-stage-", dir=output.parent))
            self.path = self.dir / output.name
        else:
            self.dir = None
            self.path = work_dir / "candidate.onnx"

    def commit(self) -> None:
        assert self.output is not None and self.dir is not None
        if self.path.is_dir():  # a stage directory replaces the old one in two renames
            old = None
            if self.output.exists():
                old = self.dir.parent / f".graphopt-old-{os.getpid()}-{self.output.name}"
                os.replace(self.output, old)
            os.replace(self.path, self.output)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            for f in sorted(self.dir.iterdir(), key=lambda p: p.name == self.output.name):  # data first, model last
                os.replace(f, self.output.parent / f.name)
        self.discard()

    def discard(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def validate_paths(reference: Path, candidate: Path, report: Report, *, data: DataSource,
                   sessions: SessionFactory, providers: Sequence[str], latency_batches: Sequence[int],
                   batch_size: int, eval_samples: int, max_accuracy_drop: float | None,
                   max_latency_ratio: float | None, progress: ProgressReporter,
                   specs: list[InputSpec], measure_speed: bool = True, backend: str = "threads",
                   replicas: int = 1) -> None:
    """Fill ``report`` with agreement, latency, size and gates of ``candidate`` against ``reference``
    (whose input specs the caller has already read)."""
    ref_size, cand_size = model_file_size(reference), model_file_size(candidate)
    # Models whose weights do not fit in memory twice are run one session at a time.
    sequential = ref_size + cand_size > SEQUENTIAL_VALIDATION_BYTES
    sequential |= backend == "ray"  # each model's actors take the cluster's CPUs in turn

    def runner(path: Path, provider: str, batch: int | None = None) -> Any:
        return make_runner(path, provider, sessions, batch, backend=backend, replicas=replicas)

    def make(path: Path, provider: str, batch: int | None = None) -> Any:
        return lambda: runner(path, provider, batch)

    if sequential:
        spill = Path(tempfile.mkdtemp(prefix="graphopt-spill-", dir=sessions.work_dir))
        agreement = compare_sequential(make(reference, providers[0]), make(candidate, providers[0]), data, specs,
                                       spill, batch_size=batch_size, limit=eval_samples, progress=progress)
        shutil.rmtree(spill, ignore_errors=True)
    else:
        cand_runner = runner(candidate, providers[0])
        try:
            agreement = compare(runner(reference, providers[0]), cand_runner, data, specs,
                                batch_size=batch_size, limit=eval_samples, progress=progress)
        finally:
            getattr(cand_runner, "close", lambda: None)()
    latencies: list[LatencyResult] = []
    if measure_speed:
        with progress.task("measuring latency", total=len(providers) * len(latency_batches)) as task:
            for provider in providers:
                for b in latency_batches:
                    inputs = latency_inputs(data, specs, b)
                    if sequential:
                        latencies.append(measure_latency_sequential(make(reference, provider, b),
                                                                    make(candidate, provider, b), inputs))
                    else:
                        latencies.append(measure_latency(runner(reference, provider, b),
                                                         runner(candidate, provider, b), inputs))
                    task.advance()
    report.data["validation"] = {
        "data": data.description,
        "provider_for_agreement": providers[0],
        "agreement": dataclasses.asdict(agreement) | {"accuracy_drop_points": agreement.accuracy_drop_points},
        "latency": [lat.to_dict() for lat in latencies],
        "size": {"reference_bytes": ref_size, "candidate_bytes": cand_size,
                 "ratio": cand_size / ref_size if ref_size else None},
    }
    gates = evaluate_gates(agreement, latencies, max_accuracy_drop=max_accuracy_drop,
                           max_latency_ratio=max_latency_ratio)
    report.data["gates"] = [dataclasses.asdict(g) for g in gates]
    failed = [g for g in gates if not g.passed]
    if failed:
        report.data["passed"] = False
        report.data["exit_code"] = GateFailed.exit_code
        report.data["message"] = "gate failed: " + "; ".join(
            f"{g.name} = {'n/a' if g.value is None else f'{g.value:.3f}'} (limit {g.limit:g})" for g in failed)


def optimize(model: Any, passes: Sequence[str] = ("cleanup",), options: Mapping[str, Mapping[str, Any]] | None = None,
             data: Any = None, *, eval_data: Any = None, output: str | os.PathLike | None = None,
             set_options: Mapping[str, Mapping[str, Any]] | None = None, providers: Sequence[str] | str = ("cpu",),
             validate: bool = True, measure_speed: bool = True, max_accuracy_drop: float | None = None,
             max_latency_ratio: float | None = None, latency_batches: Sequence[int] = (1,),
             check_each_pass: bool = False, check_tolerance: Tolerance | None = None,
             shapes: Mapping[str, tuple[int, ...]] | None = None, batch_size: int = 32, eval_samples: int = 1000,
             seed: int = 0, keep_failed: bool = False, work_dir: str | os.PathLike | None = None,
             progress: ProgressReporter | None = None, command: str | None = None) -> OptimizeResult:
    """Optimize ``model`` (path, ModelProto or onnx_ir.Model) with ``passes``; validate; optionally save.

    ``options`` maps pass names to option dicts (as in a pipeline file); ``set_options`` overrides them
    (as ``--set`` does). ``data`` feeds calibration/training and, unless ``eval_data`` is given, validation.
    Returns the optimized onnx_ir model and the report; raises ``UserError`` for bad input. A failed gate
    does not raise: the report says so (``report.passed``, ``report['exit_code']``).
    """
    progress = progress or NullProgress()
    own_work_dir = work_dir is None
    wd = Path(tempfile.mkdtemp(prefix="graphopt-")) if own_work_dir else Path(work_dir)  # type: ignore[arg-type]
    wd.mkdir(parents=True, exist_ok=True)
    report = Report.new(command or f"optimize(passes={list(passes)})")
    try:
        resolved = resolve_providers(providers)
        sessions = SessionFactory(work_dir=wd)
        context = PassContext(sessions=sessions, providers=resolved, work_dir=wd, seed=seed, progress=progress,
                              shapes=dict(shapes or {}), batch_size=batch_size)
        built = build_passes(list(passes), context, options or {}, set_options or {})
        out_path = Path(output) if output is not None else None
        ir_model, reference_path = _as_model(model, wd, shapes)
        context.reference_path = reference_path
        source = open_data(data, ir_model, shapes=shapes, batch_size=batch_size, seed=seed)
        specs = input_specs(ir_model)
        for spec_batch in source.batches(batch_size=batch_size, limit=1, specs=specs):
            del spec_batch  # fail early on data that does not fit the model
        context.data = source
        evaluation = open_data(eval_data, ir_model, shapes=shapes, batch_size=batch_size, seed=seed + 1) \
            if eval_data is not None else source
        report.data["input"] = {"path": str(model) if isinstance(model, (str, os.PathLike)) else None,
                                "size_bytes": model_file_size(reference_path),
                                "stats": None}
        input_stats = model_stats(ir_model, context.shapes)
        report.data["input"]["stats"] = input_stats.to_dict()
        pipeline = Pipeline(built, context, check_each_pass=check_each_pass, check_data=evaluation,
                            check_tolerance=check_tolerance)
        try:
            ir_model, records = pipeline.run(ir_model, input_stats)
        except GateFailed as exc:
            report.data.update(passed=False, exit_code=GateFailed.exit_code, message=str(exc))
            raise
        report.data["passes"] = [r.to_dict() for r in records]
        pass_failures = [f"pass '{r.name}': {r.failure}" for r in records if r.failure]
        stage = _Stage(out_path, wd)
        try:
            save_candidate(ir_model, stage.path)
            if validate:
                validate_paths(reference_path, stage.path, report, data=evaluation, sessions=sessions,
                               providers=resolved, latency_batches=latency_batches, batch_size=batch_size,
                               eval_samples=eval_samples, max_accuracy_drop=max_accuracy_drop,
                               max_latency_ratio=max_latency_ratio, progress=progress, specs=specs,
                               measure_speed=measure_speed)
            if pass_failures:  # the pass saved its best effort; it is written, but the run fails
                report.data.update(passed=False, exit_code=GateFailed.exit_code,
                                   message="; ".join(filter(None, [report.data.get("message"), *pass_failures])))
            gates_ok = all(g["passed"] for g in report.data["gates"])
            written = out_path is not None and (gates_ok or keep_failed)
            report.data["output"] = {"path": str(out_path) if out_path else None, "written": written}
            if written:
                stage.commit()
        finally:
            if out_path is not None:
                stage.discard()
        return OptimizeResult(ir_model, report, records, out_path if report.data["output"]["written"] else None)
    finally:
        if own_work_dir:
            shutil.rmtree(wd, ignore_errors=True)


def validate_models(reference: str | os.PathLike, candidate: str | os.PathLike, data: Any = None, *,
                    providers: Sequence[str] | str = ("cpu",), max_accuracy_drop: float | None = None,
                    max_latency_ratio: float | None = None, latency_batches: Sequence[int] = (1,),
                    shapes: Mapping[str, tuple[int, ...]] | None = None, batch_size: int = 32,
                    eval_samples: int = 1000, seed: int = 0, measure_speed: bool = True,
                    backend: str = "threads", replicas: int = 1,
                    progress: ProgressReporter | None = None, command: str | None = None) -> Report:
    """Validate an existing candidate against its reference (``graphopt validate``).

    ``backend="ray"`` runs both models as Ray actors, ``replicas`` of each sharing every batch, so a Ray
    cluster spreads the evaluation over its machines."""
    progress = progress or NullProgress()
    report = Report.new(command or "validate")
    resolved = resolve_providers(providers)
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    ref_specs = {s.name: s for s in input_specs(ref_model)}
    cand_specs = {s.name: s for s in input_specs(cand_model)}
    if set(ref_specs) != set(cand_specs):
        raise UserError(f"the models have different inputs: {sorted(ref_specs)} vs {sorted(cand_specs)}")
    with tempfile.TemporaryDirectory(prefix="graphopt-") as wd:
        source = open_data(data, ref_model, shapes=shapes, batch_size=batch_size, seed=seed)
        report.data["input"] = {"path": str(reference), "size_bytes": model_file_size(reference),
                                "stats": model_stats(ref_model, shapes).to_dict()}
        report.data["output"] = {"path": str(candidate), "written": False,
                                 "stats": model_stats(cand_model, shapes).to_dict()}
        del ref_model, cand_model
        validate_paths(Path(reference), Path(candidate), report, data=source,
                       sessions=SessionFactory(work_dir=Path(wd)), providers=resolved,
                       latency_batches=latency_batches, batch_size=batch_size, eval_samples=eval_samples,
                       max_accuracy_drop=max_accuracy_drop, max_latency_ratio=max_latency_ratio,
                       progress=progress, specs=list(ref_specs.values()), measure_speed=measure_speed,
                       backend=backend, replicas=replicas)
    return report


def bench_model(model: str | os.PathLike, data: Any = None, *, providers: Sequence[str] | str = ("cpu",),
                batches: Sequence[int] = (1,), shapes: Mapping[str, tuple[int, ...]] | None = None,
                repeat: int = 100, seed: int = 0, progress: ProgressReporter | None = None) -> list[dict[str, Any]]:
    """Latency of one model per provider and batch size (``graphopt bench``)."""
    from graphopt.runtime import time_interleaved

    progress = progress or NullProgress()
    resolved = resolve_providers(providers)
    ir_model = load_model(model)
    specs = input_specs(ir_model)
    source = open_data(data, ir_model, shapes=shapes, batch_size=max(batches), seed=seed)
    sessions = SessionFactory()
    rows = []
    with progress.task("benchmarking", total=len(resolved) * len(batches)) as task:
        for provider in resolved:
            for b in batches:  # MODEL.ort.json may hold different settings per batch size
                runner = Runner(sessions.session(model, provider, settings=tuned_settings(Path(model), provider, b)))
                (timing,) = time_interleaved([runner], latency_inputs(source, specs, b), repeat=repeat)
                rows.append({"provider": provider, "batch": b, **dataclasses.asdict(timing),
                             "samples_per_s": 1000.0 * b / timing.p50_ms})
                task.advance()
    return rows
