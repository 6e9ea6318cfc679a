"""PyTorch → ONNX: the dynamo exporter by default, the TorchScript exporter when dynamo cannot.

``torch.onnx.export(dynamo=True)`` gives an ``onnx_ir`` model directly (the IR graphopt works in), keeps
named symbolic dimensions from ``torch.export.Dim`` and runs onnxscript's optimizer (which folds
BatchNorm into Conv: fine for a model about to be optimized). It refuses some Python control flow that
tracing accepts, so on failure the TorchScript exporter is tried, with a note, because a traced graph that
matches the framework on the check inputs is more use than no graph. Both are checked the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import UserError
from graphopt.export.check import DEFAULT_ATOL, DEFAULT_RTOL
from graphopt.export.inputs import InputDecl, dynamic_axes_for
from graphopt.export.result import ExportResult, check_output_path, finish_export

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: loggers whose warnings are exporter chatter (torchvision ops missing, opset bumps) during an export.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")


def require_torch() -> Any:
    """Import torch, or say how to install it."""
    try:
        import torch
    except ImportError:
        raise UserError(f"PyTorch is not installed in this Python ({sys.executable}); "
                        "install it with: pip install 'graphopt[torch]'") from None
    return torch


# --------------------------------------------------------------------------- factories


def _import_module(module_ref: str) -> Any:
    if module_ref.endswith(".py") or os.sep in module_ref or "/" in module_ref:
        path = Path(module_ref)
        if not path.is_file():
            raise UserError(f"model file not found: {path} (expected MODULE:FACTORY with MODULE an importable "
                            "module or a .py file)")
        name = "graphopt_user_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's module failing to import is the user's to fix
            sys.modules.pop(name, None)
            raise UserError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_ref)
    except ModuleNotFoundError as exc:
        if exc.name and module_ref.split(".")[0] == exc.name.split(".")[0]:
            raise UserError(f"cannot import module '{module_ref}' (not found on sys.path or in {os.getcwd()}); "
                            "give MODULE:FACTORY with an importable module or a path to a .py file") from None
        raise UserError(f"importing '{module_ref}' failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"importing '{module_ref}' failed: {type(exc).__name__}: {exc}") from None


def load_factory(spec: str) -> tuple[Any, str]:
    """``MODULE:FACTORY`` → the factory callable (MODULE importable from the cwd, or a ``.py`` path)."""
    module_ref, sep, attr = spec.rpartition(":")
    if not sep or not module_ref or not attr:
        raise UserError(f"expected MODULE:FACTORY (e.g. mypkg.models:make_model or models/net.py:build); "
                        f"got {spec!r}")
    module = _import_module(module_ref)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserError(f"'{module_ref}' has no attribute '{attr}' (callables there: "
                            f"{', '.join(public[:12]) or 'none'})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"'{spec}' is not callable; FACTORY must be a function or class returning an nn.Module")
    return factory, attr


def make_module(spec: str) -> tuple[Any, Any]:
    """Call the factory: it returns an ``nn.Module``, or ``(module, example_inputs)``."""
    torch = require_torch()
    factory, _ = load_factory(spec)
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"calling factory '{spec}' failed: {type(exc).__name__}: {exc}") from None
    examples = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, examples = made
    if not isinstance(made, torch.nn.Module):
        raise UserError(f"factory '{spec}' returned {type(made).__name__}; expected a torch.nn.Module "
                        "(or a tuple (module, example_inputs))")
    return made, examples


# --------------------------------------------------------------------------- inputs and outputs


def _forward_names(module: Any, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    if len(names) < count:
        names += [f"input_{i}" for i in range(len(names), count)]
    return names


def normalize_examples(module: Any, example_inputs: Any, input_names: Sequence[str] | None) -> dict[str, Any]:
    """A tensor, a tuple of tensors or a ``{name: tensor}`` dict → ``{name: tensor}`` in forward's order."""
    torch = require_torch()
    if isinstance(example_inputs, Mapping):
        named = dict(example_inputs)
        if input_names and list(input_names) != list(named):
            raise UserError(f"input_names {list(input_names)} differ from the example dict's keys {list(named)}")
    else:
        tensors = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        names = list(input_names) if input_names else _forward_names(module, len(tensors))
        if len(names) != len(tensors):
            raise UserError(f"{len(names)} input name(s) for {len(tensors)} example input(s)")
        named = dict(zip(names, tensors))
    for name, value in named.items():
        if isinstance(value, np.ndarray):
            named[name] = torch.from_numpy(value)
        elif not isinstance(value, torch.Tensor):
            raise UserError(f"example input '{name}' is a {type(value).__name__}; inputs must be tensors")
    return named


def _np_dtype(tensor: Any, name: str) -> np.dtype:
    torch = require_torch()
    try:
        return torch.empty(0, dtype=tensor.dtype).numpy().dtype
    except TypeError:
        raise UserError(f"input '{name}' has dtype {tensor.dtype}, which numpy and the check cannot represent; "
                        "export with float32/float16 inputs") from None


def flatten_outputs(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a (nested) output in the exporter's order: tensors, tuples/lists by index, dicts by key."""
    torch = require_torch()
    if isinstance(obj, torch.Tensor):
        return [(prefix or "output", obj)]
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [leaf for k, v in obj.items() for leaf in flatten_outputs(v, f"{prefix}_{k}" if prefix else str(k))]
    if isinstance(obj, (tuple, list)):
        base = prefix or "output"
        return [leaf for i, v in enumerate(obj) for leaf in flatten_outputs(v, f"{base}_{i}")]
    raise UserError(f"the model returns a {type(obj).__name__}; outputs must be tensors, or tuples, lists or "
                    "dicts of tensors")


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet(captured: list[str], tracer_warnings: list[str]) -> Iterator[None]:
    """Keep exporter chatter (graph dumps, opset notices, pytree FutureWarnings) off the user's terminal.

    It is logged at DEBUG; TracerWarnings ("the trace might not generalize") are kept for the notes.
    """
    torch = require_torch()
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    buf = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as record, contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught = list(record)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        captured.append(buf.getvalue())
        if buf.getvalue().strip():
            logger.debug("exporter output:\n%s", buf.getvalue())
        for w in caught:
            if issubclass(w.category, torch.jit.TracerWarning):
                first = str(w.message).splitlines()[0]
                if first not in tracer_warnings:
                    tracer_warnings.append(first)
            logger.debug("exporter warning: %s: %s", w.category.__name__, w.message)


def _error_summary(exc: BaseException) -> str:
    """One line: the innermost cause's first line, without colour codes."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    text = _ANSI.sub("", str(inner)).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(inner).__name__}: {first}"[:300]


def _dynamo_export(torch: Any, module: Any, args: tuple[Any, ...], names: Sequence[str],
                   output_names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]], opset: int) -> Any:
    dims: dict[str, Any] = {}
    dynamic_shapes = tuple(
        {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in dynamic[n].items()} if dynamic.get(n)
        else None for n in names)
    program = torch.onnx.export(module, args, dynamo=True, external_data=False, opset_version=opset,
                                input_names=list(names), output_names=list(output_names),
                                dynamic_shapes=dynamic_shapes if any(dynamic_shapes) else None,
                                verbose=False, report=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model


def _torchscript_export(torch: Any, module: Any, args: tuple[Any, ...], names: Sequence[str],
                        outputs: Sequence[tuple[str, Any]], dynamic: Mapping[str, Mapping[int, str]],
                        opset: int, tmp: Path) -> Any:
    from graphopt.model_io import load_model

    axes: dict[str, dict[int, str]] = {n: dict(a) for n, a in dynamic.items() if a}
    batch = next((args[i].shape[0] for i, n in enumerate(names) if dynamic.get(n, {}).get(0) == "batch"), None)
    if batch is not None:
        for name, tensor in outputs:
            if tensor.dim() and tensor.shape[0] == batch:
                axes.setdefault(name, {})[0] = "batch"
    path = tmp / "torchscript.onnx"
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(names),
                      output_names=[n for n, _ in outputs], dynamic_axes=axes or None)
    return load_model(path)


def from_torch(module: Any, example_inputs: Any, *, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None, dynamic_batch: bool = False,
               dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, opset: int = DEFAULT_OPSET,
               exporter: str = "auto", output: str | os.PathLike | None = None, check: bool = True,
               atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0, keep_failed: bool = False,
               check_on_examples: bool = True, source: str = "") -> ExportResult:
    """Export a torch module to ONNX and check it against torch in ONNX Runtime.

    ``example_inputs``: a tensor, a tuple of tensors (names default to ``forward``'s parameter names) or a
    ``{name: tensor}`` dict, in ``forward``'s positional order. ``dynamic_batch`` makes axis 0 of every
    input the symbolic dimension ``batch``; ``dynamic_axes`` adds more (``{"input_ids": {1: "seq"}}``; the
    same name on several inputs is the same dimension). The module is put in eval mode.

    Returns an :class:`ExportResult` (``.model`` is the ``onnx_ir`` model, ``.check`` the comparison);
    raises ``ExportMismatch`` (a ``GateFailed``, exit 1) when ONNX Runtime disagrees with torch beyond
    ``atol + rtol * |torch|``, and ``UserError`` for bad arguments or a model no exporter can handle.
    The check runs on the example inputs (or, with ``check_on_examples=False``, on random inputs of their
    shapes, integers kept inside any embedding table) and, when axes are dynamic, on resized random inputs.
    """
    torch = require_torch()
    if exporter not in EXPORTERS:
        raise UserError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"from_torch expects a torch.nn.Module; got {type(module).__name__}")
    out_path = check_output_path(output)
    module.eval()
    named = normalize_examples(module, example_inputs, input_names)
    decls = [InputDecl(n, tuple(t.shape), _np_dtype(t, n)) for n, t in named.items()]
    extra = [(n, int(a), d) for n, axes in (dynamic_axes or {}).items() for a, d in axes.items()]
    dynamic = dynamic_axes_for(decls, dynamic_batch, extra)
    notes: list[str] = []

    # torch.export specialises a dimension whose example size is 1, so a dynamic axis is exported at >= 2.
    for name, axes in dynamic.items():
        for axis in axes:
            if named[name].shape[axis] == 1:
                named[name] = torch.cat([named[name], named[name]], dim=axis)
                logger.info("dynamic axis %d of '%s' has size 1 in the example; exported with size 2 "
                            "(a size-1 example would fix the dimension)", axis, name)
    decls = [InputDecl(n, tuple(t.shape), d.dtype) for (n, t), d in zip(named.items(), decls)]
    names = list(named)
    args = tuple(named.values())

    with torch.no_grad():
        try:
            outputs = flatten_outputs(module(*args))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"running the model on the example inputs ({', '.join(map(str, decls))}) failed: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not outputs:
        raise UserError("the model returns no tensors")
    if output_names:
        if len(output_names) != len(outputs):
            raise UserError(f"{len(output_names)} output name(s) given but the model returns {len(outputs)} "
                            f"tensor(s)")
        outputs = [(n, t) for n, (_, t) in zip(output_names, outputs)]

    captured: list[str] = []
    tracer_warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-torch-") as tmp:
        model = None
        used = exporter
        if exporter in ("auto", "dynamo"):
            try:
                with _quiet(captured, tracer_warnings):
                    model = _dynamo_export(torch, module, args, names, [n for n, _ in outputs], dynamic, opset)
                used = "dynamo"
            except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the other one
                summary = _error_summary(exc)
                logger.info("dynamo export failed: %s", summary)
                if exporter == "dynamo":
                    raise UserError(f"the dynamo exporter cannot export this model: {summary} "
                                    "(try --exporter torchscript)") from None
                notes.append(f"dynamo exporter failed ({summary}); used the TorchScript exporter (dynamo=False)")
        if model is None:
            try:
                with _quiet(captured, tracer_warnings):
                    model = _torchscript_export(torch, module, args, names, outputs, dynamic, opset, Path(tmp))
                used = "torchscript"
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001
                before = "; ".join(n for n in notes if n.startswith("dynamo exporter failed"))
                raise UserError(f"cannot export this model to ONNX: TorchScript exporter: {_error_summary(exc)}"
                                + (f"; before that, {before}" if before else "")) from None
            notes.extend(f"TorchScript tracer warning: {w}" for w in tracer_warnings)
        got = model.opset_imports.get("")
        if got != opset:
            notes.append(f"asked for opset {opset}; the {used} exporter wrote opset {got}")

        def reference(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names])
            return [t.detach().cpu().numpy() for _, t in flatten_outputs(out)]

        return finish_export(model, framework="torch", exporter=used, notes=notes, decls=decls, dynamic=dynamic,
                             examples={n: t.detach().cpu().numpy() for n, t in named.items()}
                             if check_on_examples else None,
                             reference=reference, output=out_path, check=check, atol=atol, rtol=rtol, seed=seed,
                             keep_failed=keep_failed, source=source)


def export_factory(spec: str, decls: Sequence[InputDecl] | None, **kwargs: Any) -> ExportResult:
    """``MODULE:FACTORY`` + declared inputs (random examples) → :func:`from_torch`.

    Without ``decls`` the factory must return ``(module, example_inputs)``.
    """
    torch = require_torch()
    module, examples = make_module(spec)
    if decls:
        gen = torch.Generator().manual_seed(int(kwargs.get("seed", 0)))
        examples = {}
        for d in decls:
            if d.dtype.kind == "f":
                examples[d.name] = torch.randn(d.shape, generator=gen).to(getattr(torch, d.dtype.name))
            elif d.dtype.kind == "b":
                examples[d.name] = torch.randint(0, 2, d.shape, generator=gen).bool()
            else:
                examples[d.name] = torch.randint(0, 2, d.shape, generator=gen).to(getattr(torch, d.dtype.name))
    elif examples is None:
        raise UserError(f"no inputs declared for '{spec}': give each forward argument in order, with "
                        "--input NAME=1x3x224x224[:dtype] (graphopt export) or --shape NAME=1x3x224x224 (graphopt "
                        "run), or make the factory return (module, example_inputs)")
    return from_torch(module, examples, source=f"torch:{spec}", check_on_examples=not decls, **kwargs)
