"""Exceptions raised by dbdl_magic. Every message names the table, column or option at fault."""

from __future__ import annotations


class DbdlError(Exception):
    """Base class. ``detail`` carries the database's own message (and kernel traceback)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class InputError(DbdlError, ValueError):
    """The training data or an option is unusable (empty result, NULLs, bad column, ...)."""


class SpecError(InputError):
    """The model spec is malformed or names an unsupported layer."""


class InstallError(DbdlError):
    """The database lacks the kernels, PL/Python, or a server-side torch."""


class TrainingError(DbdlError):
    """The database failed while training (the kernel's error is in ``detail``)."""
