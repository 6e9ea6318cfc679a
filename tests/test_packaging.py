"""Every package in the source tree is listed in pyproject.toml, or a non-editable install would lose it."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_all_packages_are_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graphopt").rglob("__init__.py")}
    found |= {".".join(("graphopt",) + p.parent.relative_to(ROOT).parts) for p in (ROOT / "passes").rglob("__init__.py")}
    found = {f for f in found if "__pycache__" not in f}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["graphopt.passes"] == "passes"
