"""Benchmark the stage runner on the CUDA execution provider (run it on a GPU machine; see docs/gpu.md).

For resnet_small and transformer_small, partitioned into K = 2 stages by `cleanup,partition`:

- stitched outputs: both stages on cuda:0 (tensors handed on the device with IO binding), and cuda:0 + cpu,
  against the unpartitioned model on one CUDA session (TF32 off, so the bound is float32's);
- throughput, timed interleaved round by round (Williams order) while streaming all rows: one CUDA session
  (plain ``run``, host arrays in and out, what a user writes) against the two stages on cuda:0 with
  micro-batches, with IO binding (the default) and without it (every stage boundary copies through the host),
  and with whole batches (stages still overlap, on consecutive batches),
  and cuda:0 + cpu (a GPU stage feeding a CPU stage), next to one CPU session on all cores.

    python benchmarks/partition_gpu.py [--rounds 7] [--out benchmarks/results/partition_gpu.md]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import graphopt
from graphopt.runtime import Runner, SessionFactory, SessionSettings
from graphopt.stages import StagePipeline
from _common import machine
from partition import interleave, load_rows, max_diff, table, versions

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"
CUDA = "CUDAExecutionProvider"
CASES = {  # model: (data file, rows streamed per run, batch, micro-batch)
    "resnet_small": ("resnet_small_calib.npz", 512, 64, 16),
    "transformer_small": ("transformer_small_calib.npz", 4096, 512, 128),
}


def batches_of(name: str, file: str, rows: int, batch: int) -> list[dict[str, np.ndarray]]:
    small = load_rows(name, file, rows)  # BATCH-row batches, repeated to `rows`
    full = {k: np.concatenate([b[k] for b in small]) for k in small[0]}
    return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in full.items()} for i in range(0, rows, batch)]


def run_model(name: str, args: argparse.Namespace, work: Path, rows_out: list[list[str]],
              diff_rows: list[list[str]]) -> None:
    file, rows, batch, micro = CASES[name]
    data = batches_of(name, file, rows, batch)
    out = work / f"{name}_k2"
    cleaned = work / f"{name}.clean.onnx"
    graphopt.optimize(MODELS / f"{name}.onnx", ["cleanup"], output=cleaned, validate=False)
    graphopt.optimize(MODELS / f"{name}.onnx", ["cleanup", "partition"], output=out, validate=False,
                      set_options={"partition": {"stages": 2}})

    exact = SessionFactory(SessionSettings(provider_options={CUDA: {"use_tf32": "0"}}))
    ref = Runner(exact.session(cleaned, CUDA)).run(data[0])
    cpu_ref = Runner(SessionFactory().session(cleaned)).run(data[0])
    for devices in ("cuda:0", "cuda:0,cpu"):
        with StagePipeline.from_dir(out, devices=devices, micro_batch=micro, session_factory=exact) as pipe:
            got = pipe.run(data[0])
        diff_rows.append([name, devices, f"{max_diff(ref, got):.1e}", f"{max_diff(cpu_ref, got):.1e}",
                          f"{max(float(np.abs(r).max()) for r in ref):.2f}"])
        print("  ", diff_rows[-1], flush=True)

    default = SessionFactory()
    single_gpu = Runner(default.session(cleaned, CUDA))
    single_cpu = Runner(default.session(cleaned))
    pipes = {
        "K=2 cuda:0 (IO binding)": StagePipeline.from_dir(out, devices="cuda:0", micro_batch=micro, session_factory=default),
        "K=2 cuda:0 (IO binding, whole batches)": StagePipeline.from_dir(out, devices="cuda:0", session_factory=default),
        "K=2 cuda:0 (host copies)": StagePipeline.from_dir(out, devices="cuda:0", micro_batch=micro,
                                                           session_factory=default, io_binding=False),
        "K=2 cuda:0,cpu": StagePipeline.from_dir(out, devices="cuda:0,cpu", micro_batch=micro, session_factory=default),
    }
    runners: list[tuple[str, Any, list[dict[str, np.ndarray]]]] = [
        ("1 CUDA session", single_gpu, data), ("1 CPU session (all cores)", single_cpu, data)]
    runners += [(label, pipe, data) for label, pipe in pipes.items()]
    times = interleave(runners, args.rounds)
    base = times["1 CUDA session"]
    for label, _, _ in runners:
        t = times[label]
        ratios = [b / x for b, x in zip(base, t)]
        rows_out.append([name, label, str(batch), ("—" if "whole" in label else str(micro)) if label.startswith("K=") else "—",
                         f"{rows / statistics.median(t):.0f}", f"{statistics.median(ratios):.2f}x",
                         f"{min(ratios):.2f}–{max(ratios):.2f}"])
        print("  ", rows_out[-1], flush=True)
    for pipe in pipes.values():
        pipe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "partition_gpu.md")
    args = parser.parse_args()
    if CUDA not in ort.get_available_providers():
        sys.exit("error: this onnxruntime has no CUDAExecutionProvider (run on a GPU machine; see docs/gpu.md)")
    throughput: list[list[str]] = []
    diffs: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(name, flush=True)
            run_model(name, args, Path(tmp), throughput, diffs)
    lines = [
        "## partition on the GPU: the stage runner on the CUDA execution provider",
        "",
        f"Machine: {machine([CUDA])}. Versions: {versions()}.",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        "",
        "### Stitched outputs (K = 2, TF32 off)",
        "",
        "Max abs diff of the stages' outputs against the unpartitioned model on one CUDA session, and against the "
        "CPU EP, on the first batch.",
        "",
        *table(["model", "devices", "vs CUDA session", "vs CPU EP", "max abs output"], diffs),
        "",
        "### Throughput (K = 2, rows/s, streaming every row; ratio = the CUDA session's time / this one's, per round)",
        "",
        f"{args.rounds} interleaved rounds; medians, with the range of the per-round ratios. Default CUDA EP "
        "settings (TF32 on). The CPU session uses every core.",
        "",
        *table(["model", "runner", "batch", "micro-batch", "rows/s", "vs 1 CUDA session", "range"], throughput),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
