"""Exceptions: who is at fault.

- :class:`SocketCreationError`: the kernel refused (an 'E' answer).  It is an
  OSError carrying the kernel's errno, and an instance of the matching
  built-in subclass (``PermissionError`` for EACCES/EPERM, ...).
- :class:`CreatorFatalError`: the creator is gone or broke the protocol.  The
  handle is dead afterwards.
- Bad arguments raise plain ValueError/TypeError before anything is sent.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # (not typing's: no typing at run time)
if TYPE_CHECKING:
    from typing import TypeVar

    from ._protocol import Request

    _E = TypeVar("_E", bound=OSError)

__all__ = [
    "CreatorError",
    "CreatorFatalError",
    "SocketCreationError",
    "errno_error",
    "socket_creation_error",
]


class CreatorError(Exception):
    """Base class of every error this library raises about a creator."""


class SocketCreationError(CreatorError, OSError):
    """The creator answered 'E': socket() or a later step (bind) failed.

    ``errno``/``strerror`` are the kernel's; ``stage`` is "socket" or "bind";
    ``request`` is the :class:`~sockcreator.Request` that failed.
    """

    stage: str
    request: Request | None

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}: {self.stage} failed for {self.request}"


_SUBCLASSES: dict[tuple[type[OSError], type[OSError]], type[OSError]] = {}


def errno_error(base: type[_E], errno: int) -> _E:
    """An instance of ``base`` that is also the built-in OSError subclass for
    ``errno`` (PermissionError for EACCES/EPERM, ...), classes made once."""
    builtin = type(OSError(errno, ""))  # OSError maps errno to its subclass itself
    cls: type[OSError] = base
    if builtin is not OSError:
        key = (base, builtin)
        cls = _SUBCLASSES.get(key) or _SUBCLASSES.setdefault(
            key, type(f"{base.__name__}_{builtin.__name__}", (base, builtin), {})
        )
    err = cls(errno, os.strerror(errno))
    assert isinstance(err, base)
    return err


def socket_creation_error(errno: int, stage: str, request: Request | None) -> SocketCreationError:
    """A SocketCreationError that is also the built-in OSError subclass for ``errno``."""
    err = errno_error(SocketCreationError, errno)
    err.stage = stage
    err.request = request
    return err


class CreatorFatalError(CreatorError):
    """The creator is gone, timed out, or broke the protocol; the handle is dead.

    ``condition`` is the creator's 'F' condition (e.g. ``"I"``) if it sent one;
    ``exit_status`` is the creator's exit status if known (negative: signal).
    """

    def __init__(
        self, message: str, *, condition: str | None = None, exit_status: int | None = None
    ) -> None:
        if exit_status is not None:
            message = f"{message} (creator exit status {exit_status})"
        super().__init__(message)
        self.condition = condition
        self.exit_status = exit_status
