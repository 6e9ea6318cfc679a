"""Find the fastest ONNX Runtime settings for a model, and ship them beside it as ``MODEL.ort.json``.

How a model is run matters as much as the graph: thread counts, the graph optimization level and the
memory planner on the CPU; NHWC kernels, the cuDNN algorithm search and CUDA graphs on the GPU; IO
binding on both. This module searches those settings per execution provider and batch size, measures
every candidate in ONNX Runtime (warm-up, then interleaved timed runs so that machine noise hits all
candidates alike), checks that each candidate's outputs still agree with ORT's defaults, and records
candidates that fail or disagree instead of stopping. The search is a coordinate descent: one dimension
at a time, a challenger replaces the current best only when it is faster by ``min_gain``, which keeps
the defaults unless something measurably beats them. The whole search is bounded by a time budget.

The result is written as a versioned JSON file (schema :data:`SCHEMA`, see docs/tune.md) that
``load_settings`` reads back into a :class:`graphopt.runtime.SessionSettings` and
``apply_to_session_args`` turns into ``InferenceSession(path, sess_options, providers=[(name, opts)])``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphopt.context import NullProgress, ProgressReporter
from graphopt.errors import UserError
from graphopt.runtime import PROVIDER_ALIASES, SessionSettings, Timing, short_name

logger = logging.getLogger(__name__)

SCHEMA = "graphopt.ort_settings/1"
#: ``model.metadata_props`` key where the ``tune`` pass leaves its settings for the saving code.
METADATA_KEY = "graphopt.ort_settings"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: Providers whose IO binding keeps inputs and outputs in CUDA device memory.
_CUDA_DEVICE_PROVIDERS = {CUDA, "TensorrtExecutionProvider"}
#: SessionSettings fields stored under "session" in the file (provider options are stored per entry).
_SESSION_FIELDS = ("intra_op_threads", "inter_op_threads", "graph_optimization_level", "execution_mode",
                   "enable_mem_pattern", "enable_cpu_mem_arena", "config_entries")
_LEVELS = ("disable", "basic", "extended", "layout", "all")


# ---------------------------------------------------------------- settings file

def settings_path(model_path: str | os.PathLike) -> Path:
    """``x/model.onnx`` → ``x/model.ort.json`` (a name without ``.onnx`` gets ``.ort.json`` appended)."""
    path = Path(model_path)
    if path.suffix.lower() == ".onnx":
        return path.with_suffix(".ort.json")
    return path.with_name(path.name + ".ort.json")


def full_provider_name(name: str) -> str:
    return PROVIDER_ALIASES.get(name.strip().lower(), name.strip())


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable settings file ({exc}); delete it or re-run "
                        "`graphopt tune`") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(schema, str) or not schema.startswith("graphopt.ort_settings/"):
        raise UserError(f"{path} is not a graphopt settings file (expected \"schema\": \"{SCHEMA}\")")
    if schema != SCHEMA:
        raise UserError(f"{path} has schema {schema!r}; this graphopt reads {SCHEMA!r} "
                        "(re-run `graphopt tune` or upgrade graphopt)")
    if not isinstance(doc.get("entries"), list):
        raise UserError(f"{path} has no \"entries\" list")
    return doc


def load_entry(model_path: str | os.PathLike, provider: str, batch: int | None = None) -> dict[str, Any] | None:
    """The file's entry for ``provider`` at the batch size nearest ``batch`` (smallest batch if None).

    Returns None when there is no ``MODEL.ort.json`` or it has no entry for that provider. The entry
    carries what :class:`SessionSettings` does not: ``io_binding`` and the measured latencies.
    """
    path = settings_path(model_path)
    if not path.is_file():
        return None
    doc = _read_settings_file(path)
    want = full_provider_name(provider)
    entries = [e for e in doc["entries"]
               if isinstance(e, dict) and full_provider_name(str(e.get("provider", ""))) == want]
    if not entries:
        return None
    target = 1 if batch is None else batch
    return min(entries, key=lambda e: (abs(int(e.get("batch", 1)) - target), int(e.get("batch", 1))))


def entry_to_settings(entry: Mapping[str, Any]) -> SessionSettings:
    """One file entry → SessionSettings (unknown session keys are ignored: newer minor writers)."""
    session = dict(entry.get("session") or {})
    known = {k: v for k, v in session.items() if k in _SESSION_FIELDS}
    ignored = sorted(set(session) - set(known))
    if ignored:
        logger.info("ignoring unknown session settings %s", ", ".join(ignored))
    if known.get("graph_optimization_level", "all") not in _LEVELS:
        raise UserError(f"settings entry has graph_optimization_level {known['graph_optimization_level']!r}; "
                        f"expected one of {', '.join(_LEVELS)}")
    known["config_entries"] = {str(k): str(v) for k, v in (known.get("config_entries") or {}).items()}
    provider = full_provider_name(str(entry.get("provider", CPU)))
    options = {str(k): str(v) for k, v in (entry.get("provider_options") or {}).items()}
    return SessionSettings(**known, provider_options={provider: options})


def load_settings(model_path: str | os.PathLike, provider: str, batch: int | None = None, *,
                  cuda_graph: bool = False) -> SessionSettings | None:
    """Tuned settings for ``provider`` (``cpu``/``cuda`` or a full ORT name) at the nearest batch size.

    None if ``MODEL.ort.json`` is absent or holds nothing for that provider; a damaged file is a
    UserError naming it. ``provider_options`` of the result has exactly one key, the provider.

    ``enable_cuda_graph`` is left out unless ``cuda_graph=True``: a CUDA-graph session must be run through
    IO binding on fixed input/output buffers of one shape (see docs/tune.md); run any other way it gives
    stale outputs or crashes the process (onnxruntime-gpu 1.31 segfaults on the second ``run_with_iobinding``
    with a fresh ``bind_cpu_input``). Callers that do bind fixed buffers ask for it.
    """
    entry = load_entry(model_path, provider, batch)
    if entry is None:
        return None
    settings = entry_to_settings(entry)
    if not cuda_graph:
        for options in settings.provider_options.values():
            options.pop("enable_cuda_graph", None)
    return settings


def apply_to_session_args(settings: SessionSettings,
                          provider: str | None = None) -> tuple[ort.SessionOptions, list[Any]]:
    """``(sess_options, providers)`` for ``ort.InferenceSession(path, sess_options, providers=providers)``.

    The providers list holds ``(name, options)`` for each provider in ``settings.provider_options`` (or
    ``provider`` if given), followed by the CPU provider as ORT's usual fallback for unsupported nodes.
    """
    names = [full_provider_name(provider)] if provider else list(settings.provider_options) or [CPU]
    providers: list[Any] = [(n, dict(settings.provider_options.get(n, {}))) for n in names]
    if CPU not in names:
        providers.append(CPU)
    return settings.session_options(), providers


def session_dict(settings: SessionSettings) -> dict[str, Any]:
    return {k: (dict(getattr(settings, k)) if k == "config_entries" else getattr(settings, k)) for k in _SESSION_FIELDS}


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", suffix=".json", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a settings file is as readable as the model
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_settings(model_path: str | os.PathLike, results: TuneResult | Mapping[str, Any], *,
                  path: str | os.PathLike | None = None) -> Path:
    """Write ``MODEL.ort.json`` beside ``model_path`` (or to ``path``), atomically; returns where."""
    doc = results.settings_document() if isinstance(results, TuneResult) else dict(results)
    doc["model"] = Path(model_path).name
    return _write_json_atomic(Path(path) if path is not None else settings_path(model_path), doc)


def pop_settings_metadata(model: ir.Model) -> dict[str, Any] | None:
    """Remove the ``tune`` pass's settings from the model's metadata and return them (None if absent)."""
    text = model.metadata_props.pop(METADATA_KEY, None)
    if text is None:
        return None
    return json.loads(text)


def write_settings_from_metadata(model: ir.Model, output_path: str | os.PathLike) -> Path | None:
    """If the ``tune`` pass ran, write its settings as ``OUTPUT.ort.json`` and drop them from the model.

    Call it before saving the model: the key is removed so the saved ONNX file is the same with or
    without ``tune`` (settings live in one place, the JSON file, and cannot go stale inside a model that
    another tool later edits). Returns the settings file's path, or None when there was nothing to write.
    """
    doc = pop_settings_metadata(model)
    if doc is None:
        return None
    return save_settings(output_path, doc)


# ---------------------------------------------------------------- candidates and the search space

@dataclasses.dataclass(frozen=True)
class Choice:
    """One value of a dimension: a patch on the settings.

    Keys are SessionSettings fields, ``io_binding``, ``provider_options`` or ``config_entries`` (merged;
    a None value removes the key, i.e. goes back to ORT's default).
    """

    label: str
    patch: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple[Choice, ...]
    help: str = ""


@dataclasses.dataclass
class Candidate:
    settings: SessionSettings
    io_binding: bool
    changes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return ", ".join(self.changes) or "defaults"

    def key(self) -> str:
        data = session_dict(self.settings) | {"provider_options": self.settings.provider_options,
                                               "io_binding": self.io_binding}
        return json.dumps(data, sort_keys=True)

    def with_choice(self, choice: Choice, provider: str) -> Candidate:
        s = dataclasses.replace(self.settings, config_entries=dict(self.settings.config_entries),
                                provider_options={k: dict(v) for k, v in self.settings.provider_options.items()})
        io_binding = self.io_binding
        for key, value in choice.patch.items():
            if key == "io_binding":
                io_binding = bool(value)
            elif key in ("provider_options", "config_entries"):
                target = s.provider_options.setdefault(provider, {}) if key == "provider_options" else s.config_entries
                for k, v in value.items():
                    if v is None:
                        target.pop(k, None)
                    else:
                        target[k] = str(v)
            elif key in _SESSION_FIELDS:
                setattr(s, key, value)
            else:
                raise ValueError(f"unknown setting {key!r} in choice {choice.label!r}")
        return Candidate(s, io_binding, self.changes + (choice.label,))

    def invalid_reason(self, provider: str) -> str | None:
        """Combinations ORT cannot run, recorded as skipped rather than tried."""
        opts = self.settings.provider_options.get(provider, {})
        if opts.get("enable_cuda_graph") == "1" and not self.io_binding:
            return "CUDA graphs need IO binding (fixed input/output device addresses)"
        return None


def default_candidate(provider: str, base: SessionSettings | None = None) -> Candidate:
    """ORT's defaults (or ``base``); on CUDA timed with IO binding, as graphopt's Runner does."""
    settings = dataclasses.replace(base) if base is not None else SessionSettings()
    settings.provider_options = {provider: dict((base.provider_options if base else {}).get(provider, {}))}
    return Candidate(settings, provider in _CUDA_DEVICE_PROVIDERS)


def _values(name: str, values: Sequence[Any], help: str = "") -> Dimension:
    """A dimension over one SessionSettings field (or ``io_binding``)."""
    label = (lambda v: str(v).lower()) if name == "io_binding" else str
    return Dimension(name, tuple(Choice(f"{name}={label(v)}", {name: v}) for v in values), help)


def _option_dim(name: str, option: str, values: Sequence[str | None], help: str) -> Dimension:
    """A dimension over one provider option; None means the option is left at ORT's default."""
    return Dimension(name, tuple(Choice(f"{option}={'default' if v is None else v}", {"provider_options": {option: v}})
                                 for v in values), help)


def thread_counts(cpus: int) -> list[int]:
    """0 (ORT's default: one per physical core), 1, powers of two below ``cpus``, and ``cpus``."""
    counts = [0, 1]
    n = 2
    while n < cpus:
        counts.append(n)
        n *= 2
    if cpus > 1:
        counts.append(cpus)
    return counts


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_SPIN = "session.intra_op.allow_spinning"


def cpu_space(cpus: int | None = None) -> list[Dimension]:
    cpus = cpus or available_cpus()
    return [
        _values("graph_optimization_level", ("all", "layout", "extended", "basic"),
                "ORT graph rewrites; 'all' adds CPU layout (NCHWc) transforms that do not suit every model."),
        _values("intra_op_threads", thread_counts(cpus), "Threads inside one operator (0: one per physical core)."),
        Dimension("allow_spinning", (Choice("allow_spinning=default", {"config_entries": {_SPIN: None}}),
                                     Choice("allow_spinning=0", {"config_entries": {_SPIN: "0"}})),
                  "Whether idle worker threads spin (lower latency) or sleep (less CPU stolen from others)."),
        Dimension("execution_mode",
                  tuple(Choice(f"execution_mode={m}", {"execution_mode": m, "inter_op_threads": 0})
                        for m in ("sequential", "parallel")),
                  "Run independent branches of the graph in parallel (inter-op threads)."),
        _values("enable_mem_pattern", (True, False), "ORT's memory planner (preallocates by the first run's pattern)."),
        _values("enable_cpu_mem_arena", (True, False), "The CPU memory arena."),
        _values("io_binding", (False, True), "Run through IO binding with preallocated inputs and outputs."),
    ]


def cuda_space() -> list[Dimension]:
    return [
        _option_dim("prefer_nhwc", "prefer_nhwc", (None, "1"), "NHWC convolution kernels (tensor-core friendly)."),
        _option_dim("cudnn_conv_algo_search", "cudnn_conv_algo_search", (None, "HEURISTIC", "DEFAULT"),
                    "How cuDNN picks convolution algorithms (default EXHAUSTIVE: benchmark each on first run)."),
        _option_dim("enable_cuda_graph", "enable_cuda_graph", (None, "1"),
                    "Capture the whole run as one CUDA graph (needs IO binding, static shapes, all nodes on CUDA)."),
        _option_dim("cudnn_conv_use_max_workspace", "cudnn_conv_use_max_workspace", (None, "0"),
                    "Let cuDNN use as much workspace as the fastest algorithm wants."),
        _option_dim("arena_extend_strategy", "arena_extend_strategy", (None, "kSameAsRequested"),
                    "How the CUDA memory arena grows (default kNextPowerOfTwo)."),
        _values("io_binding", (True, False),
                "Inputs and outputs bound in device memory (false: numpy in, numpy out, copies timed)."),
    ]


#: Dimensions only searched when named in ``search``: ORT warns that a separate copy stream
#: (do_copy_in_default_stream=0) may race for some models, and an output check cannot rule a race out.
OPT_IN_CUDA = [_option_dim("copy_stream", "do_copy_in_default_stream", (None, "0"),
                           "Copy on a separate stream (ORT warns this may race for some models).")]
GENERIC_SPACE = [_values("graph_optimization_level", ("all", "extended", "basic")),
                 _values("io_binding", (False, True))]


def all_dimension_names() -> list[str]:
    names: list[str] = []
    for dim in cpu_space(2) + cuda_space() + OPT_IN_CUDA + GENERIC_SPACE:
        if dim.name not in names:
            names.append(dim.name)
    return names


def search_space(provider: str, only: Sequence[str] | None = None, cpus: int | None = None) -> list[Dimension]:
    """The dimensions searched for ``provider``, optionally restricted to the names in ``only``."""
    if provider == CPU:
        dims = cpu_space(cpus)
    elif provider == CUDA:
        dims = cuda_space() + (OPT_IN_CUDA if only else [])
    else:
        dims = list(GENERIC_SPACE)
    if only:
        unknown = sorted(set(only) - set(all_dimension_names()))
        if unknown:
            raise UserError(f"unknown search dimension '{unknown[0]}'; known: {', '.join(all_dimension_names())}")
        dims = [d for d in dims if d.name in only]
    return dims


# ---------------------------------------------------------------- trials: one live candidate session

class Trial(Protocol):
    def run(self) -> float: ...
    def outputs(self) -> list[np.ndarray]: ...
    def close(self) -> None: ...


TrialFactory = Callable[[str, Candidate, Mapping[str, np.ndarray], Sequence[np.ndarray] | None], Trial]


class OrtTrial:
    """A session built exactly as an application would from the settings file, on fixed inputs.

    With IO binding, inputs and outputs live in preallocated OrtValues on the provider's device (fixed
    addresses, which CUDA graphs require); otherwise ``session.run`` takes and returns numpy arrays.
    """

    def __init__(self, source: str | bytes, provider: str, candidate: Candidate, inputs: Mapping[str, np.ndarray],
                 reference: Sequence[np.ndarray] | None) -> None:
        so, providers = apply_to_session_args(candidate.settings, provider)
        self.session = ort.InferenceSession(source, so, providers=providers)
        got = self.session.get_providers()[0]
        if got != provider:
            raise RuntimeError(f"onnxruntime did not enable {provider} (got {got})")
        self.names = [o.name for o in self.session.get_outputs()]
        self.inputs = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        self.binding: Any = None
        self._last: list[np.ndarray] | None = None
        if candidate.io_binding:
            if reference is None:
                raise RuntimeError("IO binding needs the output shapes of a reference run")
            device = "cuda" if provider in _CUDA_DEVICE_PROVIDERS else "cpu"
            device_id = int(candidate.settings.provider_options.get(provider, {}).get("device_id", 0))
            self.binding = self.session.io_binding()
            self._values = []
            for name, arr in self.inputs.items():
                value = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
                self._values.append(value)
                self.binding.bind_ortvalue_input(name, value)
            for name, ref in zip(self.names, reference):
                value = ort.OrtValue.ortvalue_from_shape_and_type(list(ref.shape), ref.dtype, device, device_id)
                self._values.append(value)
                self.binding.bind_ortvalue_output(name, value)

    def run(self) -> float:
        if self.binding is None:
            t0 = time.perf_counter()
            self._last = self.session.run(self.names, self.inputs)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter() - t0

    def outputs(self) -> list[np.ndarray]:
        if self.binding is None:
            if self._last is None:
                self.run()
            return list(self._last or [])
        return list(self.binding.copy_outputs_to_cpu())

    def close(self) -> None:
        self.binding = None
        self._values = []
        del self.session


def ort_trial_factory(source: str | bytes) -> TrialFactory:
    def make(provider: str, candidate: Candidate, inputs: Mapping[str, np.ndarray],
             reference: Sequence[np.ndarray] | None) -> Trial:
        return OrtTrial(source, provider, candidate, inputs, reference)

    return make


# ---------------------------------------------------------------- results

@dataclasses.dataclass
class CandidateRecord:
    provider: str
    batch: int
    dimension: str
    candidate: str  # the choice tried, on top of the best so far
    #: chosen (became the best so far) | faster (by min_gain, but another was faster still) |
    #: no gain (not faster by min_gain) | failed (ORT refused or crashed) | rejected (outputs differ) | skipped
    status: str
    p50_ms: float | None = None
    incumbent_p50_ms: float | None = None
    runs: int = 0
    max_abs_diff: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"provider": short_name(self.provider), "batch": self.batch, "dimension": self.dimension,
                "candidate": self.candidate, "status": self.status, "p50_ms": self.p50_ms,
                "best_so_far_p50_ms": self.incumbent_p50_ms, "runs": self.runs,
                "max_abs_diff": (self.max_abs_diff if self.max_abs_diff is None or np.isfinite(self.max_abs_diff)
                                 else None),  # JSON has no infinity; the note says what was wrong
                "note": self.note}


@dataclasses.dataclass
class GroupResult:
    """The outcome for one provider and batch size."""

    provider: str
    batch: int
    status: str  # tuned | skipped
    reason: str | None = None
    candidate: Candidate | None = None
    default: Timing | None = None
    tuned: Timing | None = None
    records: list[CandidateRecord] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.default is None or self.tuned is None or self.default.p50_ms <= 0:
            return None
        return self.tuned.p50_ms / self.default.p50_ms

    def entry(self) -> dict[str, Any]:
        assert self.candidate is not None
        s = self.candidate.settings
        return {"provider": self.provider, "batch": self.batch, "session": session_dict(s),
                "provider_options": dict(s.provider_options.get(self.provider, {})),
                "io_binding": self.candidate.io_binding, "changes": list(self.candidate.changes),
                "latency": {"default_p50_ms": self.default.p50_ms if self.default else None,
                            "tuned_p50_ms": self.tuned.p50_ms if self.tuned else None,
                            "ratio": self.ratio, "runs": self.tuned.runs if self.tuned else 0}}

    def summary(self) -> dict[str, Any]:
        return {"provider": short_name(self.provider), "batch": self.batch, "status": self.status,
                "default_p50_ms": self.default.p50_ms if self.default else None,
                "tuned_p50_ms": self.tuned.p50_ms if self.tuned else None, "ratio": self.ratio,
                "settings": self.candidate.label if self.candidate else None, "note": self.reason}


@dataclasses.dataclass
class TuneResult:
    groups: list[GroupResult]
    budget_s: float
    elapsed_s: float
    tolerance: float
    model: str | None = None

    @property
    def tuned(self) -> list[GroupResult]:
        return [g for g in self.groups if g.status == "tuned"]

    def settings_document(self) -> dict[str, Any]:
        from graphopt import __version__

        return {
            "schema": SCHEMA,
            "model": self.model,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "graphopt_version": __version__,
            "onnxruntime_version": ort.__version__,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": available_cpus()},
            "entries": [g.entry() for g in self.tuned],
            "skipped": [{"provider": g.provider, "batch": g.batch, "reason": g.reason}
                        for g in self.groups if g.status != "tuned"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "elapsed_s": self.elapsed_s, "tolerance": self.tolerance,
                "results": [g.summary() for g in self.groups],
                "candidates": [r.to_dict() for g in self.groups for r in g.records],
                "settings": self.settings_document()}


# ---------------------------------------------------------------- the search

def outputs_agree(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                  tolerance: float) -> tuple[bool, float, str | None]:
    """max |candidate - reference| <= tolerance x max |reference| on every output (and all finite)."""
    if len(reference) != len(outputs):
        return False, float("inf"), f"{len(outputs)} outputs instead of {len(reference)}"
    worst = 0.0
    for i, (r, c) in enumerate(zip(reference, outputs)):
        r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
        if r64.shape != c64.shape:
            return False, float("inf"), f"output {i} has shape {c64.shape}, expected {r64.shape}"
        if not np.all(np.isfinite(c64)) and np.all(np.isfinite(r64)):
            return False, float("inf"), f"output {i} has non-finite values"
        if r64.size:
            diff = float(np.max(np.abs(r64 - c64)))
            worst = max(worst, diff)
            scale = max(float(np.max(np.abs(r64))), 1e-6)
            if diff > tolerance * scale:
                return False, worst, (f"outputs differ from the defaults': max abs diff {diff:.3g} > "
                                      f"{tolerance:g} x max |reference| {scale:.3g}")
    return True, worst, None


def default_tolerance(model: ir.Model | None) -> float:
    """1e-3 of the outputs' range; 1e-2 for models that compute in float16 (kernel choice moves them more)."""
    if model is None:
        return 1e-3
    f16 = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    if any(v.dtype in f16 for v in model.graph.outputs) or any(
            v.const_value is not None and v.const_value.dtype in f16 for v in model.graph.initializers.values()):
        return 1e-2
    return 1e-3


@dataclasses.dataclass
class SearchConfig:
    budget_s: float = 60.0
    warmup: int = 5
    repeat: int = 30
    min_repeat: int = 5
    min_gain: float = 0.03
    tolerance: float = 1e-3
    only: Sequence[str] | None = None
    #: Settings the search starts from instead of ORT's defaults (the "defaults" it compares against).
    base: SessionSettings | None = None
    cpus: int | None = None
    #: Share of each provider/batch slot kept for the final defaults-vs-tuned check.
    confirm_share: float = 0.25


class _BudgetSpent(Exception):
    pass


class Tuner:
    """Coordinate-descent search over a provider's dimensions, one group (provider, batch) at a time."""

    def __init__(self, factory: TrialFactory, config: SearchConfig, *, progress: ProgressReporter | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 space: Callable[[str], list[Dimension]] | None = None) -> None:
        self.factory = factory
        self.config = config
        self.progress = progress or NullProgress()
        self.clock = clock
        self.space = space or (lambda p: search_space(p, config.only, config.cpus))

    # -- measuring
    def _measure(self, trials: list[Trial], deadline: float, hard_deadline: float, *, warmup: int | None = None,
                 min_repeat: int | None = None) -> list[list[float] | BaseException]:
        """Warm up, then time ``trials`` in interleaved blocks; a trial that raises gets its exception.

        Stops at ``repeat`` samples each, or at ``deadline`` once every live trial has ``min_repeat``.
        Raises _BudgetSpent if ``hard_deadline`` passes first.
        """
        cfg = self.config
        warmup = max(1, cfg.warmup if warmup is None else warmup)
        min_repeat = cfg.min_repeat if min_repeat is None else min_repeat
        samples: list[list[float] | BaseException] = [[] for _ in trials]
        slowest = 0.0
        for i, t in enumerate(trials):
            # slow runs on a short budget: cut warm-up to its share of the time left (at least one run)
            warm_until = self.clock() + max(0.0, deadline - self.clock()) * 0.3 / len(trials)
            try:
                for _ in range(warmup):
                    seconds = t.run()  # the last warm-up run says how long a run takes
                    now = self.clock()
                    if now > hard_deadline:
                        raise _BudgetSpent
                    if now > warm_until:
                        break
                slowest = max(slowest, seconds)
            except _BudgetSpent:
                raise
            except Exception as exc:  # noqa: BLE001  (an ORT failure of one candidate is data, not an error)
                samples[i] = exc
        block = 3 if slowest < 0.05 else 1  # short runs: time several in a row, drop the first (cache switch)

        def fewest() -> int:
            live = [len(s) for s in samples if not isinstance(s, BaseException)]
            return min(live) if live else cfg.repeat

        rng = np.random.default_rng(len(trials))
        for _ in range(cfg.repeat * 2):
            # a fresh random order each round: no session always follows the same one (another session's
            # idle threads still spinning, its caches) or runs twice in a row at round boundaries
            for i in rng.permutation(len(trials)):
                got = samples[i]
                if isinstance(got, BaseException):
                    continue
                try:
                    times = [trials[i].run() for _ in range(block)]
                except Exception as exc:  # noqa: BLE001
                    samples[i] = exc
                    continue
                got.extend(times[1:] if block > 1 else times)
                if self.clock() > hard_deadline:
                    if fewest() >= min_repeat:
                        return samples  # enough samples to decide on
                    raise _BudgetSpent
            count = fewest()
            if count >= cfg.repeat or (count >= min_repeat and self.clock() > deadline):
                break
        return samples

    # -- one provider and batch
    def tune_group(self, provider: str, batch: int, inputs: Mapping[str, np.ndarray], slot_end: float,
                   hard_deadline: float, task: Any) -> GroupResult:
        cfg = self.config
        group = GroupResult(provider, batch, "skipped")
        default = default_candidate(provider, cfg.base)
        try:
            ref_trial = self.factory(provider, dataclasses.replace(default, io_binding=False), inputs, None)
            try:
                ref_trial.run()
                reference = ref_trial.outputs()
            finally:
                ref_trial.close()
        except Exception as exc:  # noqa: BLE001
            group.reason = f"{short_name(provider)} with default settings failed: {_one_line(exc)}"
            return group
        dims = self.space(provider)
        start = self.clock()
        search_end = start + (slot_end - start) * (1.0 - cfg.confirm_share)
        best = default
        best_ms: float | None = None
        for d, dim in enumerate(dims):
            now = self.clock()
            challengers: list[Candidate] = []
            seen = {best.key()}
            for choice in dim.choices:
                cand = best.with_choice(choice, provider)
                if cand.key() in seen:
                    continue
                seen.add(cand.key())
                problem = cand.invalid_reason(provider)
                if problem:
                    group.records.append(CandidateRecord(provider, batch, dim.name, choice.label, "skipped",
                                                         note=problem))
                    task.advance()
                    continue
                challengers.append(cand)
            if not challengers:
                continue
            task.update(description=f"tuning {short_name(provider)} b{batch}: {dim.name}")
            if now >= search_end or now >= hard_deadline:
                for cand in challengers:
                    group.records.append(CandidateRecord(provider, batch, dim.name, cand.changes[-1], "skipped",
                                                         note="time budget spent"))
                    task.advance()
                continue
            dim_end = now + (search_end - now) / (len(dims) - d)
            best, best_ms = self._try_dimension(group, dim, best, best_ms, challengers, inputs, reference,
                                                dim_end, hard_deadline, task)
        group.candidate = best
        group.status = "tuned"
        self._confirm(group, default, best, inputs, reference, slot_end, hard_deadline)
        task.advance()
        return group

    def _try_dimension(self, group: GroupResult, dim: Dimension, best: Candidate, best_ms: float | None,
                       challengers: list[Candidate], inputs: Mapping[str, np.ndarray], reference: Sequence[np.ndarray],
                       dim_end: float, hard_deadline: float, task: Any) -> tuple[Candidate, float | None]:
        cfg = self.config
        provider, batch = group.provider, group.batch
        trials: list[Trial] = []
        live: list[Candidate] = []
        try:
            try:
                trials.append(self.factory(provider, best, inputs, reference))
            except Exception as exc:  # noqa: BLE001  (worked before; a transient failure skips this dimension)
                logger.warning("best-so-far settings failed to load again: %s", exc)
                return best, best_ms
            for cand in challengers:
                try:
                    trials.append(self.factory(provider, cand, inputs, reference))
                    live.append(cand)
                except Exception as exc:  # noqa: BLE001
                    group.records.append(CandidateRecord(provider, batch, dim.name, cand.changes[-1], "failed",
                                                         note=_one_line(exc)))
                    task.advance()
            if not live:
                return best, best_ms
            try:
                samples = self._measure(trials, dim_end, hard_deadline)
            except _BudgetSpent:
                for cand in live:
                    group.records.append(CandidateRecord(provider, batch, dim.name, cand.changes[-1], "skipped",
                                                         note="time budget spent while measuring"))
                    task.advance()
                return best, best_ms
            inc = samples[0]
            if isinstance(inc, BaseException) or not inc:
                for cand in live:
                    group.records.append(CandidateRecord(provider, batch, dim.name, cand.changes[-1], "skipped",
                                                         note="best-so-far settings failed to run"))
                    task.advance()
                return best, best_ms
            inc_ms = float(np.median(inc)) * 1e3
            winner: tuple[float, Candidate] | None = None
            for cand, trial, got in zip(live, trials[1:], samples[1:]):
                rec = CandidateRecord(provider, batch, dim.name, cand.changes[-1], "failed", incumbent_p50_ms=inc_ms)
                group.records.append(rec)
                task.advance()
                if isinstance(got, BaseException):
                    rec.note = _one_line(got)
                    continue
                rec.p50_ms, rec.runs = float(np.median(got)) * 1e3, len(got)
                try:
                    ok, diff, why = outputs_agree(reference, trial.outputs(), cfg.tolerance)
                except Exception as exc:  # noqa: BLE001
                    ok, diff, why = False, None, f"reading outputs failed: {_one_line(exc)}"
                rec.max_abs_diff = diff
                if not ok:
                    rec.status, rec.note = "rejected", why
                    continue
                rec.status = "faster" if rec.p50_ms < inc_ms * (1.0 - cfg.min_gain) else "no gain"
                if rec.status == "faster" and (winner is None or rec.p50_ms < winner[0]):
                    winner = (rec.p50_ms, cand)
            if winner is not None:
                for rec in group.records:
                    if rec.dimension == dim.name and rec.candidate == winner[1].changes[-1]:
                        rec.status = "chosen"
                return winner[1], winner[0]
            return best, inc_ms
        finally:
            for t in trials:
                t.close()

    def _confirm(self, group: GroupResult, default: Candidate, best: Candidate, inputs: Mapping[str, np.ndarray],
                 reference: Sequence[np.ndarray], slot_end: float, hard_deadline: float) -> None:
        """Time the defaults against the winner, interleaved; keep the defaults if the winner is not faster."""
        cfg = self.config
        same = best.key() == default.key()
        trials: list[Trial] = []
        try:
            trials = [self.factory(group.provider, default, inputs, reference)]
            if not same:
                trials.append(self.factory(group.provider, best, inputs, reference))
            late = self.clock() >= slot_end  # out of time: the shortest check that still gives a median
            samples = self._measure(trials, slot_end, float("inf"), warmup=1 if late else None,
                                    min_repeat=3 if late else None)
        except Exception as exc:  # noqa: BLE001
            group.reason = f"final check failed: {_one_line(exc)}; kept the defaults"
            group.candidate = default
            return
        finally:
            for t in trials:
                t.close()
        if any(isinstance(s, BaseException) or not s for s in samples):
            group.reason = "final check could not time both settings; kept the defaults"
            group.candidate = default
            return
        timings = [Timing.from_seconds(s) for s in samples]  # type: ignore[arg-type]
        group.default = timings[0]
        group.tuned = timings[-1]
        if not same and group.tuned.p50_ms >= group.default.p50_ms:
            group.reason = (f"tuned settings ({best.label}) were not faster than the defaults in the final check "
                            f"({group.tuned.p50_ms:.3f} vs {group.default.p50_ms:.3f} ms); kept the defaults")
            group.candidate = default
            group.tuned = group.default

    # -- everything
    def run(self, providers: Sequence[str], batches: Sequence[int],
            inputs_for: Callable[[int], Mapping[str, np.ndarray]],
            unavailable: Mapping[str, str] | None = None) -> TuneResult:
        cfg = self.config
        start = self.clock()
        hard_deadline = start + cfg.budget_s
        groups: list[GroupResult] = []
        unavailable = unavailable or {}
        todo = [(p, b) for p in providers for b in batches]
        runnable = [(p, b) for p, b in todo if p not in unavailable]
        total = sum(sum(len(dim.choices) - 1 for dim in self.space(p)) + 1 for p, _ in runnable)
        with self.progress.task("tuning", total=max(total, 1)) as task:
            for provider, batch in todo:
                if provider in unavailable:
                    groups.append(GroupResult(provider, batch, "skipped", reason=unavailable[provider]))
                    continue
                left = len(runnable) - sum(1 for g in groups if g.provider not in unavailable)
                now = self.clock()
                if now >= hard_deadline:
                    groups.append(GroupResult(provider, batch, "skipped", reason="time budget spent before it started"))
                    continue
                slot_end = now + (hard_deadline - now) / left
                logger.info("tuning %s at batch %d until +%.1fs", provider, batch, slot_end - start)
                groups.append(self.tune_group(provider, batch, inputs_for(batch), slot_end, hard_deadline, task))
        return TuneResult(groups, cfg.budget_s, self.clock() - start, cfg.tolerance)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def split_providers(names: Sequence[str] | str) -> tuple[list[str], dict[str, str]]:
    """Full provider names to tune, and those this onnxruntime lacks (with the reason, to be recorded).

    A name ORT does not know at all is a UserError (a typo); a real provider missing from this build is
    not: the search records it as skipped, as it does any candidate that cannot run.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    known, available = set(ort.get_all_providers()), ort.get_available_providers()
    wanted: list[str] = []
    missing: dict[str, str] = {}
    for raw in names:
        full = full_provider_name(raw)
        if full not in known:
            aliases = ", ".join(sorted(PROVIDER_ALIASES))
            raise UserError(f"unknown execution provider '{raw.strip()}'; use one of {aliases} or a full ORT name")
        if full in wanted:
            continue
        wanted.append(full)
        if full not in available:
            missing[full] = (f"{full} is not available in this onnxruntime build "
                             f"(onnxruntime {ort.__version__} has {', '.join(available)})")
    if not wanted:
        raise UserError("no execution provider given; use e.g. --providers cpu,cuda")
    return wanted, missing


def tune(model_source: str | os.PathLike | bytes, providers: Sequence[str] | str, batches: Sequence[int],
         inputs_for: Callable[[int], Mapping[str, np.ndarray]], config: SearchConfig | None = None, *,
         progress: ProgressReporter | None = None, factory: TrialFactory | None = None,
         clock: Callable[[], float] = time.perf_counter) -> TuneResult:
    """Search settings for each provider and batch size; ``inputs_for(batch)`` gives the timed inputs.

    ``model_source`` is a path (or serialized bytes) that ONNX Runtime loads for each candidate.
    """
    config = config or SearchConfig()
    if config.budget_s <= 0:
        raise UserError(f"the time budget must be positive; got {config.budget_s:g} s")
    if not batches or any(int(b) <= 0 for b in batches):
        raise UserError(f"batch sizes must be positive integers; got {list(batches)}")
    wanted, missing = split_providers(providers)
    for p in wanted:
        search_space(p, config.only, config.cpus)  # unknown dimension names fail before any work
    source = model_source if isinstance(model_source, bytes) else str(model_source)
    tuner = Tuner(factory or ort_trial_factory(source), config, progress=progress, clock=clock)
    # Candidates that ORT runs badly on purpose (e.g. cuDNN's DEFAULT algorithm: "Conv running in Fallback
    # mode. May be extremely slow.") would flood stderr with warnings about settings the search rejects.
    ort.set_default_logger_severity(3)
    try:
        result = tuner.run(wanted, [int(b) for b in batches], inputs_for, missing)
    finally:
        ort.set_default_logger_severity(2)  # ORT's default (warnings)
    if not isinstance(model_source, bytes):
        result.model = Path(model_source).name
    return result
