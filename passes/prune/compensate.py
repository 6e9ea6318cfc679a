"""Fold the constants that removed channels carried into the biases of the layers that consumed them.

With its weights zeroed, a channel is not zero: a BatchNormalization after it outputs its shift, a bias
goes through ReLU, an attention head with zeroed q/k/v outputs its value bias. The pruned model must compute
what the original computes with those weights zeroed, so the constant's contribution to each consumer
(Conv, Gemm, MatMul contracting over the removed channels) moves into that consumer's bias.

The constants are measured, not derived: the original model with the removed channels' weights zeroed runs
in ONNX Runtime on two different samples, capturing each consumer's input. Equal values at the removed
positions prove they do not depend on the data; each consumer then runs alone on just those removed inputs,
which gives its exact contribution. A contribution that is the same at every spatial position goes into the
bias; one that is not (a padded Conv sees zeros beyond the border, not the constant) is added as a constant
map (``compensate=exact``) or by its interior value (``compensate=bias``, reported as approximate).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.data import SyntheticSource, input_specs, integer_input_ranges
from graphopt.runtime import SessionFactory

from .channel import ChannelPlan
from .depgraph import Site, new_initializer
from .layers import is_constant

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Correction:
    site: Site
    vector: np.ndarray  # per output channel (original count), what to add to the bias
    map: np.ndarray | None  # the exact contribution [1, C, ...] when it is not uniform and maps are allowed
    spread: float  # largest deviation of the contribution from ``vector`` (0 when uniform)
    data_dependence: float  # largest difference between the two samples at removed positions

    @property
    def exact(self) -> bool:
        return self.map is not None or self.spread == 0.0


def sample_inputs(model: ir.Model, data: object, shapes: Mapping[str, tuple[int, ...]], seed: int
                  ) -> list[dict[str, np.ndarray]]:
    """Two different one-row inputs: from the run's data when there is some, else synthetic."""
    specs = input_specs(model)
    samples: list[dict[str, np.ndarray]] = []
    if data is not None:
        samples = [b.inputs for b in data.batches(batch_size=1, limit=2, specs=specs)]  # type: ignore[attr-defined]
    if len(samples) < 2:
        synthetic = SyntheticSource(specs, shapes, rows=2, batch_size=1, seed=seed,
                                    int_high=integer_input_ranges(model))
        samples += [b.inputs for b in synthetic.batches(batch_size=1, limit=2 - len(samples), specs=specs)]
    return samples


def _index(axis: int, positions: np.ndarray, rank: int) -> tuple[object, ...]:
    idx: list[object] = [slice(None)] * rank
    idx[axis] = positions
    return tuple(idx)


def compute(model: ir.Model, plan: ChannelPlan, samples: Sequence[dict[str, np.ndarray]], *, mode: str,
            sessions: SessionFactory) -> list[Correction]:
    """The contribution of the removed channels to every consumer that keeps running."""
    g = plan.graph
    needed: list[tuple[Site, ir.Value, int, np.ndarray]] = []
    for site in g.sites:
        act = site.node.inputs[site.act_index]
        assert act is not None
        rank = len(g.shape(act) or ())
        slot = plan.slot_of(act, site.act_axis)
        removed = plan.removed_positions(slot)
        if len(removed):
            needed.append((site, act, site.act_axis % rank, removed))
    if not needed or mode == "none":
        return []
    captured = _run_zeroed(model, plan, [act for _, act, _, _ in needed], samples, sessions)
    maps_allowed = mode == "exact" and all(
        v.shape is not None and all(isinstance(d, int) for d in list(v.shape)[1:])
        for v in model.graph.inputs if not v.is_initializer())

    masked_inputs: list[np.ndarray] = []
    dependence: list[float] = []
    for _site, act, axis, removed in needed:
        first, second = captured[act.name][0], captured[act.name][1]
        idx = _index(axis, removed, first.ndim)
        dependence.append(float(np.max(np.abs(first[idx] - second[idx]))) if first.shape == second.shape else 0.0)
        masked = np.zeros_like(first)
        masked[idx] = first[idx]
        masked_inputs.append(masked)
    outputs = _run_sites([site for site, _, _, _ in needed], masked_inputs, model, sessions)

    corrections = []
    for (site, _act, _axis, _removed), contribution, dep in zip(needed, outputs, dependence):
        axis = site.out_axis % contribution.ndim
        moved = np.moveaxis(contribution, axis, 0)
        per_channel = moved.reshape(moved.shape[0], -1)
        # where it is not uniform, the value at the centre is the interior one (a padded Conv's borders differ)
        vector = np.array(moved[(slice(None), *(d // 2 for d in moved.shape[1:]))], dtype=contribution.dtype)
        spread = float(np.max(np.abs(per_channel - vector[:, None]))) if per_channel.size else 0.0
        scale = float(np.max(np.abs(per_channel))) if per_channel.size else 0.0
        if spread <= 1e-6 + 1e-5 * scale:
            spread = 0.0
        cmap = contribution if spread and maps_allowed else None
        if dep > 1e-5 * (1.0 + scale):
            logger.warning("removed channels feeding %s depend on the data (%.3g); compensation is approximate",
                           site.node.name, dep)
        corrections.append(Correction(site, vector, cmap, spread, dep))
    return corrections


def _run_zeroed(model: ir.Model, plan: ChannelPlan, values: Sequence[ir.Value],
                samples: Sequence[dict[str, np.ndarray]], sessions: SessionFactory) -> dict[str, list[np.ndarray]]:
    """Run the original model with the removed channels' producer weights zeroed, capturing ``values``."""
    g = plan.graph
    saved: dict[ir.Value, ir.TensorProtocol] = {}
    zeroed: dict[ir.Value, np.ndarray] = {}
    for ws in g.weight_slots:
        if ws.role != "out":
            continue
        removed = plan.removed_positions(ws.slot)
        if not len(removed):
            continue
        value = ws.slot.value
        if value not in zeroed:
            zeroed[value] = np.array(value.const_value.numpy())  # type: ignore[union-attr]
        array = zeroed[value]
        array[_index(ws.slot.axis, removed, array.ndim)] = 0
    unique = list(dict.fromkeys(values))
    outputs = model.graph.outputs
    added = [v for v in unique if not v.is_graph_output()]
    if any(v.type is None for v in added):  # graph outputs need a type; a model straight from a builder may lack it
        ShapeInferencePass(check_type=False, strict_mode=False)(model)
    try:
        for value, array in zeroed.items():
            saved[value] = value.const_value  # type: ignore[assignment]
            value.const_value = ir.tensor(array, name=value.name)
        outputs.extend(added)
        session = sessions.session(model, "CPUExecutionProvider")
    finally:
        for value in added:
            outputs.remove(value)
        for value, tensor in saved.items():
            value.const_value = tensor
    names = [v.name for v in unique]
    result: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for sample in samples:
        for name, array in zip(names, session.run(names, sample)):
            result[name].append(array)  # type: ignore[arg-type]
    return result


def _run_sites(sites: Sequence[Site], inputs: Sequence[np.ndarray], model: ir.Model,
               sessions: SessionFactory) -> list[np.ndarray]:
    """Run each consumer alone (no bias) on the removed channels' values, all in one small model."""
    graph_inputs, outputs, nodes, inits = [], [], [], []
    for i, (site, array) in enumerate(zip(sites, inputs)):
        x = ir.Value(name=f"x{i}", shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        weight = site.node.inputs[site.weight_index]
        assert weight is not None and weight.const_value is not None
        w = ir.Value(name=f"w{i}", shape=ir.Shape(weight.const_value.shape), type=ir.TensorType(weight.const_value.dtype),
                     const_value=ir.tensor(weight.const_value.numpy(), name=f"w{i}"))
        operands = [x, w] if site.act_index == 0 else [w, x]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in site.node.attributes.values()]
        node = ir.Node("", site.node.op_type, operands, attrs, num_outputs=1, name=f"site{i}")
        node.outputs[0].name = f"y{i}"
        node.outputs[0].type = x.type
        graph_inputs.append(x)
        inits.append(w)
        nodes.append(node)
        outputs.append(node.outputs[0])
    opset = model.opset_imports.get("", 18)
    graph = ir.Graph(graph_inputs, outputs, nodes=nodes, initializers=inits, opset_imports={"": opset})
    session = sessions.session(ir.Model(graph, ir_version=model.ir_version), "CPUExecutionProvider")
    return session.run([o.name for o in outputs], {f"x{i}": a for i, a in enumerate(inputs)})  # type: ignore[return-value]


def fold(model: ir.Model, plan: ChannelPlan, corrections: Sequence[Correction]) -> list[dict[str, object]]:
    """Add each correction (pruned to the consumer's kept output channels) to its bias; report rows."""
    rows = []
    for c in corrections:
        node, site = c.site.node, c.site
        y = node.outputs[0]
        rank = len(plan.graph.shape(y) or ())
        axis = site.out_axis % rank
        removed = plan.removed_positions(plan.slot_of(y, axis))
        vector = np.delete(c.vector, removed)
        cmap = None if c.map is None else np.delete(c.map, removed, axis=axis)
        if not np.any(vector) and (cmap is None or not np.any(cmap)):
            continue
        if cmap is not None:
            _insert_add(model, y, cmap, f"{node.name or y.name}_pruned_map")
            how = "constant map"
        else:
            how = _add_bias(model, node, vector.reshape((len(vector),) + (1,) * (rank - 1 - axis)), axis)
        rows.append({"layer": node.name or y.name, "into": how, "max_abs": float(np.max(np.abs(vector))),
                     "exact": c.exact and c.data_dependence <= 1e-5 * (1 + float(np.max(np.abs(vector)))),
                     "border_error": round(c.spread, 6) if c.map is None else 0.0})
    return rows


def _add_bias(model: ir.Model, node: ir.Node, bias: np.ndarray, axis: int) -> str:
    graph = model.graph
    y = node.outputs[0]
    op = node.op_type
    name = f"{node.name or y.name}_bias_pruned"
    if op in ("Conv", "ConvTranspose"):
        old = node.inputs[2] if len(node.inputs) > 2 else None
        if old is None or is_constant(old):
            base = old.const_value.numpy() if old is not None else np.zeros(bias.shape[0], bias.dtype)  # type: ignore[union-attr]
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, new_initializer(graph, name, (base + bias.reshape(-1)).astype(base.dtype)))
            return "bias"
    elif op == "Gemm":
        old = node.inputs[2] if len(node.inputs) > 2 else None
        beta = node.attributes.get_float("beta", 1.0)
        if (old is None or is_constant(old)) and beta != 0:
            base = old.const_value.numpy() if old is not None else np.zeros((), bias.dtype)  # type: ignore[union-attr]
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, new_initializer(graph, name, (base + bias / beta).astype(bias.dtype)))
            return "bias"
    else:  # MatMul: the Add that follows it is its bias
        uses = list(y.uses())
        if len(uses) == 1 and not y.is_graph_output() and uses[0].node.op_type == "Add":
            add, index = uses[0].node, uses[0].idx
            other = add.inputs[1 - index]
            if other is not None and is_constant(other):
                base = other.const_value.numpy()  # type: ignore[union-attr]
                combined = base + bias
                if _fits(combined.shape, y):
                    add.replace_input_with(1 - index, new_initializer(graph, name, combined.astype(base.dtype)))
                    return "bias of the following Add"
    _insert_add(model, y, bias, name)
    return "new Add"


def _fits(shape: tuple[int, ...], y: ir.Value) -> bool:
    """Whether adding a constant of ``shape`` keeps ``y``'s shape (no new broadcast dimensions)."""
    if y.shape is None:
        return len(shape) <= 1
    dims = list(y.shape)
    if len(shape) > len(dims):
        return False
    for got, want in zip(reversed(shape), reversed(dims)):
        if got != 1 and isinstance(want, int) and got != want:
            return False
    return True


def _insert_add(model: ir.Model, y: ir.Value, constant: np.ndarray, name: str) -> None:
    graph = model.graph
    const = new_initializer(graph, name, constant.astype(constant.dtype))
    add = ir.Node("", "Add", [y, const], num_outputs=1, name=f"{name}_add")
    out = add.outputs[0]
    out.type, out.shape = y.type, y.shape
    for use in list(y.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, out)
    original = y.name
    if y.is_graph_output():
        index = list(graph.outputs).index(y)
        y.name = f"{original}_before_bias"
        out.name = original
        graph.outputs[index] = out
    else:
        out.name = f"{original}_with_bias"
    producer = y.producer()
    assert producer is not None
    graph.insert_after(producer, add)
