"""Pass options: typed dataclasses filled from defaults, a TOML file and ``--set`` (in that order).

Each pass declares its options as a dataclass whose fields are made with :func:`opt`, so the help text,
the allowed choices and the range live next to the default. ``graphopt passes`` prints them, the config
file and ``--set`` fill them, and a wrong name, type or value becomes a ``UserError`` naming the option.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from graphopt.errors import UserError


def opt(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
        min: float | None = None, max: float | None = None, min_exclusive: bool = False,
        max_exclusive: bool = False, regex: bool = False) -> Any:
    """A documented option field. Lists and dicts get a fresh copy per instance. ``regex=True``: every value
    must compile as a regular expression."""
    meta = {"help": help, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "regex": regex}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type_name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (optional)"
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def describe(options_cls: type) -> list[OptionInfo]:
    hints = typing.get_type_hints(options_cls)
    infos = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        infos.append(OptionInfo(f.name, _type_name(hints[f.name]), default,
                                f.metadata.get("help", ""), f.metadata.get("choices")))
    return infos


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a string from ``--set`` or a TOML value) to ``tp`` or raise a UserError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0])
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise UserError(f"{where} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list ({_type_name(tp)}); got {value!r}")
        return [coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"{where} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"{where} must be an integer; got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where} must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number; got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where} must be a string; got {value!r}")
        return str(value)
    raise TypeError(f"unsupported option type {tp!r} for {where}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("regex"):
            try:
                re.compile(v)
            except re.error as exc:
                raise UserError(f"{where}: {v!r} is not a regular expression ({exc})") from None
        if choices is not None and v not in choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, choices))}; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and (v < lo or (meta.get("min_exclusive") and v == lo)):
                bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
                raise UserError(f"{where} must be {bound}; got {v}")
            if hi is not None and (v > hi or (meta.get("max_exclusive") and v == hi)):
                bound = f"< {hi}" if meta.get("max_exclusive") else f"<= {hi}"
                raise UserError(f"{where} must be {bound}; got {v}")


def build(options_cls: type, prefix: str, *layers: typing.Mapping[str, Any]) -> Any:
    """Make an options object from defaults overlaid by each mapping in ``layers`` (later wins).

    Unknown names, wrong types and out-of-range values raise ``UserError``; so does the options class's
    own ``validate()`` for combinations that cannot work together.
    """
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, raw in layer.items():
            if key not in fields:
                known = ", ".join(fields) or "(none)"
                raise UserError(f"unknown option '{prefix}.{key}'; {prefix} options are: {known}")
            where = f"option {prefix}.{key}"
            value = coerce(raw, hints[key], where)
            _check_range(value, fields[key].metadata, where)
            values[key] = value
    obj = options_cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_assignments(items: typing.Iterable[str]) -> dict[str, dict[str, str]]:
    """Parse repeated ``--set pass.option=value`` into ``{pass: {option: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.strip().partition(".")
        if not sep or not dot or not pass_name or not option:
            raise UserError(f"--set expects PASS.OPTION=VALUE (e.g. quant.calibration=entropy); got {item!r}")
        out.setdefault(pass_name, {})[option] = value.strip()
    return out


def to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
