"""Where distillation's training runs: in this process, or in the separate training environment.

onnxruntime-training 1.19.2 (the last release of ONNX Runtime's on-device training API) installs a module
named ``onnxruntime`` itself, so it cannot live beside the onnxruntime that graphopt validates with. It gets
its own virtual environment, ``.venv-train`` in a source checkout (``~/.cache/graphopt/venv-train``
otherwise, or ``$GRAPHOPT_TRAIN_ENV``), created by ``graphopt setup-train``; training then runs there as a
worker process. If ``onnxruntime.training`` imports in graphopt's own interpreter, training runs
in-process instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from graphopt.errors import UserError

logger = logging.getLogger(__name__)

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")
STAMP_NAME = ".graphopt-train-stamp"
#: Environment variables: a Python to run the worker with (overrides everything), and the env's folder.
PYTHON_ENV_VAR = "GRAPHOPT_TRAIN_PYTHON"
ENV_DIR_VAR = "GRAPHOPT_TRAIN_ENV"
#: What the environment must be able to import; checked once when it is made.
CHECK_IMPORTS = "import onnxruntime.training.api, onnxruntime.training.artifacts, numpy, onnx"
SETUP_HINT = "run `graphopt setup-train` (it creates {path} with pip, about a minute)"


@dataclasses.dataclass(frozen=True)
class Backend:
    """How to run a training job: ``python`` is None for in-process."""

    python: Path | None
    description: str

    @property
    def in_process(self) -> bool:
        return self.python is None


def repo_root() -> Path | None:
    """The source checkout graphopt runs from, if it runs from one (an editable install)."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "graphopt").is_dir() else None


def default_env_dir() -> Path:
    if os.environ.get(ENV_DIR_VAR):
        return Path(os.environ[ENV_DIR_VAR]).expanduser()
    root = repo_root()
    if root is not None:
        return root / ".venv-train"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "graphopt" / "venv-train"


def env_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS_FILE.read_bytes()).hexdigest()[:16]


def env_is_ready(env_dir: Path) -> bool:
    """True when ``env_dir`` was completed by setup with the current requirements (no import check: fast)."""
    stamp = env_dir / STAMP_NAME
    return env_python(env_dir).is_file() and stamp.is_file() and stamp.read_text().strip() == requirements_hash()


def in_process_available() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(env_dir: Path | None = None) -> Backend:
    """Pick where training runs, or raise a UserError that says how to set it up."""
    forced = os.environ.get(PYTHON_ENV_VAR)
    if forced:
        return Backend(Path(forced), f"worker ({forced}, from ${PYTHON_ENV_VAR})")
    if in_process_available():
        return Backend(None, "in-process")
    env_dir = env_dir or default_env_dir()
    if env_is_ready(env_dir):
        return Backend(env_python(env_dir), f"worker ({env_dir})")
    state = "is incomplete or out of date" if env_dir.exists() else "does not exist"
    raise UserError("distillation needs onnxruntime-training, which lives in its own environment, and "
                    f"{env_dir} {state}; " + SETUP_HINT.format(path=env_dir))


def _base_python(explicit: str | None) -> str:
    """A Python <= 3.11 with venv: onnxruntime-training 1.19.2 has no wheels for newer ones."""
    if explicit:
        return explicit
    if sys.version_info[:2] <= (3, 11):
        return getattr(sys, "_base_executable", None) or sys.executable
    for name in ("python3.11", "python3.10"):
        found = shutil.which(name)
        if found:
            return found
    raise UserError("onnxruntime-training 1.19.2 needs Python 3.10 or 3.11 and none was found on PATH; "
                    "give one with `graphopt setup-train --python /path/to/python3.11`")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise setups of one environment (parallel test workers may all ask for it at once)."""
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock, setup is still idempotent
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise UserError(f"setting up the training environment failed while {what} (exit {proc.returncode}); "
                        f"see {log}: {tail}")


def setup_env(env_dir: Path | None = None, *, python: str | None = None, force: bool = False,
              say: Callable[[str], None] = logger.info) -> Path:
    """Create (or complete) the training environment; fast no-op when it is already ready. Returns its folder."""
    env_dir = (env_dir or default_env_dir()).absolute()
    env_dir.mkdir(parents=True, exist_ok=True)
    lock = env_dir / ".graphopt-setup.lock"
    with _lock(lock):
        if env_is_ready(env_dir) and not force:
            return env_dir
        if force:
            for child in env_dir.iterdir():
                if child != lock:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        log = env_dir / ".graphopt-setup.log"
        log.write_text("")
        py = env_python(env_dir)
        if not py.is_file():
            say(f"creating {env_dir}")
            _run([_base_python(python), "-m", "venv", str(env_dir)], log, "creating the virtual environment")
        (env_dir / STAMP_NAME).unlink(missing_ok=True)
        say(f"installing {', '.join(requirements())} (log: {log})")
        _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS_FILE)],
             log, "installing packages with pip")
        _run([str(py), "-c", CHECK_IMPORTS], log, "checking that onnxruntime.training imports")
        (env_dir / STAMP_NAME).write_text(requirements_hash() + "\n")
        return env_dir


def requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS_FILE.read_text().splitlines())
    return [line for line in lines if line]
