"""graphopt: a framework-agnostic ONNX graph optimizer, proved with ONNX Runtime.

Python API::

    import graphopt
    result = graphopt.optimize("model.onnx", passes=["cleanup"], data="calib.npz", output="out.onnx")
    print(result.report["validation"]["agreement"])
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.api import OptimizeResult, bench_model, optimize, validate_models  # noqa: E402
from graphopt.errors import GateFailed, PassFailed, UserError  # noqa: E402
from graphopt.model_io import load_model, save_model  # noqa: E402

__all__ = ["GateFailed", "OptimizeResult", "PassFailed", "UserError", "__version__", "bench_model",
           "load_model", "optimize", "save_model", "validate_models"]
