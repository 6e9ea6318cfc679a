"""cleanup: the model as the exporter meant it, without the leftovers.

The same sequence as ``onnxscript.optimizer.optimize`` (inlining, constant folding, onnxscript's default
rewrite rules, dead-code and unused initializer/function/opset removal, initializer deduplication, common
subexpression elimination), plus onnx_ir's identity elimination. It is composed here rather than called
because onnxscript's default rules always fold BatchNormalization into the Conv/Gemm before it, and that
must be an option: quantization wants it folded, distillation wants BatchNorm kept trainable.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.rewriter
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.rewriter.rules.common import _fuse_batchnorm

from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register
from graphopt.stats import op_histogram


@dataclasses.dataclass
class CleanupOptions:
    fold_batchnorm: bool = opt(True, "Fold BatchNormalization into the Conv/ConvTranspose/Gemm before it.")
    iterations: int = opt(2, "Rounds of folding and rewriting (stops early when nothing changes).", min=1)
    fold_size_limit: int = opt(8192, "Largest tensor (elements) constant folding may create.", min=0)


def rewrite_rules(fold_batchnorm: bool) -> list[onnxscript.rewriter.RewriteRule]:
    bn = set(map(id, _fuse_batchnorm.rules))
    return [r for r in onnxscript.rewriter._DEFAULT_REWRITE_RULES if fold_batchnorm or id(r) not in bn]  # noqa: SLF001


@register
class CleanupPass(GraphPass):
    name = "cleanup"
    summary = "Constant folding, dead code, unused initializers, CSE, identity removal, BatchNorm folding."
    Options = CleanupOptions
    tolerance = Tolerance(rel=1e-4)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: CleanupOptions = self.options
        before = op_histogram(model)
        sequence = ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager(
                [FoldConstantsPass(shape_inference=True, input_size_limit=o.fold_size_limit,
                                   output_size_limit=o.fold_size_limit),
                 onnxscript.rewriter.RewritePass(rewrite_rules(o.fold_batchnorm)),
                 common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                 common.RemoveUnusedOpsetsPass()],
                steps=o.iterations, early_stop=True),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.LiftSubgraphInitializersToMainGraphPass(),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.OutputFixPass(),
            common.NameFixPass(),
        )
        sequence(model)
        after = op_histogram(model)
        changed = {op: after.get(op, 0) - before.get(op, 0) for op in sorted(set(before) | set(after))
                   if after.get(op, 0) != before.get(op, 0)}
        self.details["op_changes"] = changed
        return ir.passes.PassResult(model, modified=bool(changed))
