"""Built-in passes. Importing this package imports every module in it, and each registers its pass(es)
in ``graphopt.registry`` with ``@register``; a new pass is a new module here, nothing else to edit."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
