"""Benchmark the lowrank pass on digits_mlp and transformer_small at energy 0.9 / 0.95 / 0.99.

For each setting: layers factorized, parameters and FLOPs per sample against the original, ONNX Runtime CPU
latency ratio (the original and the factorized model timed interleaved, medians), and agreement with the
original (mean cosine of the outputs, top-1 agreement, and digits test accuracy). Accuracy after distill
is left to the distill pass's benchmark (column marked pending).

    .venv/bin/python benchmarks/lowrank.py [--out benchmarks/results/lowrank.md] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript

from graphopt.context import PassContext
from graphopt.data import open_data
from graphopt.options import build
from graphopt.registry import get
from graphopt.runtime import Runner, SessionFactory, SessionSettings, time_interleaved
from graphopt.stats import count_flops, parameter_count
from _common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"

SETTINGS: list[tuple[str, dict[str, object]]] = [
    ("energy=0.9", {"energy": 0.9}),
    ("energy=0.95", {"energy": 0.95}),
    ("energy=0.99", {"energy": 0.99}),
    ("energy=0.9, min_saving=0 (extra)", {"energy": 0.9, "min_saving": 0.0}),
    ("rank_ratio=0.25 (extra)", {"rank_ratio": 0.25}),
]
CASES = {
    # model: (data for the pass, evaluation data, latency batch)
    "digits_mlp": ("digits_mlp_calib.npz", "digits_mlp_test.npz", 32),
    "transformer_small": ("transformer_small_calib.npz", "transformer_small_calib.npz", 1),
}


def machine() -> str:
    return cpu_name()


def versions() -> str:
    return (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, onnx_ir {ir.__version__}, "
            f"onnxscript {onnxscript.__version__}, numpy {np.__version__}")


def load_all(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "labels"}, (z["labels"] if "labels" in z.files else None)


def run_all(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    outs = [sess.run(None, {k: v[i:i + batch] for k, v in inputs.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs)


def bench_model(name: str, sessions: SessionFactory, repeat: int) -> list[str]:
    calib, evaluation, lat_batch = CASES[name]
    path = MODELS / f"{name}.onnx"
    inputs, labels = load_all(MODELS / evaluation)
    original = ir.load(path)
    params0, _ = parameter_count(original)
    flops0 = count_flops(original).total
    ref_sess = sessions.session(path)
    ref = run_all(ref_sess, inputs)
    lat_inputs = {k: v[:lat_batch] for k, v in inputs.items()}
    rows = []
    for label, options in SETTINGS:
        model = ir.load(path)
        cls = get("lowrank")
        ctx = PassContext(sessions=sessions, data=open_data(str(MODELS / calib), model), batch_size=32)
        p = cls(build(cls.Options, "lowrank", options), ctx)
        p(model)
        params, _ = parameter_count(model)
        flops = count_flops(model).total
        cand_sess = sessions.session(model)
        out = run_all(cand_sess, inputs)
        cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
        top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
        acc = "n/a (no labels)"
        if labels is not None:
            acc = f"{np.mean(ref.argmax(1) == labels):.2%} → {np.mean(out.argmax(1) == labels):.2%}"
        if p.details["factorized"]:
            t_ref, t_new = time_interleaved([Runner(ref_sess), Runner(cand_sess)], lat_inputs, repeat=repeat,
                                            budget_s=30)
            latency = f"{t_new.p50_ms / t_ref.p50_ms:.3f}× ({t_ref.p50_ms:.3f} → {t_new.p50_ms:.3f} ms)"
        else:
            latency = "1 (unchanged)"
        layers = p.details["layers"]
        ranks = ", ".join(f"{r['shape']}→{r['rank']}" for r in layers[:4]) + (" …" if len(layers) > 4 else "")
        candidates = len(layers) + sum(1 for s in p.details["skipped"]
                                       if "initializer" not in s["reason"])
        rows.append(
            f"| {name} | {label} | {len(layers)}/{candidates} | {ranks or '—'} | {params0:,} → {params:,} "
            f"({params / params0:.3f}×) | {flops / flops0:.3f}× | {latency} | {np.mean(cos):.5f} | {top1:.2%} "
            f"| {acc} | pending |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lowrank.md"))
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1: steadiest on a shared box)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    sessions = SessionFactory(SessionSettings(intra_op_threads=args.threads))
    rows = []
    for name in CASES:
        rows += bench_model(name, sessions, args.repeat)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = "\n".join([
        "## lowrank: truncated-SVD factorization (digits_mlp, transformer_small)",
        "",
        f"Machine: {machine()} (2-core CPU, shared with other work), ORT CPU EP, {args.threads} intra-op "
        f"thread(s). Versions: {versions()}.",
        "",
        f"Command: `{command}`",
        "",
        "Pass options besides the one shown are the defaults (min_saving 0.1, error measured on the calib "
        "set). Latency: p50 of the factorized model / p50 of the original, timed interleaved in one process "
        f"(batch {CASES['digits_mlp'][2]} for digits_mlp, batch {CASES['transformer_small'][2]} × 128 tokens "
        "for transformer_small). Agreement on digits_mlp_test.npz (540 samples) and transformer_small_calib.npz. "
        "\"layers\" = factorized / weight layers considered. Accuracy after `distill` is pending (the distill "
        "pass is another engineer's; its benchmark will fill that column).",
        "",
        "| model | setting | layers | shapes → ranks | parameters | FLOPs/sample | CPU latency ratio | "
        "mean cosine | top-1 agreement | accuracy (orig → new) | accuracy after distill |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "transformer_small has random (untrained) weights: their singular values are spread almost evenly "
        "(Marchenko–Pastur), so keeping 90% of the energy already needs rank 131 of 256 — above the break-even "
        "rank K·N/(K+N) = 128 — and rank 195 for the 256×1024 FFN matrices, just under their break-even 204.8 "
        "but saving only 4.8% of their FLOPs, below the default min_saving of 10%. So at energy ≥ 0.9 the pass "
        "rightly factorizes nothing; the min_saving=0 row factorizes the FFN matrices anyway (3% fewer FLOPs, "
        "a latency change near the noise) and the rank_ratio row shows what a forced low rank costs such a model. "
        "Trained weights (digits_mlp) have decaying spectra and factorize well; there the min_saving=0 row "
        "also factorizes the 64×10 classifier (rank 8 of 10, 7% saving) and costs 10 points of accuracy — "
        "the reason small savings are skipped by default.",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
