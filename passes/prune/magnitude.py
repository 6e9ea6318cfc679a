"""Unstructured and N:M magnitude pruning: zero weights in place, shapes unchanged.

Zeroing does not make ONNX Runtime faster (its kernels are dense); what it buys is a smaller compressed
model and, for 2:4, the layout that sparse tensor cores accept. Counts are exact: per-layer mode zeroes
``round(sparsity * size)`` entries of every tensor, global mode ``round(sparsity * total)`` entries
across all of them (ties broken by position), so reports and tests can rely on the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from .layers import Layer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerResult:
    layer: Layer
    shape: tuple[int, ...]
    zeros_before: int
    zeros_after: int
    note: str = ""

    def row(self) -> dict[str, object]:
        size = int(np.prod(self.shape))
        return {"layer": self.layer.name, "op": self.layer.node.op_type, "weight": self.layer.weight.name,
                "shape": "x".join(map(str, self.shape)), "params": size,
                "sparsity_before": round(self.zeros_before / max(size, 1), 4),
                "sparsity": round(self.zeros_after / max(size, 1), 4), "note": self.note}


def smallest_mask(magnitude: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of exactly ``count`` smallest entries (stable: earlier positions win ties).

    O(n): a partition finds the threshold, everything below it is in, and ties at the threshold are taken
    in position order, which is what a stable sort would pick.
    """
    flat = magnitude.reshape(-1)
    if count <= 0:
        return np.zeros(magnitude.shape, dtype=bool)
    if count >= flat.size:
        return np.ones(magnitude.shape, dtype=bool)
    threshold = np.partition(flat, count - 1)[count - 1]
    mask = flat < threshold
    need = count - int(np.count_nonzero(mask))
    if need > 0:
        mask[np.flatnonzero(flat == threshold)[:need]] = True
    return mask.reshape(magnitude.shape)


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)


def unstructured(layers: Sequence[Layer], sparsity: float, global_threshold: bool,
                 store: Callable[[ir.Value, np.ndarray], None] = _set) -> list[LayerResult]:
    """Zero the smallest-magnitude weights of each layer (or of all layers together).

    Per-layer thresholds stream: one layer's weights are in memory at a time, and ``store`` (the pass's
    ``set_weight``) writes each result away before the next is read. A global threshold needs every
    magnitude at once.
    """
    if global_threshold and layers:
        arrays = [np.array(layer.weight.const_value.numpy()) for layer in layers]  # type: ignore[union-attr]
        zeros_before = [int(np.count_nonzero(a == 0)) for a in arrays]
        magnitude = np.concatenate([np.abs(a.astype(np.float32)).reshape(-1) for a in arrays])
        mask = smallest_mask(magnitude, int(round(sparsity * magnitude.size)))
        offsets = np.cumsum([0] + [a.size for a in arrays])
        masks = [mask[offsets[i]:offsets[i + 1]].reshape(a.shape) for i, a in enumerate(arrays)]
        results = []
        for layer, array, mask, before in zip(layers, arrays, masks, zeros_before):
            array[mask] = 0
            store(layer.weight, array)
            results.append(LayerResult(layer, array.shape, before, int(np.count_nonzero(array == 0))))
        return results
    results = []
    for layer in layers:
        array = np.array(layer.weight.const_value.numpy())  # type: ignore[union-attr]
        before = int(np.count_nonzero(array == 0))
        array[smallest_mask(np.abs(array.astype(np.float32)), int(round(sparsity * array.size)))] = 0
        store(layer.weight, array)
        results.append(LayerResult(layer, array.shape, before, int(np.count_nonzero(array == 0))))
        del array
    return results


def n_of_m(layers: Sequence[Layer], n: int, m: int,
           store: Callable[[ir.Value, np.ndarray], None] = _set) -> list[LayerResult]:
    """Keep the ``n`` largest of every ``m`` consecutive weights along each layer's reduction axis."""
    results = []
    for layer in layers:
        array = np.array(layer.weight.const_value.numpy())  # type: ignore[union-attr]
        before = int(np.count_nonzero(array == 0))
        axis = layer.reduction_axis()
        k = array.shape[axis]
        if k % m:
            results.append(LayerResult(layer, array.shape, before, before,
                                       f"left dense: reduction size {k} is not a multiple of m={m}"))
            continue
        moved = np.moveaxis(array, axis, -1)  # a view: writes go to ``array``
        blocks = moved.reshape(*moved.shape[:-1], k // m, m)
        order = np.argsort(np.abs(blocks.astype(np.float32)), axis=-1, kind="stable")
        drop = np.zeros(blocks.shape, dtype=bool)
        np.put_along_axis(drop, order[..., : m - n], True, axis=-1)
        blocks = np.where(drop, np.zeros((), array.dtype), blocks)
        array = np.ascontiguousarray(np.moveaxis(blocks.reshape(moved.shape), -1, axis))
        store(layer.weight, array)
        results.append(LayerResult(layer, array.shape, before, int(np.count_nonzero(array == 0))))
    return results
