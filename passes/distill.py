"""distill: train the model (the student) to match a teacher, with ONNX Runtime's training API.

The student is the model as the pipeline has made it so far (e.g. after ``prune`` in channel mode), or an
ONNX file (``distill.student``); the teacher is the pipeline's input model, or ``distill.teacher``. The
loss is ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels)`` on classification
outputs and the MSE on the others. Training runs in onnxruntime-training's own environment
(``graphopt setup-train``); only the trained values come back, written into the student's initializers,
so the graph the pipeline hands on is the student's graph, unchanged but for its weights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import onnx_ir as ir

from graphopt.errors import UserError
from graphopt.model_io import load_model
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistillOptions:
    teacher: str | None = opt(None, "Teacher ONNX file. Default: the pipeline's input model.")
    student: str | None = opt(None, "Student ONNX file to train instead of the pipeline's current model "
                                    "(same inputs and outputs as the teacher).")
    epochs: int = opt(20, "Training epochs (the most, with early stopping).", min=1)
    temperature: float = opt(4.0, "Softmax temperature T of the soft targets.", min=0.0, min_exclusive=True)
    alpha: float | None = opt(None, "Weight of the soft (teacher) term; 1-alpha weighs the cross-entropy on "
                                    "labels. Default: 0.9 with labels, 1 without.", min=0.0, max=1.0)
    batch_size: int = opt(32, "Training batch size.", min=1)
    lr: float = opt(1e-3, "Peak learning rate.", min=0.0, min_exclusive=True)
    lr_schedule: str = opt("cosine", "After warm-up: cosine decay or constant.", choices=("cosine", "constant"))
    warmup_epochs: float = opt(1.0, "Epochs of linear learning-rate warm-up.", min=0.0)
    min_lr_ratio: float = opt(0.01, "Cosine decay ends at lr * this.", min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, "Decoupled weight decay (AdamW); an L2 term in the loss for SGD.", min=0.0)
    optimizer: str = opt("adamw", "adamw | sgd (ORT's SGD has no momentum).", choices=("adamw", "sgd"))
    trainable: list[str] = opt([], "Initializers to train (shell patterns, e.g. fc*). Default: every float32 "
                                   "weight; BatchNorm statistics and integer tensors are always frozen.")
    frozen: list[str] = opt([], "Initializers to keep as they are (shell patterns).")
    loss: str = opt("auto", "auto: KD on logits shaped (batch, classes), MSE on other outputs | kd | mse.",
                    choices=("auto", "kd", "mse"))
    val_split: float = opt(0.1, "Fraction of the data held out for validation and early stopping.",
                           min=0.0, max=0.5)
    patience: int = opt(5, "Stop after this many epochs without a better validation loss (0: never).", min=0)
    seed: int | None = opt(None, "Seed for the split and the shuffling. Default: the run's --seed.")
    samples: int | None = opt(None, "Use at most this many samples of the data.", min=1)
    checkpoint_dir: str | None = opt(None, "Folder for a checkpoint every epoch and the cached teacher outputs "
                                           "(kept after the run). Default: the run's scratch folder.")
    resume: bool = opt(False, "Continue from the last epoch saved in checkpoint_dir.")
    timeout: float = opt(600.0, "Seconds the training worker may go without reporting before it is stopped.",
                         min=1.0)

    def validate(self) -> None:
        if self.resume and not self.checkpoint_dir:
            raise UserError("option distill.resume needs distill.checkpoint_dir (the folder of the earlier run)")
        if self.student is not None and not Path(self.student).is_file():
            raise UserError(f"option distill.student: model file not found: {self.student}")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise UserError(f"option distill.teacher: model file not found: {self.teacher}")


def _replace_contents(model: ir.Model, new: ir.Model) -> None:
    """Make ``model`` (the pipeline's object: passes work in place) hold ``new``'s graph."""
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)
    model.producer_name, model.producer_version = new.producer_name, new.producer_version


@register
class DistillPass(GraphPass):
    name = "distill"
    summary = "Knowledge distillation: train the model to match the input model (teacher) with ORT training."
    Options = DistillOptions
    # Training moves the outputs by design (towards the teacher, away from the model before the pass), so
    # --check-each-pass only catches a degenerate result: outputs anti-correlated with what they were.
    tolerance = Tolerance(rel=None, min_cosine=0.0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.data import input_specs
        from graphopt.train import kd

        o: DistillOptions = self.options
        ctx = self.context
        if ctx.data is None:
            raise UserError("distill needs training data: give --data FILE.npz (inputs, and 'labels' if any)")
        teacher = Path(o.teacher) if o.teacher else ctx.reference_path
        if teacher is None:
            raise UserError("distill needs a teacher: the pipeline's input model on disk, or distill.teacher")
        student = load_model(o.student) if o.student else model
        if o.student:
            want = sorted(s.name for s in input_specs(model))
            got = sorted(s.name for s in input_specs(student))
            if want != got:
                raise UserError(f"the student {o.student} has inputs {got}, the model has {want}; they must match")
        settings = kd.Settings(
            temperature=o.temperature, alpha=o.alpha, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
            lr_schedule=o.lr_schedule, warmup_epochs=o.warmup_epochs, min_lr_ratio=o.min_lr_ratio,
            weight_decay=o.weight_decay, optimizer=o.optimizer, seed=ctx.seed if o.seed is None else o.seed,
            val_split=o.val_split, patience=o.patience, loss=o.loss, limit=o.samples, timeout=o.timeout,
            trainable=list(o.trainable), frozen=list(o.frozen))
        out = kd.distill(student, teacher, ctx.data, settings, sessions=ctx.sessions,
                         provider=ctx.providers[0], work_dir=ctx.work_dir,
                         checkpoint_dir=Path(o.checkpoint_dir) if o.checkpoint_dir else None, resume=o.resume,
                         progress=ctx.progress)
        for name, array in out.params.items():
            value = student.graph.initializers[name]
            value.const_value = ir.tensor(array, name=name)
        if o.student:
            _replace_contents(model, student)
        self._record(out, teacher, o)
        return ir.passes.PassResult(model, modified=True)

    def _record(self, out: object, teacher: Path, o: DistillOptions) -> None:
        from graphopt.train.kd import Outcome

        assert isinstance(out, Outcome)
        r = out.result
        h = r["history"]
        curve = {k: h[k] for k in ("train_loss", "val_loss", "val_accuracy", "val_agreement") if k in h}
        self.details.update({
            "teacher": str(teacher),
            "student": o.student or "the pipeline's model",
            "backend": out.backend,
            "loss": {"outputs": out.kinds, "alpha": out.alpha, "temperature": o.temperature,
                     "cross_entropy_on_labels": out.use_labels},
            "samples": {"train": r["train_samples"], "validation": r["val_samples"]},
            "trained": {"initializers": len(out.requires_grad), "elements": out.trainable_elements,
                        "batchnorm_statistics_frozen": out.batchnorm_frozen},
            "epochs": {"done": r["epochs_done"], "this_run": r["epochs_run"], "resumed_from": r["start_epoch"],
                       "best": r["best_epoch"]},
            "stopped_early": r["stopped"],
            "seconds_per_epoch": (r["train_seconds"] / r["epochs_run"]) if r["epochs_run"] else None,
            "samples_per_s": r["samples_per_s"],
            "teacher_outputs": "cached" if out.teacher_cached else f"computed in {out.teacher_seconds:.2f} s",
            "training_curve": curve,
            "history": [{k: h[k][i] for k in h} for i in range(len(h.get("epoch", [])))],
        })
        if out.batchnorm_left:
            self.details["batchnorm_trained_with_batch_statistics"] = out.batchnorm_left
