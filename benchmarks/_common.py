"""What every benchmark writes about the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU model from lscpu, else what the platform module knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or "unknown CPU"


def machine(providers: list[str] | None = None) -> str:
    """``CPU (N cores)``, plus the GPU and driver when CUDA is among the providers."""
    text = f"{cpu_name()} ({os.cpu_count()} cores)"
    if providers and "CUDAExecutionProvider" in providers:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            gpu = "none found (nvidia-smi missing)"
        text += f", GPU: {gpu}"
    return text
