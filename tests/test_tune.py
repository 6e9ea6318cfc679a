"""tune: the search keeps what is measurably faster, survives candidates that fail or disagree, respects
its time budget, and its settings file round-trips into an ONNX Runtime session.

Two kinds of test: real ORT runs on models whose speed is controlled by construction (a constant
MatMul chain that only graph optimization folds away: ~100x apart, robust on a busy 2-core machine),
and the same search logic driven by fake trials and a fake clock (exact timings, CUDA candidates on a
machine without a GPU, failures and wrong outputs on demand).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import PassContext
from graphopt.errors import UserError
from graphopt.model_io import load_model
from graphopt.registry import get as get_pass
from graphopt.runtime import SessionSettings
from graphopt.tune import (CPU, CUDA, METADATA_KEY, SCHEMA, Candidate, Choice, Dimension, GroupResult, SearchConfig,
                           Tuner, TuneResult, apply_to_session_args, cpu_space, cuda_space, load_entry, load_settings,
                           ort_trial_factory, save_settings, search_space, settings_path, thread_counts, tune,
                           write_settings_from_metadata)
from graphopt.runtime import Timing

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


# ---------------------------------------------------------------- helpers

def _chain_model(path: Path, links: int = 10, n: int = 256) -> Path:
    """y = x @ (W^links): a constant chain ORT folds away unless graph optimization is disabled."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))  # orthogonal: the product stays bounded
    nodes, prev = [], "W"
    for i in range(links):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"M{i}"]))
        prev = f"M{i}"
    nodes.append(helper.make_node("MatMul", ["x", prev], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array(q.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _level_space(*levels: str):
    dim = Dimension("graph_optimization_level",
                    tuple(Choice(f"graph_optimization_level={v}", {"graph_optimization_level": v}) for v in levels))
    return lambda provider: [dim]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeTrial:
    def __init__(self, clock: FakeClock, ms: float, outputs: list[np.ndarray]) -> None:
        self.clock, self.ms, self._outputs = clock, ms, outputs

    def run(self) -> float:
        self.clock.t += self.ms / 1e3
        return self.ms / 1e3

    def outputs(self) -> list[np.ndarray]:
        return self._outputs

    def close(self) -> None:
        pass


def fake_factory(clock: FakeClock, speed, broken=lambda c: None, wrong=lambda c: False):
    """Trials whose latency is ``speed(candidate)`` ms; ``broken`` → creation raises; ``wrong`` → outputs off."""
    reference = [np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)]

    def make(provider, candidate, inputs, ref):
        why = broken(candidate)
        if why:
            raise RuntimeError(why)
        return FakeTrial(clock, speed(candidate), [reference[0] + (0.5 if wrong(candidate) else 0.0)])

    return make


def _opts(c: Candidate, provider: str = CUDA) -> dict[str, str]:
    return c.settings.provider_options.get(provider, {})


def _records(group: GroupResult) -> dict[str, object]:
    return {r.candidate: r for r in group.records}


# ---------------------------------------------------------------- the search, on real ORT sessions

def test_search_picks_the_fast_setting_over_a_forced_slow_start(tmp_path: Path) -> None:
    path = _chain_model(tmp_path / "chain.onnx")
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    slow = SessionSettings(graph_optimization_level="disable")
    config = SearchConfig(budget_s=6, base=slow, repeat=15)
    result = Tuner(ort_trial_factory(str(path)), config, space=_level_space("disable", "all")).run(
        [CPU], [4], lambda b: {"x": x[:b]})
    (group,) = result.groups
    assert group.status == "tuned"
    assert group.candidate.settings.graph_optimization_level == "all"
    assert group.candidate.changes == ("graph_optimization_level=all",)
    rec = _records(group)["graph_optimization_level=all"]
    assert rec.status == "chosen" and rec.max_abs_diff is not None and rec.max_abs_diff < 1e-3
    # the final interleaved check: folded chain vs ten 256x256 MatMuls per run
    assert group.ratio is not None and group.ratio < 0.5, group.summary()


def test_search_keeps_the_defaults_when_the_challenger_is_slower(tmp_path: Path) -> None:
    path = _chain_model(tmp_path / "chain.onnx")
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    result = Tuner(ort_trial_factory(str(path)), SearchConfig(budget_s=6, repeat=15),
                   space=_level_space("all", "disable")).run([CPU], [4], lambda b: {"x": x[:b]})
    (group,) = result.groups
    assert group.candidate.changes == ()
    assert group.candidate.settings == SessionSettings(provider_options={CPU: {}})
    rec = _records(group)["graph_optimization_level=disable"]
    assert rec.status == "no gain" and rec.p50_ms > 2 * rec.incumbent_p50_ms
    assert group.ratio == pytest.approx(1.0)


def test_a_failing_candidate_is_recorded_and_skipped(tmp_path: Path, models_dir: Path) -> None:
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    bad = "session.intra_op_thread_affinities"  # ORT refuses a non-numeric affinity when it builds the session
    dim = Dimension("threads", (Choice("affinity=garbage", {"intra_op_threads": 2, "config_entries": {bad: "garbage"}}),
                                Choice("intra_op_threads=1", {"intra_op_threads": 1})))
    result = Tuner(ort_trial_factory(str(models_dir / "digits_cnn.onnx")), SearchConfig(budget_s=5, repeat=10),
                   space=lambda p: [dim]).run([CPU], [8], lambda b: {"input": x[:b]})
    (group,) = result.groups
    assert group.status == "tuned"
    rec = _records(group)["affinity=garbage"]
    assert rec.status == "failed" and "Processor id must consist of only digits" in rec.note
    assert _records(group)["intra_op_threads=1"].status in ("chosen", "no gain")


def test_time_budget_bounds_a_real_search(models_dir: Path) -> None:
    # resnet_small needs far more than 4 s for every dimension: the budget must cut the search short
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    result = tune(models_dir / "resnet_small.onnx", "cpu", [1], lambda b: {"input": x},
                  SearchConfig(budget_s=4.0))
    wall = time.perf_counter() - t0
    # overrun allowed: the run in flight plus the shortest final check (2 sessions, 1 warm-up + 3 runs each)
    assert wall < 4.0 + 4.0, wall
    (group,) = result.groups
    assert group.status == "tuned" and group.default is not None
    assert any(r.note and "time budget" in r.note for r in group.records)


# ---------------------------------------------------------------- the search logic, with fake trials and clock

def test_coordinate_descent_keeps_gains_and_records_failures_and_disagreements() -> None:
    clock = FakeClock()

    def speed(c: Candidate) -> float:
        s = c.settings
        ms = 10.0
        ms *= {0: 1.0, 1: 0.5, 2: 0.8, 4: 0.9}[s.intra_op_threads]
        ms *= 0.9 if s.config_entries.get("session.intra_op.allow_spinning") == "0" else 1.0
        ms *= {"all": 1.0, "layout": 1.1, "extended": 1.2, "basic": 2.0}[s.graph_optimization_level]
        ms *= 0.99 if c.io_binding else 1.0  # 1% < min_gain: not worth a change
        ms *= 0.5 if not s.enable_mem_pattern else 1.0  # fast but wrong (see `wrong`)
        return ms

    factory = fake_factory(clock, speed,
                           broken=lambda c: ("parallel executor exploded" if c.settings.execution_mode == "parallel"
                                             else None),
                           wrong=lambda c: not c.settings.enable_mem_pattern)
    space = lambda p: cpu_space(cpus=4)  # noqa: E731
    result = Tuner(factory, SearchConfig(budget_s=1000, min_gain=0.03), clock=clock, space=space).run(
        [CPU], [1], lambda b: {"x": np.zeros((b, 1), np.float32)})
    (group,) = result.groups
    assert group.candidate.changes == ("intra_op_threads=1", "allow_spinning=0")
    assert group.candidate.settings.intra_op_threads == 1
    assert group.candidate.settings.config_entries == {"session.intra_op.allow_spinning": "0"}
    assert group.candidate.io_binding is False
    recs = _records(group)
    assert recs["intra_op_threads=1"].status == "chosen"
    assert recs["intra_op_threads=2"].status == "faster"  # by more than min_gain, but not the fastest
    assert recs["intra_op_threads=4"].status == "faster"
    assert recs["graph_optimization_level=basic"].status == "no gain"
    assert recs["execution_mode=parallel"].status == "failed"
    assert "parallel executor exploded" in recs["execution_mode=parallel"].note
    assert recs["enable_mem_pattern=False"].status == "rejected"
    assert "outputs differ" in recs["enable_mem_pattern=False"].note
    assert recs["io_binding=true"].status == "no gain"
    assert group.default.p50_ms == pytest.approx(10.0) and group.tuned.p50_ms == pytest.approx(4.5)
    assert group.ratio == pytest.approx(0.45)


def test_cuda_candidates_option_dicts_and_invalid_combinations() -> None:
    names = [d.name for d in cuda_space()]
    assert names == ["prefer_nhwc", "cudnn_conv_algo_search", "enable_cuda_graph", "cudnn_conv_use_max_workspace",
                     "arena_extend_strategy", "io_binding"]
    assert "copy_stream" not in [d.name for d in search_space(CUDA)]  # opt-in only
    assert [d.name for d in search_space(CUDA, ["copy_stream"])] == ["copy_stream"]
    clock = FakeClock()

    def speed(c: Candidate) -> float:
        o = _opts(c)
        ms = 2.0 * (0.7 if o.get("prefer_nhwc") == "1" else 1.0) * (0.5 if o.get("enable_cuda_graph") == "1" else 1.0)
        ms *= 1.0 if c.io_binding else 1.5
        ms *= 1.05 if o.get("arena_extend_strategy") else 1.0
        return ms

    factory = fake_factory(clock, speed, broken=lambda c: ("cudnn said no"
                                                           if _opts(c).get("cudnn_conv_algo_search") == "HEURISTIC"
                                                           else None))
    result = Tuner(factory, SearchConfig(budget_s=1000), clock=clock).run(
        [CUDA], [8], lambda b: {"x": np.zeros((b, 1), np.float32)})
    (group,) = result.groups
    best = group.candidate
    assert best.settings.provider_options == {CUDA: {"prefer_nhwc": "1", "enable_cuda_graph": "1"}}
    assert best.io_binding is True
    recs = _records(group)
    assert recs["cudnn_conv_algo_search=HEURISTIC"].status == "failed"
    assert recs["cudnn_conv_algo_search=DEFAULT"].status == "no gain"
    assert recs["io_binding=false"].status == "skipped"
    assert "CUDA graphs need IO binding" in recs["io_binding=false"].note
    assert group.ratio == pytest.approx(0.35)
    so, providers = apply_to_session_args(best.settings)
    assert providers == [(CUDA, {"prefer_nhwc": "1", "enable_cuda_graph": "1"}), CPU]
    entry = group.entry()
    assert entry["provider_options"] == {"prefer_nhwc": "1", "enable_cuda_graph": "1"} and entry["io_binding"] is True


def test_fake_budget_is_respected_exactly() -> None:
    clock = FakeClock()
    factory = fake_factory(clock, lambda c: 1000.0)  # every run takes one (fake) second
    result = Tuner(factory, SearchConfig(budget_s=30), clock=clock, space=lambda p: cpu_space(cpus=4)).run(
        [CPU], [1, 8], lambda b: {"x": np.zeros((b, 1), np.float32)})
    # overrun: at most the run in flight, the reference run of a group, and a late final check
    # (2 sessions x (1 warm-up + 3 runs))
    assert result.elapsed_s <= 30 + 1 + 1 + 8
    assert any(g.status == "skipped" or any(r.note and "time budget" in r.note for r in g.records)
               for g in result.groups)


def test_thread_counts_and_unknown_dimensions() -> None:
    assert thread_counts(2) == [0, 1, 2]
    assert thread_counts(16) == [0, 1, 2, 4, 8, 16]
    assert thread_counts(1) == [0, 1]
    with pytest.raises(UserError, match="unknown search dimension 'nope'"):
        search_space(CPU, ["nope"])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_unavailable_provider_is_skipped_with_the_reason(models_dir: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    result = tune(models_dir / "digits_mlp.onnx", "cpu,cuda", [1], lambda b: {"input": x},
                  SearchConfig(budget_s=3, only=["intra_op_threads"]))
    by = {g.provider: g for g in result.groups}
    assert by[CPU].status == "tuned"
    assert by[CUDA].status == "skipped" and "not available in this onnxruntime build" in by[CUDA].reason


# ---------------------------------------------------------------- the settings file

def _result_for(settings_by_batch: dict[int, SessionSettings], io_binding: bool = False) -> TuneResult:
    groups = [GroupResult(CPU, b, "tuned", candidate=Candidate(s, io_binding, ("test",)),
                          default=Timing(2.0, 2.5, 10), tuned=Timing(1.0, 1.2, 10))
              for b, s in settings_by_batch.items()]
    groups.append(GroupResult(CUDA, 1, "skipped", reason="no GPU here"))
    return TuneResult(groups, 10.0, 9.0, 1e-3)


def test_settings_file_round_trips_into_a_session(tmp_path: Path, models_dir: Path) -> None:
    model = tmp_path / "digits_cnn.onnx"
    model.write_bytes((models_dir / "digits_cnn.onnx").read_bytes())
    assert settings_path(model) == tmp_path / "digits_cnn.ort.json"
    assert settings_path(tmp_path / "m.opt.onnx") == tmp_path / "m.opt.ort.json"
    assert load_settings(model, "cpu") is None  # no file yet
    b1 = SessionSettings(intra_op_threads=1, graph_optimization_level="extended", enable_mem_pattern=False,
                         config_entries={"session.intra_op.allow_spinning": "0"}, provider_options={CPU: {}})
    b8 = SessionSettings(intra_op_threads=2, execution_mode="parallel", provider_options={CPU: {}})
    path = save_settings(model, _result_for({1: b1, 8: b8}, io_binding=True))
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["model"] == "digits_cnn.onnx"
    assert doc["skipped"] == [{"provider": CUDA, "batch": 1, "reason": "no GPU here"}]
    assert load_settings(model, "cpu", 1) == b1
    assert load_settings(model, "CPUExecutionProvider", 3) == b1  # nearest batch
    assert load_settings(model, "cpu", 6) == b8
    assert load_settings(model, "cpu") == b1  # no batch: the smallest
    assert load_settings(model, "cuda", 1) is None
    assert load_entry(model, "cpu", 64)["io_binding"] is True
    so, providers = apply_to_session_args(load_settings(model, "cpu", 1))
    assert providers == [(CPU, {})]
    assert so.intra_op_num_threads == 1 and not so.enable_mem_pattern
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sess = ort.InferenceSession(str(model), so, providers=providers)
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=[CPU]).run(None, {"input": x})[0]
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_damaged_or_newer_settings_files_are_user_errors(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    path = settings_path(model)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable settings file"):
        load_settings(model, "cpu")
    path.write_text(json.dumps({"schema": "graphopt.ort_settings/2", "entries": []}))
    with pytest.raises(UserError, match="this graphopt reads 'graphopt.ort_settings/1'"):
        load_settings(model, "cpu")
    path.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(UserError, match="not a graphopt settings file"):
        load_settings(model, "cpu")


# ---------------------------------------------------------------- the pass

def test_tune_pass_leaves_settings_in_metadata_and_the_graph_unchanged(tmp_path: Path, models_dir: Path) -> None:
    from graphopt.options import build

    cls = get_pass("tune")
    options = build(cls.Options, "tune", {"budget_s": "4", "batches": "1,4", "search": "intra_op_threads,io_binding"})
    model = load_model(models_dir / "digits_mlp.onnx")
    before = ir.serde.serialize_model(model).SerializeToString()
    p = cls(options, PassContext(work_dir=tmp_path))
    result = p(model)
    assert result.modified
    doc = json.loads(model.metadata_props[METADATA_KEY])
    assert doc["schema"] == SCHEMA and [e["batch"] for e in doc["entries"]] == [1, 4]
    assert p.details["settings"]["entries"] == doc["entries"]
    assert {r["status"] for r in p.details["results"]} == {"tuned"}
    assert all(r["dimension"] in ("intra_op_threads", "io_binding") for r in p.details["candidates"])
    out = tmp_path / "out.onnx"
    written = write_settings_from_metadata(model, out)
    assert written == tmp_path / "out.ort.json" and METADATA_KEY not in model.metadata_props
    assert write_settings_from_metadata(model, out) is None  # nothing left to write
    assert load_settings(out, "cpu", 4) is not None
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    after = ir.serde.serialize_model(model).SerializeToString()
    ref = ort.InferenceSession(before, providers=[CPU]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(ort.InferenceSession(after, providers=[CPU]).run(None, {"input": x})[0], ref)


def test_tune_pass_runs_last_in_a_pipeline(cli, tmp_path: Path, models_dir: Path) -> None:
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli("run", models_dir / "digits_mlp.onnx", "--passes", "cleanup,tune", "--set", "tune.budget_s=3",
            "--set", "tune.search=intra_op_threads", "--no-latency", "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    details = json.loads(rep.read_text())["passes"][1]["details"]
    assert details["results"][0]["status"] == "tuned"
    assert details["settings"]["schema"] == SCHEMA


def test_tune_pass_bad_options_exit_2(cli, tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "out.onnx"
    for bad in ("tune.search=warp_drive", "tune.budget_s=0", "tune.batches=0", "tune.min_gain=1.5"):
        r = cli("run", models_dir / "digits_mlp.onnx", "--passes", "tune", "--set", bad, "-o", out)
        assert r.returncode == 2, (bad, r.stderr)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()


# ---------------------------------------------------------------- the command

def test_tune_command_writes_settings_beside_the_model(cli, tmp_path: Path, models_dir: Path) -> None:
    model = tmp_path / "digits_cnn.onnx"
    model.write_bytes((models_dir / "digits_cnn.onnx").read_bytes())
    rep = tmp_path / "tune.json"
    t0 = time.perf_counter()
    r = cli("tune", model, "--providers", "cpu,cuda", "--batch", "1,8", "--budget", "5", "--report", rep, "--quiet")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert wall < 5 + 20, wall  # the budget plus interpreter start-up on a busy machine
    doc = json.loads(settings_path(model).read_text())
    assert [(e["provider"], e["batch"]) for e in doc["entries"] if e["provider"] == CPU] == [(CPU, 1), (CPU, 8)]
    if not HAS_CUDA:
        assert {s["provider"] for s in doc["skipped"]} == {CUDA}
        assert "not available" in doc["skipped"][0]["reason"]
    report = json.loads(rep.read_text())
    assert report["settings_file"] == str(settings_path(model)) and report["candidates"]
    so, providers = apply_to_session_args(load_settings(model, "cpu", 8))
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=[CPU]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(model), so, providers=providers).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch expects positive integers"),
    (["--budget", "0"], "--budget expects a positive number"),
    (["--providers", "cdua"], "unknown execution provider 'cdua'"),
    (["--search", "warp_drive"], "unknown search dimension 'warp_drive'"),
    (["--data", "nope.npz"], "data file not found"),
    (["--warmup", "0"], "--warmup expects at least 1"),
    (["--min-gain", "1.5"], "--min-gain expects a fraction"),
    (["--tolerance", "-1"], "--tolerance expects a non-negative"),
])
def test_tune_command_bad_input_exit_2(cli, tmp_path: Path, models_dir: Path, args, message) -> None:
    model = tmp_path / "digits_mlp.onnx"
    model.write_bytes((models_dir / "digits_mlp.onnx").read_bytes())
    r = cli("tune", model, "--budget", "2", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error:") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not settings_path(model).exists()


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_tune_command_with_nothing_tunable_exits_2(cli, tmp_path: Path, models_dir: Path) -> None:
    model = tmp_path / "digits_mlp.onnx"
    model.write_bytes((models_dir / "digits_mlp.onnx").read_bytes())
    r = cli("tune", model, "--providers", "cuda", "--budget", "2")
    assert r.returncode == 2 and "nothing could be tuned" in r.stderr and "not available" in r.stderr, r.stderr
    assert not settings_path(model).exists()


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_search_on_a_gpu(tmp_path: Path, models_dir: Path) -> None:
    model = tmp_path / "digits_cnn.onnx"
    model.write_bytes((models_dir / "digits_cnn.onnx").read_bytes())
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    result = tune(model, "cuda", [8], lambda b: {"input": x[:b]}, SearchConfig(budget_s=20))
    (group,) = result.groups
    assert group.status == "tuned" and group.ratio is not None and group.ratio <= 1.0
    assert {r.status for r in group.records} <= {"chosen", "faster", "no gain", "skipped", "failed", "rejected"}
    save_settings(model, result)
    full = load_settings(model, "cuda", 8, cuda_graph=True)
    safe = load_settings(model, "cuda", 8)
    assert "enable_cuda_graph" not in safe.provider_options[CUDA]
    without_graph = {k: v for k, v in full.provider_options[CUDA].items() if k != "enable_cuda_graph"}
    assert without_graph == safe.provider_options[CUDA]
    # the stripped settings run with plain session.run on any batch size, and agree with the CPU (within
    # 1e-2 of the logits' range: the CUDA EP's convolutions use TF32 by default)
    so, providers = apply_to_session_args(safe)
    sess = ort.InferenceSession(str(model), so, providers=providers)
    ref = ort.InferenceSession(str(model), providers=[CPU]).run(None, {"input": x})[0]
    for b in (8, 3):
        got = sess.run(None, {"input": x[:b]})[0]
        assert np.max(np.abs(got - ref[:b])) <= 1e-2 * np.max(np.abs(ref[:b])), (got, ref[:b])


def test_cuda_graph_is_only_loaded_when_asked_for(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    options = {"prefer_nhwc": "1", "enable_cuda_graph": "1"}
    tuned = Candidate(SessionSettings(provider_options={CUDA: dict(options)}), True)
    group = GroupResult(CUDA, 8, "tuned", candidate=tuned,
                        default=Timing(2.0, 2.0, 10), tuned=Timing(1.0, 1.0, 10))
    save_settings(model, TuneResult([group], 10.0, 5.0, 1e-3))
    assert load_settings(model, "cuda", 8).provider_options == {CUDA: {"prefer_nhwc": "1"}}
    assert load_settings(model, "cuda", 8, cuda_graph=True).provider_options == {CUDA: options}
    assert load_entry(model, "cuda", 8)["io_binding"] is True
    assert load_settings(model, "cpu", 8) is None
