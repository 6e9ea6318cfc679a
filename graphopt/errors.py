"""The three kinds of failure graphopt reports, each with its own exit code.

The CLI maps them to exit codes (see ``graphopt.cli``): a ``UserError`` is something the user can fix
(exit 2), a ``PassFailed`` is a bug or limitation inside a pass (exit 3), and a ``GateFailed`` means the
optimized model does not meet the validation budget (exit 1).
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""

    exit_code = 3


class UserError(GraphoptError):
    """Bad input or usage: the message says what was expected. Exit code 2."""

    exit_code = 2


class PassFailed(GraphoptError):
    """A pass raised an unexpected exception. Exit code 3; the message names the pass."""

    exit_code = 3

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        self.cause = cause
        super().__init__(f"pass '{pass_name}' failed: {type(cause).__name__}: {cause}")


class GateFailed(GraphoptError):
    """The optimized model missed a validation gate (accuracy drop, latency, numeric check). Exit code 1."""

    exit_code = 1
