"""The blocking client: a thin shell over :mod:`sockcreator._protocol`."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import NoReturn

from ._channel import (
    ANCBUFSIZE,
    RECV_FLAGS,
    RequestSpec,
    adopt,
    close_fds,
    creator_argv,
    normalize,
    reap,
    spawn,
    unpack_fds,
)
from ._errors import CreatorFatalError, SocketCreationError, socket_creation_error
from ._protocol import (
    AddressSpec,
    AnswerParser,
    Event,
    ProtocolSpec,
    ProtocolViolation,
    SocketReceived,
)

__all__ = ["ENV_FD", "SocketCreator"]

#: Environment variable naming an inherited creator connection (see ``run``).
ENV_FD = "SOCKCREATOR_FD"


class SocketCreator:
    """A connection to a socket creator, started by us or handed to us.

    ``SocketCreator()`` starts this package's creator (hardened, allowing
    everything unless ``allow`` lists PROTO:ADDR:PORTS specs, dropping to
    ``user`` if given and we are root).  ``command`` runs another creator
    implementation instead, such as BIND 10's ``b10-sockcreator``.
    ``timeout`` bounds how long the creator may stay silent.  Thread-safe.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        timeout: float = 10.0,
        allow: Sequence[str] | None = None,
        user: str | int | None = None,
        harden: bool = True,
    ) -> None:
        if command is not None and (allow is not None or user is not None or not harden):
            raise ValueError("allow/user/harden apply only to this package's creator")
        argv = creator_argv(allow=allow, user=user, harden=harden) if command is None else command
        sock, proc = spawn(argv)
        self._setup(sock, proc, timeout)

    def _setup(
        self, sock: socket.socket, proc: subprocess.Popen[bytes] | None, timeout: float
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        sock.settimeout(timeout)
        self._sock = sock
        self._proc = proc
        self._timeout = timeout
        self._lock = threading.Lock()
        self._parser = AnswerParser()
        self._dead: str | None = None  # why the handle is unusable

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float = 10.0) -> SocketCreator:
        """Wrap an already connected channel (the handle then owns ``sock``)."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("the creator channel must be a Unix stream socket")
        self = cls.__new__(cls)
        self._setup(sock, None, timeout)
        return self

    @classmethod
    def from_environment(cls, *, timeout: float = 10.0) -> SocketCreator | None:
        """The creator connection ``sockcreator run`` passed us, or None.

        Reads and unsets ``SOCKCREATOR_FD``; the descriptor is made
        close-on-exec at once."""
        value = os.environ.pop(ENV_FD, None)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or int(value) < 3:
            raise ValueError(f"{ENV_FD}={value!r} is not a descriptor number >= 3")
        fd = int(value)
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ValueError(f"{ENV_FD}={fd} is not a socket: {e}") from None
        try:
            return cls.from_socket(sock, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    @property
    def pid(self) -> int | None:
        """The creator's pid if this handle started it, else None."""
        return self._proc.pid if self._proc is not None else None

    def get_socket(self, protocol: ProtocolSpec, address: AddressSpec, port: int) -> socket.socket:
        """One bound socket (not listening), non-inheritable."""
        return self.get_sockets([(protocol, address, port)])[0]

    def get_sockets(self, requests: Iterable[RequestSpec]) -> list[socket.socket]:
        """Many sockets, pipelined in one write.  All or nothing: on any
        failure the ones received are closed and the first failure raised."""
        reqs = normalize(requests)
        if not reqs:
            return []
        data = b"".join(r.encode() for r in reqs)
        with self._lock:
            self._check_alive()
            for r in reqs:
                self._parser.expect(r)
            try:
                self._sock.sendall(data)
            except OSError as e:
                self._fatal(f"cannot write to the creator: {e}")
            return self._collect()

    def _collect(self) -> list[socket.socket]:
        got: list[socket.socket] = []
        failure: SocketCreationError | None = None
        try:
            while self._parser.pending:
                events = self._read_events()
                for i, ev in enumerate(events):
                    if isinstance(ev, SocketReceived):
                        try:
                            got.append(adopt(ev.fd, ev.request))
                        except ProtocolViolation as e:
                            close_fds(
                                e.fd for e in events[i + 1 :] if isinstance(e, SocketReceived)
                            )
                            self._fatal(str(e))
                    elif failure is None:
                        failure = socket_creation_error(ev.errno, ev.stage, ev.request)
        except BaseException as e:
            for s in got:
                s.close()
            if self._dead is None:  # interrupted mid-answer: the channel is out of step
                self._fatal(f"interrupted while reading answers: {e!r}")
            raise
        if failure is not None:
            for s in got:
                s.close()
            raise failure
        return got

    def _read_events(self) -> list[Event]:
        try:
            data, anc, flags, _ = self._sock.recvmsg(
                self._parser.bytes_wanted(), ANCBUFSIZE, RECV_FLAGS
            )
        except TimeoutError:
            self._fatal(f"no answer from the creator within {self._timeout}s")
        except ConnectionResetError:
            data, anc, flags = b"", [], 0
        except OSError as e:
            self._fatal(f"cannot read from the creator: {e}")
        try:
            fds = unpack_fds(anc, flags)
        except ProtocolViolation as e:
            self._fatal(str(e))
        if not data:
            close_fds(fds)
            self._fatal("the creator closed the connection")
        try:
            return self._parser.feed(data, fds)
        except ProtocolViolation as e:
            close_fds(fds)
            self._fatal(str(e), e.condition)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise CreatorFatalError(f"creator unusable: {self._dead}")

    def _fatal(self, reason: str, condition: str | None = None) -> NoReturn:
        """Close the channel, kill and reap the creator, and raise."""
        self._dead = reason
        self._sock.close()
        status = reap(self._proc, min(1.0, self._timeout))
        raise CreatorFatalError(reason, condition=condition, exit_status=status)

    def terminate(self) -> None:
        """Send 'T', wait for EOF, reap.  Idempotent."""
        with self._lock:
            if self._dead is not None:
                return
            try:
                self._sock.sendall(b"T")
                data = self._sock.recv(1)
            except TimeoutError:
                self._fatal(f"creator did not exit within {self._timeout}s of 'T'")
            except (BrokenPipeError, ConnectionResetError):
                data = b""  # already gone: that is the end we wanted
            except OSError as e:
                self._fatal(f"cannot terminate the creator: {e}")
            if data:
                self._fatal(f"creator sent {data!r} instead of closing after 'T'")
            self._dead = "terminated"
            self._sock.close()
            reap(self._proc, self._timeout)

    close = terminate

    def __enter__(self) -> SocketCreator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()

    def __repr__(self) -> str:
        state = self._dead or "ready"
        return f"<SocketCreator pid={self.pid} {state}>"
