"""TensorFlow / Keras → ONNX through tf2onnx, always via a ``tf.function`` with an input signature.

``tf2onnx.convert.from_keras`` fails on some Sequential models loaded from ``.h5``; wrapping the model in
a ``tf.function`` whose signature comes from ``model.inputs`` and calling ``from_function`` works for
``.keras``, ``.h5`` and in-memory models alike, and a SavedModel's serving signature is wrapped the same
way. Leading ``None`` dimensions become the symbolic dimension ``batch``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import UserError
from graphopt.export.check import DEFAULT_ATOL, DEFAULT_RTOL
from graphopt.export.inputs import InputDecl, decls_from_shapes
from graphopt.export.result import ExportResult, check_output_path, finish_export, name_symbolic_batch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
#: the batch size used for checks when the leading dimension is unknown (not 1: that hides batch bugs).
CHECK_BATCH = 2
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def _import_tensorflow() -> Any:
    """``import tensorflow`` with its C++ start-up lines (absl, oneDNN notices) kept off the terminal.

    Those lines ignore TF_CPP_MIN_LOG_LEVEL, so file descriptor 2 is pointed at a scratch file while the
    import runs; what it caught is logged at DEBUG.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            caught = sink.read().decode(errors="replace").strip()
            if caught:
                logger.debug("tensorflow import wrote:\n%s", caught)
    return tf


def require_tf() -> tuple[Any, Any]:
    """Import tensorflow and tf2onnx, or say how to install them."""
    missing = []
    try:
        tf = _import_tensorflow()
    except ImportError:
        missing.append("tensorflow")
        tf = None
    try:
        import tf2onnx
    except ImportError:
        missing.append("tf2onnx")
        tf2onnx = None
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed in this "
                        f"Python ({sys.executable}); install them with: pip install 'graphopt[tf]' "
                        "(tensorflow-cpu 2.21 and tf2onnx 1.17, about 1.3 GB; a separate virtualenv is best)")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf, tf2onnx


def _keras_model(path: Path) -> Any:
    import keras

    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001 - unreadable files, unknown custom layers, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"cannot load Keras model {path}: {type(exc).__name__}: {first[:300]}") from None


def _keras_function(tf: Any, model: Any) -> tuple[Any, list[Any], list[str], Any]:
    """A tf.function calling the Keras model in inference mode, its signature and output names."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise UserError("the Keras model has no defined inputs (a subclassed model never called?); "
                        "build it with keras.Input or call it once before saving")
    signature = [tf.TensorSpec(tuple(t.shape), t.dtype, name=getattr(t, "name", None) or f"input_{i}")
                 for i, t in enumerate(inputs)]
    names: list[str] = []

    def call(*args: Any) -> Any:
        return model(args[0] if len(args) == 1 else list(args), training=False)

    def flat(out: Any) -> dict[str, Any]:
        leaves = _flatten(out)
        if not names:
            names.extend(n for n, _ in leaves)
        return dict(leaves)

    fn = tf.function(lambda *args: flat(call(*args)), input_signature=signature)

    def reference(values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.asarray(v) for n, v in _flatten(call(*[tf.constant(v) for v in values]))}

    return fn, signature, names, reference


def _flatten(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(out, Mapping):
        return [leaf for k in sorted(out) for leaf in _flatten(out[k], f"{prefix}_{k}" if prefix else str(k))]
    if isinstance(out, (list, tuple)):
        if len(out) == 1 and not prefix:
            return _flatten(out[0], "output")
        base = prefix or "output"
        return [leaf for i, v in enumerate(out) for leaf in _flatten(v, f"{base}_{i}")]
    return [(prefix or "output", out)]


def _saved_model_function(tf: Any, path: Path, signature_key: str | None) -> tuple[Any, list[Any], list[str], Any,
                                                                                   Any]:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"cannot load SavedModel {path}: {type(exc).__name__}: {first[:300]}") from None
    keys = list(loaded.signatures.keys())
    if not keys:
        raise UserError(f"SavedModel {path} has no signatures; save it with a serving signature "
                        "(model.export(dir) or tf.saved_model.save(obj, dir, signatures=...))")
    key = signature_key or ("serving_default" if "serving_default" in keys else keys[0] if len(keys) == 1 else None)
    if key not in keys:
        raise UserError(f"SavedModel {path} has signatures {', '.join(keys)}; choose one with --signature")
    concrete = loaded.signatures[key]
    args, kwargs = concrete.structured_input_signature
    if args:
        raise UserError(f"signature '{key}' takes positional arguments; only keyword (named) signatures are "
                        "supported")
    in_names = sorted(kwargs)
    signature = [tf.TensorSpec(kwargs[n].shape, kwargs[n].dtype, name=n) for n in in_names]
    names: list[str] = []

    def flat(out: Any) -> dict[str, Any]:
        leaves = _flatten(out)
        if not names:
            names.extend(n for n, _ in leaves)
        return dict(leaves)

    fn = tf.function(lambda *a: flat(concrete(**dict(zip(in_names, a)))), input_signature=signature)

    def reference(values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        out = concrete(**{n: tf.constant(v) for n, v in zip(in_names, values)})
        return {n: np.asarray(v) for n, v in _flatten(out)}

    return fn, signature, names, reference, loaded


def _decls(signature: Sequence[Any], pins: Mapping[str, tuple[int, ...] | str] | None) -> tuple[
        list[InputDecl], dict[str, dict[int, str]]]:
    """Concrete check shapes from the signature: unknown batch → 2, other unknown dims from ``pins``."""
    pinned = {d.name: d for d in decls_from_shapes(pins or {})}
    names = [s.name for s in signature]
    unknown = sorted(set(pinned) - set(names))
    if unknown:
        raise UserError(f"--input names '{unknown[0]}', which is not a model input (inputs: {', '.join(names)})")
    decls: list[InputDecl] = []
    dynamic: dict[str, dict[int, str]] = {}
    for spec in signature:
        dims = spec.shape.as_list() if spec.shape.rank is not None else None
        try:
            dtype = np.dtype(spec.dtype.as_numpy_dtype)
        except TypeError:
            raise UserError(f"input '{spec.name}' has dtype {spec.dtype.name}, which cannot be checked") from None
        if dtype.kind not in "biuf":
            raise UserError(f"input '{spec.name}' has dtype {spec.dtype.name}; only numeric and bool inputs "
                            "are supported")
        if dims is None:
            if spec.name not in pinned:
                raise UserError(f"input '{spec.name}' has unknown rank; give its shape with --input "
                                f"{spec.name}=DxDx...")
            dims = [None] * len(pinned[spec.name].shape)
        if dims and dims[0] is None:
            dynamic.setdefault(spec.name, {})[0] = "batch"
        if spec.name in pinned:
            shape = pinned[spec.name].shape
            if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                raise UserError(f"--input {pinned[spec.name]} does not fit input '{spec.name}' of shape "
                                f"{['?' if d is None else d for d in dims]}")
        else:
            missing = [i for i, d in enumerate(dims) if d is None and i > 0]
            if missing:
                raise UserError(f"input '{spec.name}' has unknown dimension(s) at axis {missing} "
                                f"(shape {['?' if d is None else d for d in dims]}); give the shape to check with, "
                                f"e.g. --input {spec.name}=" + "x".join(
                                    str(CHECK_BATCH if d is None and i == 0 else 16 if d is None else d)
                                    for i, d in enumerate(dims)))
            shape = tuple(CHECK_BATCH if d is None else d for d in dims)
        decls.append(InputDecl(spec.name, tuple(shape), dtype))
    return decls, dynamic


def from_tf(model: Any, *, input_shapes: Mapping[str, tuple[int, ...] | str] | None = None,
            opset: int = DEFAULT_OPSET, signature: str | None = None, output: str | os.PathLike | None = None,
            check: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0,
            keep_failed: bool = False) -> ExportResult:
    """Convert a TensorFlow model to ONNX with tf2onnx and check it against TensorFlow in ONNX Runtime.

    ``model``: a SavedModel folder, a ``.keras`` or ``.h5`` file, or an in-memory Keras model.
    ``input_shapes`` (``{name: (2, 128)}`` or ``{name: "2x128"}``) sets the shapes used for the check where
    the signature leaves a non-batch dimension unknown; an unknown leading dimension is checked at batch 2
    and at batch 3. ``signature`` picks a SavedModel signature (default ``serving_default``).

    Raises ``ExportMismatch`` (exit 1) when ONNX Runtime disagrees with TensorFlow beyond
    ``atol + rtol * |tf|``; ``UserError`` for unreadable models or bad arguments.
    """
    out_path = check_output_path(output)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir() and not (path / "saved_model.pb").is_file():
            raise UserError(f"{path} is a folder without saved_model.pb; expected a SavedModel folder, "
                            "a .keras or a .h5 file")
        if not path.exists():
            raise UserError(f"TensorFlow model not found: {path}")
        if path.is_file() and path.suffix.lower() not in KERAS_SUFFIXES:
            raise UserError(f"{path}: expected a SavedModel folder (with saved_model.pb), a .keras or a .h5 file")
    tf, tf2onnx = require_tf()
    keep_alive = None
    if isinstance(model, (str, os.PathLike)):
        source = f"tf:{path}"
        if path.is_dir():
            fn, sig, names, reference, keep_alive = _saved_model_function(tf, path, signature)
        else:
            fn, sig, names, reference = _keras_function(tf, _keras_model(path))
    elif hasattr(model, "inputs") and callable(model):
        source = f"tf:<{type(model).__name__}>"
        fn, sig, names, reference = _keras_function(tf, model)
    else:
        raise UserError(f"from_tf expects a path (SavedModel folder, .keras, .h5) or a Keras model; "
                        f"got {type(model).__name__}")

    decls, dynamic = _decls(sig, input_shapes)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=opset)
    except Exception as exc:  # noqa: BLE001 - tf2onnx has no error hierarchy of its own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"tf2onnx cannot convert this model: {type(exc).__name__}: {first[:300]}") from None
    del keep_alive  # the frozen graph holds the weights now
    import onnx_ir as ir

    onnx_model = ir.serde.deserialize_model(proto)
    name_symbolic_batch(onnx_model)
    notes: list[str] = []
    got = onnx_model.opset_imports.get("")
    if got != opset:
        notes.append(f"asked for opset {opset}; tf2onnx wrote opset {got}")
    onnx_names = [v.name for v in onnx_model.graph.outputs]
    if sorted(onnx_names) != sorted(names):
        notes.append(f"tf2onnx named the outputs {onnx_names} (TensorFlow: {names}); compared in order")

    def ordered(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = reference([inputs[d.name] for d in decls])
        if sorted(out) == sorted(onnx_names):
            return [out[n] for n in onnx_names]
        return list(out.values())

    return finish_export(onnx_model, framework="tensorflow", exporter="tf2onnx", notes=notes, decls=decls,
                         dynamic=dynamic, examples=None, reference=ordered, output=out_path, check=check,
                         atol=atol, rtol=rtol, seed=seed, keep_failed=keep_failed, source=source)
