"""graphopt export torch / graphopt.export.from_torch / load_source("torch:..."): the exported model must
compute what torch computes. Every test re-checks the written file itself (ONNX Runtime vs torch, at
shapes other than the export's) instead of trusting the exporter's own check.

Tolerance: |onnx - torch| <= 1e-4 + 1e-3 * |torch| (float32, small models).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ort_outputs

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not importable in this interpreter "
                                                        f"({sys.executable}); it comes with pip install -e '.[dev]'")
ATOL, RTOL = 1e-4, 1e-3

NETS = textwrap.dedent('''
    import math
    import torch
    from torch import nn


    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.fc = nn.Linear(16, 10)

        def forward(self, image):
            return self.fc(torch.flatten(self.features(image), 1))


    def make_cnn():
        torch.manual_seed(0)
        model = CNN()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            bn = model.features[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
        return model.train()  # the exporter must put it in eval mode itself


    class TinyTransformer(nn.Module):
        """One pre-LN encoder layer with explicit masked attention; output per token and pooled."""

        def __init__(self, vocab=50, hidden=32, heads=2, max_len=32):
            super().__init__()
            self.heads, self.dim = heads, hidden // heads
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Parameter(torch.randn(1, max_len, hidden) * 0.1)
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
            self.ff = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))
            self.head = nn.Linear(hidden, 4)

        def forward(self, input_ids, attention_mask):
            b, t = input_ids.shape
            x = self.tok(input_ids) + self.pos[:, :t]
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.dim)
            scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, -1e4)
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
            x = x + self.proj(ctx)
            x = x + self.ff(self.ln2(x))
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
            return {"logits": self.head(pooled), "hidden": x}


    def make_transformer():
        torch.manual_seed(1)
        return TinyTransformer()


    def transformer_with_examples():
        torch.manual_seed(2)
        ids = torch.randint(0, 50, (2, 12))
        return make_transformer(), (ids, torch.ones(2, 12, dtype=torch.int64))


    class DataDependent(nn.Module):
        """Python control flow on a tensor value: torch.export refuses it, tracing takes the branch."""

        def forward(self, x):
            if x.abs().sum() >= 0:
                return torch.tanh(x) * 2
            return x


    def make_data_dependent():
        return DataDependent()


    class ExportsDifferently(nn.Module):
        """Computes something else while being exported: the check must catch it."""

        def forward(self, x):
            return x * (2.0 if torch.compiler.is_exporting() else 1.0)


    def make_liar():
        return ExportsDifferently()


    def not_a_module():
        return 42
''')


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nets") / "nets_export_test.py"
    path.write_text(NETS)
    return path


@pytest.fixture(scope="module")
def nets_module(nets: Path):
    spec = importlib.util.spec_from_file_location("nets_export_test_ref", nets)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def assert_matches_torch(onnx_path: Path, module, inputs: dict[str, np.ndarray], names: list[str]) -> float:
    import torch

    module.eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(inputs[n]) for n in names])
    ref = list(out.values()) if isinstance(out, dict) else [out]
    got = ort_outputs(onnx_path, inputs)
    assert len(got) == len(ref)
    worst = 0.0
    for r, g in zip(ref, got):
        r = r.numpy()
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=RTOL)
        worst = max(worst, float(np.abs(g - r).max()))
    return worst


@needs_torch
def test_cli_cnn_dynamic_batch(cli, nets, nets_module, tmp_path):
    out = tmp_path / "cnn.onnx"
    report = tmp_path / "cnn.json"
    r = cli("export", "torch", f"{nets}:make_cnn", "--input", "image=1x3x16x16", "--dynamic-batch",
            "-o", out, "--report", report)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "max |diff|" in r.stdout
    assert out.is_file() and not out.with_name(out.name + ".data").exists()  # weights inline
    assert input_dims(out) == {"image": ["batch", 3, 16, 16]}
    rep = json.loads(report.read_text())
    assert rep["exporter"] == "dynamo" and rep["check"]["passed"] and rep["opset"] == 18
    assert [c["shapes"] for c in rep["check"]["cases"]] == ["image=2x3x16x16", "image=3x3x16x16"]
    x = np.random.default_rng(5).standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert_matches_torch(out, nets_module.make_cnn(), {"image": x}, ["image"])


@needs_torch
def test_cli_transformer_dynamic_batch_and_sequence(cli, nets, nets_module, tmp_path):
    out = tmp_path / "tr.onnx"
    report = tmp_path / "tr.json"
    r = cli("export", "torch", f"{nets}:make_transformer", "--input", "input_ids=2x16:int64",
            "--input", "attention_mask=2x16:int64", "--dynamic-batch", "--dynamic", "input_ids:1=seq",
            "--dynamic", "attention_mask:1=seq", "-o", out, "--report", report)
    assert r.returncode == 0, r.stderr
    assert input_dims(out) == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    rep = json.loads(report.read_text())
    assert [o["name"] for o in rep["outputs"]] == ["logits", "hidden"]
    assert rep["check"]["cases"][1]["shapes"] == "input_ids=3x15, attention_mask=3x15"
    rng = np.random.default_rng(7)
    model = nets_module.make_transformer()
    for b, t in [(1, 7), (4, 32)]:
        ids = rng.integers(0, 50, (b, t)).astype(np.int64)
        mask = np.ones((b, t), np.int64)
        mask[:, t // 2:] = rng.integers(0, 2, (b, t - t // 2))
        assert_matches_torch(out, model, {"input_ids": ids, "attention_mask": mask}, ["input_ids", "attention_mask"])


@needs_torch
def test_api_in_memory_module_and_dict_outputs(nets_module, tmp_path):
    import torch

    from graphopt.export import from_torch

    model = nets_module.make_transformer()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    result = from_torch(model, (ids, torch.ones_like(ids)), dynamic_batch=True)
    assert result.exporter == "dynamo" and result.path is None and not result.written
    assert [d["name"] for d in result.io()["inputs"]] == ["input_ids", "attention_mask"]  # forward's names
    assert result.check.passed and len(result.check.cases) == 2 and result.check.max_abs < 1e-3
    assert not model.training


@needs_torch
def test_large_weights_go_to_a_data_sidecar(nets_module, tmp_path, monkeypatch):
    """Above the 2 GB protobuf limit weights are written as OUT.onnx.data (threshold lowered to test it)."""
    import torch

    import graphopt.model_io
    from graphopt.export import from_torch

    monkeypatch.setattr(graphopt.model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "big.onnx"
    result = from_torch(nets_module.make_cnn(), torch.randn(2, 3, 16, 16), output=out, dynamic_batch=True)
    assert result.check.passed and out.is_file() and (tmp_path / "big.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = np.random.default_rng(8).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert_matches_torch(out, nets_module.make_cnn(), {"image": x}, ["image"])


@needs_torch
def test_fallback_to_torchscript_when_dynamo_fails(nets_module, tmp_path):
    import torch

    from graphopt.export import from_torch

    out = tmp_path / "dd.onnx"
    result = from_torch(nets_module.make_data_dependent(), torch.randn(2, 5), output=out, dynamic_batch=True)
    assert result.exporter == "torchscript"
    assert any(n.startswith("dynamo exporter failed (GuardOnDataDependentSymNode") for n in result.notes)
    assert any("TracerWarning" in n or "tracer warning" in n for n in result.notes)
    assert result.check.passed and result.written
    x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    assert_matches_torch(out, nets_module.make_data_dependent(), {"x": x}, ["x"])


@needs_torch
def test_cli_mismatch_exits_1_with_numbers_and_writes_nothing(cli, nets, tmp_path):
    out = tmp_path / "liar.onnx"
    r = cli("export", "torch", f"{nets}:make_liar", "--input", "x=2x5", "-o", out)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ONNX Runtime and torch disagree beyond tolerance")
    assert "max |diff|" in err[0] and "atol 0.0001" in err[0] and "nothing written" in err[0]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".graphopt-export-*"))


@needs_torch
def test_api_mismatch_keep_failed_writes(nets_module, tmp_path):
    import torch

    from graphopt.errors import GateFailed
    from graphopt.export import ExportMismatch, from_torch

    out = tmp_path / "liar.onnx"
    with pytest.raises(ExportMismatch) as info:
        from_torch(nets_module.make_liar(), torch.ones(2, 3), output=out, keep_failed=True)
    assert isinstance(info.value, GateFailed) and info.value.exit_code == 1
    check = info.value.result.check
    assert not check.passed and check.max_abs == pytest.approx(1.0)
    assert out.is_file() and "written anyway" in str(info.value)
    np.testing.assert_allclose(ort_outputs(out, {"x": np.ones((2, 3), np.float32)})[0], 2.0)


@needs_torch
def test_load_source_with_factory_examples(nets, nets_module, tmp_path):
    """A factory returning (module, example_inputs) needs no shapes; int64 inputs come from the examples."""
    from graphopt.export import load_source, source_stem

    assert source_stem(f"torch:{nets}:make_cnn") == "nets_export_test_make_cnn"
    assert source_stem("torch:pkg.models:build") == "models_build" and source_stem("tf:dir/m.keras") == "m"
    path = load_source(f"torch:{nets}:transformer_with_examples", {}, tmp_path / "work")
    assert path == tmp_path / "work" / "nets_export_test_transformer_with_examples.onnx"
    assert input_dims(path) == {"input_ids": ["batch", 12], "attention_mask": ["batch", 12]}
    ids = np.random.default_rng(4).integers(0, 50, (3, 12)).astype(np.int64)
    assert_matches_torch(path, nets_module.make_transformer(), {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                         ["input_ids", "attention_mask"])


@needs_torch
def test_graphopt_run_accepts_a_torch_source(cli, nets, nets_module, tmp_path):
    """`graphopt run torch:FILE:FACTORY --shape ...` exports (load_source), optimizes and validates in one go."""
    out = tmp_path / "cnn.opt.onnx"
    r = cli("run", f"torch:{nets}:make_cnn", "--shape", "image=1x3x16x16", "--passes", "cleanup",
            "--no-latency", "-q", "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    x = np.random.default_rng(6).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert_matches_torch(out, nets_module.make_cnn(), {"image": x}, ["image"])


BAD_ARGS = [
    (["{nets}:make_cnn", "--input", "image=1xAx16"], "--input expects NAME=DxDx...[:dtype]"),
    (["{nets}:make_cnn", "--input", "image=1x3x16x16:complex"], "unknown dtype 'complex'"),
    (["{nets}:make_cnn", "--input", "image=1x3x16x16", "--dynamic", "other:1=seq"], "--dynamic names input 'other'"),
    (["{nets}:make_cnn", "--input", "image=1x3x16x16", "--exporter", "onnxscript"], "--exporter must be"),
    (["no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    (["{nets}:make_cnn"], "no inputs declared"),
]


@needs_torch
@pytest.mark.parametrize("args,message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_cli_bad_input_exits_2(cli, nets, tmp_path, args, message):
    out = tmp_path / "bad.onnx"
    r = cli("export", "torch", *[a.format(nets=nets) for a in args], "-o", out)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr
    assert not out.exists()


@needs_torch
@pytest.mark.parametrize("factory,inputs,kwargs,message", [
    ("nope", ["x=1x3"], {}, "has no attribute 'nope'"),
    ("not_a_module", ["x=1x3"], {}, "returned int; expected a torch.nn.Module"),
    ("make_cnn", ["image=1x3x16x16", "extra=1x3"], {}, "running the model on the example inputs"),
    ("make_cnn", ["image=1x3x16x16"], {"output": "model.pt"}, "should end in .onnx"),
    ("make_cnn", ["image=1x3x16x16"], {"dynamic_axes": {"image": {4: "w"}}}, "has rank 4"),
    ("make_cnn", ["image=1x3x16x16"], {"output_names": ["a", "b"]}, "2 output name(s) given"),
    ("make_data_dependent", ["x=2x5"], {"exporter": "dynamo"}, "the dynamo exporter cannot export this model"),
])
def test_api_bad_input_is_user_error(nets, tmp_path, factory, inputs, kwargs, message):
    from graphopt.errors import UserError
    from graphopt.export import export_factory, parse_input

    kwargs = {k: (tmp_path / v if k == "output" else v) for k, v in kwargs.items()}
    with pytest.raises(UserError, match=None) as info:
        export_factory(f"{nets}:{factory}", [parse_input(t) for t in inputs], **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_missing_torch_names_the_pip_command(tmp_path):
    """Runs in any environment: torch is hidden from the subprocess."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['graphopt'] + sys.argv[1:]; "
            "from graphopt.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "export", "torch", "mod:make", "--input", "x=1x3",
                        "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "pip install 'graphopt[torch]'" in r.stderr and "Traceback" not in r.stderr
