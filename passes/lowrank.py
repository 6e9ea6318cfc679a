"""lowrank: factorize dense weights by truncated SVD, W ≈ A·B, where that saves FLOPs.

A layer that multiplies by a K×N weight costs K·N multiply-adds per output position; the factorized pair
costs r·(K+N). So a layer is only factorized when r < K·N/(K+N) (and by at least ``min_saving``): below
that line the two smaller products are cheaper, above it they would add work. The rank comes from the
fraction of singular-value energy to keep (``energy``: Σ s_i² over the kept values / Σ s_i², so the
relative Frobenius error of the weight is at most sqrt(1 - energy)) or a fixed ``rank_ratio``.

Handled: Gemm with an initializer B (any transA/transB; alpha, beta and the bias go on the second Gemm),
MatMul with a 2-D initializer as its second input (MatMul + Add linear layers; the Add stays), and 1×1 Conv
with group 1 (strides/pads on the first Conv, the bias on the second). The singular values are split
evenly (√S on each side) so both factors have similar ranges, which suits fp16 and quantization after.
A weight shared by several nodes is left alone (factorizing one use would duplicate it).

The report lists each layer's rank, parameters and FLOPs before/after, the weight's relative error and the
layer output's relative error measured on the run's data. Accuracy is usually recovered with ``distill``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.data import input_specs
from graphopt.errors import UserError
from graphopt.names import UniqueNames
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LowrankOptions:
    energy: float | None = opt(None, "Fraction of singular-value energy (sum of squares) to keep per layer; "
                                     "0.95 when neither energy nor rank_ratio is set.",
                               min=0.0, max=1.0, min_exclusive=True)
    rank_ratio: float | None = opt(None, "Fixed rank as a fraction of min(K, N) instead of energy.",
                                   min=0.0, max=1.0, min_exclusive=True)
    min_saving: float = opt(0.1, "Factorize a layer only if it saves at least this fraction of its FLOPs "
                                 "(0 = any saving at all; a layer that would add FLOPs is never factorized).",
                            min=0.0, max=1.0, max_exclusive=True)
    rank_multiple: int = opt(1, "Round ranks up to a multiple of this (8 suits GPU tensor cores).", min=1)
    min_rank: int = opt(1, "Smallest rank to use.", min=1)
    skip: list[str] = opt([], "Layers to leave alone: node or weight names, or regular expressions matching "
                              "the whole name.", regex=True)
    ops: list[str] = opt(["Gemm", "MatMul", "Conv"], "Op types to consider (Conv means 1x1 Conv only).",
                         choices=("Gemm", "MatMul", "Conv"))
    error_samples: int = opt(32, "Samples of the run's data used to measure each layer's output error "
                                 "(0 skips the measurement).", min=0)

    def validate(self) -> None:
        if self.energy is not None and self.rank_ratio is not None:
            raise UserError("options lowrank.energy and lowrank.rank_ratio exclude each other; set one")

    @property
    def kept_energy(self) -> float:
        return 0.95 if self.energy is None and self.rank_ratio is None else (self.energy or 0.0)


@dataclasses.dataclass
class Candidate:
    """One weight that may be factorized, seen as a K×N matrix M with layer output = input · M."""

    node: ir.Node
    weight: ir.Value
    kind: str  # "gemm" | "matmul" | "conv1x1"
    positions: int | None  # output positions per sample (for FLOPs), None when shapes are symbolic

    def matrix(self, dtype: type = np.float64) -> np.ndarray:
        """The weight as the K×N matrix the layer input's rows multiply (read again when needed, not kept)."""
        array = self.weight.const_value.numpy().astype(dtype)
        if self.kind == "conv1x1":
            return array[:, :, 0, 0].T  # [Cin, Cout]
        if self.kind == "gemm" and self.node.attributes.get_int("transB", 0):
            return array.T
        return array


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values hold at least ``energy`` of Σ s²."""
    sq = np.asarray(singular_values, dtype=np.float64) ** 2
    total = sq.sum()
    if total == 0:
        return 1
    cumulative = np.cumsum(sq) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(sq)))


def truncated_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(A [K×r], B [r×N], kept energy fraction) with A·B the best rank-r approximation of ``matrix``."""
    return _split(*np.linalg.svd(matrix, full_matrices=False), rank)


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    root = np.sqrt(s[:rank])
    total = float(np.sum(s**2))
    kept = float(np.sum(s[:rank] ** 2) / total) if total else 1.0
    return u[:, :rank] * root, root[:, None] * vt[:rank], kept


def break_even_rank(k: int, n: int) -> float:
    """Ranks below this make the factorized pair cheaper than the original (r·(K+N) < K·N)."""
    return k * n / (k + n)


def _blas_threads(elements: int) -> contextlib.AbstractContextManager[object]:
    """One BLAS thread for small matrices: there threads cost more than they save, and on a busy machine
    OpenBLAS's spinning threads made a 1024x256 SVD 80x slower (6 s instead of 0.07 s)."""
    if elements > _SMALL_MATRIX:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


#: Matrices up to this many elements are decomposed on one BLAS thread.
_SMALL_MATRIX = 1 << 20

#: Rows of layer input per batch used for the output-error measurement.
_MAX_ROWS = 2048




def _static_positions(shape: ir.Shape | None, drop_last: bool) -> int | None:
    """Output positions per sample from a shape whose only symbolic dimension is the batch."""
    if shape is None or len(shape) < 2:
        return None
    dims = list(shape)[1:-1] if drop_last else list(shape)[2:]
    if not all(isinstance(d, int) for d in dims):
        return None
    return int(math.prod(dims))


@register
class LowrankPass(GraphPass):
    name = "lowrank"
    summary = "Truncated-SVD factorization of Gemm/MatMul weights and 1x1 Conv where it saves FLOPs."
    Options = LowrankOptions
    # Lossy by design (pair with distill); --check-each-pass only catches a broken factorization.
    tolerance = Tolerance(rel=None, min_cosine=0.9)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: LowrankOptions = self.options
        graph = model.graph
        patterns = [re.compile(p) for p in o.skip]
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        plans: list[tuple[Candidate, np.ndarray, np.ndarray, dict[str, Any]]] = []
        for node in list(graph):
            cand, why = self._candidate(node, graph)
            if cand is None:
                if why:
                    skipped.append({"layer": node.name, "op": node.op_type, "reason": why})
                continue
            if any(p.fullmatch(n) for p in patterns for n in (node.name or "", cand.weight.name or "")):
                skipped.append({"layer": node.name, "op": node.op_type, "reason": "skip option"})
                continue
            plan = self._plan(cand)
            if isinstance(plan, str):
                skipped.append({"layer": node.name, "op": node.op_type, "reason": plan})
                continue
            plans.append((cand, *plan))

        if plans and o.error_samples:
            self._measure_output_error(model, plans)
        names = UniqueNames(graph)
        for cand, a, b, row in plans:
            self._replace(graph, cand, a, b, names)
            layers.append(row)
        params_before = sum(r["params_before"] for r in layers)
        params_after = sum(r["params_after"] for r in layers)
        self.details.update({
            "rank_rule": (f"rank_ratio={o.rank_ratio}" if o.rank_ratio is not None else f"energy={o.kept_energy}"),
            "factorized": len(layers),
            "params_removed": params_before - params_after,
            "layers": layers,
            "skipped": skipped,
        })
        logger.info("lowrank: factorized %d layer(s), %d parameters removed", len(layers),
                    params_before - params_after)
        return ir.passes.PassResult(model, modified=bool(layers))

    # -- finding -------------------------------------------------------------------------------------------
    def _candidate(self, node: ir.Node, graph: ir.Graph) -> tuple[Candidate | None, str | None]:
        """A factorizable layer, or (None, reason) for a layer of a handled op that cannot be (None, None)."""
        o: LowrankOptions = self.options
        if node.domain not in ("", "ai.onnx") or node.op_type not in o.ops:
            return None, None
        w_index = 1
        if len(node.inputs) <= w_index or node.inputs[w_index] is None:
            return None, None
        w = node.inputs[w_index]
        tensor = w.const_value
        if tensor is None or not w.is_initializer() or w.is_graph_input():
            return None, "weight is not a constant initializer"
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
            return None, f"weight type {tensor.dtype.name}"
        if len(w.uses()) != 1 or w.is_graph_output():
            return None, "weight is shared"
        shape = tuple(tensor.shape.numpy())
        out = node.outputs[0]
        if node.op_type == "Gemm":
            return Candidate(node, w, "gemm", 1), None
        if node.op_type == "MatMul":
            if len(shape) != 2:
                return None, f"weight is {len(shape)}-D"
            return Candidate(node, w, "matmul", _static_positions(out.shape, drop_last=True) or
                             (1 if out.shape is not None and len(out.shape) == 2 else None)), None
        # Conv
        if len(shape) != 4 or shape[2:] != (1, 1):
            return None, None  # only 1x1 convolutions are in scope; others are not reported
        if node.attributes.get_int("group", 1) != 1:
            return None, "grouped 1x1 Conv"
        return Candidate(node, w, "conv1x1", _static_positions(out.shape, drop_last=False)), None

    def _plan(self, cand: Candidate) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | str:
        o: LowrankOptions = self.options
        matrix = cand.matrix()
        k, n = matrix.shape
        full = min(k, n)
        with _blas_threads(matrix.size):
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        del matrix
        if o.rank_ratio is not None:
            rank = math.ceil(o.rank_ratio * full)
        else:
            rank = rank_for_energy(s, o.kept_energy)
        rank = max(rank, o.min_rank)
        rank = min(math.ceil(rank / o.rank_multiple) * o.rank_multiple, full)
        saving = 1.0 - rank * (k + n) / (k * n)
        if rank >= break_even_rank(k, n):
            return f"rank {rank} of {k}x{n} would add FLOPs (break-even rank {break_even_rank(k, n):.1f})"
        if saving < o.min_saving:
            return f"rank {rank} of {k}x{n} saves {saving:.1%} of FLOPs (< min_saving {o.min_saving:g})"
        a, b, kept = _split(u, s, vt, rank)
        a, b = a.astype(np.float32), b.astype(np.float32)  # the model stores float32 (or less) anyway
        per_position = (k * n, rank * (k + n))
        flops = None if cand.positions is None else [2 * cand.positions * p for p in per_position]
        row = {
            "layer": cand.node.name, "op": cand.node.op_type, "weight": cand.weight.name, "shape": f"{k}x{n}",
            "rank": rank, "full_rank": full, "energy_kept": round(kept, 6),
            "params_before": k * n, "params_after": rank * (k + n),
            "flops_before": flops[0] if flops else None, "flops_after": flops[1] if flops else None,
            "flops_saving": round(saving, 4),
            "weight_rel_error": round(math.sqrt(max(0.0, 1.0 - kept)), 6),
            "output_rel_error": None,
        }
        return a, b, row

    # -- measuring -----------------------------------------------------------------------------------------
    def _measure_output_error(self, model: ir.Model, plans: list[tuple[Candidate, np.ndarray, np.ndarray,
                                                                      dict[str, Any]]]) -> None:
        """Relative error ||X·M - X·A·B|| / ||X·M|| of each layer on its real input activations X."""
        ctx = self.context
        if ctx.data is None or ctx.sessions is None:
            return
        graph = model.graph
        graph_inputs = {v.name for v in graph.inputs}
        extra = []
        for cand, *_ in plans:
            x = cand.node.inputs[0]
            if x is not None and x.name not in graph_inputs and not x.is_graph_output() and x not in extra:
                extra.append(x)
        sums = {id(c): [0.0, 0.0] for c, *_ in plans}
        residuals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        graph.outputs.extend(extra)
        try:
            session = ctx.sessions.session(model, ctx.providers[0])
            names = [v.name for v in graph.outputs]
            for batch in ctx.data.batches(batch_size=ctx.batch_size, limit=self.options.error_samples,
                                          specs=input_specs(model)):
                values = dict(zip(names, session.run(names, batch.inputs))) | batch.inputs
                with _blas_threads(max(a.shape[0] * b.shape[1] for _, a, b, _ in plans)):
                    self._accumulate(plans, values, sums, residuals)
        except Exception as exc:  # a measurement, not the transformation: report and go on
            logger.warning("lowrank: could not measure layer output errors: %s", exc)
            return
        finally:
            for _ in extra:
                graph.outputs.pop()
        for cand, _, _, row in plans:
            err, ref = sums[id(cand)]
            row["output_rel_error"] = round(math.sqrt(err / ref), 6) if ref > 0 else None

    def _accumulate(self, plans: list[tuple[Candidate, np.ndarray, np.ndarray, dict[str, Any]]],
                    values: dict[str, np.ndarray], sums: dict[int, list[float]],
                    residuals: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        for cand, a, b, _ in plans:
            x = values.get(cand.node.inputs[0].name)
            if x is None:
                continue
            x = self._as_rows(np.asarray(x, dtype=np.float32), cand)
            if len(x) > _MAX_ROWS:  # positions of one sample are alike; a spread subset is enough
                x = x[np.linspace(0, len(x) - 1, _MAX_ROWS).astype(np.int64)]
            if id(cand) not in residuals:
                matrix = cand.matrix(np.float32)
                residuals[id(cand)] = (matrix, matrix - a @ b)
            matrix, residual = residuals[id(cand)]
            ref = x @ matrix
            sums[id(cand)][0] += float(np.sum(np.square(x @ residual, dtype=np.float64)))
            sums[id(cand)][1] += float(np.sum(np.square(ref, dtype=np.float64)))

    def _as_rows(self, x: np.ndarray, cand: Candidate) -> np.ndarray:
        """The layer input as rows that multiply the K×N matrix (NCHW channels moved last for Conv)."""
        if cand.kind == "conv1x1":
            strides = cand.node.attributes.get_ints("strides", [1, 1])
            x = x[:, :, :: strides[0], :: strides[1]]
            return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        if cand.kind == "gemm" and cand.node.attributes.get_int("transA", 0):
            x = x.T
        return x.reshape(-1, x.shape[-1])

    # -- rewriting -----------------------------------------------------------------------------------------
    def _replace(self, graph: ir.Graph, cand: Candidate, a: np.ndarray, b: np.ndarray, names: UniqueNames) -> None:
        node, w = cand.node, cand.weight
        dtype = w.const_value.dtype
        np_dtype = w.const_value.numpy().dtype
        base = node.name or w.name or "lowrank"

        def initializer(array: np.ndarray, suffix: str) -> ir.Value:
            value = ir.Value(name=names(f"{w.name}.{suffix}"), type=ir.TensorType(dtype),
                             shape=ir.Shape(array.shape), const_value=ir.tensor(array.astype(np_dtype)))
            graph.register_initializer(value)
            return value

        x = node.inputs[0]
        mid = ir.Value(name=names(f"{base}_lowrank"))
        if cand.kind == "gemm":
            trans_b = node.attributes.get_int("transB", 0)
            first_w = initializer(a.T if trans_b else a, "lowrank_a")
            second_w = initializer(b.T if trans_b else b, "lowrank_b")
            first = ir.node("Gemm", [x, first_w], {"transA": node.attributes.get_int("transA", 0),
                                                   "transB": trans_b},
                            outputs=[mid], name=names(f"{base}_lowrank_a"))
            attrs = {"transB": trans_b, "alpha": node.attributes.get_float("alpha", 1.0),
                     "beta": node.attributes.get_float("beta", 1.0)}
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            second = ir.node("Gemm", [mid, second_w] + ([bias] if bias is not None else []), attrs,
                             name=names(f"{base}_lowrank_b"))
        elif cand.kind == "matmul":
            first = ir.node("MatMul", [x, initializer(a, "lowrank_a")], outputs=[mid],
                            name=names(f"{base}_lowrank_a"))
            second = ir.node("MatMul", [mid, initializer(b, "lowrank_b")], name=names(f"{base}_lowrank_b"))
        else:  # 1x1 conv: y = M^T x per position; first conv maps Cin -> r, second r -> Cout
            first_w = initializer(a.T[:, :, None, None], "lowrank_a")
            second_w = initializer(b.T[:, :, None, None], "lowrank_b")
            keep = {k: attr.value for k, attr in node.attributes.items() if k != "group"}
            first = ir.node("Conv", [x, first_w], keep, outputs=[mid], name=names(f"{base}_lowrank_a"))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            second = ir.node("Conv", [mid, second_w] + ([bias] if bias is not None else []),
                             {"kernel_shape": [1, 1]}, name=names(f"{base}_lowrank_b"))
        out = node.outputs[0]
        second.outputs[0].name = names(f"{out.name}_lowrank")
        second.outputs[0].type = out.type
        second.outputs[0].shape = out.shape
        graph.insert_after(node, [first, second])
        if out.is_graph_output():
            new = second.outputs[0]
            name = out.name
            out.name = names(f"{name}_replaced")
            new.name = name
            for i, v in enumerate(graph.outputs):
                if v is out:
                    graph.outputs[i] = new
        out.replace_all_uses_with(second.outputs[0])
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(w.name)
