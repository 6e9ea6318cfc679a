"""Benchmark the partition pass and the stage runners on resnet_small and transformer_small, K = 2, 3, 4.

For each model the pipeline a user runs (`cleanup,partition`) writes stage directories; then, all on CPU
with one ORT thread per stage:

- balance: the plan's predicted ratio (max/mean stage cost) for the static and the profiled cost model,
  and the measured one (each stage timed alone, one thread, on one micro-batch, medians);
- cut bytes per sample: the DP's cuts against a naive split into equal node counts;
- throughput: the stages pipelined with micro-batches (a thread per stage, streaming all rows) against
  one one-thread session of the same (cleaned, unpartitioned) model, timed interleaved, round by round;
- stitched outputs against the unpartitioned model (max abs diff);
- with Ray installed, the same stream through one Ray actor per stage against the thread runner.

    .venv/bin/python benchmarks/partition.py [--rounds 5] [--micro-batch 8] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
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
from graphopt.runtime import Runner, SessionFactory, SessionSettings, interleaved_order
from graphopt.stages import StagePipeline, read_manifest, read_plan
from _common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"
CASES = {  # model: (data file, rows streamed per throughput run)
    "resnet_small": ("resnet_small_calib.npz", 256),
    "transformer_small": ("transformer_small_calib.npz", 768),
}
BATCH = 32


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def versions() -> str:
    extra = ""
    try:
        import ray

        extra = f", ray {ray.__version__}"
    except ImportError:
        pass
    return (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, onnx_ir {ir.__version__}, "
            f"onnxscript {onnxscript.__version__}, numpy {np.__version__}{extra}")


def load_rows(name: str, file: str, rows: int) -> list[dict[str, np.ndarray]]:
    """The model's calibration rows, repeated to ``rows``; synthetic ones when the file is absent (a machine
    the data was not copied to)."""
    if (MODELS / file).is_file():
        with np.load(MODELS / file) as z:
            arrays = {k: z[k] for k in z.files if k != "labels"}
    else:
        from graphopt.data import SyntheticSource, input_specs, integer_input_ranges
        from graphopt.model_io import load_model

        model = load_model(MODELS / f"{name}.onnx")
        source = SyntheticSource(input_specs(model), rows=BATCH, batch_size=BATCH,
                                 int_high=integer_input_ranges(model))
        arrays = next(iter(source.batches())).inputs
    n = len(next(iter(arrays.values())))
    reps = -(-rows // n)
    full = {k: np.concatenate([v] * reps)[:rows] for k, v in arrays.items()}
    return [{k: np.ascontiguousarray(v[i:i + BATCH]) for k, v in full.items()} for i in range(0, rows, BATCH)]


def one_thread() -> SessionFactory:
    return SessionFactory(SessionSettings(intra_op_threads=1))


def measured_balance(stage_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 5) -> tuple[float, list[float]]:
    """Each stage alone, one thread, on one micro-batch (medians): the balance the pipeline really sees."""
    manifest = read_manifest(stage_dir)
    factory = one_thread()
    sessions = [factory.session(stage_dir / s["file"]) for s in manifest["stages"]]
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeat + 1):
        env = dict(inputs)
        for k, (sess, stage) in enumerate(zip(sessions, manifest["stages"])):
            t0 = time.perf_counter()
            outs = sess.run(stage["outputs"], {n: env[n] for n in stage["inputs"]})
            times[k].append(time.perf_counter() - t0)
            env.update(zip(stage["outputs"], outs))
    med = [statistics.median(t[1:]) for t in times]
    return max(med) / (sum(med) / len(med)), med


def stream_seconds(runner: Any, batches: list[dict[str, np.ndarray]]) -> float:
    t0 = time.perf_counter()
    if isinstance(runner, StagePipeline):
        for _ in runner.stream(batches):
            pass
    else:
        for b in batches:
            runner.run(b)
    return time.perf_counter() - t0


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b))


def interleave(runners: list[tuple[str, Any, list[dict[str, np.ndarray]]]], rounds: int) -> dict[str, list[float]]:
    """Stream seconds per runner and round, after a warm-up, in a Williams order (see interleaved_order)."""
    for _, r, data in runners:
        stream_seconds(r, data[:2])
    times: dict[str, list[float]] = {label: [] for label, _, _ in runners}
    for i in range(rounds):
        for j in interleaved_order(len(runners), i):
            label, r, data = runners[j]
            times[label].append(stream_seconds(r, data))
    return times


def run_model(name: str, args: argparse.Namespace, work: Path, rows_out: dict[str, list[list[str]]]) -> None:
    file, rows = CASES[name]
    batches = load_rows(name, file, rows)
    sample = batches[0]
    micro = {k: v[: args.micro_batch] for k, v in sample.items()}
    original = MODELS / f"{name}.onnx"
    cleaned = work / f"{name}.clean.onnx"
    graphopt.optimize(original, ["cleanup"], output=cleaned, validate=False)
    ref_orig = Runner(one_thread().session(original)).run(sample)
    ref_clean = Runner(one_thread().session(cleaned)).run(sample)

    dirs: dict[tuple[str, int], Path] = {}
    for cost in ("static", "profile"):
        for k in args.stages:
            out = work / f"{name}_{cost}_k{k}"
            result = graphopt.optimize(original, ["cleanup", "partition"], output=out, validate=False,
                                       set_options={"partition": {"stages": k, "cost": cost}},
                                       data=str(MODELS / file) if (MODELS / file).is_file() else None)
            plan = read_plan(result.model)
            dirs[(cost, k)] = out
            meas, _ = measured_balance(out, micro)
            with StagePipeline.from_dir(out, session_factory=one_thread()) as pipe:
                got = pipe.run(sample)
            cut = sum(plan["cut_bytes_per_sample"])
            naive = sum(plan["naive_split"]["cut_bytes_per_sample"])
            rows_out["balance"].append([
                name, str(k), cost, f"{plan['balance_ratio']:.3f}", f"{plan['naive_split']['balance_ratio']:.3f}",
                f"{meas:.3f}", f"{cut / 1024:.0f} KiB", f"{naive / 1024:.0f} KiB", f"{cut / naive:.2f}",
                f"{max_diff(ref_clean, got):.1e}", f"{max_diff(ref_orig, got):.1e}"])
            print("  ", rows_out["balance"][-1], flush=True)

    # throughput, interleaved round by round: one one-thread session vs the pipelined stages
    single = Runner(one_thread().session(cleaned))
    micro_batches = [{k: v[i:i + args.micro_batch] for k, v in b.items()}
                     for b in batches for i in range(0, len(next(iter(b.values()))), args.micro_batch)]
    runners: list[tuple[str, Any, list[dict[str, np.ndarray]]]] = [
        ("single whole", single, batches), ("single micro", single, micro_batches)]
    pipes = []
    for cost in args.costs:
        for k in args.stages:
            pipe = StagePipeline.from_dir(dirs[(cost, k)], micro_batch=args.micro_batch, session_factory=one_thread())
            pipes.append(pipe)
            runners.append((f"{cost} K={k}", pipe, batches))
    times = interleave(runners, args.rounds)
    for p in pipes:
        p.close()
    pipes = []

    # Ray against the thread runner, in a second phase: an idle Ray instance (raylet, GCS, actors' polling
    # threads) takes CPU from whatever else runs, so it must not be up while the runs above are timed.
    ray_mbs = [args.micro_batch, 2 * args.micro_batch, 4 * args.micro_batch]
    ray_pipes: list[StagePipeline] = []
    ray_runners: list[tuple[str, Any, list[dict[str, np.ndarray]]]] = []
    if args.ray and 2 in args.stages:
        try:
            from graphopt.stages import ensure_ray

            ensure_ray(num_cpus=8)  # the local instance graphopt starts; room for the actors (2 real cores)
            for mb in ray_mbs:
                ray_pipe = StagePipeline.from_dir(dirs[(args.costs[-1], 2)], backend="ray", micro_batch=mb,
                                                  session_factory=one_thread())
                ray_pipes.append(ray_pipe)
                thr = StagePipeline.from_dir(dirs[(args.costs[-1], 2)], micro_batch=mb, session_factory=one_thread())
                pipes.append(thr)
                ray_runners += [(f"ray K=2 mb={mb}", ray_pipe, batches), (f"threads K=2 mb={mb}", thr, batches)]
            print(f"   ray K=2 max abs diff {max_diff(ref_clean, ray_pipes[0].run(sample)):.1e}", flush=True)
        except Exception as exc:  # report, do not hide
            print(f"   ray unavailable: {exc}", flush=True)
    if ray_runners:
        times.update(interleave(ray_runners, args.rounds))
    whole, micro = times["single whole"], times["single micro"]
    best_single = [min(w, m) for w, m in zip(whole, micro)]  # the single session at its better batching
    for cost in args.costs:
        for k in args.stages:
            t = times[f"{cost} K={k}"]
            ratios = [s / p for s, p in zip(best_single, t)]
            rows_out["throughput"].append([
                name, str(k), cost, f"{rows / statistics.median(whole):.1f}", f"{rows / statistics.median(micro):.1f}",
                f"{rows / statistics.median(t):.1f}", f"{statistics.median(ratios):.2f}x",
                f"{min(ratios):.2f}–{max(ratios):.2f}"])
            print("  ", rows_out["throughput"][-1], flush=True)
    per_mb: list[tuple[list[float], list[float]]] = []
    for mb, ray_pipe in zip(ray_mbs, ray_pipes):
        t_ray = times[f"ray K=2 mb={mb}"]
        t_thr = times[f"threads K=2 mb={mb}"]
        per_mb.append((t_thr, t_ray))
        ratios = [thr / ry for thr, ry in zip(t_thr, t_ray)]
        rows_out["ray"].append([name, "2", str(mb), f"{rows / statistics.median(t_thr):.1f}",
                                f"{rows / statistics.median(t_ray):.1f}", f"{statistics.median(ratios):.2f}",
                                f"{min(ratios):.2f}–{max(ratios):.2f}"])
        print("  ", rows_out["ray"][-1], flush=True)
        ray_pipe.close()
    if per_mb:  # each backend at its best micro-batch in each round (what a user would pick for each)
        best_thr = [min(t[i] for t, _ in per_mb) for i in range(args.rounds)]
        best_ray = [min(r[i] for _, r in per_mb) for i in range(args.rounds)]
        ratios = [thr / ry for thr, ry in zip(best_thr, best_ray)]
        rows_out["ray"].append([name, "2", "best of each", f"{rows / statistics.median(best_thr):.1f}",
                                f"{rows / statistics.median(best_ray):.1f}", f"{statistics.median(ratios):.2f}",
                                f"{min(ratios):.2f}–{max(ratios):.2f}"])
        print("  ", rows_out["ray"][-1], flush=True)
    for p in pipes:
        p.close()
    if ray_pipes:  # the next model's first phase runs without Ray again
        import ray

        ray.shutdown()


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--costs", default="static,profile",
                        help="cost models whose stage directories are timed for throughput")
    parser.add_argument("--no-ray", dest="ray", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "partition.md")
    args = parser.parse_args()
    args.stages = [int(s) for s in args.stages.split(",")]
    args.costs = [c for c in args.costs.split(",") if c]
    load_before = os.getloadavg()
    started = time.time()
    rows: dict[str, list[list[str]]] = {"balance": [], "throughput": [], "ray": []}
    work = Path(tempfile.mkdtemp(prefix="graphopt-bench-partition-"))
    try:
        for name in args.models.split(","):
            print(f"{name} …", flush=True)
            run_model(name, args, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    command = "python benchmarks/partition.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## partition: balanced stages and pipelined execution",
        "",
        f"Machine: {machine()}, shared with other engineers: 1-minute load average {load_before[0]:.1f} at the "
        f"start and {load_after[0]:.1f} at the end ({(time.time() - started) / 60:.0f} min). "
        f"Versions: {versions()}.",
        "",
        f"Command: `{command.strip()}`",
        "",
        "Every stage directory is what `graphopt run MODEL --passes cleanup,partition --set partition.stages=K "
        "[--set partition.cost=profile] -o DIR` writes. Balance ratio = costliest stage / mean stage; "
        "*measured* = each stage timed alone (one thread, one micro-batch of "
        f"{args.micro_batch}, medians). Cut bytes = every tensor alive across a cut, per sample, summed over the "
        "cuts; *naive* = equal node counts per stage. Max abs diff: stitched stages against the unpartitioned "
        "model after cleanup (what partition itself changes) and against the original (cleanup's BatchNorm "
        "folding included).",
        "",
        *table(["model", "K", "cost", "balance (plan)", "naive balance", "balance (measured)", "cut bytes",
                "naive cut bytes", "cut / naive", "max abs diff vs cleaned", "vs original"], rows["balance"]),
        "",
        f"Throughput: {', '.join(f'{CASES[m][1]} rows of {m}' for m in args.models.split(','))} in batches of "
        f"{BATCH}, streamed through the stages (a thread per stage, one ORT thread each, micro-batches of "
        f"{args.micro_batch}) against one one-thread ORT session of the same cleaned model, run on the batches "
        f"whole and on the same micro-batches; {args.rounds} interleaved rounds. The speed-up is against the "
        "single session at its better batching in each round (median of per-round ratios, range beside it). "
        "On 2 cores nothing can beat 2x, so K = 3 and 4 only show what over-subscription costs.",
        "",
        *table(["model", "K", "cost", "single rows/s (whole batches)", "single rows/s (micro-batches)",
                "pipelined rows/s", "speed-up", "range"], rows["throughput"]),
    ]
    if rows["ray"]:
        lines += ["", "Ray (a local instance with 8 logical CPUs on the 2 cores, one actor per stage, one ORT thread "
                      "each) against the thread runner, timed in a second phase after the runs above (an idle Ray "
                      "instance takes CPU from whatever else runs) "
                      "on the same stream and micro-batches (cost model `" + args.costs[-1] + "`): the ratio is Ray's "
                      "throughput / the threads' (1.00 = equal), median of per-round ratios. Every Ray call costs a few ms of CPU "
                      "(serialising the stage's tensors, the actor's RPC; graphopt's local instance passes tensors up "
                      "to 8 MiB inline rather than through the object store), which on 2 saturated "
                      "cores comes out of the stages' time: larger micro-batches amortise it. *best of each* takes, in "
                      "each round, each backend at its fastest micro-batch.", "",
                  *table(["model", "K", "micro-batch", "threads rows/s", "ray rows/s", "ray / threads", "range"],
                        rows["ray"])]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
