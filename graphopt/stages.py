"""Partitioned execution: write a partitioned model as stage files, and run the stages chained.

The ``partition`` pass only annotates the model (``metadata_props["graphopt.partition"]``: which nodes go
to which stage, on which device, with what predicted cost), so the model stays one valid, runnable model
while later checks run on it. :func:`write_partitioned` turns that plan into ``stage_0.onnx`` … and
``manifest.json``; :class:`StagePipeline` runs such a directory with the interface of
:class:`graphopt.runtime.Runner`, so validation and latency measurement treat it like one model.

Between stages travels an *environment*: a dict from the original graph's tensor names to arrays. A stage
reads its inputs from it and adds its outputs; after stage k only the tensors that a later stage or the
model's outputs still need are kept. A tensor that crosses several cuts (a skip connection) is therefore
passed along without any copy node in the stage files.

Two backends run the stages: ``threads`` (a thread per stage, bounded queues, micro-batches overlapping
across stages; ORT releases the GIL while it computes) and ``ray`` (an actor per stage holding its own
session and declaring its CPUs/GPUs, so a Ray cluster can place stages on different machines).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError, UserError

logger = logging.getLogger(__name__)

PLAN_KEY = "graphopt.partition"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "graphopt.stages/1"
PLAN_FORMAT = "graphopt.partition/1"


class StageFailed(GraphoptError):
    """A stage raised while running; the message names the stage and its device. Exit code 3."""

    exit_code = 3

    def __init__(self, stage: int, device: str, cause: BaseException | str) -> None:
        self.stage = stage
        self.device = device
        self.cause = cause
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {str(cause).strip()}"
        first_line = text.splitlines()[0] if text else ""
        super().__init__(f"stage {stage} (on {device}) failed: {first_line}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so a Ray actor can raise it to the driver
        cause = self.cause if isinstance(self.cause, str) else f"{type(self.cause).__name__}: {self.cause}"
        return (StageFailed, (self.stage, self.device, cause))


# --------------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------------

def parse_device(text: str) -> tuple[str, int | None]:
    """``cpu`` / ``cuda`` / ``cuda:1`` / a full provider name → (ORT provider name, device id or None).

    Only the spelling is checked here; whether this onnxruntime build has the provider is checked when a
    session is made (a plan may be written on a CPU machine for GPUs elsewhere).
    """
    from graphopt.runtime import PROVIDER_ALIASES

    name, sep, index = text.strip().partition(":")
    provider = PROVIDER_ALIASES.get(name.lower(), name)
    if provider not in PROVIDER_ALIASES.values() and not provider.endswith("ExecutionProvider"):
        raise UserError(f"unknown device '{text}'; expected cpu, cuda, cuda:N or another provider short name "
                        f"({', '.join(PROVIDER_ALIASES)})")
    device_id: int | None = None
    if sep:
        if not index.isdigit():
            raise UserError(f"device '{text}' has a bad index; expected e.g. cuda:0")
        device_id = int(index)
        if provider == "CPUExecutionProvider":
            raise UserError(f"device '{text}': cpu takes no index")
    return provider, device_id


def device_label(provider: str, device_id: int | None) -> str:
    from graphopt.runtime import short_name

    return short_name(provider) + ("" if device_id is None else f":{device_id}")


def expand_devices(devices: Sequence[str] | str | None, stages: int, default: Sequence[str]) -> list[str]:
    """One device per stage: a single entry applies to all; otherwise exactly one per stage."""
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    devices = list(devices or default)
    if len(devices) == 1:
        devices = devices * stages
    if len(devices) != stages:
        raise UserError(f"{len(devices)} devices given ({','.join(devices)}) for {stages} stages; "
                        "give one device for all stages or one per stage")
    for d in devices:
        parse_device(d)
    return [d.strip() for d in devices]


# --------------------------------------------------------------------------------------------------------
# Graph analysis shared by the pass and the writer
# --------------------------------------------------------------------------------------------------------

def node_dependencies(node: ir.Node) -> list[ir.Value]:
    """Values of the node's graph that the node reads: its inputs and what its subgraphs capture."""
    deps = [v for v in node.inputs if v is not None]
    graph = node.graph
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs = list(attr.as_graphs())
        else:
            continue
        for sub in subgraphs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                for v in inner.inputs:
                    if v is not None and v.graph is graph and v not in deps:
                        deps.append(v)
    return deps


def is_constant(value: ir.Value) -> bool:
    """Initializers travel with their consumers; they never cross a cut."""
    return value.is_initializer() and value.const_value is not None


@dataclasses.dataclass
class Interfaces:
    """What each stage reads and writes, computed from the graph and a node → stage assignment."""

    inputs: list[list[ir.Value]]     # per stage: tensors it reads that come from earlier (or model inputs)
    outputs: list[list[ir.Value]]    # per stage: tensors it makes that later stages or the model need
    live_after: list[list[ir.Value]]  # per stage: every tensor still needed after it (passed along)
    producer: dict[ir.Value, int]     # -1: a model input
    consumers: dict[ir.Value, list[int]]


def stage_interfaces(graph: ir.Graph, stage_of: Mapping[ir.Node, int], stages: int) -> Interfaces:
    producer: dict[ir.Value, int] = {}
    consumers: dict[ir.Value, set[int]] = collections.defaultdict(set)
    order: list[ir.Value] = []  # deterministic order: model inputs, then in node order
    for value in graph.inputs:
        if not is_constant(value):
            producer[value] = -1
            order.append(value)
    for node in graph:
        s = stage_of[node]
        for value in node_dependencies(node):
            if is_constant(value):
                continue
            consumers[value].add(s)
        for value in node.outputs:
            producer[value] = s
            order.append(value)
    outputs = set(graph.outputs)
    for value in graph.outputs:
        if value not in producer:
            raise UserError(f"model output '{value.name}' is a constant; partitioning needs outputs made by "
                            "nodes or model inputs")
    for value, users in consumers.items():
        if value not in producer:
            raise UserError(f"tensor '{value.name}' is read but neither made by a node nor a model input")
        if min(users) < producer[value]:
            raise ValueError(f"tensor '{value.name}' is made in stage {producer[value]} but read in stage "
                             f"{min(users)}: the stages are not in topological order")
    ins: list[list[ir.Value]] = [[] for _ in range(stages)]
    outs: list[list[ir.Value]] = [[] for _ in range(stages)]
    live: list[list[ir.Value]] = [[] for _ in range(stages)]
    for value in order:
        p = producer[value]
        users = consumers.get(value, set())
        is_output = value in outputs
        for s in sorted(users):
            if s > p:
                ins[s].append(value)
        if p >= 0 and (is_output or max(users, default=p) > p):
            outs[p].append(value)
        for s in range(max(p, 0), stages - 1):
            if is_output or any(u > s for u in users):
                live[s].append(value)
    live[stages - 1] = list(graph.outputs)  # after the last stage only the model's outputs remain
    return Interfaces(ins, outs, live, producer, {v: sorted(u) for v, u in consumers.items()})


def value_bytes_per_sample(value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Bytes of one sample of a tensor (shapes inferred with the batch set to 1)."""
    if value.dtype is None:
        return None
    shape = shapes.get(value.name or "")
    if shape is None:
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            return None
        shape = tuple(value.shape)  # type: ignore[arg-type]
    return math.ceil(math.prod(shape) * value.dtype.itemsize)  # itemsize is 0.5 for 4-bit types


def shape_json(shape: ir.Shape | None) -> list[int | str | None] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d.value else None) for d in shape]


# --------------------------------------------------------------------------------------------------------
# The plan (model metadata) and the stage directory
# --------------------------------------------------------------------------------------------------------

def is_partitioned(model: ir.Model) -> bool:
    return PLAN_KEY in model.metadata_props


def read_plan(model: ir.Model) -> dict[str, Any]:
    try:
        plan = json.loads(model.metadata_props[PLAN_KEY])
    except KeyError:
        raise UserError("the model has no partition plan; run the partition pass first") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"the model's partition plan is not valid JSON: {exc}") from None
    if plan.get("format") != PLAN_FORMAT or not plan.get("stages"):
        raise UserError(f"the model's partition plan has an unknown format ({plan.get('format')!r}); "
                        f"expected {PLAN_FORMAT}")
    return plan


def assign_stages(graph: ir.Graph, plan: Mapping[str, Any]) -> dict[ir.Node, int]:
    """Map the graph's nodes to stages by the plan's node names.

    Nodes a later pass added (names the plan does not know) join the latest stage among their producers,
    which keeps the stages in topological order; nodes the plan names but the graph lost are ignored.
    """
    by_name = {name: k for k, stage in enumerate(plan["stages"]) for name in stage["nodes"]}
    stage_of: dict[ir.Node, int] = {}
    unknown = 0
    for node in graph:  # graph order is topological
        k = by_name.get(node.name or "")
        if k is None:
            unknown += 1
            k = max((stage_of.get(v.producer(), 0) for v in node_dependencies(node)  # type: ignore[arg-type]
                     if v.producer() is not None), default=0)
        stage_of[node] = k
    if unknown:
        logger.warning("%d node(s) not in the partition plan joined the stage of their inputs", unknown)
    return stage_of


def _tensor_info(value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    per_sample = shapes.get(value.name or "")
    return {
        "dtype": None if value.dtype is None else str(np.dtype(value.dtype.numpy())),
        "shape": shape_json(value.shape),
        "shape_per_sample": None if per_sample is None else list(per_sample),
        "bytes_per_sample": value_bytes_per_sample(value, shapes),
    }


def _batch_axis(values: Iterable[ir.Value]) -> int | None:
    """Axis 0 is the batch when every model input and output has a symbolic first dimension."""
    for v in values:
        if v.shape is None or len(v.shape) == 0 or isinstance(v.shape[0], int):
            return None
    return 0


def write_partitioned(model: ir.Model, out_dir: Path) -> None:
    """Write ``stage_0.onnx`` … and ``manifest.json`` for a model annotated by the partition pass.

    Stages are cut out with onnx_ir (weights are shared with ``model``, never copied in memory; each stage
    file gets external data when its weights need it). Tensor names between stages are the original ones.
    """
    from graphopt import __version__
    from graphopt.data import integer_input_ranges
    from graphopt.model_io import save_model
    from graphopt.stats import infer_concrete_shapes, per_sample_shapes

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output directory {out_dir} already exists and is not empty")
    plan = read_plan(model)
    graph = model.graph
    k_stages = len(plan["stages"])
    stage_of = assign_stages(graph, plan)
    iface = stage_interfaces(graph, stage_of, k_stages)
    crossing_values = {v for k in range(k_stages) for v in (*iface.inputs[k], *iface.outputs[k])}
    if any(v.dtype is None for v in crossing_values):  # stage inputs and outputs must be typed
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(check_type=False, strict_mode=False)(model)
    untyped = sorted(v.name or "?" for v in crossing_values if v.dtype is None)
    if untyped:
        raise UserError(f"the element type of tensor '{untyped[0]}', which passes between stages, is unknown "
                        "(shape inference could not find it)")
    pins = {k: tuple(v) for k, v in (plan.get("shapes") or {}).items()}
    per_sample = per_sample_shapes(model, pins)
    shapes = infer_concrete_shapes(model, per_sample) if per_sample is not None else {}

    out_dir.mkdir(parents=True, exist_ok=True)
    stage_entries = []
    for k in range(k_stages):
        if not iface.outputs[k]:
            raise UserError(f"stage {k} of the partition makes nothing a later stage or the model uses; "
                            "use fewer stages")
        sub = ir.convenience.extract(graph, inputs=iface.inputs[k], outputs=iface.outputs[k])
        sub.name = f"{graph.name or 'graph'}_stage_{k}"
        stage_model = ir.Model(sub, ir_version=model.ir_version, producer_name="graphopt",
                               producer_version=__version__, functions=list(model.functions.values()))
        stage_model.metadata_props["graphopt.stage"] = f"{k}/{k_stages}"
        file_name = f"stage_{k}.onnx"
        save_model(stage_model, out_dir / file_name)
        info = plan["stages"][k]
        stage_entries.append({
            "index": k,
            "file": file_name,
            "device": info.get("device", "cpu"),
            "provider": info.get("provider", "CPUExecutionProvider"),
            "inputs": [v.name for v in iface.inputs[k]],
            "outputs": [v.name for v in iface.outputs[k]],
            "keep_after": [v.name for v in iface.live_after[k]],
            "nodes": sum(1 for n in sub),
            "predicted_cost": info.get("predicted_cost"),
            "cost_share": info.get("cost_share"),
            "weight_bytes": sum(v.const_value.nbytes for v in sub.initializers.values()
                                if v.const_value is not None),
        })

    crossing: dict[str, ir.Value] = {}
    transfers = []
    for k in range(k_stages - 1):
        names = [v.name for v in iface.live_after[k]]
        for v in iface.live_after[k]:
            crossing[v.name] = v  # type: ignore[index]
        sizes = [value_bytes_per_sample(v, shapes) for v in iface.live_after[k]]
        transfers.append({"after_stage": k, "tensors": names,
                          "bytes_per_sample": None if any(s is None for s in sizes) else int(sum(sizes))})  # type: ignore[arg-type]
    tensors = {}
    for name, v in crossing.items():
        entry = _tensor_info(v, shapes)
        entry["produced_by"] = iface.producer[v]
        entry["consumed_by"] = iface.consumers.get(v, [])
        entry["model_output"] = v in set(graph.outputs)
        tensors[name] = entry

    highs = integer_input_ranges(model)
    model_inputs = [v for v in graph.inputs if not is_constant(v)]
    costs = [s.get("predicted_cost") or 0.0 for s in plan["stages"]]
    mean = sum(costs) / len(costs) if costs else 0.0
    manifest = {
        "format": MANIFEST_FORMAT,
        "graphopt_version": __version__,
        "inputs": [v.name for v in model_inputs],
        "outputs": [v.name for v in graph.outputs],
        "model_inputs": [{"name": v.name, **_tensor_info(v, shapes), "int_high": highs.get(v.name or "")}
                         for v in model_inputs],
        "model_outputs": [{"name": v.name, **_tensor_info(v, shapes)} for v in graph.outputs],
        "batch_axis": _batch_axis([*model_inputs, *graph.outputs]),
        "cost_model": plan.get("cost_model"),
        "cost_unit": plan.get("cost_unit"),
        "balance_ratio": plan.get("balance_ratio", max(costs) / mean if mean > 0 else 1.0),
        "cut_bytes_per_sample": [t["bytes_per_sample"] for t in transfers],
        "naive_split": plan.get("naive_split"),
        "stages": stage_entries,
        "transfers": transfers,
        "tensors": tensors,
    }
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a stage directory's manifest (UserError on anything missing)."""
    root = Path(path)
    file = root / MANIFEST_NAME
    if not file.is_file():
        raise UserError(f"{root} is not a partitioned model directory (no {MANIFEST_NAME}); "
                        "make one with `graphopt run MODEL --passes partition -o DIR`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is not readable JSON: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{file} has format {manifest.get('format')!r}; expected {MANIFEST_FORMAT}")
    for key in ("inputs", "outputs", "stages"):
        if not isinstance(manifest.get(key), list) or not manifest[key] and key != "inputs":
            raise UserError(f"{file} has no '{key}' list")
    for k, stage in enumerate(manifest["stages"]):
        for key in ("file", "inputs", "outputs", "keep_after"):
            if key not in stage:
                raise UserError(f"{file}: stage {k} has no '{key}'")
        target = (root / str(stage["file"])).resolve()
        if not target.is_relative_to(root.resolve()):
            raise UserError(f"{file}: stage file {stage['file']!r} points outside {root}")
        if not target.is_file():
            raise UserError(f"{file}: stage file {stage['file']} is missing from {root}")
    return manifest


def single_stage_manifest(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A manifest for one unpartitioned model file (so the stage runners can serve it too)."""
    from graphopt.model_io import load_model

    model = load_model(path)  # refuses what is not a readable model; weights stay lazy
    inputs = [v for v in model.graph.inputs if not is_constant(v)]
    outputs = list(model.graph.outputs)
    return {
        "format": MANIFEST_FORMAT,
        "inputs": [v.name for v in inputs],
        "outputs": [v.name for v in outputs],
        "batch_axis": _batch_axis([*inputs, *outputs]),
        "stages": [{"index": 0, "file": path.name, "device": device, "inputs": [v.name for v in inputs],
                    "outputs": [v.name for v in outputs], "keep_after": [v.name for v in outputs]}],
        "transfers": [],
    }


# --------------------------------------------------------------------------------------------------------
# Running one stage
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _OnDevice:
    """A tensor left on a device by IO binding, so the next stage on the same device need not copy it."""

    value: Any  # onnxruntime.OrtValue
    device: tuple[str, int]

    def numpy(self) -> np.ndarray:
        return self.value.numpy()


def _host(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, _OnDevice) else np.asarray(value)


class StageSession:
    """One stage's ORT session; on CUDA (or when asked) it uses IO binding and keeps outputs on the device."""

    def __init__(self, index: int, session: Any, inputs: Sequence[str], outputs: Sequence[str],
                 device: str, io_binding: bool | None = None) -> None:
        provider, device_id = parse_device(device)
        self.index = index
        self.session = session
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.device = device
        got_in = {i.name for i in session.get_inputs()}
        got_out = {o.name for o in session.get_outputs()}
        if got_in != set(self.inputs) or not set(self.outputs) <= got_out:
            raise UserError(f"stage {index}'s file does not match the manifest (inputs {sorted(got_in)} vs "
                            f"{sorted(self.inputs)}; outputs {sorted(got_out)} vs {sorted(self.outputs)})")
        self.binding = provider == "CUDAExecutionProvider" if io_binding is None else io_binding
        self.device_type = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_id or 0

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        if not self.binding:
            feeds = {n: _host(env[n]) for n in self.inputs}
            return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        here = (self.device_type, self.device_id)
        binding = self.session.io_binding()
        for name in self.inputs:
            value = env[name]
            if isinstance(value, _OnDevice) and value.device == here:
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(_host(value)))
        for name in self.outputs:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        return {n: _OnDevice(v, here) for n, v in zip(self.outputs, binding.get_outputs())}


def _stage_settings(base: Any, provider: str, device_id: int | None, cpu_stages: int) -> Any:
    """Per-stage session settings: the device id for the provider, and no CPU oversubscription."""
    settings = dataclasses.replace(base, provider_options={k: dict(v) for k, v in base.provider_options.items()})
    options = settings.provider_options.setdefault(provider, {})
    # device 0 is the provider's default: left unsaid unless the caller's options name another (onnxruntime
    # 1.31 warns on every session that names a device_id)
    if device_id is not None and (device_id != 0 or "device_id" in options):
        options["device_id"] = str(device_id)
    if not options:
        del settings.provider_options[provider]
    if provider == "CPUExecutionProvider" and settings.intra_op_threads == 0 and cpu_stages > 1:
        settings.intra_op_threads = max(1, (os.cpu_count() or 1) // cpu_stages)
    return settings


# --------------------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------------------

def split_batch(inputs: Mapping[str, np.ndarray], micro_batch: int | None, batch_axis: int | None) -> list[dict[str, Any]]:
    if not inputs or micro_batch is None or batch_axis is None:
        return [dict(inputs)]
    rows = {np.shape(a)[batch_axis] for a in inputs.values() if np.ndim(a) > batch_axis}
    if len(rows) != 1:
        return [dict(inputs)]
    n = rows.pop()
    if n <= micro_batch:
        return [dict(inputs)]
    return [{k: np.asarray(v)[i:i + micro_batch] for k, v in inputs.items()} for i in range(0, n, micro_batch)]


def _join(parts: list[dict[str, Any]], names: Sequence[str], batch_axis: int | None) -> list[np.ndarray]:
    if len(parts) == 1:
        return [_host(parts[0][n]) for n in names]
    return [np.concatenate([_host(p[n]) for p in parts], axis=batch_axis or 0) for n in names]


# --------------------------------------------------------------------------------------------------------
# Threads backend
# --------------------------------------------------------------------------------------------------------

_POLL_S = 0.05


class _Abort(Exception):
    """Marks a run whose caller stopped early; its queued items are dropped."""


class _ThreadState:
    """What the worker threads share. It holds no reference to the StagePipeline, so a forgotten pipeline
    is collected and its threads stop (weakref.finalize)."""

    def __init__(self, stages: list[Any], keep_after: list[list[str]], queue_size: int) -> None:
        self.stages = stages
        self.keep_after = keep_after
        self.queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=queue_size) for _ in stages]
        self.outboxes: dict[int, queue.Queue[Any]] = {}  # run id → finished micro-batches of that run
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.errors: dict[int, BaseException] = {}  # run id → its first error
        self.busy_s = [0.0] * len(stages)
        self.items = [0] * len(stages)

    def failed(self, run_id: int) -> bool:
        return run_id in self.errors or self.closing.is_set()

    def fail(self, run_id: int, error: BaseException) -> None:
        with self.lock:
            self.errors.setdefault(run_id, error)

    def put(self, q: queue.Queue[Any], item: Any, run_id: int) -> bool:
        """Put unless the run failed meanwhile, so a full queue behind a failed stage never blocks."""
        while not self.failed(run_id):
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def worker(self, k: int) -> None:
        stage = self.stages[k]
        keep = self.keep_after[k]
        last = k + 1 == len(self.stages)
        while not self.closing.is_set():
            try:
                run_id, seq, env = self.queues[k].get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if self.failed(run_id):
                continue  # drain what a failed or abandoned run left queued
            t0 = time.perf_counter()
            try:
                env.update(stage.run(env))
                env = {name: env[name] for name in keep}
            except Exception as exc:  # any stage error stops this run, with the stage named
                logger.debug("stage %d failed", k, exc_info=True)
                self.fail(run_id, StageFailed(k, stage.device, exc))
                continue
            finally:
                self.busy_s[k] += time.perf_counter() - t0
                self.items[k] += 1
            if last:
                box = self.outboxes.get(run_id)
                if box is not None:
                    box.put((seq, env))
            else:
                self.put(self.queues[k + 1], (run_id, seq, env), run_id)

    def stop(self) -> None:
        self.closing.set()


class _ThreadBackend:
    """A thread per stage and bounded queues between them; several runs may stream at once."""

    def __init__(self, stages: list[Any], keep_after: list[list[str]], queue_size: int) -> None:
        self.state = _ThreadState(stages, keep_after, queue_size)
        self.threads = [threading.Thread(target=self.state.worker, args=(k,), name=f"graphopt-stage-{k}",
                                         daemon=True) for k in range(len(stages))]
        for t in self.threads:
            t.start()
        self.run_ids = itertools.count()
        self.in_flight = max(2, queue_size * (len(stages) + 1))  # micro-batches of one run in the pipeline

    def stream(self, parts_iter: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        """Yield each batch's finished micro-batch environments, in order, keeping the stages busy."""
        state = self.state
        run_id = next(self.run_ids)
        box: queue.Queue[Any] = queue.Queue()
        state.outboxes[run_id] = box
        slots = threading.Semaphore(self.in_flight)  # bounds memory: the feeder never runs far ahead
        sizes: dict[int, int] = {}
        done_feeding = threading.Event()

        def feed() -> None:
            try:
                for batch_index, parts in enumerate(parts_iter):
                    sizes[batch_index] = len(parts)
                    for part_index, env in enumerate(parts):
                        while not slots.acquire(timeout=_POLL_S):
                            if state.failed(run_id):
                                return
                        if not state.put(state.queues[0], (run_id, (batch_index, part_index), env), run_id):
                            return
            except BaseException as exc:  # the data source failed: stop the run with its error
                state.fail(run_id, exc)
            finally:
                done_feeding.set()

        feeder = threading.Thread(target=feed, name=f"graphopt-feeder-{run_id}", daemon=True)
        feeder.start()
        pending: dict[int, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
        next_batch = 0
        finished = False
        try:
            while True:
                if run_id in state.errors:
                    raise state.errors[run_id]
                if state.closing.is_set():
                    raise GraphoptError("the stage pipeline was closed while running")
                if done_feeding.is_set() and next_batch >= len(sizes) and run_id not in state.errors:
                    finished = True
                    return
                try:
                    (b, p), env = box.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                slots.release()
                pending[b][p] = env
                while next_batch in sizes and len(pending.get(next_batch, {})) == sizes[next_batch]:
                    done = pending.pop(next_batch)
                    next_batch += 1
                    yield [done[i] for i in range(len(done))]
        finally:
            state.outboxes.pop(run_id, None)
            if not finished:
                state.fail(run_id, _Abort())  # failed, or the caller stopped early: drain this run
            feeder.join(timeout=5)

    def close(self) -> None:
        self.state.stop()
        for t in self.threads:
            t.join(timeout=5)


# --------------------------------------------------------------------------------------------------------
# Ray backend
# --------------------------------------------------------------------------------------------------------

class RayStageActor:
    """A Ray actor holding one stage's ORT session (wrapped with ``ray.remote`` at use)."""

    def __init__(self, index: int, model: bytes | str, device: str, settings: dict[str, Any],
                 inputs: list[str], outputs: list[str], keep: list[str], fail_on: int | None = None) -> None:
        from graphopt.runtime import SessionFactory, SessionSettings

        provider, device_id = parse_device(device)
        if provider == "CUDAExecutionProvider":
            device_id = 0  # Ray gives the actor its GPU through CUDA_VISIBLE_DEVICES
        base = SessionSettings(**settings)
        st = _stage_settings(base, provider, device_id, 1)
        if isinstance(model, bytes):
            import onnxruntime as ort

            session = ort.InferenceSession(model, st.session_options(),
                                           providers=[(provider, st.provider_options.get(provider, {}))]
                                           + ([] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]))
        else:
            session = SessionFactory(st).session(model, provider)
        self.stage = StageSession(index, session, inputs, outputs, device_label(provider, device_id),
                                  io_binding=False)
        self.keep = keep
        self.calls = 0
        self.fail_on = fail_on
        self.busy_s = 0.0

    def ready(self) -> bool:
        return True

    def run(self, env: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.calls += 1
        try:
            if self.fail_on is not None and self.calls >= self.fail_on:
                raise RuntimeError(f"injected failure in stage {self.stage.index}")
            env = dict(env)
            env.update(self.stage.run(env))
            return {name: env[name] for name in self.keep}
        except Exception as exc:
            raise StageFailed(self.stage.index, self.stage.device, exc) from None
        finally:
            self.busy_s += time.perf_counter() - t0

    def stats(self) -> tuple[float, int]:
        return self.busy_s, self.calls


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("backend 'ray' needs Ray: pip install 'graphopt[ray]'") from None
    return ray


_STARTED_LOCAL_RAY = False
#: Largest Ray object passed inline (not through the object store) on a local instance graphopt starts.
INLINE_OBJECT_BYTES = 8 << 20


def ensure_ray(num_cpus: int | None = None) -> Any:
    """Connect to Ray (``RAY_ADDRESS`` or a running instance), else start a local one with
    max(cores, ``num_cpus``) logical CPUs. Call ``ray.init`` yourself to size a local instance otherwise."""
    global _STARTED_LOCAL_RAY
    ray = _import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["num_cpus"] = max(os.cpu_count() or 1, num_cpus or 0)
            # Stage outputs up to this size travel inline with the task replies and arguments instead of
            # through the object store, whose create/seal round trips to the raylet cost a stage call
            # ~25 % of its time on a machine whose cores the stages fill (transformer_small, micro-batches
            # of 4 on 2 cores: Ray/threads 0.77 -> 0.87). Larger tensors still go through the store.
            kwargs["_system_config"] = {"max_direct_call_object_size": INLINE_OBJECT_BYTES}
        try:
            ray.init(**kwargs)
        except Exception as exc:  # a Ray that no longer knows the setting: start it without
            if "_system_config" not in kwargs:
                raise
            logger.warning("Ray did not start with max_direct_call_object_size (%s); starting it without", exc)
            ray.shutdown()
            del kwargs["_system_config"]
            ray.init(**kwargs)
        _STARTED_LOCAL_RAY = not os.environ.get("RAY_ADDRESS")
    return ray


def _check_ray_resources(ray: Any, cpus: float, gpus: float, timeout: float | None) -> None:
    """Refuse what the local instance graphopt started cannot hold now, instead of leaving actors pending
    forever; on another cluster (which may grow) warn, and let the actors' start time-out decide."""
    deadline = time.monotonic() + 5.0  # actors just killed give their resources back asynchronously
    while True:
        have = ray.available_resources()
        have_cpu, have_gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
        if have_cpu >= cpus and have_gpu >= gpus:
            return
        text = (f"the stage actors need {cpus:g} CPUs and {gpus:g} GPUs; Ray has {have_cpu:g} CPUs and "
                f"{have_gpu:g} GPUs free")
        if not _STARTED_LOCAL_RAY:
            logger.warning("%s; waiting up to %s s for them", text, timeout)
            return
        if time.monotonic() > deadline:
            raise UserError(text + " (other pipelines hold the rest, or the local instance is too small: "
                                   "close them, call ray.init(num_cpus=...) first, or use fewer stages or replicas)")
        time.sleep(0.2)


class _RayBackend:
    """``replicas`` chains of one actor per stage; micro-batches go round-robin over the chains, so the same
    actors serve pipelined execution (one chain) and data-parallel evaluation (several)."""

    def __init__(self, root: Path, manifest: dict[str, Any], devices: list[str], settings: Any,
                 queue_size: int, replicas: int = 1, fail_stage: tuple[int, int] | None = None,
                 ready_timeout: float | None = 300.0) -> None:
        from graphopt.model_io import model_file_size

        stages = manifest["stages"]
        threads = max(1, settings.intra_op_threads)
        cpus = [threads if parse_device(d)[0] == "CPUExecutionProvider" else 1 for d in devices]
        gpus = sum(1 for d in devices if parse_device(d)[0] == "CUDAExecutionProvider")
        ray = ensure_ray(sum(cpus) * replicas)
        _check_ray_resources(ray, sum(cpus) * replicas, gpus * replicas, ready_timeout)
        self.chains: list[list[Any]] = []
        self.ray = ray
        self.devices = devices
        remote_cls = ray.remote(RayStageActor)
        settings_dict = dataclasses.asdict(settings) | {"intra_op_threads": threads}
        models = []
        for stage in stages:
            path = root / stage["file"]
            if model_file_size(path) > path.stat().st_size:
                models.append(str(path.resolve()))  # large: every node must see this path (shared storage)
            else:
                models.append(ray.put(path.read_bytes()))  # small: shipped through the object store
        for _ in range(replicas):
            chain = []
            for k, stage in enumerate(stages):
                provider, _ = parse_device(devices[k])
                fail_on = fail_stage[1] if fail_stage is not None and fail_stage[0] == k else None
                chain.append(remote_cls.options(
                    num_cpus=cpus[k], num_gpus=1 if provider == "CUDAExecutionProvider" else 0,
                ).remote(k, models[k], devices[k], settings_dict, stage["inputs"], stage["outputs"],
                         stage["keep_after"], fail_on))
            self.chains.append(chain)
        try:
            ray.get([a.ready.remote() for chain in self.chains for a in chain], timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise UserError(f"Ray did not start the {len(stages) * replicas} stage actors within {ready_timeout:g} s "
                            f"(available now: {ray.available_resources()})") from None
        except Exception as exc:
            self.close()
            raise _ray_error(ray, exc) from None
        self.in_flight = max(2, queue_size * (len(stages) + 1)) * replicas
        self._next = itertools.count()

    def _submit(self, env: dict[str, Any]) -> Any:
        ref: Any = env
        for actor in self.chains[next(self._next) % len(self.chains)]:
            ref = actor.run.remote(ref)
        return ref

    def _get(self, refs: list[Any]) -> list[dict[str, Any]]:
        try:
            return self.ray.get(refs)
        except Exception as exc:
            raise _ray_error(self.ray, exc) from None

    def stream(self, parts_iter: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        window: collections.deque[list[Any]] = collections.deque()
        outstanding = 0
        try:
            for parts in parts_iter:
                window.append([self._submit(env) for env in parts])
                outstanding += len(parts)
                while window and outstanding - len(window[0]) >= self.in_flight:
                    refs = window.popleft()
                    outstanding -= len(refs)
                    yield self._get(refs)
            while window:
                yield self._get(window.popleft())
        finally:
            for refs in window:  # a failed or abandoned run: drop what is still queued
                for ref in refs:
                    try:
                        self.ray.cancel(ref)
                    except Exception:  # finished already, or not cancellable
                        pass

    def stage_stats(self) -> list[tuple[float, int]]:
        """Busy seconds and calls per stage, summed over the replicas."""
        totals = [(0.0, 0)] * len(self.chains[0]) if self.chains else []
        for chain in self.chains:
            for k, (busy, calls) in enumerate(self.ray.get([a.stats.remote() for a in chain])):
                totals[k] = (totals[k][0] + busy, totals[k][1] + calls)
        return totals

    def close(self) -> None:
        for chain in self.chains:
            for actor in chain:
                try:
                    self.ray.kill(actor)
                except Exception:  # already gone
                    pass
        self.chains = []


def _ray_error(ray: Any, exc: BaseException) -> GraphoptError:
    """The stage's own error out of Ray's wrapping (a downstream task's error wraps the failed input's)."""
    current: Any = exc
    for _ in range(16):
        if isinstance(current, StageFailed):
            return StageFailed(current.stage, current.device, current.cause)
        if isinstance(current, GraphoptError) and not isinstance(current, ray.exceptions.RayError):
            return current
        nxt = getattr(current, "cause", None)
        if nxt is None or nxt is current:
            break
        current = nxt
    text = str(exc).strip().splitlines()
    return StageFailed(-1, "ray", f"{type(exc).__name__}: {text[-1] if text else ''}")


# --------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------

class StagePipeline:
    """Runs a stage directory chained, with the interface of :class:`graphopt.runtime.Runner`.

    ``micro_batch`` splits each batch along the batch axis so that stages work on different micro-batches
    at once (throughput); ``None`` sends each batch whole (what output comparison wants).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], backend_impl: Any, devices: list[str],
                 micro_batch: int | None, replicas: int = 1) -> None:
        self.root = root
        self.manifest = manifest
        self._backend = backend_impl
        self.devices = devices
        self.micro_batch = micro_batch
        self.replicas = replicas
        self.batch_axis = manifest.get("batch_axis")
        self.input_names: list[str] = list(manifest["inputs"])
        self.output_names: list[str] = list(manifest["outputs"])
        self.providers = [parse_device(d)[0] for d in devices]
        self.provider = self.providers[0]
        self._bound: dict[str, np.ndarray] | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, backend_impl.close)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, devices: Sequence[str] | str | None = None,
                 backend: str = "threads", micro_batch: int | None = None, session_factory: Any = None,
                 replicas: int = 1, queue_size: int = 2, io_binding: bool | None = None,
                 _fail_stage: tuple[int, int] | None = None) -> StagePipeline:
        """Load ``path`` (a directory with manifest.json).

        ``devices`` overrides the manifest's (one entry applies to every stage). ``session_factory`` is a
        :class:`graphopt.runtime.SessionFactory` whose settings every stage uses; CPU stages left at
        ``intra_op_threads=0`` share the cores. ``replicas`` (Ray only) makes that many chains of stage
        actors and spreads micro-batches over them (data-parallel); without ``micro_batch`` each batch is
        then cut into ``replicas`` shards. ``io_binding`` forces IO binding on or off (default: on CUDA).
        """
        root = Path(path)
        return cls._build(root, read_manifest(root), devices=devices, backend=backend, micro_batch=micro_batch,
                          session_factory=session_factory, replicas=replicas, queue_size=queue_size,
                          io_binding=io_binding, fail_stage=_fail_stage)

    @classmethod
    def from_model(cls, path: str | os.PathLike, *, device: str = "cpu", backend: str = "ray", replicas: int = 1,
                   micro_batch: int | None = None, session_factory: Any = None) -> StagePipeline:
        """One unpartitioned model file as a one-stage pipeline: with ``backend="ray"`` and ``replicas=N``
        it is N Ray actors sharing each batch (data-parallel evaluation, e.g. of a reference model)."""
        path = Path(path)
        return cls._build(path.parent, single_stage_manifest(path, device), devices=[device], backend=backend,
                          micro_batch=micro_batch, session_factory=session_factory, replicas=replicas)

    @classmethod
    def _build(cls, root: Path, manifest: dict[str, Any], *, devices: Sequence[str] | str | None, backend: str,
               micro_batch: int | None, session_factory: Any, replicas: int = 1, queue_size: int = 2,
               io_binding: bool | None = None, fail_stage: tuple[int, int] | None = None) -> StagePipeline:
        from graphopt.runtime import SessionFactory, resolve_providers

        stages = manifest["stages"]
        if micro_batch is not None and micro_batch < 1:
            raise UserError(f"micro_batch must be a positive integer; got {micro_batch}")
        if backend not in ("threads", "ray"):
            raise UserError(f"backend must be threads or ray; got {backend!r}")
        if replicas < 1 or (replicas > 1 and backend != "ray"):
            raise UserError(f"replicas={replicas}: more than one replica needs backend ray")
        default = [s.get("device") or "cpu" for s in stages]
        devs = expand_devices(devices, len(stages), default)
        resolve_providers([parse_device(d)[0] for d in devs])  # fail early on a provider this build lacks
        factory = session_factory or SessionFactory()
        if backend == "ray":
            impl: Any = _RayBackend(root, manifest, devs, factory.settings, queue_size, replicas, fail_stage)
            return cls(root, manifest, impl, devs, micro_batch, replicas)
        cpu_stages = sum(1 for d in devs if parse_device(d)[0] == "CPUExecutionProvider")
        sessions: list[Any] = []
        for k, stage in enumerate(stages):
            provider, device_id = parse_device(devs[k])
            settings = _stage_settings(factory.settings, provider, device_id, cpu_stages)
            session = factory.session(root / stage["file"], provider, settings)
            sessions.append(StageSession(k, session, stage["inputs"], stage["outputs"],
                                         device_label(provider, device_id), io_binding))
        if fail_stage is not None:
            sessions[fail_stage[0]] = _FailingStage(sessions[fail_stage[0]], fail_stage[1])
        impl = _ThreadBackend(sessions, [s["keep_after"] for s in stages], queue_size)
        return cls(root, manifest, impl, devs, micro_batch)

    # -- Runner interface --------------------------------------------------------------------------------

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UserError(f"no array for model input '{missing[0]}' (the model's inputs are "
                            f"{', '.join(self.input_names)})")
        return {n: inputs[n] for n in self.input_names}

    def _micro(self, batch: Mapping[str, np.ndarray]) -> int | None:
        if self.micro_batch is not None or self.replicas == 1 or self.batch_axis is None:
            return self.micro_batch
        rows = max((np.shape(a)[self.batch_axis] for a in batch.values() if np.ndim(a) > self.batch_axis),
                   default=1)
        return max(1, -(-rows // self.replicas))  # one shard per replica

    def stream(self, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        """Outputs of each batch in order (model output order), keeping every stage busy across batches."""
        if self._closed:
            raise GraphoptError("the stage pipeline is closed")
        parts = (split_batch(self._check_inputs(b), self._micro(b), self.batch_axis) for b in batches)
        for done in self._backend.stream(parts):
            yield _join(done, self.output_names, self.batch_axis)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = None
        for out in self.stream([inputs]):
            pass
        assert out is not None
        return out

    def bind(self, inputs: Mapping[str, np.ndarray]) -> None:
        self._bound = self._check_inputs(inputs)

    def run_bound(self) -> float:
        if self._bound is None:
            raise ValueError("bind() inputs before run_bound()")
        t0 = time.perf_counter()
        self.run(self._bound)
        return time.perf_counter() - t0

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per stage: busy seconds and micro-batches run (since the pipeline was made)."""
        if isinstance(self._backend, _ThreadBackend):
            pairs = list(zip(self._backend.state.busy_s, self._backend.state.items))
        else:
            pairs = self._backend.stage_stats()
        return [{"stage": k, "device": self.devices[k], "busy_s": b, "items": n} for k, (b, n) in enumerate(pairs)]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> StagePipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _FailingStage:
    """Test hook: a stage that raises on its n-th call (to prove failures surface and nothing hangs)."""

    def __init__(self, inner: StageSession, fail_on: int) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.calls = 0
        self.device = inner.device
        self.index = inner.index

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.calls >= self.fail_on:
            raise RuntimeError(f"injected failure in stage {self.index}")
        return self.inner.run(env)


def run_stage_dir(path: str | os.PathLike, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> list[np.ndarray]:
    """Convenience: outputs of a stage directory for one batch."""
    with StagePipeline.from_dir(path, **kwargs) as pipe:
        return pipe.run(inputs)


__all__ = ["PLAN_KEY", "MANIFEST_NAME", "StageFailed", "StagePipeline", "is_partitioned", "read_manifest",
           "read_plan", "write_partitioned", "parse_device", "expand_devices", "stage_interfaces",
           "node_dependencies", "ensure_ray", "run_stage_dir"]
