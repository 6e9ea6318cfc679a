"""Knowledge distillation, graphopt's side: stage the data, get the teacher's outputs, run the worker.

The data is streamed once into raw arrays in a job folder (never held whole), the teacher runs over it in
ONNX Runtime (graphopt's own, any provider) and its outputs are cached on disk by the hash of the teacher
and the data, the student is prepared (``prepare``), and the training job goes to the worker (in the
training environment) or runs in-process. The worker's progress lines drive the progress bar; a worker
that stops reporting for ``timeout`` seconds is killed, and one that fails surfaces as one clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.context import NullProgress, ProgressReporter
from graphopt.data import DataSource, input_specs
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory
from graphopt.train import env as train_env
from graphopt.train import prepare, worker

logger = logging.getLogger(__name__)

STAGE_BATCH = 256
LOG_TAIL_LINES = 6


@dataclasses.dataclass
class Settings:
    """Training settings (the ``distill`` pass's options, resolved)."""

    temperature: float = 4.0
    alpha: float | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    seed: int = 0
    val_split: float = 0.1
    patience: int = 5
    loss: str = "auto"
    limit: int | None = None
    timeout: float = 600.0
    trainable: list[str] = dataclasses.field(default_factory=list)
    frozen: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    params: dict[str, np.ndarray]
    result: dict[str, Any]
    kinds: list[str]
    alpha: float
    use_labels: bool
    has_labels: bool
    backend: str
    requires_grad: list[str]
    trainable_elements: int
    batchnorm_frozen: int
    batchnorm_left: list[str]
    teacher_cached: bool
    teacher_seconds: float
    rows: int


@dataclasses.dataclass
class _Staged:
    rows: int
    inputs: list[dict[str, Any]]
    labels: dict[str, Any] | None
    digest: str


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_data(data: DataSource, student: ir.Model, folder: Path, limit: int | None) -> _Staged:
    """Stream the data into raw files (one per input, plus labels): the worker memory-maps them."""
    specs = input_specs(student)
    folder.mkdir(parents=True, exist_ok=True)
    files = {s.name: open(folder / f"input_{i}.raw", "wb") for i, s in enumerate(specs)}
    label_file = open(folder / "labels.raw", "wb")
    h = hashlib.sha256()
    rows = 0
    trailing: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    labels_ok = True
    try:
        for batch in data.batches(batch_size=STAGE_BATCH, limit=limit, specs=specs):
            for spec in specs:
                arr = np.ascontiguousarray(batch.inputs[spec.name])
                if arr.ndim == 0:
                    raise UserError(f"input '{spec.name}' is a scalar; distillation needs a batch axis")
                if spec.name in trailing and arr.shape[1:] != trailing[spec.name]:
                    raise UserError(f"input '{spec.name}' changes shape between batches ({trailing[spec.name]} "
                                    f"then {arr.shape[1:]}); distillation needs one shape per input")
                trailing[spec.name] = arr.shape[1:]
                dtypes[spec.name] = arr.dtype
                files[spec.name].write(arr.tobytes())
                h.update(spec.name.encode())
                h.update(arr.tobytes())
            labels = batch.labels
            if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
                labels_ok = False
            if labels_ok and labels is not None:
                lab = labels.astype(np.int64)
                label_file.write(lab.tobytes())
                h.update(lab.tobytes())
            rows += len(batch)
    finally:
        for fh in files.values():
            fh.close()
        label_file.close()
    inputs = [{"name": s.name, "file": f"data/input_{i}.raw", "dtype": dtypes[s.name].str,
               "shape": [rows, *trailing[s.name]]} for i, s in enumerate(specs)]
    labels_spec = {"file": "data/labels.raw", "dtype": "<i8", "shape": [rows]} if labels_ok else None
    return _Staged(rows, inputs, labels_spec, h.hexdigest())


def teacher_outputs(teacher: Path, staged: _Staged, base: Path, cache_dir: Path, sessions: SessionFactory,
                    provider: str, batch_size: int,
                    progress: ProgressReporter) -> tuple[list[dict[str, Any]], str, bool, float]:
    """The teacher's outputs on the staged data, from the disk cache when teacher and data are the same.

    Returns the output specs, the key (a hash of the teacher file and the data), whether they came from
    the cache, and the seconds spent computing them.
    """
    key = hashlib.sha256((_hash_file(teacher) + staged.digest).encode()).hexdigest()[:24]
    folder = cache_dir / f"teacher-{key}"
    meta = folder / "meta.json"
    if meta.is_file():
        logger.info("teacher outputs from the cache %s", folder)
        return json.loads(meta.read_text())["outputs"], key, True, 0.0
    t0 = time.perf_counter()
    session = sessions.session(teacher, provider)
    names = [o.name for o in session.get_outputs()]
    wanted = sorted(i.name for i in session.get_inputs())
    staged_names = sorted(s["name"] for s in staged.inputs)
    if wanted != staged_names:
        raise UserError(f"the teacher {teacher} has inputs {wanted} and the student {staged_names}; "
                        "they must be the same")
    inputs = {s["name"]: np.memmap(base / s["file"], dtype=s["dtype"], mode="r", shape=tuple(s["shape"]))
              for s in staged.inputs}
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"output_{i}.raw", "wb") for i in range(len(names))]
    shapes: list[tuple[int, ...] | None] = [None] * len(names)
    dtypes: list[str] = [""] * len(names)
    try:
        with progress.task("teacher outputs", total=staged.rows) as task:
            for start in range(0, staged.rows, batch_size):
                feed = {k: np.ascontiguousarray(v[start:start + batch_size]) for k, v in inputs.items()}
                n = len(next(iter(feed.values())))
                for i, out in enumerate(session.run(names, feed)):
                    out = np.ascontiguousarray(out)
                    if out.ndim == 0 or out.shape[0] != n:
                        raise UserError(f"teacher output '{names[i]}' has shape {list(out.shape)} for a batch of "
                                        f"{n}; distillation needs outputs with the batch on axis 0")
                    if shapes[i] is not None and out.shape[1:] != shapes[i]:
                        raise UserError(f"teacher output '{names[i]}' changes shape between batches")
                    shapes[i] = out.shape[1:]
                    dtypes[i] = out.dtype.str
                    files[i].write(out.tobytes())
                task.advance(n)
    finally:
        for fh in files:
            fh.close()
    outputs = [{"output": name, "file": str((folder / f"output_{i}.raw").resolve()), "dtype": dtypes[i],
                "shape": [staged.rows, *(shapes[i] or ())]} for i, name in enumerate(names)]
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"outputs": outputs}))
    os.replace(tmp, meta)
    return outputs, key, False, time.perf_counter() - t0


def check_student(student: ir.Model, teacher: list[dict[str, Any]], staged: _Staged, base: Path,
                  sessions: SessionFactory, provider: str) -> None:
    """Run the student on a few rows: it must run and give outputs shaped like the teacher's."""
    outs = [v.name for v in student.graph.outputs]
    if len(outs) != len(teacher):
        raise UserError(f"the student has {len(outs)} outputs ({', '.join(outs)}) and the teacher "
                        f"{len(teacher)} ({', '.join(t['output'] for t in teacher)}); they must match")
    session = sessions.session(student, provider)
    n = min(4, staged.rows)
    feed = {s["name"]: np.ascontiguousarray(np.memmap(base / s["file"], dtype=s["dtype"], mode="r",
                                                      shape=tuple(s["shape"]))[:n]) for s in staged.inputs}
    try:
        got = session.run(None, feed)
    except Exception as exc:
        raise UserError(f"the student does not run on the data: {str(exc).splitlines()[0]}") from None
    for out, spec, name in zip(got, teacher, outs):
        want = [n, *spec["shape"][1:]]
        if list(out.shape) != want:
            raise UserError(f"student output '{name}' has shape {list(out.shape)} where the teacher's "
                            f"'{spec['output']}' has {want}; they must match")
        if np.dtype(spec["dtype"]).kind != "f" or out.dtype.kind != "f":
            raise UserError(f"output '{name}' is {out.dtype}; distillation needs float outputs")


def loss_kinds(teacher: list[dict[str, Any]], loss: str) -> list[str]:
    kinds = []
    for spec in teacher:
        classifier = len(spec["shape"]) == 2 and spec["shape"][1] > 1
        if loss == "kd" and not classifier:
            raise UserError(f"distill.loss=kd needs logits shaped [batch, classes]; output '{spec['output']}' "
                            f"is {spec['shape']} (use loss=auto or mse)")
        kinds.append("kd" if (loss == "kd" or (loss == "auto" and classifier)) else "mse")
    return kinds


def _labels_valid(staged: _Staged, base: Path, teacher: list[dict[str, Any]], kinds: list[str]) -> str | None:
    """None when the labels can serve as class indices for the first classification output; else why not."""
    if staged.labels is None:
        return "the data has no integer 'labels' array"
    if "kd" not in kinds:
        return "no output is a classification output ([batch, classes] logits)"
    classes = teacher[kinds.index("kd")]["shape"][1]
    labels = np.memmap(base / staged.labels["file"], dtype="<i8", mode="r", shape=(staged.rows,))
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        return f"the labels span {lo}..{hi}, outside the {classes} classes of the output"
    return None


def resolve_alpha(alpha: float | None, why_not: str | None) -> tuple[float, bool]:
    """(alpha, use_labels): default 0.9 with usable labels, 1.0 (soft targets only) without."""
    if alpha is None:
        return (0.9, True) if why_not is None else (1.0, False)
    if alpha < 1.0 and why_not is not None:
        raise UserError(f"distill.alpha={alpha:g} mixes in a cross-entropy on labels, but {why_not}; give "
                        "data with labels or set distill.alpha=1")
    return alpha, alpha < 1.0


class _EventSink:
    """Turns worker events into progress updates and log lines; remembers the error event."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.error: dict[str, Any] | None = None
        self.epochs = 0
        self.steps = 0
        self.advanced = 0
        self.last = time.monotonic()

    def __call__(self, event: dict[str, Any]) -> None:
        self.last = time.monotonic()
        kind = event.get("event")
        if kind == "phase":
            self.task.update(description=f"distilling: {event['name']}")
        elif kind == "start":
            self.epochs, self.steps = event["epochs"], event["steps_per_epoch"]
            self.task.update(total=self.epochs * self.steps,
                             description=f"distilling: epoch {event['start_epoch'] + 1}/{self.epochs}")
            self._advance(event["start_epoch"] * self.steps)
        elif kind == "step":
            self._advance(event["steps"])
        elif kind == "epoch":
            e = event["epoch"]
            parts = [f"epoch {e}/{self.epochs}", f"loss {event['train_loss']:.4f}"]
            if event.get("val_loss") is not None:
                parts.append(f"val loss {event['val_loss']:.4f}")
            for key, label in (("val_accuracy", "val acc"), ("val_agreement", "val agree")):
                if event.get(key) is not None:
                    parts.append(f"{label} {100 * event[key]:.1f}%")
            logger.info("distill %s", " · ".join(parts))
            self.task.update(description="distilling: " + " · ".join(parts))
            self._advance(e * self.steps - self.advanced)
        elif kind == "stopped":
            logger.info("distill: %s", event["reason"])
            self._advance(self.epochs * self.steps - self.advanced)
        elif kind == "error":
            self.error = event

    def _advance(self, n: int) -> None:
        if n > 0:
            self.task.advance(n)
            self.advanced += n


def _log_tail(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if "[I:onnxruntime" not in ln and "[W:onnxruntime" not in ln]
    return " | ".join(lines[-LOG_TAIL_LINES:])


def run_worker(python: Path, job: Path, sink: Callable[[dict[str, Any]], None], timeout: float,
               log: Path) -> int:
    """Run the worker script under ``python``; returns its exit code. Kills it if it goes quiet too long."""
    cmd = [str(python), "-u", "-I", str(Path(worker.__file__).resolve()), str(job)]
    with open(log, "ab") as err:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise UserError(f"cannot start the training worker {python}: {exc}; "
                            + train_env.SETUP_HINT.format(path=train_env.default_env_dir())) from None
    assert proc.stdout is not None
    buffer = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            last = time.monotonic()
            while True:
                left = timeout - (time.monotonic() - last)
                if left <= 0 or not sel.select(timeout=left):
                    raise RuntimeError(
                        f"the training worker reported nothing for {timeout:g} s and was stopped "
                        f"(distill.timeout); last log lines: {_log_tail(log) or '(none)'}")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                last = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    text = line.decode("utf-8", errors="replace")
                    if text.startswith(worker.PREFIX):
                        try:
                            sink(json.loads(text[len(worker.PREFIX):]))
                        except json.JSONDecodeError:
                            logger.debug("worker: unreadable event %r", text)
                    elif text.strip():
                        logger.debug("worker: %s", text)
        return proc.wait(timeout=max(timeout, 30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def run_job(backend: train_env.Backend, job: Path, sink: _EventSink, timeout: float, log: Path) -> dict[str, Any]:
    if backend.in_process:
        try:
            return worker.run_job(job, sink)
        except worker.JobError as exc:
            raise UserError(str(exc)) from None
    code = run_worker(backend.python, job, sink, timeout, log)  # type: ignore[arg-type]
    if sink.error is not None:
        if sink.error.get("kind") == "user":
            raise UserError(sink.error["message"])
        tail = _log_tail(log)
        raise RuntimeError(f"the training worker failed: {sink.error['message']}"
                           + (f"; last log lines: {tail}" if tail else ""))
    result_file = job.parent / json.loads(job.read_text())["result"]
    if code != 0 or not result_file.is_file():
        tail = _log_tail(log)
        raise RuntimeError(f"the training worker ({backend.python}) exited with code {code} without a result"
                           + (f"; last log lines: {tail}" if tail else "")
                           + ". Is the training environment complete? Re-create it with "
                             "`graphopt setup-train --force`")
    return json.loads(result_file.read_text())


def distill(student: ir.Model, teacher: Path, data: DataSource, settings: Settings, *,
            sessions: SessionFactory | None = None, provider: str = "CPUExecutionProvider",
            work_dir: Path | None = None, checkpoint_dir: Path | None = None, resume: bool = False,
            progress: ProgressReporter | None = None, kind: str = "train",
            backend: train_env.Backend | None = None) -> Outcome:
    """Train ``student`` (not modified) to match the ``teacher`` file on ``data``; returns trained values.

    The job folder (staged data, and the teacher's outputs unless ``checkpoint_dir`` keeps them) is made
    in ``work_dir`` and removed when training is over; ``kind="evaluate"`` keeps it (its result is a file
    there), so give it a ``work_dir``.
    """
    progress = progress or NullProgress()
    backend = backend or train_env.resolve_backend()
    if checkpoint_dir is not None:
        checkpoint_dir = checkpoint_dir.absolute()
    if resume and (checkpoint_dir is None or not (checkpoint_dir / "last.ckpt").is_file()):
        raise UserError(f"nothing to resume in {checkpoint_dir}: it holds no checkpoint from an earlier run"
                        if checkpoint_dir else "resuming needs a checkpoint folder (distill.checkpoint_dir)")
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    sessions = sessions or SessionFactory(work_dir=work_dir)
    base = Path(tempfile.mkdtemp(prefix="distill-", dir=work_dir))
    try:
        return _distill_in(base, student, teacher, data, settings, sessions, provider, checkpoint_dir, resume,
                           progress, kind, backend)
    finally:
        if kind == "train":
            shutil.rmtree(base, ignore_errors=True)


def _distill_in(base: Path, student: ir.Model, teacher: Path, data: DataSource, settings: Settings,
                sessions: SessionFactory, provider: str, checkpoint_dir: Path | None, resume: bool,
                progress: ProgressReporter, kind: str, backend: train_env.Backend) -> Outcome:
    staged = stage_data(data, student, base / "data", settings.limit)
    teacher_specs, fingerprint, cached, teacher_s = teacher_outputs(
        teacher, staged, base, checkpoint_dir or base, sessions, provider, max(settings.batch_size, 64), progress)
    check_student(student, teacher_specs, staged, base, sessions, provider)
    kinds = loss_kinds(teacher_specs, settings.loss)
    why_not = _labels_valid(staged, base, teacher_specs, kinds)
    alpha, use_labels = resolve_alpha(settings.alpha, why_not)
    names = prepare.select_parameters(student, settings.trainable, settings.frozen)
    prep = prepare.training_copy(student, names)
    ir.save(prep.model, base / "student.onnx")
    batch = settings.batch_size
    fixed = [s.shape[0] for s in input_specs(student) if s.shape and isinstance(s.shape[0], int)]
    drop_last = bool(fixed)
    if fixed and batch != fixed[0]:
        logger.warning("the student's batch axis is fixed at %d; training with batches of %d", fixed[0], fixed[0])
        batch = fixed[0]
    job = {
        "version": worker.JOB_VERSION, "kind": kind, "student": "student.onnx", "result": "result.json",
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "resume": resume,
        "rows": staged.rows, "fingerprint": fingerprint, "inputs": staged.inputs,
        "labels": staged.labels if why_not is None else None,
        "teacher": teacher_specs, "kinds": kinds, "use_labels": use_labels, "requires_grad": prep.requires_grad,
        "options": {"temperature": settings.temperature, "alpha": alpha, "epochs": settings.epochs,
                    "batch_size": batch, "lr": settings.lr, "lr_schedule": settings.lr_schedule,
                    "warmup_epochs": settings.warmup_epochs, "min_lr_ratio": settings.min_lr_ratio,
                    "weight_decay": settings.weight_decay, "optimizer": settings.optimizer, "seed": settings.seed,
                    "val_split": settings.val_split, "patience": settings.patience, "drop_last": drop_last},
    }
    job_path = base / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    with progress.task("distilling: starting the training worker", total=None) as task:
        sink = _EventSink(task)
        result = run_job(backend, job_path, sink, settings.timeout, base / "worker.log")
    params: dict[str, np.ndarray] = {}
    if kind == "train":
        with np.load(result["params"]) as npz:
            params = {k: npz[k] for k in npz.files}
    return Outcome(params, result, kinds, alpha, use_labels, job["labels"] is not None, backend.description,
                   prep.requires_grad, prep.trainable_elements, prep.batchnorm_frozen, prep.batchnorm_left,
                   cached, teacher_s, staged.rows)
