"""What a pass may use besides the model: data, providers, a work folder, a seed and progress reporting.

Passes get this object at construction and never read global state or the command line, so the same
pass runs identically from the CLI, the Python API and a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from graphopt.data import DataSource
    from graphopt.runtime import SessionFactory


class ProgressTask(Protocol):
    def advance(self, amount: float = 1) -> None: ...

    def update(self, *, total: float | None = None, description: str | None = None) -> None: ...


class ProgressReporter(Protocol):
    def task(self, description: str, total: float | None = None) -> contextlib.AbstractContextManager[ProgressTask]: ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        pass


class NullProgress:
    """Progress reporter for library use: reports nothing (the CLI passes a rich one)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[ProgressTask]:
        yield _NullTask()


@dataclasses.dataclass
class PassContext:
    data: DataSource | None = None
    sessions: SessionFactory | None = None
    providers: list[str] = dataclasses.field(default_factory=lambda: ["CPUExecutionProvider"])
    work_dir: Path = dataclasses.field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="graphopt-")))
    seed: int = 0
    progress: ProgressReporter = dataclasses.field(default_factory=NullProgress)
    #: The untouched input model on disk (teacher for distillation, reference for checks).
    reference_path: Path | None = None
    #: Concrete shapes pinned by the user (``--shape``), by input name.
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    batch_size: int = 32
