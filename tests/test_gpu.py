"""The CUDA execution provider paths, run on a GPU.

Skipped where onnxruntime has no CUDA EP (CI never has a GPU); the same logic is covered on CPU by the
CUDA-side tests in test_partition.py. On the lent GPU machine: ``pytest tests/test_gpu.py`` after the set-up in
../shared/gpu/README.md (see docs/gpu.md).

Tolerances: with TF32 off (``use_tf32=0``) the CUDA EP computes in float32, so partitioned stages must equal the
unpartitioned model on the same provider within 1e-5 of max(1, max |ref|), the issue's bound; against the CPU
EP (other kernels, other summation orders) within 1e-4. With the CUDA EP's default (TF32 convolutions and
matmuls, 10-bit mantissa) the CLI runs are held to 1e-2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import load_npz, ort_outputs
from graphopt.runtime import SessionFactory, SessionSettings
from graphopt.stages import StageFailed, StagePipeline, StageSession, _OnDevice, read_manifest
from test_partition import close_enough, make_dir

CUDA = "CUDAExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")

NO_TF32 = SessionFactory(SessionSettings(provider_options={CUDA: {"use_tf32": "0"}}))


def inputs_for(models_dir: Path, name: str, rows: int) -> dict[str, np.ndarray]:
    """The model's calibration/test rows where the file is there, else seeded random images (resnet_small's
    calibration file is often left behind on the GPU machine: it is 19 MB)."""
    for file in (f"{name}_test.npz", f"{name}_calib.npz"):
        if (models_dir / file).is_file():
            return load_npz(models_dir / file, rows)[0]
    assert name == "resnet_small", name
    return {"input": np.random.default_rng(0).standard_normal((rows, 3, 224, 224)).astype(np.float32)}


def cuda_outputs(model: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = NO_TF32.session(model, CUDA)
    return sess.run(None, inputs)


@pytest.mark.parametrize("name,rows", [("resnet_small", 6), ("transformer_small", 16), ("digits_cnn", 64)])
def test_stages_on_the_gpu_equal_the_unpartitioned_model(models_dir, tmp_path, name, rows):
    """K = 2 and 3, all stages on cuda:0 (tensors handed on the device) and mixed with the CPU, whole batches
    and micro-batches: equal to the unpartitioned model on CUDA within 1e-5, and to the CPU EP within 1e-4."""
    inputs = inputs_for(models_dir, name, rows)
    model = models_dir / f"{name}.onnx"
    ref_cuda = cuda_outputs(model, inputs)
    close_enough(ort_outputs(model, inputs), ref_cuda, tol=1e-4)
    for k in (2, 3):
        out, _ = make_dir(model, tmp_path / f"k{k}", stages=k)
        mixes = ["cuda:0", ",".join(["cuda:0"] * (k - 1) + ["cpu"]), ",".join(["cpu"] + ["cuda:0"] * (k - 1))]
        for devices in mixes:
            for micro in (None, -(-rows // 3)):
                with StagePipeline.from_dir(out, devices=devices, micro_batch=micro, session_factory=NO_TF32) as pipe:
                    assert pipe.devices == devices.split(",") * (k if "," not in devices else 1)
                    got = pipe.run(inputs)
                    close_enough(ref_cuda, got, tol=1e-5)
                    if micro:
                        assert [s["items"] for s in pipe.stage_stats()] == [3] * k


def test_cuda_stage_outputs_stay_on_the_device_and_feed_the_next_stage(models_dir, tmp_path):
    out, _ = make_dir(models_dir / "resnet_small.onnx", tmp_path / "p", stages=2)
    manifest = read_manifest(out)
    inputs = inputs_for(models_dir, "resnet_small", 4)
    stages = [StageSession(k, NO_TF32.session(out / s["file"], CUDA), s["inputs"], s["outputs"], "cuda:0")
              for k, s in enumerate(manifest["stages"])]
    assert all(s.binding for s in stages)  # IO binding is the default on CUDA
    env: dict = dict(inputs)
    first = stages[0].run(env)
    assert first and all(isinstance(v, _OnDevice) and v.device == ("cuda", 0) for v in first.values())
    assert all(v.value.device_name().lower() == "cuda" for v in first.values())  # an OrtValue in GPU memory
    env.update(first)
    final = stages[1].run(env)
    close_enough(cuda_outputs(models_dir / "resnet_small.onnx", inputs), [final[n].numpy() for n in manifest["outputs"]])


def test_a_failing_cuda_stage_stops_the_run_with_its_error(models_dir, tmp_path):
    out, _ = make_dir(models_dir / "digits_cnn.onnx", tmp_path / "p", stages=3)
    inputs = inputs_for(models_dir, "digits_cnn", 256)
    pipe = StagePipeline.from_dir(out, devices="cuda:0,cuda:0,cpu", micro_batch=4, queue_size=1, _fail_stage=(1, 3))
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=r"stage 1 \(on cuda:0\) failed: RuntimeError: injected failure"):
        pipe.run(inputs)
    assert time.perf_counter() - t0 < 20
    pipe.close()
    with StagePipeline.from_dir(out, devices="cuda:0") as pipe:  # a real ORT error on the GPU, by name
        with pytest.raises(StageFailed, match=r"stage 0 \(on cuda:0\)"):
            pipe.run({"input": np.zeros((4, 1, 9, 9), np.float32)})


def test_exec_command_on_cuda_against_the_reference(cli, models_dir, tmp_path):
    out, _ = make_dir(models_dir / "transformer_small.onnx", tmp_path / "p", stages=2)
    data = models_dir / "transformer_small_calib.npz"
    for devices in ("cuda:0", "cuda:0,cpu"):
        r = cli("exec", out, "--data", data, "--devices", devices, "--micro-batch", "8", "--json",
                "--reference", models_dir / "transformer_small.onnx", "--tolerance", "1e-2", "-o", tmp_path / "o.npz")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["devices"] == [s["device"] for s in doc["stages"]] == (["cuda:0"] * 2 if devices == "cuda:0"
                                                                          else ["cuda:0", "cpu"])
        assert doc["rows"] == 32 and all(s["items"] == 4 for s in doc["stages"])
        assert (tmp_path / "o.npz").is_file()


def test_run_validates_and_times_on_cuda(cli, models_dir, tmp_path):
    """fp16 for the CUDA EP, validated and timed on both providers; the report holds CUDA latency rows."""
    report = tmp_path / "r.json"
    r = cli("run", models_dir / "digits_cnn.onnx", "--passes", "cleanup,fp16", "--providers", "cpu,cuda",
            "--eval-data", models_dir / "digits_cnn_test.npz", "--max-accuracy-drop", "0.5", "--latency-batch", "1,64",
            "--report", report, "-o", tmp_path / "m.onnx", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    latency = json.loads(report.read_text())["validation"]["latency"]
    assert sorted((row["provider"], row["batch"]) for row in latency) == [("cpu", 1), ("cpu", 64), ("cuda", 1), ("cuda", 64)]
    assert all(row["candidate_ms"]["p50_ms"] > 0 and row["ratio"] > 0 for row in latency)


def test_ray_actor_holds_the_gpu_for_a_cuda_stage(models_dir, tmp_path):
    """--backend ray with devices cuda:0,cpu: the CUDA stage's actor asks Ray for one GPU (Ray hands it over
    through CUDA_VISIBLE_DEVICES) and runs its stage there; outputs as one CUDA session's."""
    ray = pytest.importorskip("ray")
    from graphopt.stages import ensure_ray

    out, _ = make_dir(models_dir / "transformer_small.onnx", tmp_path / "p", stages=2)
    inputs = inputs_for(models_dir, "transformer_small", 16)
    ref = cuda_outputs(models_dir / "transformer_small.onnx", inputs)
    ensure_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    assert gpus >= 1, ray.cluster_resources()
    with StagePipeline.from_dir(out, devices="cuda:0,cpu", backend="ray", micro_batch=4,
                                session_factory=NO_TF32) as pipe:
        assert ray.available_resources().get("GPU", 0) == gpus - 1  # the CUDA stage's actor holds one
        close_enough(ref, pipe.run(inputs), tol=1e-5)
        assert [s["items"] for s in pipe.stage_stats()] == [4, 4]
    ray.shutdown()
