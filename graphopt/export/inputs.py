"""What the user says about a framework model's inputs: ``NAME=1x3x224x224[:dtype]`` and ``NAME:AXIS=dim``.

A framework model has no input signature on disk (torch) or one with unknown dimensions (TF), so the
export needs shapes and dtypes from the command line. Parsing lives here so the CLI, the Python API and
``load_source`` accept exactly the same text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from graphopt.errors import UserError

#: dtypes an input may be declared with (numpy names); float32 is the default.
DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in (
    "float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32"}


@dataclasses.dataclass(frozen=True)
class InputDecl:
    """One model input: its name, the concrete shape to export/check with, and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype("float32")

    def __str__(self) -> str:
        return f"{self.name}={'x'.join(map(str, self.shape)) or 'scalar'}:{self.dtype.name}"


def parse_dtype(text: str, where: str) -> np.dtype:
    key = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if key not in DTYPES:
        raise UserError(f"{where}: unknown dtype {text!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_input(text: str) -> InputDecl:
    """Parse ``NAME=1x3x224x224`` or ``NAME=2x128:int64``."""
    name, sep, rest = text.partition("=")
    dims, _, dtype = rest.partition(":")
    name = name.strip()
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims.strip() else ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise UserError(f"--input expects NAME=DxDx...[:dtype] with positive integers "
                        f"(e.g. input=1x3x224x224 or input_ids=1x128:int64); got {text!r}") from None
    return InputDecl(name, shape, parse_dtype(dtype, f"--input {text!r}") if dtype else np.dtype("float32"))


def parse_dynamic(text: str) -> tuple[str, int, str]:
    """Parse ``NAME:AXIS=dimname`` (e.g. ``input_ids:1=seq``): that axis becomes a symbolic dimension."""
    left, sep, dim = text.partition("=")
    name, colon, axis = left.rpartition(":")
    dim = dim.strip()
    try:
        axis_i = int(axis)
        if not sep or not colon or not name.strip() or axis_i < 0 or not dim.isidentifier():
            raise ValueError
    except ValueError:
        raise UserError(f"--dynamic expects NAME:AXIS=DIMNAME with a non-negative axis and an identifier "
                        f"for the dimension (e.g. input_ids:1=seq); got {text!r}") from None
    return name.strip(), axis_i, dim


def dynamic_axes_for(decls: Iterable[InputDecl], dynamic_batch: bool,
                     extra: Iterable[tuple[str, int, str]] = ()) -> dict[str, dict[int, str]]:
    """Merge ``--dynamic-batch`` (axis 0 of every input with rank >= 1) and ``--dynamic`` into one map."""
    decls = list(decls)
    by_name = {d.name: d for d in decls}
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        for d in decls:
            if d.shape:
                axes.setdefault(d.name, {})[0] = "batch"
    for name, axis, dim in extra:
        if name not in by_name:
            raise UserError(f"--dynamic names input '{name}', which is not declared "
                            f"(inputs: {', '.join(by_name) or 'none'})")
        if axis >= len(by_name[name].shape):
            raise UserError(f"--dynamic {name}:{axis}: input '{name}' has rank {len(by_name[name].shape)}")
        axes.setdefault(name, {})[axis] = dim
    return axes


def decls_from_shapes(shapes: Mapping[str, tuple[int, ...] | str],
                      dtypes: Mapping[str, str] | None = None) -> list[InputDecl]:
    """Turn ``{name: (1, 3, 224, 224)}`` or ``{name: "1x128:int64"}`` (+ optional dtypes) into decls."""
    decls = []
    for name, shape in shapes.items():
        if isinstance(shape, str):
            decl = parse_input(f"{name}={shape}")
        else:
            decl = InputDecl(name, tuple(int(d) for d in shape))
        if dtypes and name in dtypes:
            decl = dataclasses.replace(decl, dtype=parse_dtype(dtypes[name], f"dtype of input '{name}'"))
        decls.append(decl)
    return decls
