"""partition + stages: stitched stages equal the original model (1e-5), the manifest says what crosses each
cut, the DP is optimal, bad options exit 2, and a failing stage surfaces its error without hanging."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import assert_user_error, REFERENCE_MODELS, load_npz, ort_outputs
from graphopt import options as options_mod
from graphopt.context import PassContext
from graphopt.errors import UserError
from graphopt.model_io import load_model, model_to_bytes
from graphopt.registry import get
from graphopt.runtime import SessionFactory, SessionSettings
from graphopt.stages import (MANIFEST_NAME, PLAN_KEY, StageFailed, StagePipeline, is_partitioned, read_plan,
                             write_partitioned)

DATA = {"digits_mlp": ("digits_mlp_test.npz", 64), "digits_cnn": ("digits_cnn_test.npz", 64),
        "resnet_small": ("resnet_small_calib.npz", 6), "transformer_small": ("transformer_small_calib.npz", 16)}
ONE_THREAD = SessionFactory(SessionSettings(intra_op_threads=1))


def partition(model: ir.Model, **opts) -> object:
    cls = get("partition")
    p = cls(options_mod.build(cls.Options, "partition", opts), PassContext())
    p(model)
    return p


def make_dir(model_path: Path, out: Path, **opts) -> tuple[Path, dict]:
    model = load_model(model_path)
    partition(model, **opts)
    write_partitioned(model, out)
    return out, read_plan(model)


def close_enough(ref: list[np.ndarray], got: list[np.ndarray], tol: float = 1e-5) -> None:
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        assert np.abs(r.astype(np.float64) - g).max() <= tol * max(1.0, float(np.abs(r).max()))


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_stitched_stages_equal_the_original(models_dir, tmp_path, name):
    """K = 1…4 on every reference model; micro-batches and whole batches alike."""
    file, rows = DATA[name]
    inputs, _ = load_npz(models_dir / file, rows)
    ref = ort_outputs(models_dir / f"{name}.onnx", inputs)
    for k in (1, 2, 3, 4):
        out, plan = make_dir(models_dir / f"{name}.onnx", tmp_path / f"k{k}", stages=k)
        assert len(plan["stages"]) == k
        assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME] + [f"stage_{i}.onnx" for i in range(k)])
        with StagePipeline.from_dir(out, micro_batch=-(-rows // 3), session_factory=ONE_THREAD) as pipe:
            assert pipe.output_names == [o.name for o in load_model(models_dir / f"{name}.onnx").graph.outputs]
            close_enough(ref, pipe.run(inputs))
            assert [s["items"] for s in pipe.stage_stats()] == [3] * k  # really split into 3 micro-batches
        with StagePipeline.from_dir(out, devices="cpu") as pipe:  # whole batches, the core's way
            close_enough(ref, pipe.run(inputs))


def test_partitioned_model_stays_one_valid_runnable_model(models_dir):
    model = load_model(models_dir / "digits_cnn.onnx")
    assert not is_partitioned(model)
    with pytest.raises(UserError, match="no partition plan"):
        write_partitioned(model, Path("/nonexistent/never"))
    partition(model, stages=3)
    assert is_partitioned(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    assert PLAN_KEY in {p.key for p in proto.metadata_props}
    names = [n.name for n in model.graph]
    assert all(names) and len(set(names)) == len(names)
    plan = json.loads(model.metadata_props[PLAN_KEY])
    assert sum(len(s["nodes"]) for s in plan["stages"]) == len(names)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 32)
    close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), ort_outputs(model_to_bytes(model), inputs))


@pytest.mark.parametrize("name,k", [("resnet_small", 3), ("transformer_small", 4)])
def test_manifest_schema(models_dir, tmp_path, name, k):
    out, plan = make_dir(models_dir / f"{name}.onnx", tmp_path / "p", stages=k)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format"] == "graphopt.stages/1"
    original = load_model(models_dir / f"{name}.onnx")
    assert m["inputs"] == [v.name for v in original.graph.inputs]
    assert m["outputs"] == [v.name for v in original.graph.outputs]
    assert m["batch_axis"] == 0
    costs = [s["predicted_cost"] for s in m["stages"]]
    assert m["balance_ratio"] == pytest.approx(max(costs) / (sum(costs) / k))
    assert sum(s["cost_share"] for s in m["stages"]) == pytest.approx(1.0)
    available = set(m["inputs"])
    for i, stage in enumerate(m["stages"]):
        assert stage["index"] == i and stage["file"] == f"stage_{i}.onnx"
        assert stage["device"] == "cpu" and stage["provider"] == "CPUExecutionProvider"
        proto = onnx.load(str(out / stage["file"]), load_external_data=False)
        assert [v.name for v in proto.graph.input] == stage["inputs"]
        assert [v.name for v in proto.graph.output] == stage["outputs"]
        assert set(stage["inputs"]) <= available  # everything a stage reads was made before it
        available = set(stage["keep_after"])
        if i < k - 1:
            t = m["transfers"][i]
            assert t["after_stage"] == i and t["tensors"] == stage["keep_after"]
            assert set(stage["outputs"]) <= set(t["tensors"]) | set(m["outputs"])
            total = 0
            for name_ in t["tensors"]:
                info = m["tensors"][name_]
                per = int(np.prod(info["shape_per_sample"])) * np.dtype(info["dtype"]).itemsize
                assert info["bytes_per_sample"] == per and info["produced_by"] < i + 1
                assert max(info["consumed_by"] or [k]) > i or info["model_output"]
                total += per
            assert t["bytes_per_sample"] == total == m["cut_bytes_per_sample"][i]
    assert set(m["stages"][-1]["keep_after"]) == set(m["outputs"])
    # the plan the pass wrote and the manifest agree on the cut sizes
    assert plan["cut_bytes_per_sample"] == m["cut_bytes_per_sample"]


@pytest.mark.parametrize("name", ["resnet_small", "transformer_small"])
def test_balanced_and_no_worse_balanced_than_equal_node_split(models_dir, name):
    for k in (2, 3, 4):
        model = load_model(models_dir / f"{name}.onnx")
        partition(model, stages=k)
        plan = read_plan(model)
        assert plan["balance_ratio"] <= 1.15, (k, plan["balance_ratio"])
        assert plan["balance_ratio"] <= plan["naive_split"]["balance_ratio"] + 1e-9


def test_dp_is_optimal_against_brute_force():
    from graphopt.passes.partition import best_cuts, stage_costs

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(4, 10))
        k = int(rng.integers(2, min(n, 4) + 1))
        costs = rng.integers(1, 20, n).astype(float)
        cross = np.concatenate([[0], rng.integers(1, 100, n - 1), [0]]).astype(float)
        slack = float(rng.choice([0.0, 0.1, 0.3]))
        combos = list(itertools.combinations(range(1, n), k - 1))
        bottleneck = min(max(stage_costs(costs, c)) for c in combos)
        ok = [c for c in combos if max(stage_costs(costs, c)) <= bottleneck * (1 + slack) + 1e-9]
        best = min(sum(cross[list(c)]) for c in ok)
        cuts = best_cuts(costs, cross, k, None, slack)
        assert len(cuts) == k - 1 and max(stage_costs(costs, cuts)) <= bottleneck * (1 + slack) + 1e-9
        assert sum(cross[cuts]) == best, trial


def _skip_model(path: Path) -> Path:
    """x → Relu=r → Neg → Sigmoid=s (also an output) → Tanh → Add(r, ·): r crosses every cut."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Neg", ["r"], ["n"], name="neg"),
         helper.make_node("Sigmoid", ["n"], ["s"], name="sig"),
         helper.make_node("Tanh", ["s"], ["t"], name="tanh"),
         helper.make_node("Add", ["r", "t"], ["y"], name="add")],
        "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_skip_connections_and_early_outputs_are_passed_along(tmp_path):
    model_path = _skip_model(tmp_path / "skip.onnx")
    out, _ = make_dir(model_path, tmp_path / "p", stages=5)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert all("r" in t["tensors"] for t in m["transfers"])  # the skip tensor crosses all four cuts
    assert m["tensors"]["r"]["consumed_by"] == [1, 4] and m["tensors"]["r"]["bytes_per_sample"] == 16
    assert m["tensors"]["s"]["model_output"] and all("s" in t["tensors"] for t in m["transfers"][2:])
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with StagePipeline.from_dir(out, micro_batch=3) as pipe:
        close_enough(ort_outputs(model_path, {"x": x}), pipe.run({"x": x}))


def test_subgraph_capturing_outer_values(tmp_path):
    """An If whose branches read a tensor made two stages earlier."""
    then_g = helper.make_graph([helper.make_node("Add", ["a", "a"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Mul", ["a", "a"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("ReduceSum", ["x"], ["sx"], name="sum", keepdims=0),
         helper.make_node("Greater", ["sx", "zero"], ["c"], name="gt"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "ifm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    out, _ = make_dir(path, tmp_path / "p", stages=3)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert "a" in m["stages"][-1]["inputs"]
    for x in (np.array([1, -2, 3], np.float32), np.array([-1, -2, 0.5], np.float32)):
        with StagePipeline.from_dir(out) as pipe:
            close_enough(ort_outputs(path, {"x": x}), pipe.run({"x": x}))


def test_max_stage_bytes_decides_k_and_every_stage_fits(models_dir, tmp_path):
    limit = 300_000
    out, plan = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", max_stage_bytes=limit)
    assert len(plan["stages"]) >= 2
    assert all(s["weight_bytes"] + s["activation_bytes"] <= limit for s in plan["stages"])
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 32)
    with StagePipeline.from_dir(out, micro_batch=8) as pipe:
        close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), pipe.run(inputs))


def test_profile_cost(models_dir, tmp_path):
    out, plan = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=2, cost="profile",
                         profile_runs=3)
    assert plan["cost_model"] == "profile" and plan["cost_unit"] == "microseconds"
    assert all(s["predicted_cost"] > 0 for s in plan["stages"])
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 16)
    with StagePipeline.from_dir(out) as pipe:
        close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), pipe.run(inputs))


def test_io_binding_path_and_bench_interface(models_dir, tmp_path):
    """IO binding (what CUDA stages use) exercised on CPU; bind/run_bound as validation's latency uses."""
    from graphopt.runtime import time_interleaved

    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=3)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 16)
    with StagePipeline.from_dir(out, io_binding=True, micro_batch=4) as pipe:
        close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), pipe.run(inputs))
        (timing,) = time_interleaved([pipe], inputs, warmup=1, repeat=3)
        assert timing.p50_ms > 0 and pipe.provider == "CPUExecutionProvider"


def _alive_stage_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("graphopt-"))


def test_a_failing_stage_stops_the_run_with_its_error_and_nothing_hangs(models_dir, tmp_path):
    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=3)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 256)
    before = _alive_stage_threads()
    pipe = StagePipeline.from_dir(out, micro_batch=4, queue_size=1, _fail_stage=(1, 3))
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=r"stage 1 \(on cpu\) failed: RuntimeError: injected failure") as info:
        pipe.run(inputs)  # 64 micro-batches, stage 1 fails on its 3rd: the queues are full behind it
    assert info.value.stage == 1 and time.perf_counter() - t0 < 10
    with pytest.raises(StageFailed):  # the failed run left nothing behind that blocks the next one
        pipe.run(inputs)
    pipe.close()
    deadline = time.time() + 5
    while _alive_stage_threads() > before and time.time() < deadline:
        time.sleep(0.05)
    assert _alive_stage_threads() == before


def test_real_ort_error_and_data_error_and_early_stop(models_dir, tmp_path):
    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=2)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 64)
    ref = ort_outputs(models_dir / "digits_cnn.onnx", inputs)
    with StagePipeline.from_dir(out, micro_batch=8) as pipe:
        with pytest.raises(StageFailed, match="stage 0"):
            pipe.run({"input": np.zeros((4, 1, 9, 9), np.float32)})  # wrong shape: ORT itself refuses

        def bad_data():
            yield inputs
            raise UserError("the data ran dry")

        with pytest.raises(UserError, match="ran dry"):
            list(pipe.stream(bad_data()))
        stream = pipe.stream(iter([inputs] * 50))
        close_enough(ref, next(stream))
        close_enough(ref, pipe.run(inputs))  # another run while the first is open: no deadlock, no mix-up
        close_enough(ref, next(stream))
        stream.close()  # the caller stops early: the rest drains
        close_enough(ref, pipe.run(inputs))  # and the pipeline still works


def test_bad_options_exit_2(cli, models_dir, tmp_path):
    model = models_dir / "digits_mlp.onnx"  # 5 nodes; its first Gemm holds 64x128 float weights
    out = tmp_path / "out"
    assert_user_error(cli("run", model, "--passes", "partition", "--set", "partition.stages=9", "-o", out,
                          "--no-validate"), out, "only 5 nodes", "at most 5 stages")
    assert_user_error(cli("run", model, "--passes", "partition", "--set", "partition.max_stage_bytes=1000",
                          "-o", out, "--no-validate"), out, "max_stage_bytes=1000", "smaller than node")
    assert_user_error(cli("run", model, "--passes", "partition", "--set", "partition.stages=3",
                          "--set", "partition.devices=cpu,cpu", "-o", out, "--no-validate"), out, "devices")
    assert_user_error(cli("run", model, "--passes", "partition", "--set", "partition.devices=tpu:x",
                          "-o", out, "--no-validate"), out, "unknown device")


def test_exec_command(cli, models_dir, tmp_path):
    out, _ = make_dir(models_dir / "transformer_small.onnx", tmp_path / "p", stages=2)
    result = tmp_path / "outputs.npz"
    proc = cli("exec", out, "--data", models_dir / "transformer_small_calib.npz", "--micro-batch", "4",
               "--batch-size", "16", "--limit", "24", "--reference", models_dir / "transformer_small.onnx",
               "-o", result, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == 24 and report["reference"]["passed"] and len(report["stages"]) == 2
    assert [s["items"] for s in report["stages"]] == [4 + 2, 4 + 2]  # 16 rows = 4 micro-batches, then 8 = 2
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz", 24)
    with np.load(result) as z:
        close_enough(ort_outputs(models_dir / "transformer_small.onnx", inputs), [z["logits"]])
    assert_user_error(cli("exec", tmp_path), None, "no manifest.json")
    assert_user_error(cli("exec", out, "--backend", "mpi"), None, "threads or ray")
    assert_user_error(cli("exec", out, "--devices", "cpu,cpu,cpu"), None, "3 devices", "2 stages")


def test_run_writes_a_stage_directory_and_validates_it(cli, models_dir, tmp_path):
    """The core's wiring: `graphopt run … --passes cleanup,partition -o DIR` validates stitched stages."""
    import graphopt.api

    if "write_partitioned" not in Path(graphopt.api.__file__).read_text():
        pytest.skip("graphopt.api does not write partitioned models yet (the core's wiring)")
    out = tmp_path / "stages"
    report = tmp_path / "r.json"
    proc = cli("run", models_dir / "digits_cnn.onnx", "--passes", "cleanup,partition", "--set",
               "partition.stages=2", "-o", out, "--data", models_dir / "digits_cnn_test.npz", "--no-latency",
               "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert (out / MANIFEST_NAME).is_file() and (out / "stage_1.onnx").is_file()
    agreement = json.loads(report.read_text())["validation"]["agreement"]
    assert agreement["max_abs_diff"] <= 1e-5 * max(1.0, agreement["reference_max_abs"])


def test_profiled_kernels_map_back_to_graph_nodes(tmp_path):
    """ORT's fused kernels are named after a node, `node/Fusion/`, or the tensor they make (`x_nchwc`);
    a node fused away (no kernel of its own) shares its group's time by static cost."""
    from graphopt.passes.partition import attribute_kernel_times

    model = load_model(_skip_model(tmp_path / "skip.onnx"))
    nodes = list(model.graph)  # relu, neg, sig, tanh, add
    static = np.array([1.0, 1.0, 2.0, 1.0, 1.0])
    kernels = {"relu": 10.0, "s_nchwc": 30.0, "tanh/SomeFusion/": 5.0, "add": 7.0, "mystery": 2.0}
    costs, lost = attribute_kernel_times(kernels, nodes, static)
    # neg has no kernel and only sig (timed via its output name s) reads it: 30 split 1:2 between them
    assert costs.tolist() == pytest.approx([10.0, 10.0, 20.0, 5.0, 7.0])
    assert lost == pytest.approx(2.0 / 54.0)


# --- the CUDA-side logic, exercised on CPU (CI has no GPU) ------------------------------------------------

def test_device_parsing_and_per_stage_provider_options():
    from graphopt.stages import _stage_settings, device_label, expand_devices, parse_device

    assert parse_device("cuda:1") == ("CUDAExecutionProvider", 1)
    assert parse_device("cuda") == ("CUDAExecutionProvider", None)
    assert parse_device("cpu") == ("CPUExecutionProvider", None)
    assert device_label(*parse_device("cuda:1")) == "cuda:1"
    assert expand_devices("cuda:0,cpu", 2, ["cpu", "cpu"]) == ["cuda:0", "cpu"]
    assert expand_devices("cuda:1", 3, ["cpu"] * 3) == ["cuda:1"] * 3
    for bad, match in (("cuda:x", "bad index"), ("cpu:0", "takes no index"), ("tpu", "unknown device")):
        with pytest.raises(UserError, match=match):
            parse_device(bad)
    with pytest.raises(UserError, match="3 devices given"):
        expand_devices("cpu,cpu,cpu", 2, ["cpu", "cpu"])
    base = SessionSettings(provider_options={"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}})
    st = _stage_settings(base, "CUDAExecutionProvider", 1, cpu_stages=1)
    assert st.provider_options["CUDAExecutionProvider"] == {"arena_extend_strategy": "kSameAsRequested", "device_id": "1"}
    assert "device_id" not in base.provider_options["CUDAExecutionProvider"]  # the caller's settings are not changed
    # device 0 is the default and is left out, unless the caller's options named another device
    assert _stage_settings(SessionSettings(), "CUDAExecutionProvider", 0, cpu_stages=1).provider_options == {}
    assert _stage_settings(base, "CUDAExecutionProvider", 0, cpu_stages=1).provider_options == base.provider_options
    other = SessionSettings(provider_options={"CUDAExecutionProvider": {"device_id": "1"}})
    assert _stage_settings(other, "CUDAExecutionProvider", 0, 1).provider_options["CUDAExecutionProvider"]["device_id"] == "0"
    # CPU stages split the cores between them instead of each taking all
    assert _stage_settings(SessionSettings(), "CPUExecutionProvider", None, cpu_stages=2).intra_op_threads >= 1


def test_io_binding_keeps_outputs_on_the_device_between_stages(models_dir, tmp_path):
    """What CUDA stages do (bind outputs on the device, hand the OrtValue on to the next stage on the same
    device without a host copy), here on the CPU device."""
    from graphopt.stages import StageSession, _OnDevice

    from graphopt.stages import read_manifest

    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=2)
    manifest = read_manifest(out)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 8)
    stages = [StageSession(k, ONE_THREAD.session(out / s["file"]), s["inputs"], s["outputs"], "cpu", io_binding=True)
              for k, s in enumerate(manifest["stages"])]
    env: dict = dict(inputs)
    first = stages[0].run(env)
    assert all(isinstance(v, _OnDevice) and v.device == ("cpu", 0) for v in first.values())
    env.update(first)
    final = stages[1].run(env)
    got = [final[n].numpy() for n in manifest["outputs"]]
    close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), got)


def test_ray_actors_request_a_gpu_per_cuda_stage(monkeypatch, models_dir, tmp_path):
    """The Ray backend's placement for devices=cuda:0,cpu, with a stand-in for Ray: the CUDA stage's actor
    asks for one GPU (Ray then gives it its device through CUDA_VISIBLE_DEVICES), the CPU stage for CPUs,
    and a local instance without the GPUs is refused instead of waiting forever."""
    from graphopt import stages as stages_mod

    from graphopt.stages import read_manifest

    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=2)
    manifest = read_manifest(out)
    made: list[dict] = []

    class FakeActor:
        def __init__(self, options, args):
            made.append({"options": options, "args": args})
            self.ready = type("M", (), {"remote": staticmethod(lambda: "ready")})()

    class FakeRay:
        class exceptions:
            GetTimeoutError = TimeoutError

        def __init__(self, gpus):
            self.gpus = gpus

        def remote(self, cls):
            class Remote:
                def options(self_, **options):
                    return type("O", (), {"remote": staticmethod(lambda *args: FakeActor(options, args))})()
            return Remote()

        def put(self, value):
            return value

        def get(self, refs, timeout=None):
            return refs

        def available_resources(self):
            return {"CPU": 8.0, "GPU": self.gpus}

        def kill(self, actor):
            pass

    monkeypatch.setattr(stages_mod, "_STARTED_LOCAL_RAY", True)
    monkeypatch.setattr(stages_mod, "ensure_ray", lambda num_cpus=None: FakeRay(gpus=1.0))
    settings = SessionSettings(intra_op_threads=2)
    backend = stages_mod._RayBackend(out, manifest, ["cuda:0", "cpu"], settings, queue_size=2)
    assert [m["options"] for m in made] == [{"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 2, "num_gpus": 0}]
    assert [m["args"][2] for m in made] == ["cuda:0", "cpu"]
    backend.close()
    made.clear()
    monkeypatch.setattr(stages_mod, "ensure_ray", lambda num_cpus=None: FakeRay(gpus=0.0))
    clock = itertools.count(0.0, 10.0)  # the wait for resources being given back ends at once
    monkeypatch.setattr(stages_mod.time, "monotonic", lambda: next(clock))
    with pytest.raises(UserError, match="need 2 CPUs and 2 GPUs; Ray has 8 CPUs and 0 GPUs"):
        stages_mod._RayBackend(out, manifest, ["cuda:0", "cuda:1"], settings, queue_size=2, replicas=1)
    assert not made


def test_local_ray_starts_without_the_inline_setting_when_refused(monkeypatch):
    """ensure_ray asks a local Ray for inline transfers of stage outputs; a Ray that refuses the setting
    is started without it (slower transfers, same results) instead of failing the pipeline."""
    from graphopt import stages as stages_mod

    calls: list[dict] = []

    class FakeRay:
        initialized = False

        def is_initialized(self):
            return self.initialized

        def init(self, **kwargs):
            calls.append(dict(kwargs))
            if "_system_config" in kwargs:
                raise RuntimeError("unknown config key")
            self.initialized = True

        def shutdown(self):
            pass

    fake = FakeRay()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(stages_mod, "_import_ray", lambda: fake)
    monkeypatch.setattr(stages_mod, "_STARTED_LOCAL_RAY", False)
    assert stages_mod.ensure_ray(num_cpus=2) is fake and fake.initialized
    assert calls[0]["_system_config"] == {"max_direct_call_object_size": stages_mod.INLINE_OBJECT_BYTES}
    assert "_system_config" not in calls[1] and calls[1]["num_cpus"] >= 2
