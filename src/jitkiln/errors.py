"""Errors. Each one's first line says what went wrong; the rest says what to do."""
from __future__ import annotations


class JitkilnError(Exception):
    """Base class: ``str(e)`` is the one-line reason, ``e.hint`` the action, ``e.details`` extra lines."""

    exit_code = 1

    def __init__(self, reason: str, hint: str = "", details: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.details = details

    def full(self) -> str:
        lines = [self.reason]
        if self.details:
            lines.append(self.details.rstrip())
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class UsageError(JitkilnError):
    """Bad input on the command line or through the API (unknown family, variant, shape key...)."""

    exit_code = 2


class ToolchainNotFound(JitkilnError):
    exit_code = 3


class CompileError(JitkilnError):
    """The compiler rejected a unit: carries the unit path, the first error lines and the log path."""

    exit_code = 4

    def __init__(self, reason: str, hint: str = "", details: str = "", *, unit: str = "", log: str = ""):
        super().__init__(reason, hint, details)
        self.unit = unit
        self.log = log


class CompilerKilled(CompileError):
    """The compiler died of a signal: most often the kernel's out-of-memory killer."""


class StoreError(JitkilnError):
    exit_code = 5


class StoreFull(StoreError):
    pass


class CorruptEntry(StoreError):
    """A cache entry failed verification; it is never loaded."""


class MissingInstance(JitkilnError):
    """A problem needs an instance the loaded module does not have (policy ``error``)."""

    exit_code = 6


class LaunchError(JitkilnError):
    exit_code = 7
