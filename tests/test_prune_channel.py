"""Structured channel pruning: for every coupling case, the pruned graph must compute exactly (1e-5) what
the original computes with the removed channels' producer weights zeroed.

Small models are built by hand with onnx.helper. Where the test plants the unimportant channels itself
(weights scaled by 1e-3), it also checks that those are the ones removed and zeroes them on its own; in the
coupled cases (grouped convs, attention) the reference is zeroed from ``plan.zeroed``, which still fails if
any coupled tensor was missed, because the pruned graph then computes something else.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import PassContext
from graphopt.model_io import load_model, model_to_bytes
from graphopt.options import build
from graphopt.passes.prune import PrunePass
from graphopt.pipeline import check_model
from conftest import load_npz, ort_outputs

RNG = np.random.default_rng(0)
TOL = 1e-5


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _seed() -> None:
    """The same weights whatever tests run before this one."""
    global RNG
    RNG = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], inputs: dict[str, list],
         outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # fills the outputs' shapes
    onnx.checker.check_model(model)
    return model


def prune(model: onnx.ModelProto | ir.Model, **options: object) -> tuple[ir.Model, PrunePass]:
    ir_model = ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model
    p = PrunePass(build(PrunePass.Options, "prune", {"mode": "channel", **options}), PassContext(seed=0))
    p(ir_model)
    check_model(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # shapes left consistent
    return ir_model, p


def zeroed(model: onnx.ModelProto, spec: list[tuple[str, int, list[int]]]) -> onnx.ModelProto:
    """The original model with the given slices of the given initializers set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for name, axis, indices in spec:
        array = numpy_helper.to_array(inits[name]).copy()
        index = [slice(None)] * array.ndim
        index[axis] = indices
        array[tuple(index)] = 0
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return out


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model_to_bytes(model) if isinstance(model, ir.Model) else model.SerializeToString()
    return ort_outputs(data, feeds)


def assert_equivalent(pruned: ir.Model, reference: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      original: onnx.ModelProto | None = None) -> None:
    got, want = run(pruned, feeds), run(reference, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * max(1.0, float(np.abs(w).max())))
    if original is not None:  # the comparison can fail: zeroing changed the outputs
        base = run(original, feeds)
        assert max(float(np.abs(b - w).max()) for b, w in zip(base, want)) > 1e-3


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def planted(*shape: int, channels: list[int], axis: int = 0, scale: float = 0.05) -> np.ndarray:
    """Random weights whose ``channels`` along ``axis`` are small, so they are the least important.

    Small, not tiny: zeroing them must still move the outputs, or the comparison could not fail.
    """
    w = f32(*shape)
    index = [slice(None)] * len(shape)
    index[axis] = channels
    w[tuple(index)] *= scale
    return w


def image(n: int = 2, c: int = 3, h: int = 6, w: int = 6) -> dict[str, np.ndarray]:
    return {"x": f32(n, c, h, w)}


def bn_params(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {f"{prefix}_s": f32(c) + 1.5, f"{prefix}_b": f32(c), f"{prefix}_m": f32(c),
            f"{prefix}_v": np.abs(f32(c)) + 0.5}


def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix)


DROP = [1, 2, 5, 6]
KEEP = [0, 3, 4, 7]


# ----------------------------------------------------------------------------- Conv, bias, BN, per-channel Mul
def conv_bn_model(consumer_kernel: int, pad: int) -> onnx.ModelProto:
    inits = {"w1": planted(8, 3, 3, 3, channels=DROP), "b1": f32(8), **bn_params("bn", 8),
             "scale": f32(1, 8, 1, 1) + 2.0,
             "w2": f32(5, 8, consumer_kernel, consumer_kernel), "b2": f32(5)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             bn("bn", "c1", "n1"), helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Mul", ["r1", "scale"], ["s1"]),
             helper.make_node("Conv", ["s1", "w2", "b2"], ["y"], name="conv2", pads=[pad] * 4)]
    return make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])


def test_conv_bias_batchnorm_elementwise_and_consumer_are_pruned_together() -> None:
    model = conv_bn_model(consumer_kernel=1, pad=0)
    pruned, p = prune(model, sparsity=0.5)
    np.testing.assert_array_equal(weight(pruned, "w1"), numpy_helper.to_array(model.graph.initializer[0])[KEEP])
    assert weight(pruned, "b1").shape == (4,) and weight(pruned, "bn_v").shape == (4,)
    assert weight(pruned, "scale").shape == (1, 4, 1, 1)
    assert weight(pruned, "w2").shape == (5, 4, 1, 1)
    # the BatchNorm shift and bias through ReLU of the removed channels went into conv2's bias
    assert p.details["compensation"][0]["exact"] and p.details["approximate_compensation"] == 0
    assert_equivalent(pruned, zeroed(model, [("w1", 0, DROP)]), image(), original=model)


def test_compensation_none_drops_the_constants() -> None:
    model = conv_bn_model(consumer_kernel=1, pad=0)
    pruned, _ = prune(model, sparsity=0.5, compensate="none")
    feeds = image()
    got, want = run(pruned, feeds), run(zeroed(model, [("w1", 0, DROP)]), feeds)
    assert float(np.abs(got[0] - want[0]).max()) > 1e-3


def test_padded_consumer_exact_map_and_interior_bias() -> None:
    model = conv_bn_model(consumer_kernel=3, pad=1)
    reference = zeroed(model, [("w1", 0, DROP)])
    exact, p = prune(model, sparsity=0.5, compensate="exact")
    assert p.details["approximate_compensation"] == 0
    assert_equivalent(exact, reference, image(), original=model)
    approx, p = prune(model, sparsity=0.5, compensate="bias")
    assert p.details["approximate_compensation"] == 1
    feeds = image()
    got, want = run(approx, feeds)[0], run(reference, feeds)[0]
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], rtol=TOL, atol=TOL)  # interior
    assert float(np.abs(got - want).max()) > 1e-4  # the border is where the bias is only approximate


def test_zero_sparsity_changes_nothing(models_dir) -> None:
    path = models_dir / "digits_cnn.onnx"
    model = load_model(path)
    shapes = {n: tuple(v.const_value.shape.numpy()) for n, v in model.graph.initializers.items()}
    pruned, p = prune(model, sparsity=0.0)
    assert not p.details["channels_removed"]
    assert {n: tuple(v.const_value.shape.numpy()) for n, v in pruned.graph.initializers.items()} == shapes
    feeds, _ = load_npz(models_dir / "digits_cnn_test.npz", 64)
    np.testing.assert_array_equal(run(pruned, feeds)[0], ort_outputs(path, feeds)[0])


# ----------------------------------------------------------------------------- Gemm / MatMul MLPs
def test_matmul_mlp_hidden_units_with_bias_through_sigmoid() -> None:
    inits = {"w1": planted(6, 8, channels=DROP, axis=1), "b1": f32(8), "w2": planted(8, 4, channels=DROP), "b2": f32(4)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Sigmoid", ["hb"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    model = make(nodes, inits, {"x": ["N", 6]}, ["y"])
    pruned, _ = prune(model, sparsity=0.5)
    assert weight(pruned, "w1").shape == (6, 4) and weight(pruned, "w2").shape == (4, 4)
    assert_equivalent(pruned, zeroed(model, [("w1", 1, DROP)]), {"x": f32(3, 6)}, original=model)


def test_gemm_transposed_weights_and_missing_bias() -> None:
    inits = {"w1": planted(8, 6, channels=DROP), "b1": f32(8), "w2": planted(4, 8, channels=DROP, axis=1)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("Add", ["a", "b1"], ["a2"]),  # b1 is shared: each use must keep its own copy
             helper.make_node("Gemm", ["a2", "w2"], ["y"], transB=1, alpha=0.5)]
    model = make(nodes, inits, {"x": ["N", 6]}, ["y"])
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "w2").shape == (4, 4)
    assert any(r["into"] == "bias" for r in p.details["compensation"])  # a C input was added to the Gemm
    assert_equivalent(pruned, zeroed(model, [("w1", 0, DROP)]), {"x": f32(3, 6)}, original=model)


# ----------------------------------------------------------------------------- Flatten / Reshape into Gemm
@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_into_gemm_removes_a_block_per_channel(flatten: str) -> None:
    inits = {"w1": planted(8, 3, 3, 3, channels=DROP), "b1": np.abs(f32(8)) + 0.5,  # positive: through ReLU
             "w2": planted(5, 8, 16, channels=DROP, axis=1).reshape(5, 128), "b2": f32(5),
             "shape": np.array([-1, 128], dtype=np.int64)}
    flat = (helper.make_node("Flatten", ["r"], ["f"], axis=1) if flatten == "Flatten"
            else helper.make_node("Reshape", ["r", "shape"], ["f"]))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["c"], ["r"]), flat,
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])
    pruned, _ = prune(model, sparsity=0.5)
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")).reshape(5, 8, 16)
    np.testing.assert_array_equal(weight(pruned, "w2"), w2[:, KEEP].reshape(5, 64))
    if flatten == "Reshape":
        reshape = next(n for n in pruned.graph if n.op_type == "Reshape")
        assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 64]
    assert_equivalent(pruned, zeroed(model, [("w1", 0, DROP)]), image(), original=model)


# ----------------------------------------------------------------------------- Concat, Split
def test_concat_maps_each_input_to_its_offset_range_and_keeps_fixed_parts() -> None:
    inits = {"wa": planted(4, 3, 1, 1, channels=[1, 2]), "wb": planted(6, 3, 1, 1, channels=[0, 4, 5]),
             "wc": f32(5, 13, 1, 1)}
    wc = inits["wc"]
    wc[:, [1, 2, 4, 8, 9]] *= 0.05  # concat positions of wa[1,2] (1,2) and wb[0,4,5] (4,8,9)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Conv", ["x", "wb"], ["b"]),
             helper.make_node("Concat", ["a", "b", "x"], ["cat"], axis=1),  # the model input part stays
             helper.make_node("Relu", ["cat"], ["r"]), helper.make_node("Conv", ["r", "wc"], ["y"])]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "wa").shape[0] + weight(pruned, "wb").shape[0] == 5
    assert weight(pruned, "wc").shape == (5, 8, 1, 1)  # 10 prunable -> 5 kept, + 3 input channels
    assert_equivalent(pruned, zeroed(model, p.plan.zeroed), image(), original=model)
    removed = {name: idx for name, _, idx in p.plan.zeroed}
    assert removed == {"wa": [1, 2], "wb": [0, 4, 5]}


def test_split_sizes_follow_the_pruned_channels() -> None:
    inits = {"w": planted(8, 3, 3, 3, channels=DROP), "split": np.array([3, 5], dtype=np.int64),
             "w1": f32(2, 3, 1, 1), "w2": f32(2, 5, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Split", ["c", "split"], ["s1", "s2"], axis=1),
             helper.make_node("Relu", ["s1"], ["r1"]), helper.make_node("Conv", ["r1", "w1"], ["y1"]),
             helper.make_node("Conv", ["s2", "w2"], ["y2"])]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y1", "y2"])
    pruned, p = prune(model, sparsity=0.5)
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [1, 3]  # DROP = 1, 2 | 5, 6
    assert_equivalent(pruned, zeroed(model, [("w", 0, DROP)]), image(), original=model)


# ----------------------------------------------------------------------------- residual Add/Sub/Mul
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_residual_branches_share_one_channel_set(op: str) -> None:
    inits = {"w0": planted(8, 3, 3, 3, channels=DROP), "b0": np.abs(f32(8)) + 0.5,
             "w1": planted(8, 8, 3, 3, channels=DROP),
             **bn_params("bn", 8), "w2": planted(4, 8, 1, 1, channels=DROP, axis=1)}
    inits["w1"][:, DROP] *= 0.05
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["h"]),
             helper.make_node("Conv", ["h", "w1"], ["c1"], pads=[1] * 4), bn("bn", "c1", "n1"),
             helper.make_node(op, ["n1", "h"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])
    pruned, p = prune(model, sparsity=0.5, compensate="exact")
    groups = [g for g in p.details["groups"]]
    assert len(groups) == 1 and groups[0]["channels"] == 8 and groups[0]["removed"] == 4
    assert weight(pruned, "w0").shape[0] == weight(pruned, "w1").shape[0] == weight(pruned, "w1").shape[1] == 4
    assert_equivalent(pruned, zeroed(model, [("w0", 0, DROP), ("w1", 0, DROP)]), image(), original=model)


# ----------------------------------------------------------------------------- grouped and depthwise Conv
@pytest.mark.parametrize("kind", ["grouped", "depthwise", "depthwise_x2"])
def test_grouped_and_depthwise_conv(kind: str) -> None:
    group = 2 if kind == "grouped" else 8
    cout = 16 if kind == "depthwise_x2" else 8
    inits = {"w0": f32(8, 3, 1, 1), "wg": f32(cout, 8 // group, 3, 3), "bg": f32(cout), **bn_params("bn", cout),
             "w2": f32(4, cout, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Relu", ["c0"], ["h"]),
             helper.make_node("Conv", ["h", "wg", "bg"], ["g"], group=group, pads=[1] * 4),
             bn("bn", "g", "n"), helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])
    pruned, p = prune(model, sparsity=0.5, compensate="exact")
    conv = next(n for n in pruned.graph if len(n.inputs) > 1 and n.inputs[1].name == "wg")
    wg = weight(pruned, "wg")
    if kind == "grouped":  # 4 input and 4 output channels per group -> 2 and 2: groups shrink alike
        assert conv.attributes.get_int("group", 1) == 2 and wg.shape == (4, 2, 3, 3)
    else:  # the depthwise conv follows its input channels; its group count drops with them
        assert conv.attributes.get_int("group", 1) == 4 and wg.shape == (cout // 2, 1, 3, 3)
    assert_equivalent(pruned, zeroed(model, p.plan.zeroed), image(), original=model)


# ----------------------------------------------------------------------------- transformer: MLP and heads
def attention_block(heads_drop: list[int]) -> onnx.ModelProto:
    d, h, hd, s, ff = 16, 4, 4, 5, 32
    inits = {"wq": f32(d, d), "bq": f32(d), "wk": f32(d, d), "bk": f32(d), "wv": f32(d, d), "bv": f32(d),
             "wo": f32(d, d), "bo": f32(d), "ln_s": f32(d) + 1, "ln_b": f32(d), "w1": f32(d, ff), "b1": f32(ff),
             "w2": f32(ff, d), "b2": f32(d), "split": np.array([-1, s, h, hd], dtype=np.int64),
             "merge": np.array([-1, s, d], dtype=np.int64), "scale": np.array(0.5, dtype=np.float32),
             "sqrt2": np.array(1.4142135, dtype=np.float32), "one": np.array(1.0, dtype=np.float32),
             "half": np.array(0.5, dtype=np.float32)}
    for name in ("wq", "wk", "wv"):
        for head in heads_drop:
            inits[name][:, head * hd:(head + 1) * hd] *= 0.05
    for head in heads_drop:
        inits["wo"][head * hd:(head + 1) * hd] *= 0.05
    inits["w1"][:, ::2] *= 0.05
    inits["w2"][::2] *= 0.05
    n = helper.make_node
    nodes = []
    for t in "qkv":
        nodes += [n("MatMul", ["x", f"w{t}"], [f"{t}0"]), n("Add", [f"{t}0", f"b{t}"], [f"{t}1"]),
                  n("Reshape", [f"{t}1", "split"], [f"{t}2"])]
    nodes += [n("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3]), n("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1]),
              n("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]), n("MatMul", ["q3", "k3"], ["sc"]),
              n("Mul", ["sc", "scale"], ["sc2"]), n("Softmax", ["sc2"], ["p"], axis=-1),
              n("MatMul", ["p", "v3"], ["o3"]), n("Transpose", ["o3"], ["o2"], perm=[0, 2, 1, 3]),
              n("Reshape", ["o2", "merge"], ["o1"]), n("MatMul", ["o1", "wo"], ["o0"]),
              n("Add", ["o0", "bo"], ["attn"]), n("Add", ["x", "attn"], ["res1"]),
              n("LayerNormalization", ["res1", "ln_s", "ln_b"], ["ln"], axis=-1),
              n("MatMul", ["ln", "w1"], ["f0"]), n("Add", ["f0", "b1"], ["f1"]), n("Div", ["f1", "sqrt2"], ["g0"]),
              n("Erf", ["g0"], ["g1"]), n("Add", ["g1", "one"], ["g2"]), n("Mul", ["half", "g2"], ["g3"]),
              n("Mul", ["f1", "g3"], ["gelu"]), n("MatMul", ["gelu", "w2"], ["f2"]), n("Add", ["f2", "b2"], ["f3"]),
              n("Add", ["res1", "f3"], ["y"])]
    return make(nodes, inits, {"x": ["N", s, d]}, ["y"])


def test_transformer_attention_heads_and_mlp_hidden_units() -> None:
    model = attention_block(heads_drop=[1, 2])
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "wq").shape == (16, 8) and weight(pruned, "wo").shape == (8, 16)
    assert weight(pruned, "w1").shape == (16, 16) and weight(pruned, "w2").shape == (16, 16)
    split = next(n for n in pruned.graph if n.op_type == "Reshape" and n.inputs[0].name == "q1")
    assert split.inputs[1].const_value.numpy().tolist() == [-1, 5, 2, 4]  # 2 of 4 heads of 4 left
    heads = [(name, axis, idx) for name, axis, idx in p.plan.zeroed if name in ("wq", "wk", "wv")]
    assert all(idx == list(range(4, 12)) for _, _, idx in heads) and len(heads) == 3  # heads 1 and 2
    assert [name for name, _, _ in p.plan.zeroed if name == "w1"] == ["w1"]
    assert_equivalent(pruned, zeroed(model, p.plan.zeroed), {"x": f32(3, 5, 16)}, original=model)
    # the residual stream feeds a LayerNormalization: its group stays, and the report says why
    (stopped,) = p.details["stopped_groups"]
    assert stopped["layers"] == "wo, w2" and "LayerNormalization" in stopped["reason"]


def test_heads_can_be_kept_whole() -> None:
    pruned, p = prune(attention_block(heads_drop=[1]), sparsity=0.5, prune_heads=False)
    assert weight(pruned, "wq").shape == (16, 16) and weight(pruned, "w1").shape == (16, 16)


# ----------------------------------------------------------------------------- what stops a group
def test_unknown_operator_stops_its_group_and_the_graph_stays_equivalent() -> None:
    inits = {"w0": planted(8, 3, 1, 1, channels=DROP), "w1": planted(8, 8, 1, 1, channels=DROP, axis=1),
             "w2": f32(4, 8, 1, 1), "axis": np.array(1, dtype=np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("CumSum", ["r1", "axis"], ["cs"], name="cumsum"),  # mixes channels
             helper.make_node("Conv", ["cs", "w2"], ["y"], name="conv2")]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y"])
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "w0").shape == (4, 3, 1, 1) and weight(pruned, "w1").shape == (8, 4, 1, 1)
    assert [s["node"] for s in p.details["not_understood"]] == ["cumsum"]
    stopped = {s["layers"]: s["reason"] for s in p.details["stopped_groups"]}
    assert "CumSum 'cumsum'" in stopped["conv1"]
    assert_equivalent(pruned, zeroed(model, [("w0", 0, DROP)]), image(), original=model)


def test_model_output_channels_are_never_pruned() -> None:
    inits = {"w0": planted(8, 3, 1, 1, channels=DROP), "w1": planted(6, 8, 1, 1, channels=[0, 1, 2])}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Relu", ["c0"], ["h"]),
             helper.make_node("Conv", ["h", "w1"], ["y"])]
    model = make(nodes, inits, {"x": ["N", 3, 6, 6]}, ["y", "h"])  # h is an output too
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "w0").shape == (8, 3, 1, 1) and weight(pruned, "w1").shape == (6, 8, 1, 1)
    assert not p.details["channels_removed"]
    assert {s["reason"] for s in p.details["stopped_groups"]} == {"model output 'h'", "model output 'y'"}


def test_skip_and_keep_first_fix_those_layers() -> None:
    model = conv_bn_model(consumer_kernel=1, pad=0)
    pruned, p = prune(model, sparsity=0.5, keep_first=True)
    assert weight(pruned, "w1").shape[0] == 8 and not p.details["channels_removed"]
    pruned, p = prune(model, sparsity=0.5, skip=["conv2"])
    assert weight(pruned, "w1").shape[0] == 8
    assert any("prune.skip" in s["reason"] for s in p.details["not_understood"])


# ----------------------------------------------------------------------------- allocation
def test_uniform_sparsity_per_group_and_round_to(models_dir) -> None:
    model = load_model(models_dir / "digits_cnn.onnx")
    _, p = prune(model, sparsity=0.3)
    for g in p.details["groups"]:
        assert g["removed"] == round(0.3 * g["channels"])  # 16, 32, 64, 64 -> 5, 10, 19, 19
    model = load_model(models_dir / "digits_cnn.onnx")
    _, p = prune(model, sparsity=0.3, round_to=8)
    assert all(g["kept"] % 8 == 0 for g in p.details["groups"])


def test_global_allocation_reaches_the_total(models_dir) -> None:
    model = load_model(models_dir / "digits_mlp.onnx")
    _, p = prune(model, sparsity=0.4, allocation="global", importance="l2")
    total = p.details["channels_in_prunable_groups"]
    assert p.details["channels_removed"] == round(0.4 * total) == round(0.4 * (128 + 64))
    assert len({g["sparsity"] for g in p.details["groups"]}) > 1  # not the same fraction everywhere


# ----------------------------------------------------------------------------- reference models
@pytest.mark.parametrize("name, compensate, n", [("digits_cnn", "exact", 64), ("transformer_small", "bias", 4),
                                                 ("resnet_small", "exact", 2)])
def test_reference_models_equal_their_zeroed_originals(models_dir, name: str, compensate: str, n: int) -> None:
    path = models_dir / f"{name}.onnx"
    pruned, p = prune(load_model(path), sparsity=0.5, compensate=compensate)
    assert p.details["approximate_compensation"] == 0
    original = onnx.load(str(path))
    sample = next(f for f in sorted(models_dir.glob(f"{name}_*.npz")))
    feeds, _ = load_npz(sample, n)
    assert_equivalent(pruned, zeroed(original, p.plan.zeroed), feeds, original=original)
    before = sum(t.const_value.size for t in ir.serde.deserialize_model(original).graph.initializers.values())
    after = sum(t.const_value.size for t in pruned.graph.initializers.values())
    assert after < 0.6 * before


def test_values_used_inside_control_flow_are_kept() -> None:
    then_graph = helper.make_graph([helper.make_node("Identity", ["h"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    inits = {"w0": planted(8, 3, 1, 1, channels=DROP), "w1": f32(4, 8, 1, 1), "w2": planted(8, 3, 1, 1, channels=DROP),
             "w3": planted(4, 8, 1, 1, channels=DROP, axis=1), "cond": np.array(True)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Relu", ["c0"], ["h"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph, name="if"),
             helper.make_node("Conv", ["branch", "w1"], ["y"]),
             helper.make_node("Conv", ["x", "w2"], ["c2"]), helper.make_node("Relu", ["c2"], ["h2"]),
             helper.make_node("Conv", ["h2", "w3"], ["y2"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
        value_info=[helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["N", 8, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    pruned, p = prune(model, sparsity=0.5)
    assert weight(pruned, "w0").shape == (8, 3, 1, 1) and weight(pruned, "w2").shape == (4, 3, 1, 1)
    assert any(s["op"] == "If" for s in p.details["not_understood"])
    assert_equivalent(pruned, zeroed(model, [("w2", 0, DROP)]), image(), original=model)
