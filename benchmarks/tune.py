"""Benchmark `graphopt tune`: tuned ONNX Runtime settings against ORT's defaults, per model and batch.

For each model: run the search (``graphopt.tune.tune``, a time budget per model), write the settings
file, then measure again from scratch — fresh sessions built from the file exactly as an application
would (``load_entry`` + ``apply_to_session_args``, IO binding when the entry says so) against fresh
sessions with ORT's defaults, interleaved run by run, medians of many runs — and report the ratio.
The re-measurement is independent of the search's own numbers, so a setting that only won by noise
shows up as a ratio near 1.

    .venv/bin/python benchmarks/tune.py                       # CPU: resnet_small, transformer_small
    .venv/bin/python benchmarks/tune.py --providers cuda --batches 1,8,64 --models resnet_small \
        --budget 240 --out benchmarks/results/tune_gpu.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript

from graphopt.data import input_specs, open_data
from graphopt.model_io import load_model
from graphopt.runtime import Timing, short_name
from graphopt.tune import (Candidate, OrtTrial, SearchConfig, default_candidate, entry_to_settings, full_provider_name,
                           load_entry, save_settings, tune)
from graphopt.validate import latency_inputs
from _common import machine

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"


def versions() -> str:
    return (f"onnxruntime {ort.__version__} ({', '.join(short_name(p) for p in ort.get_available_providers())}), "
            f"onnx {onnx.__version__}, onnx_ir {ir.__version__}, onnxscript {onnxscript.__version__}")


def remeasure(sides: list[tuple[Path, Candidate]], provider: str, inputs: dict[str, np.ndarray], *, runs: int,
              warmup: int = 5) -> list[tuple[Timing, float]]:
    """Fresh sessions for each (model, settings), interleaved in alternating order.

    Returns each side's timing and its max abs output difference from the first side's outputs.
    """
    first_model, _ = sides[0]
    ref = OrtTrial(str(first_model), provider, Candidate(default_candidate(provider).settings, False), inputs, None)
    ref.run()
    reference = ref.outputs()
    ref.close()
    trials = [OrtTrial(str(m), provider, c, inputs, reference) for m, c in sides]
    try:
        for t in trials:
            for _ in range(warmup):
                t.run()
        samples: list[list[float]] = [[] for _ in trials]
        rng = np.random.default_rng(0)
        for _ in range(runs):
            for j in rng.permutation(len(trials)):  # a random order each round: no fixed neighbours
                samples[j].append(trials[j].run())
        out = []
        for t, got in zip(trials, samples):
            diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                       for a, b in zip(reference, t.outputs()))
            out.append((Timing.from_seconds(got), diff))
        return out
    finally:
        for t in trials:
            t.close()


def changes_text(entry: dict) -> str:
    return ", ".join(entry["changes"]) or "(ORT defaults)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet_small,transformer_small")
    ap.add_argument("--providers", default="cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budget", type=float, default=150.0, help="search budget per model, seconds")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per setting in the re-measurement")
    ap.add_argument("--models-dir", type=Path, default=MODELS)
    ap.add_argument("--fp16", action="store_true", help="also tune the model after graphopt's fp16 pass")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune.md")
    args = ap.parse_args()
    providers = [full_provider_name(p) for p in args.providers.split(",") if p.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    command = "python benchmarks/tune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = os.getloadavg()[0]

    variants = ["fp32", "fp16"] if args.fp16 else ["fp32"]
    rows: list[str] = []
    search_rows: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="graphopt-bench-tune-"))
    try:
        for name in [m for m in args.models.split(",") if m.strip()]:
            paths = {"fp32": work / f"{name}.onnx"}
            shutil.copyfile(args.models_dir / f"{name}.onnx", paths["fp32"])
            if args.fp16:
                from graphopt.api import optimize

                paths["fp16"] = work / f"{name}.fp16.onnx"
                optimize(paths["fp32"], ["fp16"], validate=False, output=paths["fp16"])
            ir_model = load_model(paths["fp32"])
            specs = input_specs(ir_model)
            source = open_data(None, ir_model, synthetic_rows=max(batches), batch_size=max(batches), seed=0)
            del ir_model
            cache: dict[int, dict[str, np.ndarray]] = {}

            def inputs_for(b: int) -> dict[str, np.ndarray]:
                if b not in cache:
                    cache[b] = latency_inputs(source, specs, b)
                return cache[b]

            results = {}
            for variant in variants:
                t0 = time.perf_counter()
                tolerance = 1e-2 if variant == "fp16" else 1e-3
                results[variant] = tune(paths[variant], providers, batches, inputs_for,
                                        SearchConfig(budget_s=args.budget, tolerance=tolerance))
                searched = time.perf_counter() - t0
                save_settings(paths[variant], results[variant])
                groups = results[variant].groups
                tried = sum(len(g.records) for g in groups)
                failed = sum(1 for g in groups for r in g.records if r.status in ("failed", "rejected"))
                search_rows.append(f"| {name} {variant} | {args.budget:g} s | {searched:.1f} s | {tried} | {failed} |")
            for provider in providers:
                for b in batches:
                    sides: list[tuple[Path, Candidate]] = []
                    labels: list[str] = []
                    skipped = []
                    for variant in variants:
                        entry = load_entry(paths[variant], provider, b)
                        if entry is None or entry["batch"] != b:
                            group = next(g for g in results[variant].groups if g.provider == provider and g.batch == b)
                            skipped.append(f"{variant}: {group.reason}")
                            continue
                        sides.append((paths[variant], default_candidate(provider)))
                        labels.append(f"{variant} defaults")
                        if variant == "fp32":  # an A/A control: the same defaults in a second session
                            sides.append((paths[variant], default_candidate(provider)))
                            labels.append("fp32 defaults again (noise control)")
                        sides.append((paths[variant], Candidate(entry_to_settings(entry), bool(entry["io_binding"]),
                                                                 tuple(entry["changes"]))))
                        labels.append(f"{variant} tuned: {changes_text(entry)}")
                    if skipped:
                        rows.append(f"| {name} | {short_name(provider)} | {b} | | | skipped ({'; '.join(skipped)}) |")
                        continue
                    timings = remeasure(sides, provider, inputs_for(b), runs=args.runs)
                    base = timings[0][0].p50_ms
                    for label, (t, diff) in zip(labels, timings):
                        rows.append(f"| {name} | {short_name(provider)} | {b} | {t.p50_ms:.3f} ms | "
                                    f"**{t.p50_ms / base:.3f}×** | {label} (max abs diff {diff:.2g}) |")
                        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kind = "CPU" if providers == ["CPUExecutionProvider"] else "/".join(short_name(p).upper() for p in providers)
    text = "\n".join([
        f"## tune: tuned ONNX Runtime settings vs ORT defaults ({kind})",
        "",
        f"Machine: {machine(providers)}. {versions()}. Load average (1 min) {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work shared the machine).",
        "",
        f"Command: `{command}`",
        "",
        "The search (`graphopt tune`, coordinate descent, min gain 3%, outputs checked against the defaults at "
        "1e-3 of their range, 1e-2 for fp16) ran with the budget shown; then fresh sessions built from the written "
        "`MODEL.ort.json` were timed against fresh default sessions, interleaved run by run in a random order "
        "each round "
        f"({args.runs} runs each after 5 warm-up runs; p50). Ratio = p50 / p50 of the fp32 model with ORT's "
        "defaults, measured in the same interleaved loop (lower is faster); max abs diff is against that model's "
        "outputs. The \"defaults again\" row is a second session with the same defaults: its distance from "
        "1.000 is the noise of this run. "
        "Synthetic inputs. On CUDA both sides use IO binding with device-resident inputs and outputs unless the "
        "tuned entry says io_binding=false.",
        "",
        "| model | provider | batch | p50 | ratio to fp32 defaults | settings |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *rows,
        "",
        "| model | budget | search took | candidates tried | failed or rejected |",
        "| --- | ---: | ---: | ---: | ---: |",
        *search_rows,
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
