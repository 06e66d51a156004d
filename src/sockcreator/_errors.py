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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._protocol import Request

__all__ = ["CreatorError", "CreatorFatalError", "SocketCreationError", "socket_creation_error"]


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


_SUBCLASSES: dict[type[OSError], type[SocketCreationError]] = {}


def socket_creation_error(errno: int, stage: str, request: Request | None) -> SocketCreationError:
    """A SocketCreationError that is also the built-in OSError subclass for ``errno``."""
    builtin = type(OSError(errno, ""))  # OSError maps errno to its subclass itself
    cls: type[SocketCreationError] = SocketCreationError
    if builtin is not OSError:
        cls = _SUBCLASSES.get(builtin) or _SUBCLASSES.setdefault(
            builtin,
            type(f"SocketCreationError_{builtin.__name__}", (SocketCreationError, builtin), {}),
        )
    err = cls(errno, os.strerror(errno))
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
