"""Pipeline files (TOML): passes, their options, data and validation settings.

```toml
passes = ["cleanup", "quant"]

[options.quant]
calibration = "entropy"

[data]
path = "models/build/digits_cnn_calib.npz"   # or a folder, or "module:function"
eval = "models/build/digits_cnn_test.npz"
batch_size = 32
shapes = { input = [1, 1, 8, 8] }

[validate]
providers = ["cpu"]
max_accuracy_drop = 1.0
max_latency_ratio = 1.1
latency_batches = [1, 8]
```
Values here override defaults; ``--set`` and command-line flags override this file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from graphopt.errors import UserError

_TOP = {"passes", "options", "data", "validate", "seed", "check_each_pass"}
_DATA = {"path", "eval", "batch_size", "shapes", "eval_samples"}
_VALIDATE = {"providers", "max_accuracy_drop", "max_latency_ratio", "latency_batches", "enabled", "keep_failed"}


@dataclasses.dataclass
class PipelineFile:
    passes: list[str] | None = None
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    validate: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    check_each_pass: bool | None = None


def _unknown(section: str, keys: set[str], allowed: set[str], path: Path) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise UserError(f"{path}: unknown key '{extra[0]}' in {section}; allowed: {', '.join(sorted(allowed))}")


def load_pipeline_file(path: str | Path) -> PipelineFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    _unknown("the top level", set(raw), _TOP, path)
    passes = raw.get("passes")
    if passes is not None and (not isinstance(passes, list) or not all(isinstance(p, str) for p in passes)):
        raise UserError(f"{path}: 'passes' must be a list of pass names, e.g. passes = [\"cleanup\"]")
    options = raw.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UserError(f"{path}: [options.PASS] tables expected, e.g. [options.quant]")
    data = raw.get("data", {})
    validate = raw.get("validate", {})
    _unknown("[data]", set(data), _DATA, path)
    _unknown("[validate]", set(validate), _VALIDATE, path)
    if "path" in data:  # relative data paths are relative to the config file
        data["path"] = _relative(path, data["path"])
    if "eval" in data:
        data["eval"] = _relative(path, data["eval"])
    return PipelineFile(passes, options, data, validate, raw.get("seed"), raw.get("check_each_pass"))


def _relative(config: Path, value: str) -> str:
    if ":" in value and not value.endswith(".npz") and not (config.parent / value).exists():
        return value  # module:function
    p = Path(value)
    return str(p if p.is_absolute() else (config.parent / p))
