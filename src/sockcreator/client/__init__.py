"""Talking to a creator: the client library.

The creator's protocol with no I/O (:mod:`._protocol`: requests and the
answer parser), what both shells share (:mod:`._channel`: starting a
creator, taking descriptors out of ``recvmsg``, checking a received socket),
the errors (:mod:`._errors`), the blocking client (:mod:`.blocking`), the
asyncio client (:mod:`.aio`) and the ``PROTO:ADDR:PORTS`` specs
(:mod:`.specs`).

This part may import: the standard library, its own modules and
``sockcreator._record`` (frozen dataclasses made cheaply).  It must
not import ``run``, ``broker`` or ``creator.py`` (the creator is run by
path, never imported), so that a program that only asks a creator for
sockets loads nothing else.  The asyncio client is not imported here: a
blocking program does not pay for asyncio.

Twins kept on purpose: :mod:`.blocking` and :mod:`.aio` are the same thin
shell over :mod:`._protocol` and :mod:`._channel` (which hold everything
that is not I/O: encoding, parsing, checking a received socket, counting
descriptors); they differ exactly where blocking and asyncio differ (a lock
and kernel timeouts, against a reader task, futures and cancellation).  What
``duplicates`` still pairs between them is the context-manager protocol and
their import lists.
"""

from ._errors import CreatorError, CreatorFatalError, SocketCreationError
from ._protocol import Request, SocketOptions, make_request
from .blocking import ENV_FD, SocketCreator

__all__ = [
    "ENV_FD",
    "CreatorError",
    "CreatorFatalError",
    "Request",
    "SocketCreationError",
    "SocketCreator",
    "SocketOptions",
    "make_request",
]
