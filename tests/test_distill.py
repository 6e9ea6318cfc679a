"""distill: the KD loss in ORT against numpy, training that moves a student towards its teacher, resume,
bad data, and a training worker that fails or hangs.

Training runs in the training environment (.venv-train, made by `graphopt setup-train`; `make test` makes it
first). If it is missing, the `train_env` fixture makes it through the same code path, and fails the tests
with the reason when it cannot: these tests never skip silently.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import load_npz, ort_outputs

from graphopt.data import open_data
from graphopt.model_io import load_model, save_model
from graphopt.train import env as train_env
from graphopt.train import kd
from graphopt.train.loss import reference_loss


@pytest.fixture(scope="session")
def train_env_dir() -> Path:
    if os.environ.get(train_env.PYTHON_ENV_VAR):
        pytest.fail(f"${train_env.PYTHON_ENV_VAR} is set; unset it to run the distill tests")
    target = train_env.default_env_dir()
    if not train_env.env_is_ready(target):
        try:
            train_env.setup_env(target)
        except Exception as exc:  # noqa: BLE001  (any failure is the message)
            pytest.fail(f"the training environment {target} is missing and could not be made "
                        f"(`graphopt setup-train`): {exc}")
    return target


@pytest.fixture(scope="session")
def noisy_cnn(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn with every weight perturbed: a student that has lost most of its accuracy (~59%)."""
    model = load_model(models_dir / "digits_cnn.onnx")
    rng = np.random.default_rng(0)
    for name, value in model.graph.initializers.items():
        a = value.const_value.numpy()
        if a.dtype == np.float32 and "running" not in name and a.size > 1:
            noise = rng.standard_normal(a.shape).astype(np.float32) * a.std() * 0.6
            value.const_value = ir.tensor((a + noise).astype(np.float32), name=name)
    path = tmp_path_factory.mktemp("students") / "noisy_cnn.onnx"
    save_model(model, path)
    return path


def _kl(teacher: np.ndarray, student: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lt, ls = log_softmax(teacher), log_softmax(student)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)))


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["kd", "mse"])
def test_loss_graph_equals_numpy_reference(case, train_env_dir, models_dir, noisy_cnn, tmp_path):
    """The eval graph built by onnxblock computes the loss of graphopt.train.loss.reference_loss, batch by
    batch (float32 vs float64: rel 1e-5), and the BatchNorm-frozen student it runs gives the student's
    own outputs (abs 1e-4)."""
    teacher = models_dir / ("digits_cnn.onnx" if case == "kd" else "digits_mlp.onnx")
    data_file = models_dir / ("digits_cnn_test.npz" if case == "kd" else "digits_mlp_test.npz")
    student_path = noisy_cnn if case == "kd" else teacher
    student = load_model(student_path)
    if case == "mse":  # a student that differs from the teacher: scale the last layer
        w = student.graph.initializers["fc3.weight"]
        w.const_value = ir.tensor(w.const_value.numpy() * 0.7, name=w.name)
        student_path = tmp_path / "student.onnx"
        save_model(student, student_path)
    temperature, alpha = 2.0, 0.3
    settings = kd.Settings(temperature=temperature, alpha=alpha if case == "kd" else None, batch_size=64,
                           loss=case)
    out = kd.distill(student, teacher, open_data(data_file), settings, work_dir=tmp_path, kind="evaluate")
    got = np.load(out.result["file"])
    inputs, labels = load_npz(data_file)
    t_logits = ort_outputs(teacher, inputs)[0]
    s_logits = ort_outputs(student_path, inputs)[0]
    np.testing.assert_allclose(got["out_0"], s_logits, atol=1e-4)
    start = 0
    for batch_loss, n in zip(got["loss"], got["batch_sizes"]):
        sl = slice(start, start + n)
        start += n
        ref = reference_loss([s_logits[sl]], [t_logits[sl]], [case], labels[sl], temperature,
                             alpha if case == "kd" else 1.0)
        assert ref["loss"] > 0.01
        assert batch_loss == pytest.approx(ref["loss"], rel=1e-5)
    assert start == len(labels)
    if case == "kd":
        assert out.use_labels and out.alpha == alpha


def test_distill_pass_moves_student_to_teacher(train_env_dir, models_dir, noisy_cnn, tmp_path):
    """The pipeline's model is the student (default): 4 epochs of pure KD (alpha=1) cut its KL to the teacher
    on held-out data by more than 10x and bring its test accuracy from ~59% to >= 97%."""
    import graphopt

    teacher = models_dir / "digits_cnn.onnx"
    test_x, test_y = load_npz(models_dir / "digits_cnn_test.npz")
    t_logits = ort_outputs(teacher, test_x)[0]
    before = ort_outputs(noisy_cnn, test_x)[0]
    result = graphopt.optimize(
        noisy_cnn, ["distill"], data=models_dir / "digits_cnn_train.npz", output=tmp_path / "out.onnx",
        set_options={"distill": {"teacher": str(teacher), "epochs": "4", "alpha": "1"}},
        validate=False)
    after = ort_outputs(tmp_path / "out.onnx", test_x)[0]
    kl_before, kl_after = _kl(t_logits, before), _kl(t_logits, after)
    assert kl_after < kl_before / 10, (kl_before, kl_after)
    assert np.mean(before.argmax(1) == test_y) < 0.7
    assert np.mean(after.argmax(1) == test_y) >= 0.97
    details = result.report["passes"][0]["details"]
    assert details["loss"] == {"outputs": ["kd"], "alpha": 1.0, "temperature": 4.0, "cross_entropy_on_labels": False}
    assert details["trained"]["batchnorm_statistics_frozen"] == 3
    assert len(details["training_curve"]["train_loss"]) == 4 and len(details["training_curve"]["val_accuracy"]) == 4
    assert details["training_curve"]["train_loss"][-1] < details["training_curve"]["train_loss"][0]
    # same graph, new weights; the running statistics are untouched
    ref, new = load_model(noisy_cnn), load_model(tmp_path / "out.onnx")
    assert [n.op_type for n in ref.graph] == [n.op_type for n in new.graph]
    stats = [n for n in ref.graph.initializers if "running" in n]
    assert stats and all(np.array_equal(ref.graph.initializers[n].const_value.numpy(),
                                        new.graph.initializers[n].const_value.numpy()) for n in stats)


def test_transformer_student_trains(train_env_dir, models_dir, tmp_path):
    """A transformer (LayerNormalization, MatMul, Gather, Softmax, Erf; int64 ids, no labels): the training
    graph builds (LayerNorm's extra outputs are declared for ORT), the loss is the soft-target KL only, and
    the student stays a working model: a student with its output layer scaled by 0.5 moves back towards the
    teacher (KL on the data drops)."""
    import graphopt

    teacher = models_dir / "transformer_small.onnx"
    student = load_model(teacher)
    head = [n for n in student.graph if n.op_type == "Gemm"][-1].inputs[1]
    head.const_value = ir.tensor(head.const_value.numpy() * 0.5, name=head.name)
    student_path = tmp_path / "student.onnx"
    save_model(student, student_path)
    data = models_dir / "transformer_small_calib.npz"
    result = graphopt.optimize(
        teacher, ["distill"], data=data, output=tmp_path / "out.onnx", validate=False,
        set_options={"distill": {"student": str(student_path), "epochs": "3", "val_split": "0",
                                 "batch_size": "8", "lr": "1e-4"}})
    details = result.report["passes"][0]["details"]
    assert details["loss"]["outputs"] == ["kd"] and details["loss"]["alpha"] == 1.0
    inputs, _ = load_npz(data)
    t_logits = ort_outputs(teacher, inputs)[0]
    before = ort_outputs(student_path, inputs)[0]
    after = ort_outputs(tmp_path / "out.onnx", inputs)[0]
    assert np.all(np.isfinite(after))
    assert _kl(t_logits, after) < 0.5 * _kl(t_logits, before)


def test_resume_continues_from_saved_epoch(train_env_dir, models_dir, noisy_cnn, tmp_path, cli):
    """2 epochs, then --resume to 3, gives the same model as 3 epochs straight (constant lr: the schedule
    does not depend on the total), and the report says it resumed after epoch 2."""
    teacher = models_dir / "digits_cnn.onnx"
    common = ["--student", noisy_cnn, "--data", models_dir / "digits_cnn_train.npz", "--no-validate", "-q",
              "--set", "distill.lr_schedule=constant", "--set", "distill.warmup_epochs=0",
              "--set", "distill.samples=512"]
    first = cli("distill", teacher, *common, "-o", tmp_path / "a.onnx", "--epochs", "2")
    assert first.returncode == 0, first.stderr
    resumed = cli("distill", teacher, *common, "-o", tmp_path / "b.onnx", "--epochs", "3", "--resume",
                  "--checkpoint-dir", tmp_path / "a.onnx.distill", "--report", tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stderr
    straight = cli("distill", teacher, *common, "-o", tmp_path / "c.onnx", "--epochs", "3")
    assert straight.returncode == 0, straight.stderr
    details = json.loads((tmp_path / "b.json").read_text())["passes"][0]["details"]
    assert details["epochs"] == {"done": 3, "this_run": 1, "resumed_from": 2, "best": details["epochs"]["best"]}
    assert len(details["training_curve"]["train_loss"]) == 3
    assert details["teacher_outputs"] == "cached"
    x, _ = load_npz(models_dir / "digits_cnn_test.npz")
    a, b, c = (ort_outputs(tmp_path / f"{k}.onnx", x)[0] for k in "abc")
    assert np.abs(a - c).max() > 1e-3  # the third epoch changed something
    np.testing.assert_allclose(b, c, atol=1e-4)


def test_bad_data_is_one_line_error(train_env_dir, models_dir, noisy_cnn, tmp_path, cli):
    teacher = models_dir / "digits_cnn.onnx"
    inputs, _ = load_npz(models_dir / "digits_cnn_train.npz", 200)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, **inputs)
    out = tmp_path / "out.onnx"
    cases = {
        "alpha": (["--data", unlabelled, "--alpha", "0.5"], "alpha=0.5"),
        "shape": (["--data", models_dir / "digits_mlp_train.npz"], "input"),
        "resume": (["--data", unlabelled, "--resume", "--checkpoint-dir", tmp_path / "empty"], "nothing to resume"),
        "option": (["--data", unlabelled, "--set", "distill.temperature=0"], "temperature"),
    }
    for name, (args, needle) in cases.items():
        proc = cli("distill", teacher, "--student", noisy_cnn, "-o", out, "--no-validate", *args)
        assert proc.returncode == 2, (name, proc.stderr)
        assert needle in _one_error_line(proc), name
        assert not out.exists(), name
    wrong_student = cli("distill", teacher, "--student", models_dir / "digits_mlp.onnx", "-o", out,
                        "--data", unlabelled, "--no-validate")
    assert wrong_student.returncode == 2 and "expects [batch,64]" in _one_error_line(wrong_student)


def _fake_python(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.parametrize("mode", ["crash", "hang", "missing"])
def test_worker_failure_is_a_clear_error(mode, models_dir, noisy_cnn, tmp_path, cli, monkeypatch):
    """A worker that crashes, hangs or cannot start gives one error line (exit 3, or 2 when it cannot start),
    quickly, never a hang."""
    bodies = {"crash": 'echo "Segmentation fault: simulated" >&2; exit 139', "hang": "exec sleep 120"}
    python = _fake_python(tmp_path, bodies[mode]) if mode in bodies else tmp_path / "no-such-python"
    monkeypatch.setenv(train_env.PYTHON_ENV_VAR, str(python))
    t0 = time.monotonic()
    proc = cli("distill", models_dir / "digits_cnn.onnx", "--student", noisy_cnn, "-o", tmp_path / "o.onnx",
               "--data", models_dir / "digits_cnn_calib.npz", "--no-validate", "--set", "distill.timeout=3")
    assert time.monotonic() - t0 < 60
    line = _one_error_line(proc)
    assert "pass 'distill'" in line or mode == "missing"
    expected = {"crash": (3, "Segmentation fault: simulated"), "hang": (3, "reported nothing for 3 s"),
                "missing": (2, "cannot start the training worker")}[mode]
    assert proc.returncode == expected[0], proc.stderr
    assert expected[1] in line
    assert not (tmp_path / "o.onnx").exists()


def test_no_training_env_says_how_to_set_up(models_dir, noisy_cnn, tmp_path, cli, monkeypatch):
    monkeypatch.setenv(train_env.ENV_DIR_VAR, str(tmp_path / "absent-env"))
    proc = cli("distill", models_dir / "digits_cnn.onnx", "--student", noisy_cnn, "-o", tmp_path / "o.onnx",
               "--data", models_dir / "digits_cnn_calib.npz", "--no-validate")
    assert proc.returncode == 2
    assert "graphopt setup-train" in _one_error_line(proc)


def test_setup_train_is_idempotent_and_fast(train_env_dir, cli):
    t0 = time.monotonic()
    proc = cli("setup-train")
    assert proc.returncode == 0, proc.stderr
    assert "training environment ready" in proc.stdout
    assert time.monotonic() - t0 < 20


class _RecordingTask:
    def __init__(self) -> None:
        self.total: float | None = None
        self.done = 0.0
        self.descriptions: list[str] = []

    def advance(self, amount: float = 1) -> None:
        self.done += amount

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        if total is not None:
            self.total = total
        if description is not None:
            self.descriptions.append(description)


def test_in_process_backend_and_progress(monkeypatch, tmp_path):
    """With onnxruntime.training importable, the job runs in-process through the same worker.run_job; its
    events drive the progress bar (resumed epochs count as done) and a JobError becomes a UserError."""
    from graphopt.errors import UserError
    from graphopt.train import worker

    monkeypatch.delenv(train_env.PYTHON_ENV_VAR, raising=False)
    monkeypatch.setattr(train_env, "in_process_available", lambda: True)
    backend = train_env.resolve_backend()
    assert backend.in_process

    def fake_job(job, emit):
        emit({"event": "phase", "name": "building training graphs"})
        emit({"event": "start", "epochs": 3, "start_epoch": 1, "steps_per_epoch": 10, "train_samples": 300,
              "val_samples": 30})
        emit({"event": "step", "steps": 4, "loss": 1.0})
        emit({"event": "epoch", "epoch": 2, "epochs": 3, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.9})
        emit({"event": "stopped", "reason": "early stopping"})
        return {"ok": True}

    monkeypatch.setattr(worker, "run_job", fake_job)
    task = _RecordingTask()
    job = tmp_path / "job.json"
    job.write_text("{}")
    assert kd.run_job(backend, job, kd._EventSink(task), 5, tmp_path / "log") == {"ok": True}
    assert task.total == 30 and task.done == 30
    assert any("epoch 2/3 · loss 0.5000 · val loss 0.6000 · val acc 90.0%" in d for d in task.descriptions)

    def failing_job(job, emit):
        raise worker.JobError("the loss became nan at epoch 1, step 3")

    monkeypatch.setattr(worker, "run_job", failing_job)
    with pytest.raises(UserError, match="loss became nan"):
        kd.run_job(backend, job, kd._EventSink(_RecordingTask()), 5, tmp_path / "log")


def test_schedule_and_split():
    """Warm-up is linear to lr, cosine ends at lr * min_lr_ratio, constant stays; the validation split is
    seeded, disjoint and covers every row."""
    from graphopt.train.worker import _split, lr_at

    o = {"lr": 1e-2, "lr_schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_at(0, 100, 10, o) == pytest.approx(1e-3)
    assert lr_at(9, 100, 10, o) == pytest.approx(1e-2)
    assert lr_at(10, 100, 10, o) == pytest.approx(1e-2)
    assert lr_at(55, 100, 10, o) == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert lr_at(100, 100, 10, o) == pytest.approx(1e-3)
    assert lr_at(70, 100, 0, {**o, "lr_schedule": "constant"}) == 1e-2
    train, val = _split(1057, 0.1, seed=3)
    assert len(val) == 106 and len(train) == 951 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(1057))
    assert np.array_equal(_split(1057, 0.1, seed=3)[1], val) and not np.array_equal(_split(1057, 0.1, seed=4)[1], val)
