"""Errors written for users.

Every error the library raises on bad input is a :class:`BnfreezeError`. Its ``str()`` says
what was wrong and what to do, and its ``exit_code`` is what the CLI exits with. The CLI turns
these into a one-line message in exactly one place (``bnfreeze.cli``); a user never sees a
traceback for bad input.
"""

from __future__ import annotations

from collections.abc import Callable

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug in bnfreeze, never bad input


class BnfreezeError(Exception):
    """Base class for every error bnfreeze reports to a user."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} {self.hint}"
        return self.message


class ContradictoryOptions(BnfreezeError):
    """Two options that cannot be given together, such as ``bn_inference`` and ``train_bn``.

    The check is made once, where the request is built (``Assignment.freeze``); the CLI
    spells the options as flags (:meth:`spelled`)."""

    def __init__(self, first: str, second: str) -> None:
        self.options = (first, second)
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each option's name passed through ``spell``."""
        first, second = (spell(name) for name in self.options)
        return f"{first} and {second} contradict each other; pick one."


class ModelFormatError(BnfreezeError):
    """The file is not a model bnfreeze can read, or it is damaged."""


class SelectionError(BnfreezeError):
    """A layer selection (glob, name, --up-to / --from) is invalid or matches nothing."""


class OutputError(BnfreezeError):
    """The output path cannot be written safely."""


class PlanError(BnfreezeError):
    """A TOML freeze plan is malformed."""


class ExpectationError(BnfreezeError):
    """An expectation (``--expect NAME[=ARG]`` or a plan's ``[[expect]]``) is malformed or
    matches nothing it could be checked on."""


class UnsafeModelError(BnfreezeError):
    """Loading the model would execute code from the file (a Lambda layer, say)."""


class RuntimeUnavailableError(BnfreezeError):
    """A requested runtime (tf_keras, say) is not installed."""


class DataError(BnfreezeError):
    """Data given for a measurement (``verify --data FILE.npz``) does not fit the model."""


class RecompileWarning(UserWarning):
    """A flag changed on an in-memory model that is already compiled: call ``compile()``
    again with a new optimizer (:func:`bnfreeze.recompile`) before ``fit()``.

    Defined here, at the bottom of the import order, so that the runtime (the
    ``BatchNormGuard`` callback) can emit it; :mod:`bnfreeze.api` exports it."""
