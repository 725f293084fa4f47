"""Errors the kernels raise, and the wrapper that turns any other failure into one of them.

Every refusal is a :class:`KernelError` (a ``ValueError``) whose message names the argument,
config key, layer or tensor at fault. PL/Python reports an exception as ``Class: message``, so
:func:`clean_errors` keeps torch's and numpy's internal errors (``IndexError``,
``RuntimeError``, ``MemoryError``, ...) from becoming the primary message of a SQL error: they
are re-raised as a :class:`KernelError` that says which kernel failed and why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class KernelError(ValueError):
    """A kernel refused its input or could not complete; the message says what and why."""


class ConfigError(KernelError):
    """The kernel's JSON config is malformed or holds a value out of range."""


class DataError(KernelError):
    """A packed buffer (x, y, or an evaluation statistics vector) is malformed."""


class LimitError(KernelError):
    """The request exceeds a resource limit of the database server."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line[:500] + ("…" if len(line) > 500 else "")


def clean_errors(what: str) -> Callable[[F], F]:
    """Decorator: a :class:`KernelError` passes through; ``MemoryError`` becomes a
    :class:`LimitError`; any other ``Exception`` becomes a :class:`KernelError` naming ``what``
    (the kernel) and the original exception's type and first line (chained as its cause)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KernelError:
                raise
            except MemoryError as exc:
                raise LimitError(
                    f"{what}: the database server process ran out of memory"
                    f"{': ' + _first_line(exc) if str(exc) else ''}; use a smaller model, "
                    "batch_size or buffer"
                ) from exc
            except RecursionError as exc:
                raise KernelError(f"{what}: input nested too deeply ({_first_line(exc)})") from exc
            except Exception as exc:
                if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
                    raise LimitError(
                        f"{what}: the database server process ran out of memory "
                        f"({_first_line(exc)}); use a smaller model, batch_size or buffer"
                    ) from exc
                raise KernelError(
                    f"{what} failed: {type(exc).__name__}: {_first_line(exc)}"
                ) from exc

        return wrapped  # type: ignore[return-value]

    return decorate
