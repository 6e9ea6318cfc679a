"""quant: int8 (and int4 weight-only) quantization that ONNX Runtime runs as integer kernels.

``static`` (default) inserts QuantizeLinear/DequantizeLinear pairs with scales from streaming calibration
(see ``graphopt.calibrate``), placed so ORT's QDQ fusions turn every quantized Conv/MatMul/Gemm into an
int8 kernel; ``dynamic`` quantizes MatMul/Gemm weights and lets activations be quantized at run time
(DynamicQuantizeLinear + MatMulInteger, fused by ORT into DynamicQuantizeMatMul); ``weight_only`` stores
MatMul/Gemm weights block-wise in 4 or 8 bits (MatMulNBits, or DequantizeLinear with a block size).

The pass prepares the graph itself (constant and BatchNorm folding, Identity removal, shape inference),
so no separate pre-processing step is needed. With ``target_drop`` it ranks layers by how much
quantizing each one alone disturbs its output and keeps the most sensitive ones in float until the
accuracy budget holds, reusing the calibration statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphopt import calibrate
from graphopt.errors import UserError
from graphopt.options import opt
from graphopt.registry import GraphPass, Tolerance, register

from ._quant_plan import COMPUTE_OPS, Selection, preprocess, quantized_op_counts

logger = logging.getLogger(__name__)

ACTIVATION_TYPES = ("uint8", "int8", "uint16", "int16")
WEIGHT_TYPES = ("int8", "uint8", "int4", "uint4")


@dataclasses.dataclass
class QuantOptions:
    mode: str = opt("static", "static: QDQ with calibrated activation scales | dynamic: int8 weights, "
                    "activations quantized at run time (MatMul/Gemm) | weight_only: block-wise int4/int8 "
                    "MatMul/Gemm weights", choices=("static", "dynamic", "weight_only"))
    calibration: str = opt("minmax", "How activation ranges come from the calibration data (static mode): "
                           "minmax | percentile | entropy (KL divergence) | mse", choices=calibrate.METHODS)
    percentile: float = opt(99.999, "Percent of values kept inside the range (calibration=percentile).",
                            min=50.0, max=100.0)
    bins: int | None = opt(None, "Histogram bins per sign for percentile/entropy/mse (default: 8192 for "
                           "entropy, 2048 otherwise).", min=16, max=1 << 16)
    calib_batches: int | None = opt(None, "Calibration batches to use (default: all the data).", min=1)
    calib_batch_size: int | None = opt(None, "Rows per calibration batch (default: as many as fit in "
                                       "~32 MB of observed activations, at most the run's batch size).", min=1)
    activation_type: str = opt("uint8", "Activation integer type (static mode).", choices=ACTIVATION_TYPES)
    weight_type: str | None = opt(None, "Weight integer type: int8 (static/dynamic default), uint8, int4 "
                                  "(weight_only default), uint4.", choices=WEIGHT_TYPES)
    symmetric_activations: bool = opt(False, "Zero point fixed mid-range for activations (disables Relu "
                                      "absorption).")
    symmetric_weights: bool = opt(True, "Zero point 0 for weights (ORT's fastest int8 kernels need it).")
    per_channel: bool = opt(True, "One weight scale per output channel (Conv axis 0, ConvTranspose axis 1, "
                            "Gemm axis 0 if transB else 1, MatMul axis 1).")
    reduce_range: bool = opt(False, "7-bit weights (for CPUs without VNNI, where u8 x s8 products can "
                             "saturate).")
    op_types: list[str] | None = opt(None, "Compute ops to quantize (default: Conv, MatMul, Gemm for static; "
                                     "MatMul, Gemm for dynamic; MatMul for weight_only, like ORT's MatMulNBits "
                                     "quantizer, which keeps a final Gemm classifier in float).", choices=COMPUTE_OPS)
    exclude_nodes: list[str] = opt([], "Node names to keep in float.")
    exclude_op_types: list[str] = opt([], "Op types to keep in float (also stops int8 Add, MaxPool, ...).")
    exclude_regex: list[str] = opt([], "Regular expressions; nodes whose name matches stay in float.",
                                  regex=True)
    keep_first: bool = opt(False, "Keep the first quantizable layer in float.")
    keep_last: bool = opt(False, "Keep the last quantizable layer in float.")
    matmul_activations: bool = opt(True, "Also quantize MatMuls whose two inputs are activations (attention).")
    neighbours: bool = opt(True, "Run the ops between int8 layers in int8 too (Add, MaxPool, "
                           "GlobalAveragePool, Concat, Reshape, ...), as ORT's fusions expect.")
    stem_space_to_depth: bool = opt(True, "static: rewrite stride-2 Convs with <= 4 input channels and kernels >= 5 "
                                    "(ImageNet stems) as SpaceToDepth + stride-1 Conv on 4x the channels: exact, "
                                    "and ORT's int8 Conv runs it ~30% faster.")
    target_drop: float | None = opt(None, "Accuracy budget in points (accuracy with labels, else top-1 "
                                    "agreement with float); keeps the most sensitive layers in float until met "
                                    "(static mode).", min=0.0)
    max_float_layers: int | None = opt(None, "At most this many layers kept in float by target_drop "
                                       "(default: all but one).", min=0)
    eval_data: str | None = opt(None, "Data for target_drop's accuracy checks (.npz, folder or "
                                "module:function; default: the run's data).")
    eval_samples: int = opt(512, "Samples per target_drop accuracy check.", min=1)
    block_size: int = opt(32, "weight_only: weights per scale along K.", choices=(16, 32, 64, 128, 256))
    weight_only_format: str = opt("matmulnbits", "weight_only: com.microsoft MatMulNBits, or qdq "
                                  "(DequantizeLinear with block_size, opset 21; int4 only).",
                                  choices=("matmulnbits", "qdq"))
    accuracy_level: int = opt(0, "weight_only MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, "
                              "4 int8 compute).", choices=(0, 1, 2, 3, 4))

    def resolved_weight_type(self) -> str:
        if self.weight_type is not None:
            return self.weight_type
        return "int4" if self.mode == "weight_only" else "int8"

    def validate(self) -> None:
        wt = self.resolved_weight_type()
        if self.mode != "weight_only" and wt in ("int4", "uint4"):
            raise UserError(f"quant.weight_type={wt} needs quant.mode=weight_only (int4 kernels exist only "
                            "for weight-only MatMul); use int8 or uint8")
        if self.mode == "weight_only" and wt not in ("int4", "uint4", "int8", "uint8"):
            raise UserError("quant.mode=weight_only takes weight_type int4, uint4, int8 or uint8")
        if self.mode != "static":
            if self.calibration != "minmax":
                raise UserError(f"quant.calibration={self.calibration} sets activation ranges, which "
                                f"quant.mode={self.mode} does not calibrate; use mode=static or drop the option")
            if self.target_drop is not None:
                raise UserError(f"quant.target_drop works with mode=static, not mode={self.mode}")
            if self.activation_type != "uint8" or self.symmetric_activations:
                raise UserError(f"activation type/symmetry are static-mode options; mode={self.mode} "
                                "quantizes activations as uint8 at run time" if self.mode == "dynamic" else
                                "mode=weight_only keeps activations in float; drop the activation options")
            if self.op_types and {"Conv", "ConvTranspose"} & set(self.op_types):
                raise UserError(f"quant.mode={self.mode} quantizes MatMul and Gemm only; Conv needs mode=static")
        if self.mode == "weight_only" and self.weight_only_format == "qdq" and wt not in ("int4", "uint4"):
            raise UserError("quant.weight_only_format=qdq is int4/uint4 only (ORT makes MatMulNBits from "
                            "4-bit DequantizeLinear); use weight_only_format=matmulnbits for 8 bits")
        if self.activation_type in ("uint16", "int16") and self.mode == "static":
            logger.info("16-bit activations: ORT has no 16-bit QLinearConv/MatMul; layers run as float on "
                        "dequantized values")

    def resolved_op_types(self) -> tuple[str, ...]:
        if self.op_types:
            return tuple(self.op_types)
        return {"static": ("Conv", "MatMul", "Gemm"), "dynamic": ("MatMul", "Gemm"),
                "weight_only": ("MatMul",)}[self.mode]

    def selection(self, keep_float: frozenset[str] = frozenset()) -> Selection:
        ops = self.resolved_op_types()
        return Selection(op_types=ops, exclude_nodes=frozenset(self.exclude_nodes),
                         exclude_op_types=frozenset(self.exclude_op_types), exclude_regex=tuple(self.exclude_regex),
                         keep_first=self.keep_first, keep_last=self.keep_last,
                         matmul_activations=self.matmul_activations and self.mode == "static",
                         keep_float=keep_float)


def _candidates(model: ir.Model, sel: Selection) -> int:
    """Nodes of the selected op types not excluded by name: is there anything to quantize at all?"""
    return sum(1 for n in model.graph if n.op_type in sel.op_types and sel.excluded(n) is None)


@register
class QuantPass(GraphPass):
    name = "quant"
    summary = "Int8 QDQ quantization (static, streaming calibration), dynamic int8, weight-only int4/int8."
    Options = QuantOptions
    tolerance = Tolerance(rel=None, min_cosine=0.98)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o: QuantOptions = self.options
        existing = quantized_op_counts(model)
        if existing:
            found = ", ".join(f"{v} {k}" for k, v in sorted(existing.items()))
            self.details["message"] = f"model is already quantized ({found}); left unchanged"
            return ir.passes.PassResult(model, modified=False)
        if not _candidates(model, o.selection()):
            self.details["message"] = (f"nothing to quantize: no {', '.join(o.selection().op_types)} node "
                                       "outside the exclusions; left unchanged")
            return ir.passes.PassResult(model, modified=False)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 13:
            raise UserError(f"quant needs ONNX opset >= 13 (per-channel DequantizeLinear); the model has opset "
                            f"{opset}; convert it first (e.g. onnx.version_converter)")
        t0 = time.perf_counter()
        self.details["preprocess"] = preprocess(model, self.context)
        self.details["preprocess"]["seconds"] = round(time.perf_counter() - t0, 3)
        if o.mode == "static":
            from ._quant_static import run_static

            run_static(self, model)
        else:
            from ._quant_modes import run_dynamic, run_weight_only

            run_dynamic(self, model) if o.mode == "dynamic" else run_weight_only(self, model)
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)  # preprocessing alone rewrites the graph
