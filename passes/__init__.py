"""Built-in passes. Importing this package registers each of them in ``graphopt.registry``."""

from graphopt.passes import cleanup  # noqa: F401
