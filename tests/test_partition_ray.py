"""The Ray backend on a local Ray instance: stitched outputs equal the original's, a failing stage's error
reaches the caller without hanging and its actors are released, and replicas serve data-parallel runs."""

from __future__ import annotations

import time
from unittest import mock

import pytest

from conftest import load_npz, ort_outputs
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory, SessionSettings
from graphopt.stages import StageFailed, StagePipeline
from test_partition import close_enough, make_dir

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'graphopt[ray]')")
ONE_THREAD = SessionFactory(SessionSettings(intra_op_threads=1))


@pytest.fixture(scope="module")
def local_ray():
    from graphopt.stages import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    # the local instance graphopt starts itself, with 4 logical CPUs whatever this machine has (graphopt
    # asks for max(cores, num_cpus); the tests below count on 4, also on a 16-core machine)
    with mock.patch("os.cpu_count", return_value=1):
        ensure_ray(num_cpus=4)
    assert ray.cluster_resources().get("CPU") == 4
    yield ray
    ray.shutdown()


def _cpus_back(ray_, total: float, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray_.available_resources().get("CPU", 0) >= total:
            return True
        time.sleep(0.2)
    return False


def test_ray_pipeline_equals_original_refuses_what_cannot_fit_and_releases_actors(local_ray, models_dir, tmp_path):
    out, _ = make_dir(models_dir / "transformer_small.onnx", tmp_path / "p", stages=2)
    out3, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p3", stages=3)
    inputs, _ = load_npz(models_dir / "transformer_small_calib.npz", 16)
    ref = ort_outputs(models_dir / "transformer_small.onnx", inputs)
    with StagePipeline.from_dir(out, backend="ray", micro_batch=4, session_factory=ONE_THREAD) as pipe:
        close_enough(ref, pipe.run(inputs))
        assert [s["items"] for s in pipe.stage_stats()] == [4, 4]
        assert local_ray.available_resources().get("CPU", 0) <= 2  # two actors hold a CPU each
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="need 3 CPUs"):  # 2 + 3 actors > 4 CPUs: refused, not pending
            StagePipeline.from_dir(out3, backend="ray", session_factory=ONE_THREAD)
        assert time.perf_counter() - t0 < 15
    assert _cpus_back(local_ray, 4)


def test_ray_failing_stage_surfaces_and_nothing_hangs(local_ray, models_dir, tmp_path):
    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=3)
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 128)
    pipe = StagePipeline.from_dir(out, backend="ray", micro_batch=4, session_factory=ONE_THREAD,
                                  _fail_stage=(1, 3))
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=r"stage 1 \(on cpu\) failed: RuntimeError: injected failure") as info:
        pipe.run(inputs)
    assert info.value.stage == 1 and time.perf_counter() - t0 < 20
    assert "\n" not in str(info.value)  # one line, not Ray's wrapped traceback
    pipe.close()
    assert _cpus_back(local_ray, 4)


def test_ray_replicas_data_parallel(local_ray, models_dir):
    """The same actors serve data-parallel evaluation: each batch is sharded over the replicas."""
    inputs, _ = load_npz(models_dir / "digits_cnn_test.npz", 50)
    with StagePipeline.from_model(models_dir / "digits_cnn.onnx", backend="ray", replicas=2,
                                  session_factory=ONE_THREAD) as pipe:
        close_enough(ort_outputs(models_dir / "digits_cnn.onnx", inputs), pipe.run(inputs))
        assert pipe.stage_stats()[0]["items"] == 2  # two shards of 25, one per replica
    assert _cpus_back(local_ray, 4)


def test_validate_with_ray_backend_data_parallel(cli, models_dir, tmp_path):
    """`graphopt validate --backend ray --replicas 2`: both models as Ray actors sharing each batch."""
    import json

    out = tmp_path / "c.onnx"
    assert cli("run", models_dir / "digits_mlp.onnx", "--passes", "cleanup", "-o", out, "--no-validate",
               "-q").returncode == 0
    proc = cli("validate", models_dir / "digits_mlp.onnx", out, "--data", models_dir / "digits_mlp_test.npz",
               "--backend", "ray", "--replicas", "2", "--no-latency", "--report", tmp_path / "v.json", "-q")
    assert proc.returncode == 0, proc.stderr
    agreement = json.loads((tmp_path / "v.json").read_text())["validation"]["agreement"]
    assert agreement["samples"] == 540 and agreement["max_abs_diff"] < 1e-5
    assert agreement["candidate_accuracy"] == agreement["reference_accuracy"] > 0.95
