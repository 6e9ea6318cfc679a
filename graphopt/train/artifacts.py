"""Build the training artifacts (training, eval and optimizer graphs, first checkpoint) with onnxblock.

Runs inside the training environment (numpy, onnx, onnxruntime.training; no graphopt). The student file it
gets is already prepared by ``graphopt.train.prepare`` (IR version <= 10, BatchNorm statistics folded into
constants, trainable parameters chosen); this module adds the loss and the optimizer and works around what
onnxblock leaves behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__:  # in-process, as graphopt.train.artifacts
    from . import loss as _loss
else:  # in the training environment's worker, imported from beside worker.py
    import loss as _loss  # type: ignore[no-redef]

#: Names of the loss terms the training and eval graphs also output (for the progress and the curves).
COMPONENT_KL = "graphopt_loss_kl"
COMPONENT_CE = "graphopt_loss_ce"
COMPONENT_MSE = "graphopt_loss_mse"
MAX_IR_VERSION = 10  # the newest IR version onnxruntime-training 1.19.2 loads


def component_names(kinds: Sequence[str], use_labels: bool) -> list[str]:
    names = []
    if "kd" in kinds:
        names.append(COMPONENT_KL)
        if use_labels:
            names.append(COMPONENT_CE)
    if "mse" in kinds:
        names.append(COMPONENT_MSE)
    return names


@dataclasses.dataclass(frozen=True)
class Artifacts:
    training: Path
    eval: Path
    optimizer: Path
    checkpoint: Path

    @classmethod
    def at(cls, folder: Path) -> Artifacts:
        return cls(folder / "training_model.onnx", folder / "eval_model.onnx", folder / "optimizer_model.onnx",
                   folder / "checkpoint")

    def exist(self) -> bool:
        return all(p.exists() for p in (self.training, self.eval, self.optimizer, self.checkpoint))


@contextlib.contextmanager
def stderr_to(log: Path) -> Iterator[None]:
    """Send file descriptor 2 to ``log``: ORT's graph builders print hundreds of INFO lines there."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _trim_eval_batchnorm(path: Path) -> None:
    """onnxblock's eval model turns training-mode BatchNorm off but keeps its 3 outputs, which is invalid."""
    import onnx

    model = onnx.load(str(path))
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    changed = False
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            if not any(o and o in used for o in node.output[1:]):
                del node.output[1:]
                changed = True
    if changed:
        onnx.save(model, str(path))


def generate(student: Path, folder: Path, *, kinds: Sequence[str], requires_grad: Sequence[str],
             temperature: float, alpha: float, use_labels: bool, optimizer: str, weight_decay: float,
             log: Path) -> Artifacts:
    import onnx
    from onnxruntime.training import artifacts as ort_artifacts
    from onnxruntime.training import onnxblock

    model = onnx.load(str(student))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    output_names = [o.name for o in model.graph.output]
    if len(kinds) != len(output_names):
        raise ValueError(f"{len(kinds)} loss kinds for {len(output_names)} outputs")
    l2 = weight_decay if optimizer == "sgd" else 0.0
    block = _loss.build_loss_block(kinds, temperature=temperature, alpha=alpha, use_labels=use_labels,
                                       opset=opset, l2_params=list(requires_grad), l2=l2)
    components = component_names(kinds, use_labels)

    class _WithComponents(onnxblock.Block):
        """The loss block, plus Identity nodes giving its terms fixed names the worker can ask for."""

        def build(self, *outs: str) -> str:
            from onnx import helper

            loss = block(*outs)
            for src, dst in zip(block.components, components):
                self.base.graph.node.append(helper.make_node("Identity", [src], [dst], name=dst + ".node"))
            return loss

    if optimizer == "adamw":
        optim: object = onnxblock.optim.AdamW(weight_decay=weight_decay)
    else:
        optim = onnxblock.optim.SGD()
    folder.mkdir(parents=True, exist_ok=True)
    with stderr_to(log):
        ort_artifacts.generate_artifacts(
            model, requires_grad=list(requires_grad), frozen_params=[], loss=_WithComponents(),
            optimizer=optim, artifact_directory=str(folder),
            additional_output_names=output_names + components)
    arts = Artifacts.at(folder)
    _trim_eval_batchnorm(arts.eval)
    return arts
