"""graphopt's quant pass against onnxruntime.quantization, side by side in one run.

Static QDQ (uint8 activations, int8 per-channel weights) for minmax, percentile and entropy on
digits_cnn, resnet_small and transformer_small: accuracy (digits, real labels) or cosine / top-1
agreement with fp32, CPU latency p50 at batch 1 and 8 measured interleaved in this process, size,
int8 kernels after ORT's optimizer, and quantization / calibration wall time and peak RSS, each call in
its own process. ORT's quantize_static gets its pre-processing (quant_pre_process) done beforehand, not
counted. Then dynamic int8 and weight-only int4 on transformer_small against quantize_dynamic and
MatMulNBitsQuantizer.

    .venv/bin/python benchmarks/quant_vs_ort.py            # writes benchmarks/results/quant.md
    .venv/bin/python benchmarks/quant_vs_ort.py --quick    # fewer timing runs (smoke test)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"
RESULTS = ROOT / "benchmarks" / "results" / "quant.md"
STATIC_METHODS = ("minmax", "percentile", "entropy")
ORT_METHOD = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
INT8_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                "MatMulInteger", "ConvInteger", "MatMulNBits"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def peak_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssWatch:
    """Highest RSS while the block runs, sampled every 2 ms (ru_maxrss cannot be reset)."""

    def __enter__(self) -> RssWatch:
        import threading

        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss / 2**20
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)


SCALED_DIR = Path(tempfile.gettempdir()) / "graphopt-bench-calib"


def calib_file(model: str) -> Path:
    """The model's calibration split, or for ``MODEL@N`` N samples made like it (see :func:`make_scaled`)."""
    if "@" in model:
        name, n = model.split("@")
        return SCALED_DIR / f"{name}_{n}.npz"
    return MODELS / f"{model}_calib.npz"


def model_file(model: str) -> Path:
    return MODELS / f"{model.split('@')[0]}.onnx"


def make_scaled(model: str, n: int) -> str:
    """N calibration samples drawn the way models/build.py draws the model's 32 (resnet_small: standard
    normal images; transformer_small: uniform token ids), with another seed: to see how calibration
    memory grows with the data."""
    rng = np.random.default_rng(100 + n)
    if model == "resnet_small":
        arrays = {"input": rng.standard_normal((n, 3, 224, 224), dtype=np.float32)}
    elif model == "transformer_small":
        arrays = {"input_ids": rng.integers(0, 1000, size=(n, 128), dtype=np.int64)}
    else:
        raise ValueError(model)
    SCALED_DIR.mkdir(exist_ok=True)
    np.savez(SCALED_DIR / f"{model}_{n}.npz", **arrays)
    return f"{model}@{n}"


def load(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as z:
        labels = z["labels"] if "labels" in z.files else None
        return {k: z[k] for k in z.files if k != "labels"}, labels


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over an .npz, batch by batch."""

    def __init__(self, path: Path, batch: int = 8) -> None:
        self.inputs, _ = load(path)
        self.batch, self.i = batch, 0
        self.n = len(next(iter(self.inputs.values())))

    def get_next(self):  # noqa: ANN201
        if self.i >= self.n:
            return None
        out = {k: v[self.i:self.i + self.batch] for k, v in self.inputs.items()}
        self.i += self.batch
        return out

    def __len__(self) -> int:
        return self.n


# --- workers (each in its own process) ------------------------------------------------------------------

def worker(kind: str, model: str, method: str, out: str) -> dict:
    base = peak_mb()
    if kind == "graphopt-quant":
        from graphopt import api

        t0 = time.perf_counter()
        result = api.optimize(str(model_file(model)), passes=["quant"], data=str(calib_file(model)),
                              set_options={"quant": {"calibration": method}}, output=out, validate=False)
        wall = time.perf_counter() - t0
        d = result.records[0].details
        return {"wall_s": wall, "calib_s": d["calibration"]["seconds"], "peak_mb": peak_mb(), "import_mb": base}
    if kind == "ort-quant":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        t0 = time.perf_counter()
        quantize_static(str(Path(out).parent / f"{model}.pre.onnx"), out, _Reader(calib_file(model)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]))
        return {"wall_s": time.perf_counter() - t0, "peak_mb": peak_mb(), "import_mb": base}
    if kind == "ort-calib":
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, RssWatch() as watch:
            cal = create_calibrator(Path(out).parent / f"{model_file(model).stem}.pre.onnx",
                                    list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                    augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                    calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]))
            cal.collect_data(_Reader(calib_file(model)))
            cal.compute_data()
        return {"calib_s": time.perf_counter() - t0, "peak_mb": peak_mb(), "increment_mb": watch.peak - watch.start}
    if kind == "graphopt-calib":
        from graphopt import calibrate
        from graphopt.context import PassContext
        from graphopt.data import open_data
        from graphopt.model_io import load_model
        from graphopt.passes._quant_plan import Selection, make_plan, preprocess
        from graphopt.runtime import SessionFactory

        wd = Path(tempfile.mkdtemp())
        try:
            with RssWatch() as whole:
                t0 = time.perf_counter()
                m = load_model(model_file(model))
                preprocess(m, PassContext(work_dir=wd))
                plan = make_plan(m, Selection(op_types=("Conv", "MatMul", "Gemm")), neighbours=True, fuse_relu=True)
                prep = time.perf_counter() - t0
                data = open_data(str(calib_file(model)))
                histogram = method in calibrate.HISTOGRAM_METHODS
                batch = calibrate.auto_batch_size(m, plan.calibrated, 32, histogram=histogram)
                with RssWatch() as only:
                    t0 = time.perf_counter()
                    calibrate.collect(m, plan.calibrated, data, SessionFactory(work_dir=wd), histogram=histogram,
                                      batch_size=batch, bins=calibrate.default_bins(method))
                    calib = time.perf_counter() - t0
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        return {"calib_s": calib, "prep_s": prep, "peak_mb": peak_mb(), "increment_mb": whole.peak - whole.start,
                "collect_increment_mb": only.peak - only.start, "batch": batch, "tensors": len(plan.calibrated)}
    if kind == "fp32":
        import onnxruntime as ort

        inputs, _ = load(calib_file(model))
        batch = int(method)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(model_file(model)), so, providers=["CPUExecutionProvider"])
        created = time.perf_counter() - t0
        n = len(next(iter(inputs.values())))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                sess.run(None, {k: v[i:i + batch] for k, v in inputs.items()})
            times.append(time.perf_counter() - t0)
        return {"fp32_s": float(np.median(times)), "fp32_with_session_s": created + float(np.median(times))}
    raise SystemExit(f"unknown worker {kind}")


def run_worker(kind: str, model: str, method: str, out: Path, times: int = 2) -> dict:
    """Run a worker ``times`` times in fresh processes; times are the fastest run's (least disturbed by
    other jobs on the machine), memory figures the largest."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    runs = []
    for _ in range(times):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, model, method, str(out)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {kind} {model} {method} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    merged = dict(runs[0])
    for key in merged:
        values = [r[key] for r in runs]
        if key.endswith("_s"):
            merged[key] = min(values)
        elif key.endswith("_mb"):
            merged[key] = max(values)
    return merged


# --- measurements in this process ------------------------------------------------------------------------

def optimized_ops(path: Path, tmp: Path) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def kernels(path: Path, tmp: Path) -> str:
    ops = optimized_ops(path, tmp)
    q = sum(v for k, v in ops.items() if k in INT8_KERNELS)
    f = sum(v for k, v in ops.items() if k in FLOAT_COMPUTE)
    return f"{q} int8 / {f} float"


def outputs(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def quality(ref_path: Path, path: Path, model: str) -> tuple[str, tuple[float, ...]]:
    """Text for the table and a tuple to compare (higher is better): accuracy, or (top-1, cosine)."""
    if model.startswith("digits"):
        inputs, labels = load(MODELS / f"{model}_test.npz")
        acc = float(np.mean(outputs(path, inputs).argmax(1) == labels))
        return f"acc {100 * acc:.2f}%", (acc,)
    inputs, _ = load(calib_file(model))
    r, c = outputs(ref_path, inputs).astype(np.float64), outputs(path, inputs).astype(np.float64)
    cos = float(np.mean(np.sum(r * c, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))))
    top1 = float(np.mean(r.argmax(1) == c.argmax(1)))
    return f"cos {cos:.5f}, top-1 {100 * top1:.1f}%", (top1, cos)


def latency_rounds(paths: list[Path], model: str, batch: int, repeat: int, threads: int = 0,
                   rounds: int = 5) -> list[list[float]]:
    """p50 per model in each of ``rounds`` rounds of interleaved runs (fresh sessions each round)."""
    import onnxruntime as ort

    from graphopt.runtime import Runner, time_interleaved

    inputs, _ = load(calib_file(model))
    fixed = {k: np.ascontiguousarray(np.concatenate([v] * (-(-batch // len(v))))[:batch]) for k, v in inputs.items()}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    per_round = []
    for _ in range(rounds):
        runners = [Runner(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])) for p in paths]
        timings = time_interleaved(runners, fixed, warmup=3, repeat=repeat, budget_s=40 if batch > 1 else 15)
        per_round.append([t.p50_ms for t in timings])
    return per_round


def medians(per_round: list[list[float]]) -> list[float]:
    """Median p50 per model over the rounds of :func:`latency_rounds`."""
    return [float(np.median([r[i] for r in per_round])) for i in range(len(per_round[0]))]


def latency(paths: list[Path], model: str, batch: int, repeat: int, threads: int = 0) -> list[float]:
    return medians(latency_rounds(paths, model, batch, repeat, threads))


def ratio(per_round: list[list[float]], a: int, b: int) -> float:
    """Median over rounds of model a's p50 / model b's p50 in the same round: what survives the load of
    other jobs on a shared machine better than a ratio of medians."""
    return float(np.median([r[a] / r[b] for r in per_round]))


def size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def machine() -> str:
    return f"{os.cpu_count()}-core CPU, {cpu_name()}"


def versions() -> str:
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript

    return (f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, onnx_ir {onnx_ir.__version__}, "
            f"onnxscript {onnxscript.__version__}, numpy {np.__version__}, Python {platform.python_version()}")


# --- the run -------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "MODEL", "METHOD", "OUT"))
    ap.add_argument("--models", default="digits_cnn,resnet_small,transformer_small")
    ap.add_argument("--methods", default=",".join(STATIC_METHODS))
    ap.add_argument("--quick", action="store_true", help="few timing runs (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from onnxruntime.quantization.shape_inference import quant_pre_process

    models = args.models.split(",")
    methods = args.methods.split(",")
    repeat = 8 if args.quick else 40
    tmp = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    lines: list[str] = []
    say = lines.append
    cmd = "python benchmarks/quant_vs_ort.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    say("## quant: graphopt vs onnxruntime.quantization\n")
    say(f"- machine: {machine()} (shared with other jobs: latencies are medians of interleaved runs, read the ratios)")
    say(f"- versions: {versions()}")
    say(f"- command: `{cmd}`")
    say("- settings: static QDQ, uint8 activations, int8 symmetric per-channel weights, same calibration data "
        "(`*_calib.npz`) for both; ORT gets `quant_pre_process` first (not timed) and its default calibrator "
        "options; graphopt does its own preprocessing inside the pass (timed). Quality: digits_cnn accuracy on "
        "its labelled test split; resnet_small / transformer_small cosine and top-1 agreement with fp32 on the "
        "calibration samples (the only real samples built for them). Latency: ORT CPU EP, default threads and 1 "
        f"thread; 5 rounds (fresh sessions each) of up to {repeat} interleaved runs; ms columns are medians of the per-round p50s, ratio columns medians of the per-round ratios. Load average (1 min) at the start: {os.getloadavg()[0]:.1f}. Memory: peak RSS (VmHWM) of a process that does only that call (imports included).\n")
    targets: list[tuple[str, bool, str]] = []
    calib_rows: list[str] = []
    for model in models:
        src = MODELS / f"{model}.onnx"
        pre = tmp / f"{model}.pre.onnx"
        quant_pre_process(str(src), str(pre))
        say(f"### {model}\n")
        say("| method | tool | quality | int8 kernels (after ORT opt.) | size MB | quant wall s | quant peak RSS MB |")
        say("| --- | --- | --- | --- | --- | --- | --- |")
        say(f"| fp32 | - | {quality(src, src, model)[0]} | {kernels(src, tmp)} | {size_mb(src):.2f} | - | - |")
        produced: dict[str, dict[str, Path]] = {}
        for method in methods:
            ours, theirs = tmp / f"{model}.{method}.graphopt.onnx", tmp / f"{model}.{method}.ort.onnx"
            g = run_worker("graphopt-quant", model, method, ours)
            o = run_worker("ort-quant", model, method, theirs)
            produced[method] = {"graphopt": ours, "ort": theirs}
            scores = {}
            for tool, path, info in (("graphopt", ours, g), ("ORT", theirs, o)):
                text, scores[tool] = quality(src, path, model)
                say(f"| {method} | {tool} | {text} | {kernels(path, tmp)} | {size_mb(path):.2f} "
                    f"| {info['wall_s']:.2f} | {info['peak_mb']:.0f} |")
            a, b = scores["graphopt"], scores["ORT"]
            ok = a[0] >= b[0] - 1e-9 and (len(a) == 1 or a[1] >= b[1] - 1e-4)
            fmt = ", ".join
            targets.append((f"quality >= ORT's: {model} {method}", ok,
                            f"graphopt {fmt(f'{v:.5f}' for v in a)} vs ORT {fmt(f'{v:.5f}' for v in b)}"))
            gc_ = run_worker("graphopt-calib", model, method, tmp / "unused")
            oc = run_worker("ort-calib", model, method, theirs)
            fp = run_worker("fp32", model, str(gc_["batch"]), tmp / "unused")
            if method in ("entropy", "percentile"):
                targets.append((f"calibration peak RSS <= 0.15x ORT's (whole process): {model} {method}",
                                gc_["peak_mb"] <= 0.15 * oc["peak_mb"], f"{gc_['peak_mb'] / oc['peak_mb']:.2f}x"))
                targets.append((f"calibration RSS increment <= 0.15x ORT's: {model} {method}",
                                gc_["collect_increment_mb"] <= 0.15 * oc["increment_mb"],
                                f"{gc_['collect_increment_mb'] / max(oc['increment_mb'], 1):.2f}x"))
                targets.append((f"calibration wall <= 0.3x ORT's: {model} {method}", gc_["calib_s"] <= 0.3 * oc["calib_s"],
                                f"{gc_['calib_s'] / oc['calib_s']:.2f}x"))
            targets.append((f"calibration wall <= 2x fp32 inference: {model} {method}",
                            gc_["calib_s"] <= 2 * fp["fp32_s"], f"{gc_['calib_s'] / fp['fp32_s']:.2f}x"))
            calib_rows.append(
                f"| {model} | {method} | {gc_['calib_s']:.2f} | {oc['calib_s']:.2f} | {gc_['calib_s'] / oc['calib_s']:.2f} "
                f"| {gc_['peak_mb']:.0f} | {oc['peak_mb']:.0f} | {gc_['peak_mb'] / oc['peak_mb']:.2f} "
                f"| {gc_['increment_mb']:.0f} | {gc_['collect_increment_mb']:.0f} | {oc['increment_mb']:.0f} "
                f"| {gc_['collect_increment_mb'] / max(oc['increment_mb'], 1):.2f} "
                f"| {gc_['batch']} | {fp['fp32_s']:.2f} | {gc_['calib_s'] / fp['fp32_s']:.2f} "
                f"| {gc_['calib_s'] / fp['fp32_with_session_s']:.2f} |")
        say("")
        batches = (1, 8)
        say("| method | threads | batch | fp32 ms | ORT ms | graphopt ms | ORT / fp32 | graphopt / fp32 | graphopt / ORT |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for method in methods:
            for threads in (0, 1):
                for b in batches:
                    rounds = latency_rounds([src, produced[method]["ort"], produced[method]["graphopt"]], model, b,
                                            repeat, threads)
                    f, o, g = medians(rounds)
                    of, gf, go = ratio(rounds, 1, 0), ratio(rounds, 2, 0), ratio(rounds, 2, 1)
                    tname = "default" if threads == 0 else str(threads)
                    say(f"| {method} | {tname} | {b} | {f:.3f} | {o:.3f} | {g:.3f} | {of:.3f} | {gf:.3f} "
                        f"| {go:.3f} |")
                    targets.append((f"latency <= ORT's: {model} {method} b{b} threads={tname}", go <= 1.0,
                                    f"{go:.3f}x"))
                    if model == "resnet_small":
                        limit = 0.45 if b == 1 else 0.28
                        targets.append((f"resnet_small b{b} <= {limit}x fp32: {method} threads={tname}",
                                        gf <= limit, f"{gf:.3f}x"))
        say("")
    say("### calibration alone (each call in its own process)\n")
    say("graphopt: `graphopt.calibrate.collect` on the loaded, preprocessed model (streaming; batch chosen to keep "
        "the fetched activations alive at once under 32 MB: for the histogram methods ORT runs the next batch "
        "while this one is binned, so a batch gets 16 MB); ORT: `create_calibrator` + `collect_data` + `compute_data` on the "
        "pre-processed model with all its quantizable op types, batches of 8 (this includes its model loading). "
        "Peak = VmHWM of the whole process (imports included: graphopt's imports alone take ~125 MB, "
        "onnxruntime.quantization's ~70 MB). Increments = highest RSS during the work (sampled every 2 ms) minus "
        "the RSS just before it: graphopt +load/prep/calib covers load + preprocess + calibration, graphopt "
        "+calib the calibration call alone; ORT + covers its calibrator. fp32 = the fp32 model (default ORT "
        "options) run over the same data at the same batch size, in its own process (median of 3 passes; the last "
        "column adds its session creation, as the calibration time includes its own). Each worker runs twice: "
        "fastest time, largest memory.\n")
    say("| model | method | graphopt s | ORT s | time ratio | graphopt peak MB | ORT peak MB | peak ratio "
        "| graphopt +load/prep/calib MB | graphopt +calib MB | ORT + MB | +calib / ORT+ | batch | fp32 s "
        "| calib / fp32 | calib / (fp32 + its session) |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines.extend(calib_rows)
    say("")
    scaled = [m for m in ("resnet_small", "transformer_small") if m in models and "entropy" in methods]
    if scaled and not args.quick:
        say("### calibration memory as the calibration data grows (entropy)\n")
        say("The same calibration-alone workers on 32 and 128 samples drawn like each model's calibration split "
            "(`make_scaled`; same data for both tools). ORT's calibrators keep every observed activation until "
            "`compute_data`, so their memory grows with the data; graphopt keeps histograms, so its memory "
            "does not.\n")
        say("| model | samples | graphopt s | ORT s | time ratio | graphopt peak MB | ORT peak MB | peak ratio "
            "| graphopt +calib MB | ORT + MB | increment ratio |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for model in scaled:
            for n in (32, 128):
                name = make_scaled(model, n)
                gc_ = run_worker("graphopt-calib", name, "entropy", tmp / "unused")
                oc = run_worker("ort-calib", name, "entropy", tmp / f"{model}.entropy.ort.onnx")
                say(f"| {model} | {n} | {gc_['calib_s']:.2f} | {oc['calib_s']:.2f} "
                    f"| {gc_['calib_s'] / oc['calib_s']:.2f} | {gc_['peak_mb']:.0f} | {oc['peak_mb']:.0f} "
                    f"| {gc_['peak_mb'] / oc['peak_mb']:.2f} | {gc_['collect_increment_mb']:.0f} "
                    f"| {oc['increment_mb']:.0f} | {gc_['collect_increment_mb'] / max(oc['increment_mb'], 1):.2f} |")
                if n == 128:
                    targets.append((f"calibration peak RSS <= 0.15x ORT's (whole process), 128 samples: {model}",
                                    gc_["peak_mb"] <= 0.15 * oc["peak_mb"], f"{gc_['peak_mb'] / oc['peak_mb']:.2f}x"))
        shutil.rmtree(SCALED_DIR, ignore_errors=True)
        say("")
    if "transformer_small" in models:
        say(weight_modes(tmp, repeat))
    say("### targets (issue 4)\n")
    say("| target | met | measured |")
    say("| --- | --- | --- |")
    for name, ok, value in targets:
        say(f"| {name} | {'met' if ok else 'NOT met'} | {value} |")
    say("")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)


def weight_modes(tmp: Path, repeat: int) -> str:
    """Dynamic int8 and weight-only int4 on transformer_small, graphopt vs ORT's tools."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from graphopt import api

    model = "transformer_small"
    src = MODELS / f"{model}.onnx"
    pre = tmp / f"{model}.pre.onnx"
    made: dict[str, Path] = {}
    for name, opts in (("dynamic", {"mode": "dynamic"}),
                       ("int4", {"mode": "weight_only", "block_size": "32"}),
                       ("int4 acc4", {"mode": "weight_only", "block_size": "32", "accuracy_level": "4"})):
        out = tmp / f"{model}.{name.replace(' ', '_')}.graphopt.onnx"
        api.optimize(str(src), passes=["quant"], set_options={"quant": opts}, output=out, validate=False)
        made[f"graphopt {name}"] = out
    out = tmp / f"{model}.dynamic.ort.onnx"
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True)
    made["ORT dynamic"] = out
    for name, level in (("int4", None), ("int4 acc4", 4)):
        q = MatMulNBitsQuantizer(str(src), block_size=32, is_symmetric=True, accuracy_level=level)
        q.process()
        out = tmp / f"{model}.{name.replace(' ', '_')}.ort.onnx"
        q.model.save_model_to_file(str(out), False)
        made[f"ORT {name}"] = out
    rows = ["### transformer_small: dynamic int8 and weight-only int4 (block 32, symmetric)\n",
            "| variant | quality | kernels | size MB | b1 ms | b1 / fp32 | b8 ms | b8 / fp32 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = list(made)
    lat = {b: latency([src] + [made[n] for n in names], model, b, repeat) for b in (1, 8)}
    rows.append(f"| fp32 | - | {kernels(src, tmp)} | {size_mb(src):.2f} | {lat[1][0]:.2f} | 1.000 | {lat[8][0]:.2f} | 1.000 |")
    for i, n in enumerate(names, start=1):
        rows.append(f"| {n} | {quality(src, made[n], model)[0]} | {kernels(made[n], tmp)} | {size_mb(made[n]):.2f} "
                    f"| {lat[1][i]:.2f} | {lat[1][i] / lat[1][0]:.3f} | {lat[8][i]:.2f} | {lat[8][i] / lat[8][0]:.3f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
