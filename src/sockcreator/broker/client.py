"""The blocking client of the broker (``sockcreator serve``): :class:`Broker`
(the asyncio one, :class:`~.aio.AsyncBroker`, is in :mod:`.aio`).

::

    with Broker("/run/sockcreator/broker.sock") as broker:
        sock = broker.request_socket("tcp", "0.0.0.0", 80, backlog=128,
                                     share="SAMEAPP", name="web")
        ...
        broker.release_socket(sock)

A grant lasts until it is released or the connection closes (so when this
process exits, however it exits, its grants end).  Errors say who is at
fault: :class:`SocketRefusedError` (an OSError with the errno: EPERM for the
policy, EBUSY for a share conflict, the kernel's for a failed socket()/bind())
when the broker said no; :class:`BrokerFatalError` when the broker is gone
or broke the protocol (the handle is dead afterwards); ValueError/TypeError
for bad arguments, before anything is sent.
"""

from __future__ import annotations

import _thread  # (threading.Lock is _thread.allocate_lock: no threading import)
import collections
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from types import TracebackType

from ..client._channel import RECV_FLAGS, close_fds, set_kernel_timeouts
from ..client._protocol import (
    AddressSpec,
    ProtocolSpec,
)
from ..client.specs import parse_listen
from ._clientlib import (
    _ANCBUF,
    _CTRUNC,
    _READ,
    _RELEASE,
    ENV_BROKER_FD,
    BrokerFatalError,
    HeldSocket,
    ShareSpec,
    SocketRefusedError,
    _adopt,
    _expected,
    _fds,
    _refused,
    _status,
    _template,
    build_request,
)
from ._protocol import (
    AnswerDecoder,
    BindCounts,
    BindFrame,
    BrokerMessage,
    BrokerProtocolError,
    Denied,
    Fatal,
    FatalCode,
    Granted,
    Hello,
    HelloReply,
    Reason,
    ShareMode,
    StatusEntry,
    StatusQuery,
    lingering,
)

_INT = struct.Struct("@i")

TYPE_CHECKING = False  # (not typing's: no typing at run time)
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = [
    "ENV_BROKER_FD",
    "Broker",
    "BrokerFatalError",
    "HeldSocket",
    "Reason",
    "SocketRefusedError",
    "build_request",
    "get_listen_sockets",
]


class Broker:
    """A blocking connection to the broker at ``path``.  Thread-safe.

    ``timeout`` bounds how long the broker may stay silent.  ``max_held`` and
    ``max_pending`` are the broker's per-connection limits (from its hello)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            set_kernel_timeouts(sock, timeout)
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        self._setup(sock, timeout)

    def _setup(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._lock = _thread.allocate_lock()
        self._decoder = AnswerDecoder()
        self._later: collections.deque[BrokerMessage] = collections.deque()  # read, not taken
        self._next_id = 1
        self._held: dict[socket.socket, int] = {}
        self._dead: str | None = None
        self.max_held = 0
        self.max_pending = 0
        self.version = 0  # the protocol version spoken (2: bind_socket() works)
        #: (bound, refused) client sockets, as of the last status() (version 2)
        self.binds: tuple[int, int] | None = None
        try:
            self._sock.sendall(Hello().encode())
            reply = self._read()
        except OSError as e:
            self._fatal(f"cannot greet the broker: {e}")
        if not isinstance(reply, HelloReply):
            self._fatal(f"the broker answered the hello with {reply!r}")
        self.max_held, self.max_pending = reply.max_held, reply.max_pending
        self.version = reply.version

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float = 10.0) -> Broker:
        """Use an already connected socket (the handle then owns it)."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("a broker connection is a Unix stream socket")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        set_kernel_timeouts(sock, timeout)
        self = cls.__new__(cls)
        self._setup(sock, timeout)
        return self

    @classmethod
    def from_environment(cls, *, timeout: float = 10.0) -> Broker | None:
        """The connection ``sockcreator run --broker`` passed us, or None.

        Reads and unsets ``SOCKCREATOR_BROKER_FD``; the descriptor is made
        close-on-exec.  The hello is sent again: the broker answers each."""
        value = os.environ.pop(ENV_BROKER_FD, None)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or int(value) < 3:
            raise ValueError(f"{ENV_BROKER_FD}={value!r} is not a descriptor number >= 3")
        try:
            sock = socket.socket(fileno=int(value))
        except OSError as e:
            raise ValueError(f"{ENV_BROKER_FD}={value} is not a socket: {e}") from None
        sock.set_inheritable(False)
        try:
            return cls.from_socket(sock, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    # The requests ------------------------------------------------------------

    def request_socket(
        self,
        protocol: ProtocolSpec,
        address: AddressSpec,
        port: int,
        *,
        share: ShareSpec = ShareMode.NO,
        name: str = "",
        reuseport: bool = False,
        v6only: bool = True,
        freebind: bool = False,
        backlog: int | None = None,
        linger: float | None = None,
    ) -> socket.socket:
        """A bound socket (listening if ``backlog`` is given), non-inheritable.

        ``share``: NO, SAMEAPP (with ``name``) or ANY; ``reuseport``,
        ``v6only`` and ``freebind`` are set before bind.  ``linger``: seconds
        the broker keeps the socket open if this grant is its last to end
        (capped by the broker's ``--max-linger``; None: its ``--linger``).
        Raises :class:`SocketRefusedError` if refused."""
        with self._lock:
            self._check_alive()
            t = _template(protocol, address, port, share, name, reuseport, v6only, freebind,
                          backlog)  # fmt: skip
            rid = self._next_id
            frame = t.frame(rid)
            if linger is not None:
                if self.version < 2:
                    raise _refused(errno.EOPNOTSUPP, Reason.UNAVAILABLE, t.request)
                frame = lingering(frame, linger)  # (ValueError out of range)
            answer = self._ask(rid, frame, "request")[0]
            if isinstance(answer, Denied):
                raise _refused(answer.errno, answer.reason, t.request)
            assert isinstance(answer, Granted)
            try:
                sock = _adopt(answer, t.request)
            except BrokerProtocolError as e:
                self._fatal(str(e))
            self._held[sock] = answer.grant
            return sock

    def bind_socket(self, sock: socket.socket | int, address: AddressSpec, port: int) -> None:
        """Have the broker bind your own socket ``sock`` (AF_INET/AF_INET6,
        TCP or UDP, not bound yet) to ``address``:``port``, if its policy lets
        you: the creator binds it, and every option you set stays.  This is
        what ``sockcreator run --broker --intercept`` does for each
        privileged bind().  Raises :class:`SocketRefusedError`: EPERM
        (policy), bind()'s own errno (``Reason.BIND``: EADDRINUSE, EINVAL...),
        another for a descriptor that is not such a socket (``Reason.SOCKET``)."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        if fd < 0:
            raise ValueError("a closed socket")
        if not 0 <= port <= 65535:
            raise ValueError(f"bad port {port}")
        with self._lock:
            self._check_alive()
            if self.version < 2:
                raise _refused(errno.EOPNOTSUPP, Reason.UNAVAILABLE, None)  # (a version 1 broker)
            rid = self._next_id
            frame = BindFrame(rid, addr, port).encode()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _INT.pack(fd))]
            answer = self._ask(rid, frame, "bind", rights)[0]
            if isinstance(answer, Denied):
                raise _refused(answer.errno, answer.reason, None)

    def grant_of(self, sock: socket.socket) -> int:
        """The grant id of a socket this handle received (KeyError if none)."""
        return self._held[sock]

    def release_socket(self, sock: socket.socket) -> None:
        """Close ``sock`` and end its grant (the cached socket closes with its
        last holder).  KeyError if this handle did not grant it."""
        with self._lock:
            self._check_alive()
            grant = self._held.pop(sock)
            sock.close()
            rid = self._next_id
            answer = self._ask(rid, _RELEASE.pack(b"R", 12, rid, grant), "release")
            if isinstance(answer[0], Denied):
                raise _refused(answer[0].errno, answer[0].reason, None)

    def status(self) -> list[HeldSocket]:
        """Every grant of every held socket (root or the admin group only:
        otherwise :class:`SocketRefusedError` with EPERM).  The same answer
        also says how many client sockets the broker has bound and refused
        (``bind_socket``, ``run --broker --intercept``): :attr:`binds`."""
        with self._lock:
            self._check_alive()
            answers = self._ask(self._next_id, StatusQuery(self._next_id).encode(), "status")
            if isinstance(answers[-1], Denied):
                raise _refused(answers[-1].errno, answers[-1].reason, None)
            for a in answers:
                if isinstance(a, BindCounts):
                    self.binds = (a.bound, a.refused)
            return _status([a for a in answers if isinstance(a, StatusEntry)])

    # Plumbing ----------------------------------------------------------------

    def _ask(
        self, rid: int, data: bytes, kind: str, rights: list[tuple[int, int, bytes]] | None = None
    ) -> list[BrokerMessage]:
        self._next_id = rid + 1 if rid < 2**32 - 1 else 1
        try:
            if rights:  # one sendmsg: the descriptor goes with the frame's bytes
                n = self._sock.sendmsg([data], rights)
                if n < len(data):
                    self._sock.sendall(data[n:])
            else:
                self._sock.sendall(data)
        except OSError as e:
            self._fatal(f"cannot write to the broker: {e}")
        out: list[BrokerMessage] = []
        while True:
            msg = self._read()
            if not _expected(kind, msg) or getattr(msg, "id", rid) != rid:
                if isinstance(msg, Granted):
                    os.close(msg.fd)
                self._fatal(f"unexpected answer {msg!r} to {kind} {rid}")
            out.append(msg)
            if not isinstance(msg, (StatusEntry, BindCounts)):
                return out

    def _read(self) -> BrokerMessage:
        """The next frame.  One request is outstanding at a time, so reads
        need not stop at frame boundaries (see AnswerDecoder.feed_any): one
        ``recvmsg`` takes a whole answer."""
        if self._later:
            return self._take(self._later.popleft())
        while True:
            try:
                data, anc, flags, _ = self._sock.recvmsg(_READ, _ANCBUF, RECV_FLAGS)
            except BlockingIOError:  # SO_RCVTIMEO expired
                self._fatal(f"no answer from the broker within {self._timeout}s", timed_out=True)
            except ConnectionResetError:
                data, anc, flags = b"", [], 0
            except OSError as e:
                self._fatal(f"cannot read from the broker: {e}")
            fds: list[int] = []
            if anc or flags & _CTRUNC:
                try:
                    fds = _fds(anc, flags)
                except BrokerProtocolError as e:
                    self._fatal(str(e))
            if not data:
                close_fds(fds)
                self._fatal("the broker closed the connection")
            try:
                messages = self._decoder.feed_any(data, fds)
            except BrokerProtocolError as e:
                close_fds(e.fds)
                self._fatal(str(e))
            if messages:
                self._later.extend(messages[1:])
                return self._take(messages[0])

    def _take(self, msg: BrokerMessage) -> BrokerMessage:
        if isinstance(msg, Fatal):
            self._fatal(f"the broker closed the connection: {msg.text}", msg.code)
        return msg

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise BrokerFatalError(f"broker connection unusable: {self._dead}")

    def _fatal(
        self, reason: str, code: FatalCode | None = None, *, timed_out: bool = False
    ) -> NoReturn:
        self._dead = reason
        self._drop_later()
        self._sock.close()
        raise BrokerFatalError(reason, code=code, timed_out=timed_out)

    def _drop_later(self) -> None:
        """Close the descriptors of answers read but never taken."""
        close_fds([m.fd for m in self._later if isinstance(m, Granted)])
        self._later.clear()

    def fileno(self) -> int:
        return self._sock.fileno()

    def detach(self) -> int:
        """Give up the connection's descriptor (the grants stay with it)."""
        with self._lock:
            self._check_alive()
            self._dead = "detached"
            return self._sock.detach()

    def close(self) -> None:
        """Close the connection: the broker releases every grant.  The
        sockets already received stay open until closed.  Idempotent."""
        with self._lock:
            self._held.clear()  # the sockets are the caller's: only forget them
            if self._dead is None:
                self._dead = "closed"
                self._drop_later()
                self._sock.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Broker {self._dead or 'ready'}, {len(self._held)} held>"


def get_listen_sockets(
    path: str | os.PathLike[str],
    specs: Sequence[str],
    *,
    backlog: int = socket.SOMAXCONN,
    share: ShareSpec = ShareMode.NO,
    name: str = "",
    timeout: float = 10.0,
    linger: float | None = None,
) -> tuple[Broker, list[socket.socket]]:
    """For ``sockcreator run --broker PATH --listen SPEC...``: connect, and
    get one socket per ``tcp|udp:ADDR:PORT`` spec (TCP ones listening).

    All or nothing: on any failure the sockets received are closed, the
    connection too, and the error raised (ValueError for a bad spec,
    :class:`SocketRefusedError`, :class:`BrokerFatalError`, OSError from
    connect).  Keep the returned :class:`Broker` open (or pass its
    descriptor on, e.g. as ``SOCKCREATOR_BROKER_FD``) for as long as the
    sockets are in use: closing it ends the grants."""
    requests = [parse_listen(s) for s in specs]
    broker = Broker(path, timeout=timeout)
    socks: list[socket.socket] = []
    try:
        for r in requests:
            socks.append(
                broker.request_socket(
                    r.type,
                    r.address,
                    r.port,
                    share=share,
                    name=name,
                    backlog=backlog if r.type == socket.SOCK_STREAM else None,
                    linger=linger,
                )
            )
    except BaseException:
        for s in socks:
            s.close()
        broker.close()
        raise
    return broker, socks


# --- asyncio ----------------------------------------------------------------------
