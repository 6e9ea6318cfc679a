"""ONNX Runtime sessions: the one factory that knows execution providers and session options.

Validation, latency, calibration and profiling all make their sessions here, so provider names,
options and IO binding behave the same everywhere. A requested provider that this onnxruntime build does
not have is an error listing the ones it has; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphopt.errors import UserError
from graphopt.model_io import EXTERNAL_DATA_THRESHOLD, model_to_bytes, save_model, weight_bytes

logger = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


def short_name(provider: str) -> str:
    for alias, full in PROVIDER_ALIASES.items():
        if full == provider:
            return alias
    return provider


def resolve_providers(names: Sequence[str] | str) -> list[str]:
    """Map ``cpu,cuda`` (or full names) to ORT provider names; refuse ones this build lacks."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    available = ort.get_available_providers()
    resolved = []
    for raw in names:
        name = raw.strip()
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            shown = ", ".join(f"{short_name(p)} ({p})" if short_name(p) != p else p for p in available)
            raise UserError(f"execution provider '{name}' is not available in this onnxruntime build; "
                            f"available: {shown}")
        if full not in resolved:
            resolved.append(full)
    if not resolved:
        raise UserError("no execution provider given; use e.g. --providers cpu")
    return resolved


@dataclasses.dataclass
class SessionSettings:
    """Session options and per-provider options (what ``tune`` searches and ``MODEL.ort.json`` stores)."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"  # disable | basic | extended | layout | all
    execution_mode: str = "sequential"  # sequential | parallel
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    provider_options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    optimized_model_path: str | None = None
    #: ``SessionOptions.add_session_config_entry`` pairs, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
    config_entries: dict[str, str] = dataclasses.field(default_factory=dict)

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
            levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
        so.graph_optimization_level = levels[self.graph_optimization_level]
        so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel"
                             else ort.ExecutionMode.ORT_SEQUENTIAL)
        so.enable_mem_pattern = self.enable_mem_pattern
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.log_severity_level = 3
        if self.optimized_model_path:
            so.optimized_model_filepath = self.optimized_model_path
        for key, value in self.config_entries.items():
            so.add_session_config_entry(key, str(value))
        return so


class SessionFactory:
    """Makes ORT sessions for a model (path or in-memory onnx_ir model) on a given provider."""

    def __init__(self, settings: SessionSettings | None = None, work_dir: Path | None = None) -> None:
        self.settings = settings or SessionSettings()
        self.work_dir = work_dir

    def session(self, model: ir.Model | str | os.PathLike, provider: str = "CPUExecutionProvider",
                settings: SessionSettings | None = None, *, share_weights: bool = False) -> ort.InferenceSession:
        """``share_weights`` (in-memory models): ORT reads the model's own weight arrays instead of a copy
        serialized or written to a file. It saves the write and keeps memory flat when ORT uses the weights
        as they are (``extended`` optimization and below); with layout changes (``all``: NCHWc) ORT makes
        its own copies, and a file it maps is cheaper."""
        settings = settings or self.settings
        providers: list[Any] = [(provider, settings.provider_options.get(provider, {}))]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # ORT's normal per-node placement for unsupported ops
        so = settings.session_options()
        shared: list[ort.OrtValue] = []
        source: Any
        if isinstance(model, ir.Model) and share_weights:
            source, shared = _serialize_sharing_weights(model, so)
        elif isinstance(model, ir.Model):
            if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD // 2:
                if self.work_dir is None:
                    raise ValueError("a work_dir is needed to run large in-memory models")
                path = self.work_dir / f"session-{id(model)}.onnx"
                save_model(model, path, external_data=True)
                source = str(path)
            else:
                source = model_to_bytes(model)
        else:
            source = str(model)
        try:
            sess = ort.InferenceSession(source, so, providers=providers)
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load the model on {short_name(provider)}: "
                            f"{str(exc).splitlines()[0]}") from None
        if shared:
            sess._graphopt_weights = shared  # type: ignore[attr-defined]  # ORT reads them for the session's life
        if sess.get_providers()[0] != provider:
            raise UserError(f"onnxruntime did not enable {provider} (got {sess.get_providers()})")
        return sess


def _serialize_sharing_weights(model: ir.Model, so: ort.SessionOptions,
                               min_bytes: int = 1024) -> tuple[bytes, list[ort.OrtValue]]:
    """The model serialized without the data of its initializers of ``min_bytes`` or more, which are handed
    to ORT (``add_external_initializers`` on ``so``) as OrtValues over the model's own arrays; returns the
    bytes and those OrtValues, which must outlive the session. The model is left as it was."""
    names: list[str] = []
    values: list[ort.OrtValue] = []
    swapped: dict[str, ir.TensorProtocol] = {}
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < min_bytes:
                continue
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())))
            names.append(name)
            swapped[name] = tensor
            # a stand-in that serializes as an external-data reference: ORT takes the OrtValue instead
            value.const_value = ir.ExternalTensor("graphopt-in-memory", offset=0, length=tensor.nbytes,
                                                  dtype=tensor.dtype, shape=tensor.shape, name=name)
        proto = model_to_bytes(model)
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor
    if names:
        so.add_external_initializers(names, values)
    return proto, values


_FLOAT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}


class Runner:
    """Runs one session; on CUDA it binds inputs/outputs so timing measures the device, not copies."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.provider = session.get_providers()[0]
        self.output_names = [o.name for o in session.get_outputs()]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else None
        self._binding: Any = None
        #: Float inputs by name and numpy type: a candidate may take float16 where its reference took float32
        #: (fp16 with keep_io_types=false), and the same data must feed both.
        self._float_inputs = {i.name: _FLOAT_TYPES[i.type] for i in session.get_inputs() if i.type in _FLOAT_TYPES}

    def _adapt(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(inputs)
        for name, arr in out.items():
            want = self._float_inputs.get(name)
            if want is not None and arr.dtype.kind == "f" and arr.dtype != want:
                out[name] = arr.astype(want)
        return out

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        inputs = self._adapt(inputs)
        if self.device is None:
            return self.session.run(self.output_names, inputs)
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def bind(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Prepare repeated timed runs on fixed inputs (device-resident on CUDA)."""
        inputs = self._inputs = self._adapt(inputs)
        if self.device is None:
            return
        binding = self.session.io_binding()
        self._device_values = []
        for name, arr in inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.device, 0)
            self._device_values.append(value)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self._binding = binding

    def run_bound(self) -> float:
        """One timed run on the bound inputs; returns seconds."""
        if self._binding is None:
            t0 = time.perf_counter()
            self.session.run(self.output_names, self._inputs)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return time.perf_counter() - t0


@dataclasses.dataclass
class Timing:
    p50_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> Timing:
        ms = np.asarray(samples) * 1000.0
        return cls(float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), len(samples))


def interleaved_order(n: int, i: int) -> list[int]:
    """Round ``i``'s order of ``n`` sessions, from a Williams design: over n rounds (2n when n is odd)
    every session takes every position and directly follows every other session equally often."""
    if n <= 0:
        return []
    first, lo, hi = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    r = i % (n if n % 2 == 0 else 2 * n)
    order = [(x + r) % n for x in first]
    return order[::-1] if r >= n else order


def time_interleaved(runners: Sequence[Runner], inputs: Mapping[str, np.ndarray], *, warmup: int = 5,
                     repeat: int = 50, budget_s: float = 20.0) -> list[Timing]:
    """Time several sessions on the same inputs, alternating run by run so machine noise hits all alike.

    The order changes from round to round (:func:`interleaved_order`), so each session takes each position
    and follows each other session equally often: with several intra-op thread pools on
    few cores, the session that runs right after a long one is measurably faster or slower (10-20 % on a
    2-core machine), which a fixed order would hand to one session. Stops early (keeping at least 10 runs
    each) when ``budget_s`` is spent.
    """
    for r in runners:
        r.bind(inputs)
        for _ in range(warmup):
            r.run_bound()
    samples: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    for i in range(repeat):
        for j in interleaved_order(len(runners), i):
            samples[j].append(runners[j].run_bound())
        if i >= 9 and time.perf_counter() - start > budget_s:
            break
    return [Timing.from_seconds(s) for s in samples]
