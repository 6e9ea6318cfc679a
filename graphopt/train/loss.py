"""The distillation loss: an onnxblock built on top of the student graph, and its numpy reference.

For a classification output (logits, rank 2):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(the CE term only when there are labels and alpha < 1; T^2 keeps the soft term's gradients on the scale of
the hard term's as T changes, as in Hinton et al.); for any other output, the mean squared error between
the student's and the teacher's. Several outputs add up. The teacher's outputs are graph inputs of the
training model (``graphopt_teacher_<i>``), computed once outside training.

This module runs inside the training environment: it may import only numpy, onnx and onnxruntime.training
(no graphopt), and only inside the functions that build graphs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

TEACHER_INPUT = "graphopt_teacher_{index}"
LABELS_INPUT = "graphopt_labels"


def teacher_input_name(index: int) -> str:
    return TEACHER_INPUT.format(index=index)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_loss(students: Sequence[np.ndarray], teachers: Sequence[np.ndarray], kinds: Sequence[str],
                   labels: np.ndarray | None, temperature: float, alpha: float) -> dict[str, float]:
    """The loss in float64 numpy, term by term: what the ONNX graph must compute."""
    total = kl_sum = ce_sum = mse_sum = 0.0
    ce_done = False
    for s, t, kind in zip(students, teachers, kinds):
        if kind == "kd":
            log_ps = _log_softmax(s / temperature)
            log_pt = _log_softmax(t / temperature)
            kl = float(np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)))
            kl_sum += kl
            total += alpha * temperature ** 2 * kl
            if labels is not None and alpha < 1.0 and not ce_done:
                ce = float(-np.mean(_log_softmax(s)[np.arange(len(labels)), labels.astype(np.int64)]))
                ce_sum += ce
                total += (1.0 - alpha) * ce
                ce_done = True
        else:
            mse = float(np.mean((s.astype(np.float64) - t.astype(np.float64)) ** 2))
            mse_sum += mse
            total += mse
    return {"loss": total, "kl": kl_sum, "ce": ce_sum, "mse": mse_sum}


def build_loss_block(kinds: Sequence[str], *, temperature: float, alpha: float, use_labels: bool,
                     opset: int, l2_params: Sequence[str] = (), l2: float = 0.0) -> Any:
    """An onnxblock.Block computing the loss over the base model's outputs (in graph-output order).

    ``block.components`` names the loss terms the block also exposes (for logging), in the order
    kl, ce, mse (only the ones that exist). ``l2`` adds ``l2/2 * sum(p^2)`` over ``l2_params`` (weight decay
    for SGD, whose ORT optimizer has none).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    def const(graph: Any, value: Any, dtype: Any, token: str) -> str:
        name = _graph_utils.generate_graph_name(f"graphopt.{token}")
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    class DistillLoss(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self.components: list[str] = []

        def _node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
            outs = [_graph_utils.generate_graph_name(f"graphopt.{op}") for _ in range(n_out)]
            self.base.graph.node.append(helper.make_node(op, inputs, outs, name=outs[0] + ".node", **attrs))
            return outs

        def _reduce_sum_last(self, x: str) -> str:
            if opset >= 13:
                axes = const(self.base.graph, [-1], np.int64, "axes")
                return self._node("ReduceSum", [x, axes], keepdims=0)[0]
            return self._node("ReduceSum", [x], axes=[-1], keepdims=0)[0]

        def _mean_all(self, x: str) -> str:
            return self._node("ReduceMean", [x], keepdims=0)[0]

        def _add_input_like(self, output_name: str, name: str, elem_type: int | None = None,
                            drop_last_dim: bool = False) -> None:
            like = copy.deepcopy(_graph_utils.get_output_from_output_name(self.base, output_name))
            like.name = name
            if hasattr(like, "metadata_props"):
                del like.metadata_props[:]
            if elem_type is not None:
                like.type.tensor_type.elem_type = elem_type
            if drop_last_dim and like.type.tensor_type.HasField("shape"):
                del like.type.tensor_type.shape.dim[-1]
            self.base.graph.input.append(like)

        def build(self, *output_names: str) -> str:  # noqa: C901  (one graph, built term by term)
            g = self.base.graph
            kl_terms: list[str] = []
            ce_terms: list[str] = []
            mse_terms: list[str] = []
            temp = const(g, temperature, np.float32, "temperature")
            for index, (out, kind) in enumerate(zip(output_names, kinds)):
                teacher = teacher_input_name(index)
                self._add_input_like(out, teacher)
                if kind == "kd":
                    (s,) = self._node("Div", [out, temp])
                    (log_ps,) = self._node("LogSoftmax", [s], axis=-1)
                    (t,) = self._node("Div", [teacher, temp])
                    (log_pt,) = self._node("LogSoftmax", [t], axis=-1)
                    (pt,) = self._node("Exp", [log_pt])
                    (diff,) = self._node("Sub", [log_pt, log_ps])
                    (prod,) = self._node("Mul", [pt, diff])
                    kl_terms.append(self._mean_all(self._reduce_sum_last(prod)))
                    if use_labels and not ce_terms:
                        self._add_input_like(out, LABELS_INPUT, TensorProto.INT64, drop_last_dim=True)
                        # ORT's training graph needs both outputs of SoftmaxCrossEntropyLoss.
                        ce, _log_prob = self._node("SoftmaxCrossEntropyLoss", [out, LABELS_INPUT], 2,
                                                   reduction="mean")
                        ce_terms.append(ce)
                else:
                    (d,) = self._node("Sub", [out, teacher])
                    (sq,) = self._node("Mul", [d, d])
                    mse_terms.append(self._mean_all(sq))
            terms: list[str] = []

            def total(parts: list[str]) -> str:
                acc = parts[0]
                for p in parts[1:]:
                    (acc,) = self._node("Add", [acc, p])
                return acc

            if kl_terms:
                kl = total(kl_terms)
                self.components.append(kl)
                terms.append(self._node("Mul", [kl, const(g, alpha * temperature ** 2, np.float32, "kd_w")])[0])
            if ce_terms:
                self.components.append(ce_terms[0])
                terms.append(self._node("Mul", [ce_terms[0], const(g, 1.0 - alpha, np.float32, "ce_w")])[0])
            if mse_terms:
                mse = total(mse_terms)
                self.components.append(mse)
                terms.append(mse)
            if l2 > 0 and l2_params:
                squares = []
                for p in l2_params:
                    (sq,) = self._node("Mul", [p, p])
                    squares.append(self._node("ReduceSum", [sq], keepdims=0)[0])
                terms.append(self._node("Mul", [total(squares), const(g, l2 / 2.0, np.float32, "l2_w")])[0])
            loss = total(terms)
            (loss,) = self._node("Identity", [loss])
            return loss

    del onnx  # imported to fail early here when onnx is missing
    return DistillLoss()
