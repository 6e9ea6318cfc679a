"""Models over 2 GB: build a model with ~3 GiB of weights in external data and run graphopt on it.

Records wall time and peak RSS per pass (`peak_rss_bytes` in the report is the process's running peak after
each pass) and of the whole run, against the 1.5x-of-weights target. The weights are written tensor by
tensor, never held in memory whole, so the builder itself stays small.

    .venv/bin/python benchmarks/big_model.py [--gib 3] [--passes cleanup,prune,quant]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent


def build(folder: Path, gib: float, width: int = 4096, hidden: int = 16384) -> tuple[Path, int]:
    """A stack of MatMul(width->hidden) + Relu + MatMul(hidden->width) blocks, weights in model.onnx.data."""
    folder.mkdir(parents=True, exist_ok=True)
    per_matrix = width * hidden * 4
    n_blocks = max(1, round(gib * 2**30 / (2 * per_matrix)))
    data_name = "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    offset = 0
    with open(folder / data_name, "wb") as fh:
        x = "input"
        for b in range(n_blocks):
            for j, shape in enumerate(((width, hidden), (hidden, width))):
                name = f"block{b}.w{j}"
                for rows in range(0, shape[0], 1024):  # write in slabs: never the whole matrix
                    slab = rng.standard_normal((min(1024, shape[0] - rows), shape[1]), dtype=np.float32)
                    fh.write((slab * (1.0 / np.sqrt(shape[0]))).astype(np.float32).tobytes())
                t = TensorProto()
                t.name, t.data_type = name, TensorProto.FLOAT
                t.dims.extend(shape)
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(per_matrix))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                offset += per_matrix
                inits.append(t)
            nodes += [helper.make_node("MatMul", [x, f"block{b}.w0"], [f"h{b}"], name=f"block{b}.up"),
                      helper.make_node("Relu", [f"h{b}"], [f"r{b}"], name=f"block{b}.relu"),
                      helper.make_node("MatMul", [f"r{b}", f"block{b}.w1"], [f"y{b}"], name=f"block{b}.down")]
            x = f"y{b}"
    nodes.append(helper.make_node("Identity", [x], ["output"]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, folder / "big.onnx")
    return folder / "big.onnx", offset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--passes", default="cleanup")
    ap.add_argument("--work", default="/tmp/graphopt-big")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    model, weight_bytes = build(work / "in", args.gib)
    build_s = time.perf_counter() - t0
    out = work / "out" / "big.opt.onnx"
    report = work / "report.json"
    cmd = [sys.executable, "-m", "graphopt.cli", "run", str(model), "--passes", args.passes, "-o", str(out),
           "--report", str(report), "--eval-samples", "16", "--batch-size", "8", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode not in (0, 1):
        print(proc.stderr)
        raise SystemExit(proc.returncode)
    data = json.loads(report.read_text())
    import onnxruntime

    lines = [
        "## Models over 2 GB (benchmarks/big_model.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxruntime "
        f"{onnxruntime.__version__}, onnx {onnx.__version__}. Command: `{' '.join(['graphopt'] + cmd[3:])}`.",
        f"Model: {data['input']['stats']['nodes']} nodes, "
        f"weights {weight_bytes / 2**30:.2f} GiB in external data (built in {build_s:.0f} s).",
        "",
        "| pass | wall s | peak RSS so far (GiB) | x weights | weights after (GiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for rec in data["passes"]:
        rss = rec.get("peak_rss_bytes") or 0
        lines.append(f"| {rec['name']} | {rec['seconds']:.1f} | {rss / 2**30:.2f} | {rss / weight_bytes:.2f} | "
                     f"{rec['after']['bytes'] / 2**30:.2f} |")
    v = data.get("validation") or {}
    lines += ["", f"Whole run (load, passes, save, validation with one ORT session at a time): wall {wall:.0f} s, "
              f"peak RSS {peak / 2**30:.2f} GiB = **{peak / weight_bytes:.2f}x the weights** (target <= 1.5x). "
              f"Exit code {proc.returncode}; output written: {data['output']['written']}; "
              f"output size {v.get('size', {}).get('candidate_bytes', 0) / 2**30:.2f} GiB; "
              f"max abs diff {v.get('agreement', {}).get('max_abs_diff', float('nan')):.3g}, "
              f"mean cosine {v.get('agreement', {}).get('mean_cosine', float('nan')):.6f}."]
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "big_model.md").write_text(text)
    print(text)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
