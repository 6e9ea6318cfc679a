"""The one registry of passes, and the base class every pass derives from.

Built-in passes register when ``graphopt.passes`` is imported; third-party packages register through the
``graphopt.passes`` entry-point group (each entry point names a GraphPass subclass).
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import metadata
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.context import PassContext
from graphopt.errors import UserError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a pass may move the model's outputs (used by ``--check-each-pass``).

    ``rel`` bounds the max abs difference relative to the reference outputs' max magnitude;
    ``min_cosine`` bounds the mean cosine similarity per sample. Either or both may be set.
    """

    rel: float | None = 1e-4
    min_cosine: float | None = None

    def describe(self) -> str:
        parts = []
        if self.rel is not None:
            parts.append(f"max abs diff <= {self.rel:g} x max |reference|")
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine:g}")
        return " and ".join(parts)


@dataclasses.dataclass
class NoOptions:
    """This pass takes no options."""


class GraphPass(ir.passes.InPlacePass):
    """Base of graphopt passes: an onnx_ir in-place pass with a name, typed options and a context.

    ``details`` collects JSON-serialisable facts for the report (per-layer tables, notes, curves).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    tolerance: ClassVar[Tolerance] = Tolerance()

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.context = context if context is not None else PassContext()
        self.details: dict[str, Any] = {}
        #: Set by a pass that produced its best model but missed its own target (e.g. quant's target_drop):
        #: the model is still written and the run exits 1 with this message.
        self.failure: str | None = None
        self._spill: Any = None

    def set_weight(self, value: ir.Value, array: Any) -> None:
        """Give ``value`` new weights. Large ones are written to the run's scratch folder at once and kept as
        lazy external tensors (see ``graphopt.model_io.TensorSpill``), and a memory-mapped original is
        unmapped, so a pass over a model larger than memory holds about one tensor at a time."""
        from graphopt.model_io import SPILL_MIN_BYTES, TensorSpill

        old = value.const_value
        if getattr(array, "nbytes", 0) >= SPILL_MIN_BYTES:
            if self._spill is None:
                self._spill = TensorSpill(self.context.work_dir)
            value.const_value = self._spill.put(array, value.name or "")
        else:
            value.const_value = ir.tensor(array, name=value.name)
        if isinstance(old, ir.ExternalTensor):
            old.release()


_REGISTRY: dict[str, type[GraphPass]] = {}
_entry_points_loaded = False


def register(cls: type[GraphPass]) -> type[GraphPass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{cls.name}' is registered twice ({existing.__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _entry_points_loaded
    import graphopt.passes  # noqa: F401  (registers the built-ins)

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group="graphopt.passes"):
        try:
            cls = ep.load()
            register(cls)
        except Exception as exc:  # a broken plug-in must not break graphopt
            logger.warning("could not load pass plug-in %s: %s", ep.name, exc)


def get(name: str) -> type[GraphPass]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown pass '{name}'; available passes: {', '.join(sorted(_REGISTRY))}") from None


def all_passes() -> list[type[GraphPass]]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
