"""Streaming calibration: activation ranges from running the model in ONNX Runtime batch by batch.

ONNX Runtime's own calibrators keep every observed activation of every batch before computing ranges,
which takes gigabytes for a ResNet-18. Here the model is augmented instead: each observed tensor gets
ReduceMin / ReduceMax / ReduceSum nodes (the sum only to notice NaN and Inf), and for the histogram
methods the tensor itself is fetched and folded into a fixed-size histogram right away. Nothing of a
batch outlives the batch.

Histograms have a power-of-two bin width on a grid centred on zero. When a batch goes beyond the
current range the width doubles and neighbouring bins merge exactly, so streaming batch by batch gives
the very same histogram (and ranges) as one pass over all the data at once.

Range methods: ``minmax``; ``percentile`` (clip the tails); ``entropy`` (TensorRT-style: the clipping
threshold that minimizes the KL divergence between the clipped histogram and its quantized version);
``mse`` (the clipping threshold that minimizes the expected squared quantization error).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.context import NullProgress, ProgressReporter
from graphopt.data import DataSource, input_specs
from graphopt.errors import UserError
from graphopt.runtime import SessionFactory

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")

#: Elements binned per numpy call: bounds the temporaries (8 bytes each) whatever the tensor size.
_CHUNK = 1 << 20
_MIN_EXP = -120


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """An integer type's range and whether its zero point is fixed at the middle (symmetric)."""

    qmin: int
    qmax: int
    symmetric: bool = False

    @classmethod
    def for_type(cls, name: str, symmetric: bool = False, reduce_range: bool = False) -> QuantSpec:
        bits, signed = {"int8": (8, True), "uint8": (8, False), "int16": (16, True), "uint16": (16, False),
                        "int4": (4, True), "uint4": (4, False)}[name]
        if reduce_range:
            bits -= 1
        if signed:
            return cls(-(1 << (bits - 1)), (1 << (bits - 1)) - 1, symmetric)
        return cls(0, (1 << bits) - 1, symmetric)


def quant_params(lo: float, hi: float, spec: QuantSpec) -> tuple[float, int]:
    """Scale and zero point that cover [lo, hi] (widened to contain 0, so 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if spec.symmetric:
        zp = (spec.qmin + spec.qmax + 1) // 2
        absmax = max(-lo, hi)
        scale = absmax / (spec.qmax - zp)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zp = spec.qmin if scale == 0 else int(np.clip(round(spec.qmin - lo / scale), spec.qmin, spec.qmax))
    if not scale > 1e-12:  # a constant-zero tensor: any scale represents it
        scale = 1.0
    return float(np.float32(scale)), zp


def quant_params_array(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quant_params` for many ranges at once (per-channel weights); float32 scales, int64 zero points."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if spec.symmetric:
        zp = np.full(lo.shape, (spec.qmin + spec.qmax + 1) // 2, np.int64)
        scale = np.maximum(-lo, hi) / (spec.qmax - zp)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.round(spec.qmin - lo / np.where(scale > 0, scale, 1)), spec.qmin)
        zp = np.clip(zp, spec.qmin, spec.qmax).astype(np.int64)
    scale = np.where(scale > 1e-12, scale, 1.0).astype(np.float32)
    return scale, zp


def _exponent(absmax: float, bins: int) -> int:
    """Smallest e with bins * 2**e > absmax: the finest power-of-two bin width that holds absmax."""
    if not absmax > 0:
        return _MIN_EXP
    e = max(math.frexp(absmax / bins)[1], _MIN_EXP)
    while bins * 2.0 ** e <= absmax:
        e += 1
    while e > _MIN_EXP and bins * 2.0 ** (e - 1) > absmax:
        e -= 1
    return e


@dataclasses.dataclass
class Histogram:
    """Counts on [-bins*w, bins*w) with w = 2**exp; bin i holds [(i-bins)*w, (i-bins+1)*w)."""

    bins: int
    exp: int | None = None
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.bins < 2 or self.bins % 2:
            raise ValueError("histogram bins per side must be an even number >= 2")

    @property
    def width(self) -> float:
        return 2.0 ** (self.exp if self.exp is not None else _MIN_EXP)

    def _grow(self, exp: int) -> None:
        assert self.counts is not None and self.exp is not None
        b = self.bins
        while self.exp < exp:
            merged = self.counts.reshape(b, 2).sum(axis=1)
            self.counts = np.zeros(2 * b, np.int64)
            self.counts[b // 2: b // 2 + b] = merged
            self.exp += 1

    def add(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Add finite values ``x`` whose min and max are ``lo`` and ``hi``."""
        need = _exponent(max(-float(lo), float(hi)), self.bins)
        if self.exp is None:
            self.exp, self.counts = need, np.zeros(2 * self.bins, np.int64)
        elif need > self.exp:
            self._grow(need)
        assert self.counts is not None
        flat = np.asarray(x).reshape(-1)
        dtype = np.float32 if -126 <= self.exp <= 126 else np.float64
        inv = dtype(2.0 ** -self.exp)
        b = self.bins
        # np.add.at into the int64 counts (numpy >= 1.25's fast path) is ~30 % faster than np.bincount, which
        # makes and adds a new counts array per chunk; both check every index against the bounds.
        for start in range(0, flat.size, _CHUNK):
            t = np.multiply(flat[start:start + _CHUNK], inv, dtype=dtype)  # exact: a power of two
            if lo < 0:
                np.floor(t, out=t)
                t += b  # exact: small integers
                np.add.at(self.counts, t.astype(np.intp), 1)
            else:  # all >= 0: truncation is floor, and the bins are the upper half
                np.add.at(self.counts[b:], t.astype(np.intp), 1)

    def folded(self) -> np.ndarray:
        """Histogram of |x|: bin k holds [k*w, (k+1)*w) (negative bins mirrored onto it)."""
        assert self.counts is not None
        b = self.bins
        return self.counts[b:] + self.counts[:b][::-1]


@dataclasses.dataclass
class TensorStats:
    """What calibration keeps of one tensor: exact min/max, element count, optional histogram."""

    name: str
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    hist: Histogram | None = None

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        if lo is None or hi is None:
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)
        if self.hist is not None:
            self.hist.add(x, lo, hi)


# --- ranges -----------------------------------------------------------------------------------------

def minmax_range(stats: TensorStats) -> tuple[float, float]:
    return stats.min, stats.max


def _need_hist(stats: TensorStats) -> Histogram:
    if stats.hist is None or stats.hist.counts is None:
        raise ValueError(f"tensor '{stats.name}' was calibrated without a histogram")
    return stats.hist


def percentile_range(stats: TensorStats, percentile: float, symmetric: bool = False) -> tuple[float, float]:
    """Clip ``100 - percentile`` percent of the values: half on each side, or of |x| when symmetric.

    Thresholds are the outer edge of the histogram bin holding the quantile, so they lie within one bin
    width outside the exact quantile.
    """
    hist = _need_hist(stats)
    w, b = hist.width, hist.bins
    if symmetric:
        fold = hist.folded()
        cdf = np.cumsum(fold)
        k = int(np.searchsorted(cdf, percentile / 100.0 * cdf[-1], side="left"))
        t = (min(k, b - 1) + 1) * w
        return max(stats.min, -t), min(stats.max, t)
    counts = hist.counts
    assert counts is not None
    cdf = np.cumsum(counts)
    total = cdf[-1]
    cut = (100.0 - percentile) / 200.0 * total
    i_lo = int(np.searchsorted(cdf, cut, side="right"))
    i_hi = int(np.searchsorted(cdf, total - cut, side="left"))
    lo = (min(i_lo, 2 * b - 1) - b) * w
    hi = (min(i_hi, 2 * b - 1) - b + 1) * w
    return max(stats.min, lo), min(stats.max, hi)


def _xlogx(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    pos = v > 0
    out[pos] = v[pos] * np.log(v[pos])
    return out


def entropy_kept_bins(fold: np.ndarray, levels: int, max_candidates: int | None = 2048) -> int:
    """Number of |x| bins to keep (threshold = that many bin widths) minimizing KL(P || Q).

    For each candidate k (levels..used bins): P is the first k bins with everything beyond folded into
    bin k-1 (the clipped values). Q models the quantizer itself on the first k bins (without the outliers):
    ``levels`` points 0, s, 2s, ..., k (s = k / (levels - 1) bins), each taking the values that round to it,
    so the cells are [0, s/2), [s/2, 3s/2), ..., [k - s/2, k] (a bin a cell edge cuts counts as uniform
    across the bin); each cell's mass is spread evenly over the part of the cell where P is non-zero.
    Grouping whole bins into ``levels`` equal groups instead puts the group edges half a step away from the
    real rounding edges and gives the top level, where the clipped values go, a full cell instead of half
    of one; TensorRT's reference code (i // levels bins per group, the remainder in the last group) makes
    the score jump at multiples of ``levels``. A candidate where P has mass and Q none scores infinity, and
    so does one that clips while keeping a single non-zero bin (P and Q are then the same point mass and
    the divergence is 0 whatever was clipped). All candidates are scored from prefix sums, in blocks, so
    this costs O(candidates x levels) numpy work and bounded memory. At most ``max_candidates`` thresholds
    are tried, evenly spaced (and the full range): TensorRT's ~1900 over 2048 bins; None tries every bin.
    """
    nonzero = np.flatnonzero(fold)
    if nonzero.size == 0:
        return 1
    used = int(nonzero[-1]) + 1
    if used <= levels:
        return used
    f = np.concatenate([fold[:used].astype(np.float64), [0.0]])
    total = f.sum()
    csum = np.concatenate([[0.0], np.cumsum(f)])
    nzb = (f > 0).astype(np.float64)
    cnz = np.concatenate([[0.0], np.cumsum(nzb)])
    cflogf = np.concatenate([[0.0], np.cumsum(_xlogx(f))])
    step = 1 if max_candidates is None else max(1, -(-(used + 1 - levels) // max_candidates))
    all_ks = np.arange(levels, used + 1, step)
    if all_ks[-1] != used:
        all_ks = np.append(all_ks, used)
    kl = np.empty(all_ks.size)
    block = max(1, (1 << 18) // levels)
    for b0 in range(0, all_ks.size, block):
        ks = all_ks[b0:b0 + block]
        kk = ks[:, None].astype(np.float64)
        tail = total - csum[ks]
        last = f[ks - 1]
        # bin k-1 is non-zero in P through the clipped values alone
        extra = ((last == 0) & (tail > 0)).astype(np.float64)
        s = kk / (levels - 1)
        edges = np.concatenate([np.zeros_like(kk), (np.arange(1, levels)[None, :] - 0.5) * s, kk], axis=1)
        j = np.minimum(np.floor(edges).astype(np.int64), used)
        fr = edges - j
        mass = np.diff(csum[j] + fr * f[j], axis=1)
        nzlen = np.diff(cnz[j] + fr * nzb[j] + extra[:, None] * np.clip(edges - (kk - 1), 0.0, 1.0), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            dens = np.where(nzlen > 0, mass / np.where(nzlen > 0, nzlen, 1.0), 0.0)
            logd = np.log(np.where(dens > 0, dens, 1.0))
            # bins wholly inside a cell take its density
            lo_b = np.ceil(edges[:, :-1]).astype(np.int64)
            hi_b = np.maximum(np.floor(edges[:, 1:]).astype(np.int64), lo_b)
            sum_plogq = ((csum[hi_b] - csum[lo_b]) * logd).sum(axis=1)
            # a bin an inner edge cuts takes the two cells' densities in proportion
            inner = edges[:, 1:-1]
            jb = np.floor(inner).astype(np.int64)
            a = inner - jb
            q_cut = a * dens[:, :-1] + (1 - a) * dens[:, 1:]
            p_cut = np.where(a > 0, f[jb], 0.0)
            sum_plogq += np.where(p_cut > 0, p_cut * np.log(np.where(q_cut > 0, q_cut, 1.0)), 0.0).sum(axis=1)
            # the clipped values sit in bin k-1
            e_top = edges[:, levels - 1]
            jt = np.floor(e_top).astype(np.int64)
            at = e_top - jt
            q_last = np.where((jt == ks - 1) & (at > 0), at * dens[:, levels - 2] + (1 - at) * dens[:, levels - 1],
                              dens[:, levels - 1])
            sum_plogq += np.where(tail > 0, tail * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
            sum_plogp = cflogf[ks - 1] + _xlogx(last + tail)
            score = (sum_plogp - sum_plogq) / total - math.log(total) + np.log(csum[ks])
        score[(tail > 0) & ((q_last <= 0) | (cnz[ks] < 2))] = np.inf
        kl[b0:b0 + block] = score
    if not np.isfinite(kl).any():
        return used
    return int(all_ks[int(np.argmin(kl))])


def entropy_range(stats: TensorStats, spec: QuantSpec) -> tuple[float, float]:
    """Threshold t from :func:`entropy_kept_bins` on |x| (first bin left out); the range is [-t, t]
    within [min, max].

    Data on one side of zero quantized asymmetrically uses every level of the type on that side;
    otherwise half of them (the |x| histogram stands for each half of the range).
    """
    hist = _need_hist(stats)
    one_sided = stats.min >= 0 or stats.max <= 0
    levels = spec.qmax - spec.qmin + 1
    if not (one_sided and not spec.symmetric):
        levels //= 2
    levels = max(2, min(levels, hist.bins))
    fold = hist.folded().copy()
    # Values within one bin of 0 are left out of the divergence: 0 is exact (it is the zero point) and
    # the spike of zeros after a ReLU would otherwise decide the threshold on its own.
    fold[0] = 0
    t = entropy_kept_bins(fold, levels) * hist.width
    return max(stats.min, -t), min(stats.max, t)


def mse_range(stats: TensorStats, spec: QuantSpec, candidates: int = 128) -> tuple[float, float]:
    """The clipping threshold t (of ``candidates`` evenly spaced up to max |x|) with the least expected
    squared error (clipping + rounding), with the histogram's bin centres standing for the values."""
    hist = _need_hist(stats)
    counts = hist.counts
    assert counts is not None
    idx = np.flatnonzero(counts)
    if idx.size == 0:
        return stats.min, stats.max
    w, b = hist.width, hist.bins
    centers = np.clip((idx - b + 0.5) * w, stats.min, stats.max)
    n = counts[idx].astype(np.float64)
    absmax = max(-stats.min, stats.max)
    ts = absmax * np.arange(1, candidates + 1) / candidates
    best, best_err = (stats.min, stats.max), math.inf
    for start in range(0, len(ts), 32):
        tt = ts[start:start + 32]
        lo = np.maximum(stats.min, -tt)
        hi = np.minimum(stats.max, tt)
        params = [quant_params(a, c, spec) for a, c in zip(lo, hi)]
        scale = np.array([p[0] for p in params])[:, None]
        zp = np.array([p[1] for p in params], dtype=np.float64)[:, None]
        q = np.clip(np.round(centers[None, :] / scale) + zp, spec.qmin, spec.qmax)
        err = (((q - zp) * scale - centers[None, :]) ** 2 * n[None, :]).sum(axis=1)
        j = int(np.argmin(err))
        if err[j] < best_err:
            best_err, best = float(err[j]), (float(lo[j]), float(hi[j]))
    return best


def default_bins(method: str) -> int:
    """Histogram bins per sign a method calibrates with unless told otherwise.

    The KL search of ``entropy`` depends on how many histogram bins a quantization step spans; TensorRT's
    2048 bins on [0, max|x|] for 128 levels give 16 at the largest threshold. The power-of-two grid spans
    max|x| with between half and all of the bins, and uint8 one-sided data has 256 levels, so entropy
    needs 8192 per sign to get at least as many. The other methods are fine with 2048.
    """
    return 8192 if method == "entropy" else 2048


def compute_range(stats: TensorStats, method: str, spec: QuantSpec, percentile: float = 99.999) -> tuple[float, float]:
    if method == "minmax":
        return minmax_range(stats)
    if method == "percentile":
        return percentile_range(stats, percentile, spec.symmetric)
    if method == "entropy":
        return entropy_range(stats, spec)
    if method == "mse":
        return mse_range(stats, spec)
    raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")


# --- running the model --------------------------------------------------------------------------------

@dataclasses.dataclass
class CalibrationResult:
    stats: dict[str, TensorStats]
    batches: int
    samples: int
    seconds: float
    batch_size: int


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for out in node.outputs:
            if out.name:
                found[out.name] = out
    return found


def _bytes_per_sample(values: Sequence[ir.Value]) -> int:
    """Rough bytes one sample of the observed tensors takes (unknown dims count as 64)."""
    total = 0
    for v in values:
        if v.shape is None:
            total += 4 * 64 * 64
            continue
        n = 1
        for axis, d in enumerate(v.shape):
            if axis == 0:
                continue
            n *= d if isinstance(d, int) else 64
        total += n * (v.dtype.itemsize if v.dtype is not None else 4)
    return total


#: Fetched activations alive at once: what bounds calibration memory whatever the model.
BATCH_BUDGET_BYTES = 32 << 20


def auto_batch_size(model: ir.Model, names: Sequence[str], limit: int, budget_bytes: int = BATCH_BUDGET_BYTES,
                    histogram: bool = False) -> int:
    """The largest batch (up to ``limit``) whose activations of ``names`` stay within ``budget_bytes``.

    ``histogram`` is :func:`collect`'s flag: with it, one batch is binned while ORT runs the next, so two
    batches are alive and each gets half the budget."""
    if histogram:
        budget_bytes //= 2
    values = _values_by_name(model.graph)
    per_sample = _bytes_per_sample([values[n] for n in names if n in values])
    return int(max(1, min(limit, budget_bytes // max(int(per_sample), 1))))


def _augment(model: ir.Model, names: Sequence[str], fetch: bool) -> tuple[ir.Model, list[str], dict[str, list[str]]]:
    """A clone of ``model`` whose outputs are min, max and sum (and the tensor when ``fetch``) of each name.

    Graph inputs are not augmented: the batch holds them already. Returns the clone, the names computed in
    numpy from the batch, and the output names per tensor.
    """
    clone = model.clone()
    graph = clone.graph
    values = _values_by_name(graph)
    input_names = {v.name for v in graph.inputs}
    graph.outputs.clear()
    from_batch: list[str] = []
    outputs: dict[str, list[str]] = {}
    for name in names:
        if name in input_names:
            from_batch.append(name)
            continue
        value = values.get(name)
        if value is None:
            raise ValueError(f"calibration: no tensor named '{name}' in the model")
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        outs = []
        for op in ("ReduceMin", "ReduceMax", "ReduceSum"):
            node = ir.node(op, [value], {"keepdims": 0}, name=f"{name}__calib_{op}")
            node.outputs[0].name = f"{name}__calib_{op}"
            node.outputs[0].type = value.type
            node.outputs[0].shape = ir.Shape([])
            graph.append(node)
            graph.outputs.append(node.outputs[0])
            outs.append(node.outputs[0].name)
        if fetch:
            graph.outputs.append(value)
            outs.append(name)
        outputs[name] = outs
    return clone, from_batch, outputs


def _consumers(model: ir.Model, name: str) -> str:
    value = _values_by_name(model.graph).get(name)
    if value is None:
        return ""
    names = [n.name or n.op_type for n in value.consumers()]
    return f" (input of {', '.join(names[:3])})" if names else ""


def _nonfinite(model: ir.Model, name: str) -> UserError:
    return UserError(f"calibration: tensor '{name}'{_consumers(model, name)} has NaN or Inf values on the "
                     "calibration data; check the data, or exclude the node that consumes it")


class _Prefetch:
    """Iterate ``source`` on a worker thread that works ahead while the consumer handles an item.

    At most ``depth`` + 1 items are alive at once: the consumer's and the ones the worker has made or is
    making (the worker waits for the consumer to come back for the next item before it makes another).
    ``depth=0`` iterates in the caller's thread. An exception in the source is raised in the consumer
    where it happened; ``close`` stops the worker (the consumer failed or stopped early) and waits for it.
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int) -> None:
        self._source = source
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._slots = threading.Semaphore(depth + 1)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._work, name="graphopt-calibration", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        try:
            while True:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                item = next(self._source, self._END)
                self._queue.put((item, None))
                if item is self._END:
                    return
        except BaseException as exc:  # handed to the consumer
            self._queue.put((None, exc))

    def __iter__(self) -> Iterator:
        if self._thread is None:
            yield from self._source
            return
        while True:
            item, exc = self._queue.get()
            if exc is not None:
                raise exc
            if item is self._END:
                return
            yield item
            del item
            self._slots.release()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def collect(model: ir.Model, names: Sequence[str], data: DataSource, sessions: SessionFactory, *,
            histogram: bool, bins: int = 2048, batch_size: int = 8, max_batches: int | None = None,
            provider: str = "CPUExecutionProvider", progress: ProgressReporter | None = None) -> CalibrationResult:
    """Run ``model`` over ``data`` and keep running statistics of the tensors ``names``.

    ``bins`` is the histogram resolution of |x| (bins per sign); the data streams in batches of ``batch_size``
    rows, at most ``max_batches`` of them. Non-finite values in an observed tensor are a ``UserError``
    naming the tensor.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    stats = {n: TensorStats(n, hist=Histogram(bins + bins % 2) if histogram else None) for n in names}
    specs = input_specs(model)
    limit = None if max_batches is None else max_batches * batch_size
    n_batches = samples = 0
    session = None
    runs = None
    try:
        clone, from_batch, outputs = _augment(model, names, fetch=histogram)
        if outputs:
            # Calibration needs each observed tensor in plain layout, so layout-changing optimizations
            # (NCHWc) would add reorder copies and a second copy of every weight (+40 MB on resnet_small for
            # 5-10 % less time, measured); without them ORT uses the weights as they are. No
            # arena: its free lists would hold the largest batch's activations for the whole run. The session
            # reads the clone's weight arrays (shared with the model) instead of a serialized copy. No
            # spinning: ORT's idle threads would take the cores the histogram binning runs on.
            settings = dataclasses.replace(
                sessions.settings, graph_optimization_level="extended", enable_cpu_mem_arena=False,
                optimized_model_path=None,
                config_entries={**sessions.settings.config_entries, "session.intra_op.allow_spinning": "0"})
            session = sessions.session(clone, provider, settings, share_weights=True)
        del clone
        fetch_names = [o for outs in outputs.values() for o in outs]
        batches = data.batches(batch_size=batch_size, limit=limit, specs=specs)
        if session is not None:
            # ORT runs batch k+1 on a worker thread while this one folds batch k into the histograms
            # (ORT runs without the GIL), so binning costs little wall time: two batches alive at most.
            runs = _Prefetch(((b, session.run(fetch_names, b.inputs)) for b in batches), depth=1 if histogram else 0)
            items: Iterator = iter(runs)
        else:
            items = ((b, None) for b in batches)
        with progress.task("calibrating", total=max_batches) as task:
            for batch, fetched in items:
                for name in from_batch:
                    x = batch.inputs[name]
                    if x.size and not np.all(np.isfinite(x)):
                        raise _nonfinite(model, name)
                    stats[name].update(x)
                if fetched is not None:
                    results = dict(zip(fetch_names, fetched))
                    del fetched
                    for name, outs in outputs.items():
                        lo, hi, total = (float(results[o]) for o in outs[:3])
                        if not (math.isfinite(total) and math.isfinite(lo) and math.isfinite(hi)):
                            raise _nonfinite(model, name)
                        if histogram:
                            stats[name].update(results.pop(outs[3]), lo, hi)
                        else:
                            stats[name].min = min(stats[name].min, lo)
                            stats[name].max = max(stats[name].max, hi)
                    del results
                n_batches += 1
                samples += len(batch)
                task.advance()
    finally:
        if runs is not None:
            runs.close()
        session = None
    return CalibrationResult(stats, n_batches, samples, time.perf_counter() - t0, batch_size)


def iter_ranges(result: CalibrationResult, method: str, spec: QuantSpec,
                percentile: float = 99.999) -> Iterator[tuple[str, tuple[float, float]]]:
    for name, st in result.stats.items():
        yield name, compute_range(st, method, spec, percentile)
