"""Errors a user can act on.

Every error retrodb raises on purpose is a `RetrodbError` carrying a one-line
message and, where there is one, the command or flag that fixes it. The CLI
prints these without a traceback (exit 1; `UsageError` exits 2, as a bad
option does); an OSError the library did not expect (disk full, permission
denied) is printed the same way, with the file and the database's state;
anything else is a bug and keeps its traceback under RETRODB_DEBUG=1.
"""

from __future__ import annotations


class RetrodbError(Exception):
    """Base class: `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self):
        # Rebuilt from its fields, not by calling __init__ again (subclasses take other arguments): an error
        # raised in a Ray worker reaches the command as the same error, hint included.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls, args: tuple, fields: dict) -> RetrodbError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(fields)
    return exc


class UsageError(RetrodbError):
    """Options or arguments that do not go together, or a value an option does not take (exit 2)."""


class DatabaseNotFound(RetrodbError):
    pass


class DatabaseBusy(RetrodbError):
    pass


class ConfigMismatch(RetrodbError):
    pass


class BadInput(RetrodbError):
    """Input that the --on-error policy refused (file, line and reason in the message)."""


class MissingStage(RetrodbError):
    """A command needs a stage that has not run yet (keys, index)."""


class MissingDependency(RetrodbError):
    pass


class CorruptDatabase(RetrodbError):
    pass


def require(module: str, extra: str):
    """Import an optional dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"this needs the optional package '{module}', which is not installed",
            hint=f"pip install 'retrodb[{extra}]'",
        ) from exc


class BadOption(UsageError):
    """A command-line value that cannot work (an RE2-invalid --regex, a --where that is not one boolean
    expression): the CLI reports it as a usage error (exit 2) naming `option`."""

    def __init__(self, option: str, message: str, hint: str | None = None):
        super().__init__(f"{option}: {message}", hint)
        self.option = option
        self.reason = message
