"""Calibrators (graphopt.calibrate) against numpy references on known distributions.

Each range method is checked against an independent computation on the raw samples (np.quantile, a
loop implementation of the KL search, a brute-force MSE search), and streaming batch by batch must give
exactly the histogram and ranges that one pass over all the data gives. The ORT collector is checked on
a tiny model the same way (streamed == one-shot, min/max exact, NaN named).
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import calibrate
from graphopt.calibrate import Histogram, QuantSpec, TensorStats
from graphopt.data import ArraySource
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory

U8 = QuantSpec.for_type("uint8")
S8 = QuantSpec.for_type("int8", symmetric=True)


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(200_000).astype(np.float32)
    with_outliers = np.concatenate([normal, rng.standard_normal(20).astype(np.float32) * 40])
    return {
        "normal": normal,
        "uniform": rng.uniform(-3, 5, 100_000).astype(np.float32),
        "relu": np.maximum(normal * 2.5, 0),
        "exponential": rng.exponential(1.5, 100_000).astype(np.float32),
        "laplace_outliers": with_outliers,
        "skewed": np.concatenate([rng.standard_normal(50_000) * 0.2 - 0.5,
                                  rng.exponential(3.0, 50_000)]).astype(np.float32),
    }


def _stats(x: np.ndarray, bins: int = 2048, parts: int = 1) -> TensorStats:
    st = TensorStats("x", hist=Histogram(bins))
    for chunk in np.array_split(x, parts):
        st.update(chunk)
    return st


@pytest.mark.parametrize("name", list(_distributions()))
def test_streamed_equals_one_shot(name: str) -> None:
    x = _distributions()[name]
    # Batches with growing ranges force the histogram to double its width several times.
    order = np.argsort(np.abs(x), kind="stable")
    streamed = _stats(x[order], parts=7)
    one_shot = _stats(x)
    assert streamed.hist.exp == one_shot.hist.exp
    np.testing.assert_array_equal(streamed.hist.counts, one_shot.hist.counts)
    assert (streamed.min, streamed.max, streamed.count) == (one_shot.min, one_shot.max, one_shot.count)
    for method in calibrate.METHODS:
        for spec in (U8, S8):
            assert calibrate.compute_range(streamed, method, spec, 99.9) == \
                calibrate.compute_range(one_shot, method, spec, 99.9)


@pytest.mark.parametrize("name", list(_distributions()))
def test_minmax_and_histogram_totals(name: str) -> None:
    x = _distributions()[name]
    st = _stats(x, parts=3)
    assert calibrate.minmax_range(st) == (float(x.min()), float(x.max()))
    assert st.hist.counts.sum() == x.size
    # Every value lies in the bin the grid says: recount with numpy's histogram on the same edges.
    w, b = st.hist.width, st.hist.bins
    edges = (np.arange(2 * b + 1) - b) * w
    ref, _ = np.histogram(x.astype(np.float64), bins=edges)
    np.testing.assert_array_equal(st.hist.counts, ref)


@pytest.mark.parametrize("name", list(_distributions()))
@pytest.mark.parametrize("percentile", [99.0, 99.99])
def test_percentile_against_numpy(name: str, percentile: float) -> None:
    x = _distributions()[name]
    st = _stats(x, parts=4)
    w = st.hist.width
    cut = (100 - percentile) / 200
    q_lo, q_hi = np.quantile(x.astype(np.float64), [cut, 1 - cut])
    lo, hi = calibrate.percentile_range(st, percentile)
    # Thresholds are bin edges just outside the exact quantiles (clipped to the data's range).
    assert q_hi - 1e-9 <= hi <= q_hi + w + 1e-9
    assert q_lo - w - 1e-9 <= lo <= q_lo + 1e-9
    t_ref = np.quantile(np.abs(x.astype(np.float64)), percentile / 100)
    lo_s, hi_s = calibrate.percentile_range(st, percentile, symmetric=True)
    t = max(-lo_s, hi_s)
    assert t_ref - 1e-9 <= t <= t_ref + w + 1e-9 or t == max(-st.min, st.max)


def _kl_reference(fold: np.ndarray, levels: int) -> int:
    """The KL threshold search written plainly, one candidate at a time (slow; the spec).

    Candidate k keeps k bins; P is them with the clipped mass added to the last; Q is what the quantizer
    makes of the kept values: ``levels`` points 0, s, ..., k (s = k / (levels - 1)), cell g holding what
    rounds to point g, its mass spread evenly over the part of the cell where P is non-zero.
    """
    nz = np.flatnonzero(fold)
    used = int(nz[-1]) + 1
    if used <= levels:
        return used
    f = fold[:used].astype(np.float64)
    best, best_kl = used, math.inf
    for k in range(levels, used + 1):
        p = f[:k].copy()
        tail = f[k:].sum()
        p[-1] += tail
        if tail > 0 and np.count_nonzero(f[:k]) < 2:
            continue  # clipping down to a single point mass: P == Q whatever was clipped
        s = k / (levels - 1)
        edges = [0.0] + [(g - 0.5) * s for g in range(1, levels)] + [float(k)]
        q = np.zeros(k)
        for g in range(levels):
            a, b = edges[g], edges[g + 1]
            ov = np.clip(np.minimum(np.arange(1, k + 1), b) - np.maximum(np.arange(k), a), 0.0, None)
            mass = float((ov * f[:k]).sum())
            nzlen = float((ov * (p > 0)).sum())
            if nzlen > 0:
                q += ov * (p > 0) * (mass / nzlen)
        if np.any((p > 0) & (q <= 0)):
            continue
        pn, qn = p / p.sum(), q / q.sum()
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl - 1e-12:
            best, best_kl = k, kl
    return best


@pytest.mark.parametrize("name", ["normal", "relu", "laplace_outliers", "exponential"])
@pytest.mark.parametrize("levels", [128, 255])
def test_entropy_against_reference(name: str, levels: int) -> None:
    st = _stats(_distributions()[name], bins=1024, parts=3)
    fold = st.hist.folded()
    assert calibrate.entropy_kept_bins(fold, levels, max_candidates=None) == _kl_reference(fold, levels)
    if name == "laplace_outliers":
        lo, hi = calibrate.entropy_range(st, S8)
        bulk = float(np.quantile(np.abs(_distributions()["normal"]), 0.999))
        assert bulk < hi < 0.5 * max(-st.min, st.max)  # keeps the bulk, clips the 40-sigma outliers


def test_entropy_never_clips_to_a_single_point() -> None:
    """Data on a few discrete values (pixels): keeping one non-zero bin and clipping the rest would score a
    divergence of 0 (P and Q are the same point mass); such candidates are refused."""
    fold = np.zeros(4096, np.int64)
    fold[[3, 900, 1800, 2700, 3600]] = [5000, 40, 30, 20, 10]
    k = calibrate.entropy_kept_bins(fold, 255, max_candidates=None)
    assert k == _kl_reference(fold, 255) and k > 900
    assert calibrate.entropy_kept_bins(fold, 255) > 900  # the default, every other candidate here
    assert calibrate.default_bins("entropy") == 8192 and calibrate.default_bins("percentile") == 2048


def _true_mse(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    scale, zp = calibrate.quant_params(lo, hi, spec)
    q = np.clip(np.round(x / scale) + zp, spec.qmin, spec.qmax)
    return float(np.mean(((q - zp) * scale - x) ** 2))


@pytest.mark.parametrize("name", ["normal", "relu", "laplace_outliers", "skewed"])
@pytest.mark.parametrize("spec", [U8, S8], ids=["uint8", "int8sym"])
def test_mse_against_brute_force(name: str, spec: QuantSpec) -> None:
    x = _distributions()[name].astype(np.float64)
    st = _stats(x.astype(np.float32), parts=2)
    lo, hi = calibrate.mse_range(st, spec)
    absmax = max(-st.min, st.max)
    best = min(_true_mse(x, max(st.min, -t), min(st.max, t), spec)
               for t in absmax * np.arange(1, 129) / 128)
    assert _true_mse(x, lo, hi, spec) <= best * 1.03 + 1e-12


def test_quant_params_conventions() -> None:
    assert calibrate.quant_params(0.0, 6.0, U8) == (pytest.approx(6 / 255), 0)  # Relu range: zero point 0
    scale, zp = calibrate.quant_params(-1.0, 3.0, U8)
    assert zp == round(1.0 / scale) and scale == pytest.approx(4 / 255)
    scale, zp = calibrate.quant_params(-2.0, 0.5, S8)
    assert zp == 0 and scale == pytest.approx(2 / 127)
    assert calibrate.quant_params(1.0, 2.0, U8)[1] == 0  # the range always contains 0
    assert calibrate.quant_params(0.0, 0.0, U8) == (1.0, 0)


# --- the ORT collector ---------------------------------------------------------------------------------

def _tiny_model(log: bool = False) -> ir.Model:
    rng = np.random.default_rng(1)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu")]
    if log:
        nodes.append(helper.make_node("Log", ["conv"], ["log"], name="log"))
        nodes.append(helper.make_node("Add", ["relu", "log"], ["y"], name="add"))
    else:
        nodes.append(helper.make_node("Identity", ["relu"], ["y"], name="id"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("histogram", [False, True])
def test_collect_streams_like_one_shot(tmp_path, histogram: bool) -> None:
    model = _tiny_model()
    x = np.random.default_rng(2).standard_normal((40, 3, 6, 6)).astype(np.float32)
    names = ["x", "conv", "relu"]
    sessions = SessionFactory(work_dir=tmp_path)
    small = calibrate.collect(model, names, ArraySource({"x": x}), sessions, histogram=histogram, bins=256,
                              batch_size=3)
    whole = calibrate.collect(model, names, ArraySource({"x": x}), sessions, histogram=histogram, bins=256,
                              batch_size=40)
    assert small.batches == 14 and whole.batches == 1 and small.samples == whole.samples == 40
    for name in names:
        a, b = small.stats[name], whole.stats[name]
        assert (a.min, a.max) == (b.min, b.max)
        if histogram:
            np.testing.assert_array_equal(a.hist.counts, b.hist.counts)
    assert small.stats["x"].min == float(x.min()) and small.stats["relu"].min == 0.0
    # max_batches stops early
    two = calibrate.collect(model, names, ArraySource({"x": x}), sessions, histogram=False, batch_size=3,
                            max_batches=2)
    assert two.batches == 2 and two.samples == 6


def test_collect_names_nonfinite_tensor(tmp_path) -> None:
    model = _tiny_model(log=True)
    x = np.random.default_rng(3).standard_normal((8, 3, 6, 6)).astype(np.float32)
    with pytest.raises(UserError, match="'log'.*NaN or Inf"):
        calibrate.collect(model, ["conv", "log"], ArraySource({"x": x}), SessionFactory(work_dir=tmp_path),
                          histogram=False, batch_size=4)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="'x'"):
        calibrate.collect(model, ["x"], ArraySource({"x": bad}), SessionFactory(work_dir=tmp_path),
                          histogram=True, batch_size=4)

    # with histograms the batches run on a worker thread: a failing batch still names the tensor
    with pytest.raises(UserError, match="'log'.*NaN or Inf"):
        calibrate.collect(model, ["conv", "log"], ArraySource({"x": x}), SessionFactory(work_dir=tmp_path),
                          histogram=True, batch_size=2)
    assert not [t for t in threading.enumerate() if t.name == "graphopt-calibration"]


def test_prefetch_bounds_items_and_passes_errors() -> None:
    alive: list[int] = []
    made: list[int] = []

    def source():
        for i in range(10):
            made.append(i)
            alive.append(len(made) - consumed[0])
            yield i

    consumed = [0]
    got = []
    runs = calibrate._Prefetch(source(), depth=1)
    for item in runs:
        got.append(item)
        time.sleep(0.01)  # let the worker run ahead as far as it may
        consumed[0] += 1
    runs.close()
    assert got == list(range(10))
    assert max(alive) <= 2  # the consumer's item and at most one made ahead

    def failing():
        yield 1
        raise RuntimeError("stage broke")

    runs = calibrate._Prefetch(failing(), depth=1)
    with pytest.raises(RuntimeError, match="stage broke"):
        list(runs)
    runs.close()

    # the consumer stops early: close() stops the worker, which never runs the whole source
    made.clear()
    consumed[0] = 0
    runs = calibrate._Prefetch(source(), depth=1)
    for item in runs:
        break
    runs.close()
    assert len(made) <= 3
    assert not [t for t in threading.enumerate() if t.name == "graphopt-calibration"]


def test_session_sharing_the_models_weights_equals_a_serialized_one(models_dir, tmp_path) -> None:
    """What calibration runs on: ORT reads the model's own weight arrays (no copy, no file); the outputs
    are those of a session on the serialized model, the model is left as it was, and the session keeps
    the arrays alive after the caller drops them."""
    import gc

    from graphopt.model_io import load_model
    from graphopt.runtime import SessionSettings

    model = load_model(models_dir / "digits_cnn.onnx")
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    assert sum(t.nbytes >= 1024 for t in before.values()) >= 4  # the conv and gemm weights are shared
    x = np.load(models_dir / "digits_cnn_test.npz")["input"][:16]
    settings = SessionSettings(graph_optimization_level="extended")
    ref = SessionFactory().session(model, settings=settings).run(None, {"input": x})[0]
    shared = SessionFactory().session(model, settings=settings, share_weights=True)
    assert all(v.const_value is before[name] for name, v in model.graph.initializers.items())
    del model, before
    gc.collect()
    np.testing.assert_array_equal(shared.run(None, {"input": x})[0], ref)
    # weights memory-mapped from an external-data file are shared the same way
    from graphopt.model_io import save_model

    save_model(load_model(models_dir / "digits_cnn.onnx"), tmp_path / "m.onnx", external_data=True)
    mapped = load_model(tmp_path / "m.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in mapped.graph.initializers.values())
    got = SessionFactory().session(mapped, settings=settings, share_weights=True).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, ref)
