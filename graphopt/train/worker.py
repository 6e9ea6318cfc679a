"""The training worker: reads a job folder, trains the student with ONNX Runtime's training API, writes results.

Runs in the training environment (``python worker.py JOB.json``) or in-process (:func:`run_job`). Inputs
come as files (the prepared student, raw arrays, a JSON job spec) so the two Python environments share
nothing but a folder. Progress goes to stdout as lines ``@@graphopt {json}`` that graphopt parses to drive
its progress bar; everything else (ORT's logs, tracebacks) goes to stderr, which graphopt keeps in a log.

Only numpy, onnx and onnxruntime.training are imported here: no graphopt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__:
    from . import artifacts as _artifacts
    from . import loss as _loss
else:  # run as a script in the training environment: import the siblings directly
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import artifacts as _artifacts  # type: ignore[no-redef]
    import loss as _loss  # type: ignore[no-redef]

PREFIX = "@@graphopt "
JOB_VERSION = 1
#: Job fields that must not change between a run and its ``resume`` (they shape the graphs or the data).
SIGNATURE_FIELDS = ("kinds", "requires_grad", "use_labels", "rows", "fingerprint")
SIGNATURE_OPTIONS = ("temperature", "alpha", "optimizer", "weight_decay", "batch_size", "seed", "val_split",
                     "drop_last")

Emit = Callable[[dict[str, Any]], None]


class JobError(Exception):
    """A problem with the job the user can fix (bad resume folder, diverged training): exit 2."""


def emit_stdout(event: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _array(spec: dict[str, Any], base: Path) -> np.ndarray:
    shape = tuple(spec["shape"])
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=spec["dtype"])
    return np.memmap(base / spec["file"], dtype=spec["dtype"], mode="r", shape=shape)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signature(job: dict[str, Any], student: Path) -> str:
    payload = {k: job[k] for k in SIGNATURE_FIELDS}
    payload["options"] = {k: job["options"][k] for k in SIGNATURE_OPTIONS}
    payload["student"] = _file_hash(student)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def lr_at(step: int, total: int, warmup: int, o: dict[str, Any]) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` (or constant)."""
    lr = o["lr"]
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if o["lr_schedule"] == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * o["min_lr_ratio"]
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


class Data:
    """The staged arrays, memory-mapped; batches are gathered by index."""

    def __init__(self, job: dict[str, Any], base: Path) -> None:
        self.inputs = {s["name"]: _array(s, base) for s in job["inputs"]}
        self.teacher = [_array(s, base) for s in job["teacher"]]
        self.labels = _array(job["labels"], base).astype(np.int64) if job.get("labels") else None
        self.rows = int(job["rows"])

    def feeds(self, names: list[str], idx: np.ndarray) -> list[np.ndarray]:
        idx = np.sort(idx)
        out = []
        for name in names:
            if name in self.inputs:
                out.append(np.ascontiguousarray(self.inputs[name][idx]))
            elif name == _loss.LABELS_INPUT:
                assert self.labels is not None
                out.append(np.ascontiguousarray(self.labels[idx]))
            elif name.startswith("graphopt_teacher_"):
                out.append(np.ascontiguousarray(self.teacher[int(name.rsplit("_", 1)[1])][idx]))
            else:
                raise ValueError(f"the training graph has an input '{name}' that no staged array feeds")
        return out


def _batches(idx: np.ndarray, size: int, drop_last: bool) -> list[np.ndarray]:
    parts = [idx[i:i + size] for i in range(0, len(idx), size)]
    if drop_last and parts and len(parts[-1]) < size:
        parts.pop()
    return parts


def _split(rows: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(rows)
    n_val = int(round(rows * val_split))
    if val_split > 0 and rows > 1:
        n_val = min(max(n_val, 1), rows - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _evaluate(module: Any, data: Data, idx: np.ndarray, job: dict[str, Any]) -> dict[str, float | None]:
    """Loss, its terms and top-1 accuracy (labels) or agreement (teacher) of the eval graph on ``idx``."""
    module.eval()
    names = module.input_names()
    out_names = module.output_names()
    kd_index = job["kinds"].index("kd") if "kd" in job["kinds"] else None
    sums: dict[str, float] = {}
    correct = 0
    seen = 0
    bs = job["options"]["batch_size"]
    for part in _batches(idx, bs, job["options"]["drop_last"]):
        outs = module(*data.feeds(names, part))
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        n = len(part)
        for name, value in zip(out_names, outs):
            if name == out_names[0] or name in (_artifacts.COMPONENT_KL, _artifacts.COMPONENT_CE,
                                                _artifacts.COMPONENT_MSE):
                key = "loss" if name == out_names[0] else name.replace("graphopt_loss_", "")
                sums[key] = sums.get(key, 0.0) + float(value) * n
        if kd_index is not None:
            logits = np.asarray(outs[1 + kd_index])
            pred = logits.argmax(-1)
            ref = data.labels[np.sort(part)] if data.labels is not None else \
                np.asarray(data.teacher[kd_index][np.sort(part)]).argmax(-1)
            correct += int(np.sum(pred == ref))
        seen += n
    result: dict[str, float | None] = {k: v / seen for k, v in sums.items()} if seen else {}
    if kd_index is not None and seen:
        result["accuracy" if data.labels is not None else "agreement"] = correct / seen
    return result


def _open(arts: Any, state_path: Path) -> tuple[Any, Any, Any]:
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    state = CheckpointState.load_checkpoint(str(state_path))
    module = Module(str(arts.training), state, str(arts.eval))
    optimizer = Optimizer(str(arts.optimizer), module)
    return state, module, optimizer


def _save_params(state: Any, names: list[str], path: Path) -> None:
    arrays = {name: np.array(state.parameters[name].data) for name in names}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run_job(job_path: Path, emit: Emit) -> dict[str, Any]:  # noqa: C901  (the training loop, start to end)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    from onnxruntime.training.api import CheckpointState

    job = json.loads(Path(job_path).read_text())
    if job.get("version") != JOB_VERSION:
        raise ValueError(f"job version {job.get('version')} is not {JOB_VERSION}; graphopt and its worker differ")
    base = Path(job_path).parent
    o = job["options"]
    student = base / job["student"]
    ckpt_dir = Path(job["checkpoint_dir"]) if job.get("checkpoint_dir") else base / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sig = signature(job, student)
    sig_file = ckpt_dir / "signature.json"
    last = ckpt_dir / "last.ckpt"
    best_params = ckpt_dir / "best.npz"
    resume = bool(job.get("resume"))
    if resume:
        if not last.is_file() or not sig_file.is_file():
            raise JobError(f"nothing to resume in {ckpt_dir}: it holds no checkpoint from an earlier run")
        if json.loads(sig_file.read_text()).get("signature") != sig:
            raise JobError(f"the checkpoint in {ckpt_dir} was made for another student, data or loss/optimizer "
                           "options; run without resume to start over")
    else:
        for stale in (last, best_params, sig_file):
            stale.unlink(missing_ok=True)

    arts = _artifacts.Artifacts.at(ckpt_dir / "artifacts")
    if not (resume and arts.exist()):
        emit({"event": "phase", "name": "building training graphs"})
        arts = _artifacts.generate(
            student, ckpt_dir / "artifacts", kinds=job["kinds"], requires_grad=job["requires_grad"],
            temperature=o["temperature"], alpha=o["alpha"], use_labels=job["use_labels"],
            optimizer=o["optimizer"], weight_decay=o["weight_decay"], log=base / "artifacts.log")
    sig_file.write_text(json.dumps({"signature": sig}) + "\n")

    data = Data(job, base)
    state, module, optimizer = _open(arts, last if resume else arts.checkpoint)

    if job.get("kind") == "evaluate":
        return _evaluate_job(job, base, data, module)

    train_idx, val_idx = _split(data.rows, o["val_split"], o["seed"])
    bs = o["batch_size"]
    steps_per_epoch = len(_batches(train_idx, bs, o["drop_last"]))
    if steps_per_epoch == 0:
        raise JobError(f"{len(train_idx)} training samples do not make one batch of {bs}")
    epochs = o["epochs"]
    total_steps = epochs * steps_per_epoch
    warmup = int(round(o["warmup_epochs"] * steps_per_epoch))
    saved: dict[str, Any] = {"history": {}, "best_epoch": None, "best_val": None, "bad_epochs": 0,
                             "stopped": None}
    start_epoch = 0
    if resume:
        start_epoch = int(state.properties["graphopt_epoch"])
        saved = json.loads(str(state.properties["graphopt_state"]))
        saved.update(stopped=None, bad_epochs=0)  # resuming asks for more training: patience starts again
    emit({"event": "start", "epochs": epochs, "start_epoch": start_epoch, "steps_per_epoch": steps_per_epoch,
          "train_samples": int(len(train_idx)), "val_samples": int(len(val_idx))})
    history: dict[str, list[Any]] = saved["history"]
    names = module.input_names()
    out_names = module.output_names()
    comp_index = {n.replace("graphopt_loss_", ""): i for i, n in enumerate(out_names)
                  if n.startswith("graphopt_loss_")}
    run_epochs = 0
    train_seconds = 0.0
    train_samples = 0
    for epoch in range(start_epoch, epochs):
        if saved.get("stopped"):
            break
        module.train()
        order = np.random.default_rng([o["seed"], epoch]).permutation(train_idx)
        loss_sum = 0.0
        comp_sums = dict.fromkeys(comp_index, 0.0)
        seen = 0
        t0 = time.perf_counter()
        last_emit = t0
        pending = 0
        lr = o["lr"]
        for step, part in enumerate(_batches(order, bs, o["drop_last"])):
            lr = lr_at(epoch * steps_per_epoch + step, total_steps, warmup, o)
            optimizer.set_learning_rate(lr)
            outs = module(*data.feeds(names, part))
            loss = float(outs[0])
            if not math.isfinite(loss):
                raise JobError(f"the loss became {loss} at epoch {epoch + 1}, step {step + 1} (learning rate "
                               f"{lr:.3g}); lower distill.lr")
            optimizer.step()
            module.lazy_reset_grad()
            n = len(part)
            loss_sum += loss * n
            for key, i in comp_index.items():
                comp_sums[key] += float(outs[i]) * n
            seen += n
            pending += 1
            now = time.perf_counter()
            if now - last_emit > 0.25:
                emit({"event": "step", "steps": pending, "loss": loss})
                pending = 0
                last_emit = now
        if pending:
            emit({"event": "step", "steps": pending, "loss": loss_sum / max(seen, 1)})
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        train_samples += seen
        run_epochs += 1
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": lr,
                               "seconds": seconds, "samples_per_s": seen / seconds if seconds else None}
        for key, total in comp_sums.items():
            row[f"train_{key}"] = total / seen
        improved = True
        if len(val_idx):
            ev = _evaluate(module, data, val_idx, job)
            row.update({f"val_{k}": v for k, v in ev.items()})
            val = ev["loss"]
            improved = saved["best_val"] is None or val < saved["best_val"]
            if improved:
                saved["best_val"] = val
        if improved:
            saved["best_epoch"] = epoch + 1
            saved["bad_epochs"] = 0
            _save_params(state, job["requires_grad"], best_params)
        else:
            saved["bad_epochs"] += 1
        row["best"] = improved
        rows_before = len(history.get("epoch", []))
        for key, value in row.items():
            if key != "best":
                history.setdefault(key, [None] * rows_before).append(value)
        for values in history.values():
            values.extend([None] * (rows_before + 1 - len(values)))
        if o["patience"] and saved["bad_epochs"] >= o["patience"] and epoch + 1 < epochs:
            saved["stopped"] = (f"early stopping after epoch {epoch + 1}: the validation loss did not improve "
                                f"for {o['patience']} epochs (best: epoch {saved['best_epoch']})")
        state.properties["graphopt_epoch"] = epoch + 1
        state.properties["graphopt_state"] = json.dumps(saved)
        tmp = last.with_name(last.name + ".tmp")
        CheckpointState.save_checkpoint(state, str(tmp), include_optimizer_state=True)
        os.replace(tmp, last)
        emit({"event": "epoch", **row, "epochs": epochs})
        if saved.get("stopped"):
            emit({"event": "stopped", "reason": saved["stopped"]})
    if not best_params.is_file():  # resumed a finished run that never saved best (cannot happen) or 0 epochs
        _save_params(state, job["requires_grad"], best_params)
    result = {"history": history, "best_epoch": saved["best_epoch"], "best_val_loss": saved["best_val"],
              "stopped": saved.get("stopped"), "start_epoch": start_epoch, "epochs_run": run_epochs,
              "epochs_done": start_epoch + run_epochs, "train_samples": int(len(train_idx)),
              "val_samples": int(len(val_idx)), "steps_per_epoch": steps_per_epoch,
              "train_seconds": train_seconds, "samples_per_s": train_samples / train_seconds if train_seconds else None,
              "params": str(best_params)}
    (base / job["result"]).write_text(json.dumps(result) + "\n")
    emit({"event": "done"})
    return result


def _evaluate_job(job: dict[str, Any], base: Path, data: Data, module: Any) -> dict[str, Any]:
    """Run the eval graph (initial parameters) over all rows: the loss per batch and the student outputs."""
    module.eval()
    names = module.input_names()
    out_names = module.output_names()
    losses, sizes = [], []
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in out_names[1:]}
    idx = np.arange(data.rows)
    for part in _batches(idx, job["options"]["batch_size"], False):
        outs = module(*data.feeds(names, part))
        losses.append(float(outs[0]))
        sizes.append(len(part))
        for name, value in zip(out_names[1:], outs[1:]):
            outputs[name].append(np.asarray(value).reshape(np.shape(value)))
    arrays = {f"out_{i}": np.concatenate(v) if v[0].ndim else np.asarray(v) for i, v in enumerate(outputs.values())}
    np.savez(base / "evaluate.npz", loss=np.asarray(losses), batch_sizes=np.asarray(sizes), **arrays)
    result = {"outputs": list(outputs), "file": str((base / "evaluate.npz").resolve())}
    (base / job["result"]).write_text(json.dumps(result) + "\n")
    return result


def fast_import_training_api() -> None:
    """Import onnxruntime's training API without torch (5-10 s of a worker's start otherwise).

    ``import onnxruntime`` in the training build probes ``onnxruntime.training.ortmodule`` (torch), and
    ``onnxruntime.training``'s own ``__init__`` and ``artifacts`` pull in torch through ``amp``, ``optim`` and
    ``onnxruntime.tools``. The worker needs none of these: it uses ``api``, ``onnxblock`` and
    ``artifacts.generate_artifacts`` (without ORT-format export). So the packages are entered without
    running their ``__init__``; if that ever fails, the normal (slow) import is used.
    """
    import importlib.util
    import types

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return
    root = Path(spec.origin).parent
    training = types.ModuleType("onnxruntime.training")
    training.__path__ = [str(root / "training")]
    tools = types.ModuleType("onnxruntime.tools")
    tools.__path__ = [str(root / "tools")]
    convert = types.ModuleType("onnxruntime.tools.convert_onnx_models_to_ort")

    class OptimizationStyle:  # what artifacts.py imports; only used for ORT-format export
        Fixed = 0
        Runtime = 1

    def convert_onnx_models_to_ort(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ORT-format export is not available in graphopt's training worker")

    convert.OptimizationStyle = OptimizationStyle  # type: ignore[attr-defined]
    convert.convert_onnx_models_to_ort = convert_onnx_models_to_ort  # type: ignore[attr-defined]
    stubs = {"onnxruntime.training": training, "onnxruntime.training.ortmodule": None,
             "onnxruntime.tools": tools, "onnxruntime.tools.convert_onnx_models_to_ort": convert}
    sys.modules.update(stubs)  # type: ignore[arg-type]
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime.training.api  # noqa: F401
        import onnxruntime.training.artifacts  # noqa: F401
    except Exception:  # noqa: BLE001  (fall back to the ordinary import)
        for name in [n for n in sys.modules if n == "onnxruntime" or n.startswith("onnxruntime.")]:
            del sys.modules[name]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: worker.py JOB.json\n")
        return 2
    fast_import_training_api()
    try:
        run_job(Path(argv[0]), emit_stdout)
        return 0
    except JobError as exc:
        emit_stdout({"event": "error", "kind": "user", "message": str(exc)})
        return 2
    except Exception as exc:  # the whole story goes to stderr (the log); one line to graphopt
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        emit_stdout({"event": "error", "kind": "internal", "message": f"{type(exc).__name__}: {first}"})
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
