"""The blocking client: a thin shell over :mod:`sockcreator.client._protocol`."""

from __future__ import annotations

import _thread  # (threading.Lock is _thread.allocate_lock: no threading import)
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType

from ._channel import (
    ANCBUFSIZE,
    RECV_FLAGS,
    SEND_FLAGS,
    RequestSpec,
    adopt,
    close_fds,
    creator_argv,
    descriptor_lost,
    descriptor_lost_error,
    normalize,
    reap,
    request_of,
    set_kernel_timeouts,
    spawn,
    unpack_fds,
)
from ._errors import CreatorFatalError, socket_creation_error
from ._protocol import (
    AddressSpec,
    AnswerParser,
    DescriptorLost,
    Event,
    ProtocolSpec,
    ProtocolViolation,
    Request,
    SocketReceived,
)

TYPE_CHECKING = False  # (not typing's: no typing at run time)
if TYPE_CHECKING:
    import subprocess
    from typing import NoReturn

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
        if isinstance(command, (str, bytes)):
            raise TypeError("command is an argv list, not a string")
        if command is not None and not command:
            raise ValueError("command is an empty argv")
        if not timeout > 0:  # before spawning: a bad argument must not leave a child
            raise ValueError("timeout must be positive")
        argv = creator_argv(allow=allow, user=user, harden=harden) if command is None else command
        sock, proc = spawn(argv)
        self._setup(sock, proc, timeout)

    def _setup(
        self, sock: socket.socket, proc: subprocess.Popen[bytes] | None, timeout: float
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        set_kernel_timeouts(sock, timeout)
        self._sock = sock
        self._proc = proc
        self._timeout = timeout
        self._lock = _thread.allocate_lock()
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
        try:
            sock = socket.socket(fileno=fd)  # EBADF/ENOTSOCK: not an open socket
        except (OSError, OverflowError) as e:
            raise ValueError(f"{ENV_FD}={fd} is not a socket: {e}") from None
        sock.set_inheritable(False)
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
        return self._transact([request_of(protocol, address, port)])[0]

    def get_sockets(self, requests: Iterable[RequestSpec]) -> list[socket.socket]:
        """Many sockets, pipelined in one write.  All or nothing: on any
        failure the ones received are closed and the first failure raised."""
        return self._transact(normalize(requests))

    #: Requests in flight at once.  A batch is sent in windows of this many,
    #: each window's answers read before the next is sent: a huge batch
    #: written all at once would deadlock against a creator blocked on
    #: writing answers that nobody reads yet.
    WINDOW = 512

    def _transact(self, reqs: list[Request]) -> list[socket.socket]:
        if not reqs:
            return []
        got: list[socket.socket] = []
        failures: list[OSError] = []
        with self._lock:
            self._check_alive()
            try:
                n, parser = len(reqs), self._parser
                for start in range(0, n, self.WINDOW):
                    window = reqs if n <= self.WINDOW else reqs[start : start + self.WINDOW]
                    if len(window) == 1:  # get_socket()
                        parser.expect(window[0])
                        data = window[0].encode()
                    else:
                        for r in window:
                            parser.expect(r)
                        data = b"".join([r.encode() for r in window])
                    try:
                        self._sock.sendall(data, SEND_FLAGS)
                    except OSError as e:
                        self._fatal(f"cannot write to the creator: {e}", self._last_words())
                    self._collect(got, failures)
            except BaseException as e:
                for s in got:
                    s.close()
                if self._dead is None:  # interrupted (Ctrl-C) mid-answer: out of step
                    self._kill(f"interrupted while reading answers: {e!r}")
                raise  # the interruption itself, not a CreatorFatalError
        if failures:
            for s in got:
                s.close()
            raise failures[0]
        return got

    def _collect(self, got: list[socket.socket], failures: list[OSError]) -> None:
        """Read answers until none is pending: sockets into ``got``, 'E's into ``failures``."""
        parser = self._parser
        while parser.pending:
            events = self._read_events()
            if not events:  # the 'S' of an answer, say: its descriptor comes next
                continue
            for i, ev in enumerate(events):
                if isinstance(ev, SocketReceived):
                    try:
                        got.append(adopt(ev.fd, ev.request))
                    except ProtocolViolation as e:
                        close_fds(e.fd for e in events[i + 1 :] if isinstance(e, SocketReceived))
                        self._fatal(str(e))
                elif isinstance(ev, DescriptorLost):
                    failures.append(descriptor_lost_error(ev.request))
                else:
                    failures.append(socket_creation_error(ev.errno, ev.stage, ev.request))

    def _read_events(self) -> Sequence[Event | DescriptorLost]:
        try:
            data, anc, flags, _ = self._sock.recvmsg(
                self._parser.bytes_wanted(), ANCBUFSIZE, RECV_FLAGS
            )
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            self._fatal(f"no answer from the creator within {self._timeout}s")
        except ConnectionResetError:
            data, anc, flags = b"", [], 0
        except OSError as e:
            self._fatal(f"cannot read from the creator: {e}")
        fds: list[int] = []
        if anc or flags:  # (most reads carry nothing but data)
            if flags and descriptor_lost(data, anc, flags):  # our table is full, in step
                try:
                    return self._parser.feed_lost_descriptor(data)
                except ProtocolViolation as e:
                    self._fatal(str(e))
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

    def _last_words(self) -> str | None:
        """After a failed write: the 'F' condition the creator sent before
        leaving, if it is still queued (anything else read is discarded)."""
        while True:
            try:
                data, anc, flags, _ = self._sock.recvmsg(
                    self._parser.bytes_wanted() or 1, ANCBUFSIZE, RECV_FLAGS | socket.MSG_DONTWAIT
                )
                fds = unpack_fds(anc, flags)
            except (OSError, ProtocolViolation):
                return None
            if not data:
                close_fds(fds)
                return None
            try:
                events = self._parser.feed(data, fds)
            except ProtocolViolation as e:
                close_fds(fds)
                return e.condition
            close_fds(ev.fd for ev in events if isinstance(ev, SocketReceived))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise CreatorFatalError(f"creator unusable: {self._dead}")

    def _kill(self, reason: str) -> int | None:
        """Close the channel, kill and reap the creator; its exit status."""
        self._dead = reason
        self._sock.close()
        return reap(self._proc, min(1.0, self._timeout))

    def _fatal(self, reason: str, condition: str | None = None) -> NoReturn:
        """:meth:`_kill`, then raise the CreatorFatalError."""
        status = self._kill(reason)
        raise CreatorFatalError(reason, condition=condition, exit_status=status)

    def terminate(self) -> None:
        """Send 'T', wait for EOF, reap.  Idempotent."""
        with self._lock:
            if self._dead is not None:
                return
            try:
                self._sock.sendall(b"T", SEND_FLAGS)
                data = self._sock.recv(1)
            except (TimeoutError, BlockingIOError):
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

    def detach(self) -> socket.socket:
        """Hand the channel over and forget the creator process: no 'T', no
        reaping.  The caller owns the returned socket (blocking, no kernel
        timeouts, non-inheritable); the handle is unusable afterwards.
        ``sockcreator run`` uses this to pass the channel to PROGRAM."""
        with self._lock:
            self._check_alive()
            self._dead = "detached"
            self._proc = None
            sock = self._sock
            zero = struct.pack("@ll", 0, 0)  # struct timeval 0: no timeout
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, zero)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, zero)
            sock.setblocking(True)
            return sock

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
