"""Benchmark the distill pass: recovering the accuracy that channel pruning (and low-rank) took away.

digits_cnn (the teacher) -> prune, channel mode, 50% -> then, with the same budget (epochs, learning rate,
schedule, batch size, validation split, best-validation-epoch selection, no early stop), either

- distill: the default KD loss (T=4, alpha=0.9: soft teacher targets plus 10% cross-entropy on labels), or
- labels only: the same training with alpha=0 (cross-entropy on the labels, no teacher),

for seeds 0, 1, 2 interleaved (KD, labels, KD, labels, ...), test accuracy in ONNX Runtime on the held-out
digits test split. Also: the training speed (training seconds per epoch and samples/s, medians), the same
comparison after lowrank on digits_mlp, and the README's pipeline `prune,distill,quant` end to end.

    .venv/bin/python benchmarks/distill.py [--out benchmarks/results/distill.md] [--seeds 0,1,2] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript

import graphopt
from graphopt.registry import all_passes
from graphopt.train import env as train_env
from _common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"


def machine() -> str:
    return cpu_name()


def versions(train_python: Path | None) -> str:
    text = (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, onnx_ir {ir.__version__}, "
            f"onnxscript {onnxscript.__version__}, numpy {np.__version__}")
    if train_python is not None:
        probe = ("import importlib.metadata as m; print(m.version('onnxruntime-training'), m.version('onnx'), "
                 "m.version('numpy'))")
        out = subprocess.run([str(train_python), "-c", probe], capture_output=True, text=True).stdout.split()
        if len(out) == 3:
            text += f"; training env: onnxruntime-training {out[0]}, onnx {out[1]}, numpy {out[2]}"
    return text


def accuracy(model: Path, data: Path) -> float:
    with np.load(data) as z:
        x, y = {k: z[k] for k in z.files if k != "labels"}, z["labels"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    logits = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
    return float(np.mean(logits.argmax(-1) == y))


def train_once(model: Path, first: list[str], first_options: dict[str, dict[str, str]], distill: dict[str, str],
               data: Path, out: Path) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    result = graphopt.optimize(model, [*first, "distill"], data=data, output=out, validate=False,
                               set_options={**first_options, "distill": distill})
    seconds = time.perf_counter() - t0
    return result.report["passes"][-1]["details"], seconds


def mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs))


def main() -> None:  # noqa: C901  (one report, built top to bottom)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill.md")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    backend = train_env.resolve_backend()
    teacher = MODELS / "digits_cnn.onnx"
    train, test = MODELS / "digits_cnn_train.npz", MODELS / "digits_cnn_test.npz"
    prune_opts = {"prune": {"mode": "channel", "sparsity": "0.5"}}
    budget = {"epochs": str(args.epochs), "patience": "0"}
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-bench-distill-"))

    pruned = tmp / "pruned.onnx"
    graphopt.optimize(teacher, ["prune"], data=train, output=pruned, validate=False, set_options=prune_opts)
    acc_teacher, acc_pruned = accuracy(teacher, test), accuracy(pruned, test)
    params = {m: graphopt.load_model(m) for m in (teacher, pruned)}
    n_params = {m: sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
                for m, model in params.items()}

    methods = {"distill (T=4, alpha=0.9)": {}, "labels only (alpha=0)": {"alpha": "0"}}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:  # interleaved: both methods see the same machine load
        for method, extra in methods.items():
            out = tmp / f"s{seed}-{len(runs[method])}-{'kd' if not extra else 'ce'}.onnx"
            details, wall = train_once(teacher, ["prune"], prune_opts, {**budget, "seed": str(seed), **extra},
                                       train, out)
            runs[method].append({"seed": seed, "acc": accuracy(out, test), "best": details["epochs"]["best"],
                                 "s_epoch": details["seconds_per_epoch"], "sps": details["samples_per_s"],
                                 "wall": wall, "train": details["samples"]["train"]})
            print(f"seed {seed} {method}: test accuracy {100 * runs[method][-1]['acc']:.2f}%", flush=True)

    # lowrank on digits_mlp (the classifier layer kept), then distill vs labels only, same seeds and budget
    mlp, mlp_train, mlp_test = (MODELS / f"digits_mlp{suffix}" for suffix in (".onnx", "_train.npz", "_test.npz"))
    lowrank_rows = []
    if "lowrank" in {c.name for c in all_passes()}:
        lr_opts = {"lowrank": {"rank_ratio": "0.05", "skip": "fc3.weight"}}
        factorized = tmp / "mlp_lowrank.onnx"
        graphopt.optimize(mlp, ["lowrank"], data=mlp_train, output=factorized, validate=False, set_options=lr_opts)
        lowrank_rows.append(("lowrank rank_ratio=0.05 (fc1, fc2 at rank 4; fc3 kept), no training",
                             accuracy(factorized, mlp_test)))
        for method, extra in methods.items():
            accs = []
            for seed in seeds:
                out = tmp / f"mlp-{seed}-{'kd' if not extra else 'ce'}.onnx"
                train_once(mlp, ["lowrank"], lr_opts, {**budget, "seed": str(seed), **extra}, mlp_train, out)
                accs.append(accuracy(out, mlp_test))
            lowrank_rows.append((f"lowrank + {method}, mean of {len(seeds)} seeds", mean(accs)))

    # the README's pipeline, end to end, as a user runs it
    e2e_out, e2e_report = tmp / "digits_cnn.pdq.onnx", tmp / "pdq.json"
    command = ["graphopt", "run", "models/build/digits_cnn.onnx", "--passes", "prune,distill,quant",
               "--set", "prune.mode=channel", "--set", "prune.sparsity=0.5",
               "--data", "models/build/digits_cnn_train.npz", "--eval-data", "models/build/digits_cnn_test.npz",
               "--latency-batch", "1,32", "-o", "out/digits_cnn.pdq.onnx"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", *command[1:-1], str(e2e_out), "--report",
                           str(e2e_report), "-q"], cwd=ROOT, capture_output=True, text=True)
    e2e_wall = time.perf_counter() - t0
    e2e = json.loads(e2e_report.read_text()) if e2e_report.is_file() else None

    kd_key, ce_key = list(methods)
    kd_mean, ce_mean = mean([r["acc"] for r in runs[kd_key]]), mean([r["acc"] for r in runs[ce_key]])
    lines = [
        "## distill: knowledge distillation after channel pruning",
        "",
        f"Machine: {machine()} (2-core CPU, shared with other work). Versions: {versions(backend.python)}. "
        f"Training backend: {backend.description}.",
        "",
        f"Command: `.venv/bin/python benchmarks/distill.py --seeds {args.seeds} --epochs {args.epochs}`",
        "",
        f"Teacher: digits_cnn ({n_params[teacher]:,} parameters), test accuracy **{100 * acc_teacher:.2f}%** "
        f"(540 held-out digits; one sample = 0.19 points). Student: `prune` channel mode 50% "
        f"({n_params[pruned]:,} parameters), test accuracy before training **{100 * acc_pruned:.2f}%**.",
        f"Budget for both methods: {args.epochs} epochs over {runs[kd_key][0]['train']} training samples "
        "(10% of digits_cnn_train.npz held out for validation), AdamW lr 1e-3 with 1 warm-up epoch and cosine "
        "decay, batch 32, the best-validation-loss epoch kept, no early stop; only alpha differs.",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean test accuracy | vs teacher |",
        "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |",
    ]
    for method in methods:
        accs = [r["acc"] for r in runs[method]]
        lines.append(f"| {method} | " + " | ".join(f"{100 * a:.2f}%" for a in accs)
                     + f" | **{100 * mean(accs):.2f}%** | {100 * (mean(accs) - acc_teacher):+.2f} pts |")
    lines += [
        "",
        f"Targets: distill within 1.0 point of the teacher: **{'met' if acc_teacher - kd_mean <= 0.01 else 'missed'}** "
        f"({100 * (acc_teacher - kd_mean):.2f} points below); better than labels only (mean of {len(seeds)} "
        f"seeds): **{'met' if kd_mean > ce_mean else 'missed'}** ({100 * (kd_mean - ce_mean):+.2f} points).",
        "",
        "Training speed (medians over the runs above; the training part of an epoch, without validation; "
        "the pass's wall time adds the worker's start, the teacher's outputs and building the training graphs):",
        "",
        f"| method | s / epoch | samples / s | pass wall time (s, {args.epochs} epochs) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for method in methods:
        rs = runs[method]
        lines.append(f"| {method} | {statistics.median(r['s_epoch'] for r in rs):.3f} | "
                     f"{statistics.median(r['sps'] for r in rs):,.0f} | "
                     f"{statistics.median(r['wall'] for r in rs):.1f} |")
    if lowrank_rows:
        lines += ["", "After lowrank (digits_mlp, teacher test accuracy "
                  f"{100 * accuracy(mlp, mlp_test):.2f}%, same budget):", "",
                  "| student | test accuracy |", "| --- | ---: |"]
        lines += [f"| {name} | {100 * acc:.2f}% |" for name, acc in lowrank_rows]
        gap = lowrank_rows[1][1] - lowrank_rows[2][1]
        lines += ["", f"Distill vs labels only after lowrank: {100 * gap:+.2f} points. With two hidden layers "
                  "squeezed to rank 4 the student's capacity is the limit: neither method gets back to the teacher"
                  + ("." if gap > 0 else ", and here the teacher's soft targets do not help more than the labels.")]
    lines += ["", "The README's pipeline end to end:", "", f"`{' '.join(command)}`", ""]
    if e2e is not None:
        v = e2e["validation"] or {}
        agreement = v.get("agreement", {})
        size_in, size_out = v.get("size", {}).get("reference_bytes"), v.get("size", {}).get("candidate_bytes")
        lines += [f"exit code {proc.returncode}, {e2e_wall:.1f} s wall; "
                  f"accuracy {100 * agreement.get('reference_accuracy', float('nan')):.2f}% → "
                  f"{100 * agreement.get('candidate_accuracy', float('nan')):.2f}%"
                  + (f"; file {size_in / 1024:.1f} KiB → {size_out / 1024:.1f} KiB ({size_out / size_in:.3f}×)"
                     if size_in and size_out else "") + ".", ""]
        lat = v.get("latency") or []
        if lat:
            lines += ["| batch | teacher p50 | output p50 | ratio |", "| ---: | ---: | ---: | ---: |"]
            for row in lat:
                lines.append(f"| {row['batch']} | {row['reference_ms']['p50_ms']:.3f} ms | "
                             f"{row['candidate_ms']['p50_ms']:.3f} ms | {row['ratio']:.3f}× |")
    else:
        lines += [f"failed: exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
