"""Benchmark the fp16 pass on every reference model: size, error and latency against float32.

For each model and pass setting (float16 with the cuda policy, the default; float16 with the cpu policy;
bfloat16 with the cuda policy where the provider runs it): file size ratio, max abs error and mean cosine
against the float32 model on the same provider, top-1 agreement / accuracy, and the p50 latency ratio with
the float32 model timed interleaved (IO binding on CUDA). ``--probe`` instead lists which ops the
provider runs natively in float16/bfloat16 (how the cpu policy's list was derived).

    .venv/bin/python benchmarks/fp16.py [--providers cpu] [--out benchmarks/results/fp16.md] [--append]
    .venv/bin/python benchmarks/fp16.py --probe cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
from onnx import TensorProto
from onnx import helper as oh

from graphopt.data import input_specs
from graphopt.model_io import model_to_bytes
from graphopt.options import build
from graphopt.registry import get
from graphopt.runtime import (Runner, SessionFactory, SessionSettings, resolve_providers, short_name,
                              time_interleaved)
from _common import machine

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "build"
REFERENCE_MODELS = ["digits_mlp", "digits_cnn", "resnet_small", "transformer_small"]
EVAL_DATA = {"digits_mlp": "digits_mlp_test.npz", "digits_cnn": "digits_cnn_test.npz",
             "resnet_small": "resnet_small_calib.npz", "transformer_small": "transformer_small_calib.npz"}
#: Latency batch per provider kind (small models get larger batches so the run is not all overhead).
LATENCY_BATCH = {"cpu": {"digits_mlp": 32, "digits_cnn": 32, "resnet_small": 1, "transformer_small": 1},
                 "cuda": {"digits_mlp": 256, "digits_cnn": 256, "resnet_small": 32, "transformer_small": 32}}
SETTINGS = [("fp16 (provider=cuda, default)", {}), ("fp16 provider=cpu", {"provider": "cpu"}),
            ("bf16 (provider=cuda)", {"bf16": True})]


def versions() -> str:
    return (f"onnxruntime {ort.__version__} ({', '.join(short_name(p) for p in ort.get_available_providers())}), "
            f"onnx {onnx.__version__}, onnx_ir {ir.__version__}, onnxscript {onnxscript.__version__}")


def eval_inputs(name: str, model: ir.Model) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    path = MODELS / EVAL_DATA[name]
    if path.is_file():
        with np.load(path) as z:
            return ({k: z[k] for k in z.files if k != "labels"}, z["labels"] if "labels" in z.files else None,
                    path.name)
    rng = np.random.default_rng(0)  # the GPU machine may not carry the data files
    inputs = {}
    for spec in input_specs(model):
        shape = [32 if not isinstance(d, int) else d for d in spec.shape]
        inputs[spec.name] = (rng.integers(0, 1000, shape) if spec.dtype.kind in "iu"
                             else rng.standard_normal(shape)).astype(spec.dtype)
    return inputs, None, "random inputs (32)"


def run_batches(runner: Runner, inputs: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    return np.concatenate([runner.run({k: v[i:i + batch] for k, v in inputs.items()})[0].astype(np.float32)
                           for i in range(0, n, batch)])


def bench(name: str, provider: str, sessions: SessionFactory, repeat: int, batch: int | None = None) -> list[str]:
    path = MODELS / f"{name}.onnx"
    original = ir.load(path)
    ref_bytes = model_to_bytes(original)
    inputs, labels, source = eval_inputs(name, original)
    ref_runner = Runner(sessions.session(path, provider))
    ref = run_batches(ref_runner, inputs)
    kind = short_name(provider)
    lat_batch = batch or LATENCY_BATCH.get(kind, LATENCY_BATCH["cuda"])[name]
    lat_inputs = {k: np.concatenate([v] * (lat_batch // len(v) + 1))[:lat_batch] for k, v in inputs.items()}
    rows = []
    for label, options in SETTINGS:
        if options.get("bf16") and kind == "cpu":
            continue  # the CPU EP has no bfloat16 compute kernels (see --probe cpu)
        model = ir.load(path)
        cls = get("fp16")
        p = cls(build(cls.Options, "fp16", options))
        p(model)
        data = model_to_bytes(model)
        try:
            runner = Runner(sessions.session(model, provider))
            out = run_batches(runner, inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. an op without a bfloat16 kernel on this provider
            rows.append(f"| {name} | {label} | {len(data) / len(ref_bytes):.3f} | failed: "
                        f"{str(exc).splitlines()[0][:150]} | | | | | | {source} |")
            print(rows[-1], flush=True)
            continue
        err = float(np.max(np.abs(out - ref)))
        cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
        agree = f"{np.mean(ref.argmax(1) == out.argmax(1)):.2%}"
        if labels is not None:
            agree += f" (acc {np.mean(ref.argmax(1) == labels):.2%} → {np.mean(out.argmax(1) == labels):.2%})"
        t_ref, t_new = time_interleaved([ref_runner, runner], lat_inputs, repeat=repeat, budget_s=30)
        low, float32 = p.details["nodes_low_precision"], p.details["nodes_float32"]
        rows.append(f"| {name} | {label} | {len(data) / len(ref_bytes):.3f} | {err:.2e} "
                    f"({err / float(np.max(np.abs(ref))):.1e} rel) | {np.mean(cos):.7f} | {agree} | "
                    f"{low}/{low + float32} | {p.details['casts_inserted']} | "
                    f"{t_new.p50_ms / t_ref.p50_ms:.3f}× (b{lat_batch}: "
                    f"{t_ref.p50_ms:.3f} → {t_new.p50_ms:.3f} ms) | {source} |")
        print(rows[-1], flush=True)
    return rows


# -- probe: which ops does a provider run natively in low precision? ------------------------------------------
PROBE_UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Softplus",
               "LeakyRelu", "HardSigmoid", "HardSwish", "Identity", "Softmax", "LogSoftmax", "Transpose",
               "Flatten", "ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "Clip", "Round", "Floor"]
PROBE_BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "MatMul", "Equal", "Less", "Greater", "PRelu"]


def _probe_models(elem: int) -> dict[str, onnx.ModelProto]:
    def tensor(name: str, dims: list[int]) -> TensorProto:  # a constant of the probed type
        return oh.make_tensor(name, elem, dims, [1.0] * int(np.prod(dims)))

    def model(op: str, n_in: int, shape: list[int], attrs: dict | None = None, consts: list | None = None,
              opset: int = 18) -> onnx.ModelProto:
        names = [f"x{i}" for i in range(n_in)] + [c.name for c in consts or []]
        nodes = [oh.make_node(op, names, ["y"], **(attrs or {}))]
        g = oh.make_graph(nodes, op, [oh.make_tensor_value_info(f"x{i}", elem, shape) for i in range(n_in)],
                          [oh.make_value_info("y", onnx.TypeProto())], initializer=consts or [])
        m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
        m.ir_version = 10  # what every onnxruntime in use reads
        m = onnx.shape_inference.infer_shapes(m)
        inferred = [v for v in m.graph.value_info if v.name == "y"]
        if inferred:
            m.graph.output[0].CopyFrom(inferred[0])
        return m

    i64 = lambda name, vals: oh.make_tensor(name, TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    x4 = [2, 4, 8, 8]
    models = {op: model(op, 1, x4) for op in PROBE_UNARY}
    models.update({op: model(op, 2, x4 if op != "MatMul" else [2, 8, 8]) for op in PROBE_BINARY})
    models.update({
        "Gemm": model("Gemm", 2, [8, 8]), "Conv": model("Conv", 2, [4, 4, 3, 3]),
        "ConvTranspose": model("ConvTranspose", 2, [4, 4, 3, 3]),
        "MaxPool": model("MaxPool", 1, x4, {"kernel_shape": [2, 2]}),
        "AveragePool": model("AveragePool", 1, x4, {"kernel_shape": [2, 2]}),
        "LayerNormalization": model("LayerNormalization", 3, [8]),
        "BatchNormalization": model("BatchNormalization", 1, x4, consts=[tensor(n, [4]) for n in "sbmv"]),
        "Gelu(opset20)": model("Gelu", 1, x4, opset=20),
        "Concat": model("Concat", 2, x4, {"axis": 0}),
        "Reshape": model("Reshape", 1, x4, consts=[i64("s", [-1])]),
        "Gather": model("Gather", 1, x4, consts=[i64("i", [0])]),
        "Slice": model("Slice", 1, x4, consts=[i64("st", [0]), i64("en", [1])]),
        "Squeeze": model("Squeeze", 1, [1, 4], consts=[i64("a", [0])]),
        "Unsqueeze": model("Unsqueeze", 1, x4, consts=[i64("a", [0])]),
        "Expand": model("Expand", 1, [1, 4], consts=[i64("s", [3, 4])]),
        "Tile": model("Tile", 1, [1, 4], consts=[i64("r", [3, 1])]),
        "Pad": model("Pad", 1, [4], consts=[i64("p", [1, 1])]),
        "Where": model("Where", 2, [4], consts=[oh.make_tensor("c", TensorProto.BOOL, [4], [1, 0, 1, 0])]),
        "Max(3 inputs)": model("Max", 3, x4),
        "CumSum": model("CumSum", 1, [4], consts=[oh.make_tensor("ax", TensorProto.INT64, [], [0])]),
        "Resize": model("Resize", 1, x4, {"mode": "nearest"},
                        consts=[oh.make_tensor("r", TensorProto.FLOAT, [0], []),
                                oh.make_tensor("sc", TensorProto.FLOAT, [4], [1, 1, 2, 2])]),
    })
    # Where's condition comes first.
    node = models["Where"].graph.node[0]
    node.input[:] = ["c", "x0", "x1"]
    return models


def probe(provider: str) -> str:
    """Which ops the provider runs natively (no inserted Cast, no fallback to CPU), from ORT's profile."""
    lines = [f"## fp16: {short_name(provider)} EP low-precision op coverage (--probe)", "",
             f"Machine: {machine([provider])}. Versions: {versions()}.", "",
             f"Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`", "",
             "native = the op ran on the provider with no Cast inserted around it; otherwise what ORT did.", "",
             "| op | float16 | bfloat16 |", "| --- | --- | --- |"]
    results: dict[str, dict[str, str]] = {}
    for dtype_name, elem in (("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)):
        for op, m in _probe_models(elem).items():
            results.setdefault(op, {})[dtype_name] = _probe_one(m, provider, op.split("(")[0])
    for op in sorted(results):
        lines.append(f"| {op} | {results[op]['float16']} | {results[op]['bfloat16']} |")
    return "\n".join(lines) + "\n"


def _probe_one(model: onnx.ModelProto, provider: str, op: str) -> str:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "probe")
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            np_type = {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(i.type)
            if np_type is None:  # bfloat16: ORT's python API takes it as an OrtValue only
                import ml_dtypes
                arr = np.ones(shape, ml_dtypes.bfloat16)
                feeds[i.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16),
                                                                               TensorProto.BFLOAT16)
            else:
                feeds[i.name] = np.ones(shape, np_type)
        sess.run_with_ort_values([o.name for o in sess.get_outputs()],
                                 {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                                  for k, v in feeds.items()})
        events = json.loads(Path(sess.end_profiling()).read_text())
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not fail
        return "refused: " + str(exc).splitlines()[0].split(" : ")[-1].strip()[:70]
    ran = [(e["args"].get("op_name"), e["args"].get("provider")) for e in events
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    extra = sorted({o for o, _ in ran if o not in (op, "Cast")} - {None})
    casts = sum(1 for o, _ in ran if o == "Cast") - sum(1 for n in model.graph.node if n.op_type == "Cast")
    where = {p for o, p in ran if o == op}
    if not where:
        return "fused/removed" + (f" ({', '.join(extra)})" if extra else "")
    if where != {provider}:
        return f"on {', '.join(sorted(short_name(p) for p in where))}"
    if casts > 0:
        return f"Casts inserted ({casts})"
    return "native"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp16.md"))
    parser.add_argument("--append", action="store_true", help="append the section to --out")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads on CPU")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--models", default=",".join(REFERENCE_MODELS))
    parser.add_argument("--batch", type=int, help="latency batch for every model (default: per model and provider)")
    parser.add_argument("--probe", metavar="PROVIDER", help="list the provider's float16/bfloat16 op coverage")
    args = parser.parse_args()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if args.probe:
        text = probe(resolve_providers(args.probe)[0])
    else:
        providers = resolve_providers(args.providers)
        sessions = SessionFactory(SessionSettings(intra_op_threads=args.threads))
        rows = []
        for provider in providers:
            for name in args.models.split(","):
                rows += [r.replace("| ", f"| {short_name(provider)} | ", 1) for r in
                         bench(name, provider, sessions, args.repeat, args.batch)]
        text = "\n".join([
            f"## fp16: float16 / bfloat16 on the reference models ({', '.join(map(short_name, providers))})",
            "",
            f"Machine: {machine(providers)}. ORT CPU EP with {args.threads} intra-op thread(s). "
            f"Versions: {versions()}.",
            "",
            f"Command: `{command}`",
            "",
            "Size = serialized model bytes / float32 model bytes. Error = max |out - float32 out| on the same "
            "provider over the data named (rel = / max |float32 out|). Latency = p50 converted / p50 float32, "
            "timed interleaved in one process (IO binding on CUDA), batch shown. Nodes low = nodes with a "
            "float16/bfloat16 output / nodes with a float output. bfloat16 is not run on the CPU EP (it has "
            "no bfloat16 compute kernels).",
            "",
            "| provider | model | setting | size ratio | max abs error | mean cosine | top-1 agreement | "
            "nodes low | Casts added | latency ratio | data |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows, "",
        ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():  # one "## " title per results file
        text = out.read_text().rstrip("\n") + "\n\n" + text.replace("## ", "### ", 1)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
