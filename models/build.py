"""Build the reference ONNX models that graphopt is tested and benchmarked on.

Run as::

    .venv/bin/python models/build.py --out models/build [--only NAME[,NAME]]

Four models are produced, each for a different reason:

``digits_mlp``
    A small MLP (64-128-64-10) trained on scikit-learn's ``load_digits`` (1,797
    real 8x8 handwritten digits).  It exists so that optimizations can be
    checked against *real-data accuracy*, not just output closeness: the test
    split gives a torch accuracy and an ONNX Runtime accuracy, and an optimized
    graph must keep the latter.  Its calibration split is meant for
    calibration-based passes (e.g. quantization).
``digits_cnn``
    A small Conv/BatchNorm/ReLU/MaxPool/Flatten/Gemm network trained on the same
    data.  It carries the classic rewrite targets (Conv+BatchNormalization
    folding, Conv+Relu, Flatten into Gemm) while still having a real accuracy
    number to protect.
``resnet_small``
    A ResNet-18-style network (BasicBlock, layers [2, 2, 2, 2], 224x224 input)
    with fixed random weights and deliberately non-trivial BatchNorm statistics.
    It exists to give a *realistic convolutional op mix and size* (11.7 M
    parameters, ~1.8 GFLOP per image) for speed measurements; it has no labels.
``transformer_small``
    A 4-layer hand-written pre-LN transformer encoder (explicit q/k/v
    projections, 4 heads of 64, MatMul/Softmax attention, GELU FFN, LayerNorm,
    sequence length 128) with fixed random weights.  It exists to give a
    *realistic transformer op mix* (MatMul, Reshape/Transpose, Softmax,
    LayerNormalization, Erf-based GELU, Gather) for speed measurements; no labels.

Every model is exported with the dynamo-based ``torch.onnx.export`` (opset 18,
weights embedded, dynamic batch dimension), checked with onnxruntime against
torch at batch 1 and batch 3 (atol 1e-4), and written atomically (temp file +
``os.replace``).  A ``manifest.json`` describes the outputs.  Everything is
seeded, so re-running produces identical weights and data files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OPSET = 18
ATOL = 1e-4
MAX_BATCH = 4096
NUM_THREADS = 2
MODEL_NAMES: tuple[str, ...] = ("digits_mlp", "digits_cnn", "resnet_small", "transformer_small")

# Quiet, known-harmless exporter chatter: torchlib registers torchvision ops only if
# torchvision is importable, and torch.export's pytree emits a FutureWarning.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)


# --------------------------------------------------------------------------- #
# Determinism and atomic file helpers
# --------------------------------------------------------------------------- #


def set_determinism(seed: int) -> None:
    """Seed torch and pin it to deterministic, few-threaded CPU execution."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(NUM_THREADS)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and ``os.replace``."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays as an ``.npz`` readable by ``np.load``, byte-reproducibly.

    ``np.savez`` stamps the current time into the zip entries; this writes the
    same format with a fixed timestamp so repeated runs give identical bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DigitsSplit:
    """The deterministic train / calibration / test split of ``load_digits``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> DigitsSplit:
    """Test = 30 % of all (stratified), calibration = 200 of the rest, train = remainder."""
    data = load_digits()
    x = (data.data.astype(np.float32) / np.float32(16.0)).astype(np.float32)  # [1797, 64] in [0, 1]
    y = data.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=200, stratify=y_rest, random_state=0
    )
    return DigitsSplit(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_calib=np.ascontiguousarray(x_calib),
        y_calib=np.ascontiguousarray(y_calib),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
    )


# --------------------------------------------------------------------------- #
# Architectures
# --------------------------------------------------------------------------- #


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(x))
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetSmall(nn.Module):
    """ResNet-18 layout: 7x7/2 stem + maxpool, BasicBlock x [2, 2, 2, 2], GAP, FC."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        in_ch = 64
        stages: list[nn.Sequential] = []
        for i, (width, n) in enumerate(zip(widths, layers)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def init_resnet(model: ResNetSmall, gen: torch.Generator) -> None:
    """Kaiming conv weights and random-but-plausible BatchNorm parameters/statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out explicitly (no SDPA)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self._split(self.q(x))
        k = self._split(self.k(x))
        v = self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)  # [B, H, T, D]
        ctx = ctx.transpose(1, 2).reshape(b, t, c)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: x + Attn(LN(x)); x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerSmall(nn.Module):
    def __init__(
        self,
        vocab: int = 1000,
        seq_len: int = 128,
        hidden: int = 256,
        heads: int = 4,
        ffn: int = 1024,
        num_layers: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, hidden))
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids) + self.pos_emb
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x).mean(dim=1)
        return self.classifier(x)


def init_transformer(model: TransformerSmall, gen: torch.Generator) -> None:
    with torch.no_grad():
        model.tok_emb.weight.normal_(0.0, 0.02 * 25, generator=gen)  # ~N(0, 0.5)
        model.pos_emb.normal_(0.0, 0.1, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=gen)
                m.bias.normal_(0.0, 0.02, generator=gen)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.normalized_shape, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.normalized_shape, generator=gen) * 0.05)


# --------------------------------------------------------------------------- #
# Training (digits)
# --------------------------------------------------------------------------- #


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


# --------------------------------------------------------------------------- #
# Export and verification
# --------------------------------------------------------------------------- #


@dataclass
class ExportInfo:
    proto: onnx.ModelProto
    exporter: str
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _default_optimizer_without_bn_fusion() -> Iterator[None]:
    """Run the exporter's default onnxscript optimizer, minus BatchNorm folding.

    ``torch.onnx.export(..., optimize=True)`` calls ``onnxscript.optimizer.optimize_ir``,
    whose default rewrite rules fold ``BatchNormalization`` into the preceding
    Conv/Gemm.  The reference models must keep their BatchNormalization nodes
    (folding them is graphopt's job), so the three public batchnorm-fusion rules
    are filtered out of ``onnxscript.rewriter._DEFAULT_REWRITE_RULES`` while the
    export runs.  Everything else (constant folding, shape materialisation,
    no-op removal, ...) stays exactly as the exporter does it by default.
    """
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    bn_rules = (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )
    original = rewriter._DEFAULT_REWRITE_RULES
    filtered = tuple(r for r in original if not any(r is b for b in bn_rules))
    if len(original) - len(filtered) != len(bn_rules):
        raise LookupError("could not locate onnxscript's batchnorm fusion rules")
    rewriter._DEFAULT_REWRITE_RULES = filtered
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = original


def _dynamo_export(
    model: nn.Module, example: torch.Tensor, input_name: str, output_name: str, optimize: bool
) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        external_data=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=({0: batch},),
        optimize=optimize,
        verbose=False,
    )
    assert program is not None
    return program.model_proto


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_name: str = "logits",
) -> ExportInfo:
    """Export with the dynamo exporter (dynamic batch); fall back to TorchScript."""
    model.eval()
    notes: list[str] = []
    proto: onnx.ModelProto | None = None
    exporter = "dynamo"
    try:
        try:
            with _default_optimizer_without_bn_fusion():
                proto = _dynamo_export(model, example, input_name, output_name, optimize=True)
        except (ImportError, AttributeError, LookupError) as exc:
            # onnxscript internals moved: export unoptimised, fold constants only.
            note = f"could not disable onnxscript BN fusion ({exc}); used optimize=False + fold_constants"
            print(f"  NOTE: {note}", file=sys.stderr)
            notes.append(note)
            import onnxscript.optimizer

            proto = _dynamo_export(model, example, input_name, output_name, optimize=False)
            onnxscript.optimizer.fold_constants(proto)
            onnxscript.optimizer.remove_unused_nodes(proto)
    except Exception as exc:  # noqa: BLE001 - any exporter failure triggers the fallback
        exporter = "torchscript"
        note = f"dynamo export failed ({type(exc).__name__}: {exc}); fell back to dynamo=False"
        print(f"  NOTE: {note}", file=sys.stderr)
        notes.append(note)
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
        proto = onnx.load_model_from_string(buf.getvalue())

    notes.extend(fix_io_names(proto, input_name, output_name))
    strip_node_debug_metadata(proto)
    onnx.checker.check_model(proto, full_check=True)
    n_bn_torch = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_bn_onnx = op_histogram(proto).get("BatchNormalization", 0)
    if n_bn_onnx != n_bn_torch:
        raise RuntimeError(
            f"exported graph has {n_bn_onnx} BatchNormalization nodes, torch model has {n_bn_torch}"
        )
    return ExportInfo(proto=proto, exporter=exporter, notes=notes)


def strip_node_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node exporter debug metadata (stack traces with absolute source paths,
    line numbers, ``__main__`` module names, FX node dumps) so the ONNX bytes do not
    depend on where or how this script is run.  Graph-level metadata is kept."""

    def clear(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clear(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        clear(g.node)

    clear(proto.graph.node)
    for fn in proto.functions:
        clear(fn.node)


def fix_io_names(proto: onnx.ModelProto, input_name: str, output_name: str) -> list[str]:
    """Make sure the single graph input/output carry the requested names."""
    notes: list[str] = []
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise RuntimeError(
            f"expected 1 input / 1 output, got {[i.name for i in real_inputs]} / "
            f"{[o.name for o in graph.output]}"
        )
    renames = {}
    if real_inputs[0].name != input_name:
        renames[real_inputs[0].name] = input_name
    if graph.output[0].name != output_name:
        renames[graph.output[0].name] = output_name
    if not renames:
        return notes
    for old, new in renames.items():
        notes.append(f"renamed graph value {old!r} -> {new!r}")
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    return notes


def ort_session(proto_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = NUM_THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto_bytes, opts, providers=["CPUExecutionProvider"])


def ort_run(sess: ort.InferenceSession, input_name: str, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    outs = [
        sess.run(["logits"], {input_name: x[i : i + chunk]})[0] for i in range(0, x.shape[0], chunk)
    ]
    return np.concatenate(outs, axis=0)


def verify_against_torch(
    name: str,
    model: nn.Module,
    sess: ort.InferenceSession,
    input_name: str,
    sample: np.ndarray,
) -> float:
    """Compare ORT and torch at batch 1 and batch 3; return the max abs diff seen."""
    worst = 0.0
    for bs in (1, 3):
        x = sample[:bs]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {input_name: x})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"{name}: ORT shape {got.shape} != torch shape {ref.shape} at batch {bs}")
        diff = float(np.max(np.abs(got - ref)))
        worst = max(worst, diff)
        if not np.allclose(got, ref, atol=ATOL, rtol=0.0):
            raise RuntimeError(f"{name}: ORT vs torch max |diff| {diff:.3g} > {ATOL} at batch {bs}")
    return worst


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type, including nodes inside local functions / subgraphs."""
    counts: Counter[str] = Counter()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            counts[node.op_type if not node.domain else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g.node)

    visit(proto.graph.node)
    for fn in proto.functions:
        visit(fn.node)
    return dict(sorted(counts.items()))


def save_and_verify(
    name: str,
    model: nn.Module,
    example: torch.Tensor,
    sample: np.ndarray,
    input_name: str,
    out_dir: Path,
) -> tuple[dict[str, Any], ort.InferenceSession]:
    info = export_onnx(model, example, input_name)
    data = info.proto.SerializeToString(deterministic=True)
    sess = ort_session(data)
    max_diff = verify_against_torch(name, model, sess, input_name, sample)
    path = out_dir / f"{name}.onnx"
    atomic_write_bytes(path, data)
    # Re-load what was written and double-check names.
    saved = onnx.load(str(path))
    init_names = {t.name for t in saved.graph.initializer}
    ins = [i.name for i in saved.graph.input if i.name not in init_names]
    outs = [o.name for o in saved.graph.output]
    if ins != [input_name] or outs != ["logits"]:
        raise RuntimeError(f"{name}: saved model has inputs {ins}, outputs {outs}")
    opset = next((o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")), None)
    entry: dict[str, Any] = {
        "file": path.name,
        "sha256": sha256_file(path),
        "exporter": info.exporter,
        "opset": opset,
        "ir_version": saved.ir_version,
        "max_abs_diff_vs_torch": max_diff,
        "op_histogram": op_histogram(saved),
        "batchnorm_nodes": op_histogram(saved).get("BatchNormalization", 0),
    }
    if info.notes:
        entry["export_notes"] = info.notes
    return entry, sess


def io_entry(input_name: str, shape: Sequence[int | str], dtype: str, params: int) -> dict[str, Any]:
    return {
        "input": {"name": input_name, "shape": list(shape), "dtype": dtype},
        "output": {"name": "logits"},
        "parameters": params,
    }


# --------------------------------------------------------------------------- #
# Model builders
# --------------------------------------------------------------------------- #


def _build_digits(
    name: str,
    make: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    split: DigitsSplit,
    out_dir: Path,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    min_acc: float,
) -> dict[str, Any]:
    set_determinism(seed)
    model = make()

    def shaped(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape((a.shape[0], *input_shape)), dtype=np.float32)

    x_train, x_calib, x_test = shaped(split.x_train), shaped(split.x_calib), shaped(split.x_test)
    train_classifier(
        model,
        torch.from_numpy(x_train),
        torch.from_numpy(split.y_train),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
    )
    acc_torch = torch_accuracy(model, x_test, split.y_test)

    entry, sess = save_and_verify(
        name, model, torch.from_numpy(x_test[:2]), x_test, "input", out_dir
    )
    acc_ort = float((ort_run(sess, "input", x_test).argmax(axis=1) == split.y_test).mean())
    if acc_torch < min_acc or acc_ort < min_acc:
        raise RuntimeError(f"{name}: accuracy torch {acc_torch:.4f} / ORT {acc_ort:.4f} < {min_acc}")

    for part, xs, ys in (
        ("train", x_train, split.y_train),
        ("calib", x_calib, split.y_calib),
        ("test", x_test, split.y_test),
    ):
        save_npz(out_dir / f"{name}_{part}.npz", {"input": xs, "labels": ys.astype(np.int64)})

    result = io_entry("input", ["batch", *input_shape], "float32", param_count(model))
    result.update(
        {
            "test_accuracy_torch": acc_torch,
            "test_accuracy_onnx": acc_ort,
            "splits": {
                "train": int(x_train.shape[0]),
                "calib": int(x_calib.shape[0]),
                "test": int(x_test.shape[0]),
            },
            "data_files": {p: f"{name}_{p}.npz" for p in ("train", "calib", "test")},
        }
    )
    result.update(entry)
    return result


def build_digits_mlp(out_dir: Path, split: DigitsSplit) -> dict[str, Any]:
    return _build_digits(
        "digits_mlp",
        DigitsMLP,
        (64,),
        split,
        out_dir,
        seed=0,
        epochs=40,
        lr=2e-3,
        batch_size=32,
        weight_decay=1e-4,
        min_acc=0.95,
    )


def build_digits_cnn(out_dir: Path, split: DigitsSplit) -> dict[str, Any]:
    return _build_digits(
        "digits_cnn",
        DigitsCNN,
        (1, 8, 8),
        split,
        out_dir,
        seed=1,
        epochs=30,
        lr=2e-3,
        batch_size=32,
        weight_decay=1e-4,
        min_acc=0.96,
    )


def build_resnet_small(out_dir: Path) -> dict[str, Any]:
    name = "resnet_small"
    set_determinism(2)
    model = ResNetSmall()
    init_resnet(model, torch.Generator().manual_seed(2))
    model.eval()
    calib = np.random.default_rng(2).standard_normal((32, 3, 224, 224), dtype=np.float32)
    entry, _ = save_and_verify(name, model, torch.from_numpy(calib[:2]), calib, "input", out_dir)
    save_npz(out_dir / f"{name}_calib.npz", {"input": calib})
    result = io_entry("input", ["batch", 3, 224, 224], "float32", param_count(model))
    result["data_files"] = {"calib": f"{name}_calib.npz"}
    result.update(entry)
    return result


def build_transformer_small(out_dir: Path) -> dict[str, Any]:
    name = "transformer_small"
    set_determinism(3)
    model = TransformerSmall()
    init_transformer(model, torch.Generator().manual_seed(3))
    model.eval()
    ids = np.random.default_rng(3).integers(0, 1000, size=(32, 128), dtype=np.int64)
    entry, _ = save_and_verify(name, model, torch.from_numpy(ids[:2]), ids, "input_ids", out_dir)
    save_npz(out_dir / f"{name}_calib.npz", {"input_ids": ids})
    result = io_entry("input_ids", ["batch", 128], "int64", param_count(model))
    result["data_files"] = {"calib": f"{name}_calib.npz"}
    result.update(entry)
    return result


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/build"), help="output directory")
    parser.add_argument(
        "--only",
        type=str,
        default=None,
        help=f"comma-separated subset of {','.join(MODEL_NAMES)}",
    )
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(MODEL_NAMES))
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
        args.names = [n for n in MODEL_NAMES if n in names]
    else:
        args.names = list(MODEL_NAMES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(NUM_THREADS)

    manifest_path = out_dir / "manifest.json"
    manifest: dict[str, Any] = {"models": {}}
    if manifest_path.exists() and set(args.names) != set(MODEL_NAMES):
        # Partial rebuild: keep the entries of models not rebuilt this time.
        try:
            manifest = json.loads(manifest_path.read_text())
            manifest.setdefault("models", {})
        except (OSError, json.JSONDecodeError):
            manifest = {"models": {}}

    split: DigitsSplit | None = None
    t_all = time.perf_counter()
    for name in args.names:
        t0 = time.perf_counter()
        if name in ("digits_mlp", "digits_cnn"):
            split = split or load_digits_split()
            entry = (build_digits_mlp if name == "digits_mlp" else build_digits_cnn)(out_dir, split)
        elif name == "resnet_small":
            entry = build_resnet_small(out_dir)
        else:
            entry = build_transformer_small(out_dir)
        manifest["models"][name] = entry
        dt = time.perf_counter() - t0
        acc = (
            f" acc torch={entry['test_accuracy_torch']:.4f} onnx={entry['test_accuracy_onnx']:.4f}"
            if "test_accuracy_onnx" in entry
            else ""
        )
        print(f"{name}: params={entry['parameters']:,}{acc} time={dt:.1f}s", flush=True)

    manifest["generator"] = {
        "script": "models/build.py",
        "opset": OPSET,
        "torch": torch.__version__.split("+")[0],
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    manifest["models"] = dict(sorted(manifest["models"].items(), key=lambda kv: MODEL_NAMES.index(kv[0])))
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    print(f"total: {time.perf_counter() - t_all:.1f}s -> {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
