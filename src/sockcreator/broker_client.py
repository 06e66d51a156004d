"""Clients of the broker (``sockcreator serve``): :class:`Broker` and :class:`AsyncBroker`.

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

import array
import asyncio
import collections
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn, Union

from ._broker_protocol import (
    MAX_BODY,
    AnswerDecoder,
    BrokerMessage,
    BrokerProtocolError,
    Denied,
    Fatal,
    FatalCode,
    Granted,
    Hello,
    HelloReply,
    Reason,
    Release,
    Released,
    ShareMode,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    StatusQuery,
    check_name,
)
from ._channel import RECV_FLAGS, SEND_FLAGS, close_fds, set_kernel_timeouts, unpack_fds
from ._errors import CreatorError, CreatorFatalError, errno_error
from ._protocol import (
    AddressSpec,
    ProtocolSpec,
    ProtocolViolation,
    Request,
    SocketOptions,
    make_request,
)
from .policy import parse_listen

__all__ = [
    "ENV_BROKER_FD",
    "AsyncBroker",
    "Broker",
    "BrokerFatalError",
    "HeldSocket",
    "SocketRefusedError",
    "get_listen_sockets",
]

#: Environment variable naming an inherited broker connection.
ENV_BROKER_FD = "SOCKCREATOR_BROKER_FD"

_ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_CTRUNC = int(socket.MSG_CTRUNC)
_READ = 3 + MAX_BODY  # the longest frame: one read takes any answer whole
_PROTO = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
_kernel_family = socket.SocketType.family.__get__
_kernel_type = socket.SocketType.type.__get__
_ID = struct.Struct("!I")
_RELEASE = struct.Struct("!cHIQ")  # a whole 'R' frame
_TEMPLATES = 256  # requests remembered, encoded (then forgotten all at once)
ShareSpec = Union[ShareMode, str]


class SocketRefusedError(CreatorError, OSError):
    """The broker refused: ``errno`` says how (EPERM, EBUSY, or the kernel's),
    ``reason`` (a :class:`~sockcreator._broker_protocol.Reason`) says why."""

    reason: Reason
    request: Request | None

    def __str__(self) -> str:
        what = f" for {self.request}" if self.request is not None else ""
        return f"[Errno {self.errno}] {self.strerror}: refused ({self.reason.name.lower()}){what}"


def _refused(err: int, reason: Reason, request: Request | None) -> SocketRefusedError:
    e = errno_error(SocketRefusedError, err)
    e.reason = reason
    e.request = request
    return e


class BrokerFatalError(CreatorFatalError):
    """The broker is gone or broke the protocol; ``code`` is its ``X`` code."""

    def __init__(self, message: str, *, code: FatalCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class HeldSocket:
    """One grant of one held socket, as ``status`` lists it."""

    grant: int
    request: Request
    share: ShareMode
    name: str
    backlog: int | None
    uid: int
    gid: int
    pid: int

    def __str__(self) -> str:
        listen = "-" if self.backlog is None else str(self.backlog)
        name = self.name or "-"
        return (
            f"{self.request} backlog={listen} grant={self.grant} share={self.share.name} "
            f"name={name} uid={self.uid} gid={self.gid} pid={self.pid}"
        )


def _share(share: ShareSpec) -> ShareMode:
    if isinstance(share, ShareMode):
        return share
    if isinstance(share, str):
        try:
            return ShareMode[share.upper()]
        except KeyError:
            raise ValueError(f"share must be NO, SAMEAPP or ANY, not {share!r}") from None
    raise TypeError(f"share must be a ShareMode or str, not {type(share).__name__}")


def build_request(
    rid: int,
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
) -> SocketRequest:
    """Validate a request before anything is sent (ValueError/TypeError)."""
    options = SocketOptions(0)
    if reuseport:
        options |= SocketOptions.REUSEPORT
    if not v6only:
        options |= SocketOptions.DUALSTACK
    if freebind:
        options |= SocketOptions.FREEBIND
    request = make_request(protocol, address, port, options=options)
    mode = _share(share)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    check_name(name)
    if mode is ShareMode.SAMEAPP and not name:
        raise ValueError("SAMEAPP needs a share name")
    if backlog is not None:
        if not isinstance(backlog, int) or isinstance(backlog, bool):
            raise TypeError(f"backlog must be an int or None, not {type(backlog).__name__}")
        if not 0 <= backlog <= 65535:
            raise ValueError(f"backlog must be in 0..65535, not {backlog}")
        if request.type != socket.SOCK_STREAM:
            raise ValueError("only TCP sockets listen: backlog must be None for UDP")
    return SocketRequest(rid, request, mode, name, backlog)


class _Template:
    """A checked request, encoded but for its id."""

    __slots__ = ("head", "request", "tail")

    def __init__(self, m: SocketRequest) -> None:
        frame = m.encode()
        self.request = m.request
        self.head = frame[:3]
        self.tail = frame[7:]

    def frame(self, rid: int) -> bytes:
        return self.head + _ID.pack(rid) + self.tail


_templates: dict[tuple[object, ...], _Template] = {}
_ADDRESS_TYPES = (str, ipaddress.IPv4Address, ipaddress.IPv6Address)


def _template(
    protocol: ProtocolSpec,
    address: AddressSpec,
    port: int,
    share: ShareSpec,
    name: str,
    reuseport: bool,
    v6only: bool,
    freebind: bool,
    backlog: int | None,
) -> _Template:
    """:func:`build_request`, remembered for arguments of exactly the plain
    types (so that, say, ``True`` is never taken for port 1, nor a str
    subclass for a str: those are checked anew every time)."""
    key: tuple[object, ...] = ()
    if (
        type(port) is int
        and type(protocol) in (str, int)
        and type(address) in _ADDRESS_TYPES
        and type(name) is str
        and (backlog is None or type(backlog) is int)
        and type(share) in (str, ShareMode)
    ):
        key = (protocol, address, port, share, name, not reuseport, not v6only, not freebind,
               backlog)  # fmt: skip
        t = _templates.get(key)
        if t is not None:
            return t
    m = build_request(
        0,
        protocol,
        address,
        port,
        share=share,
        name=name,
        reuseport=reuseport,
        v6only=v6only,
        freebind=freebind,
        backlog=backlog,
    )
    t = _Template(m)
    if key:
        if len(_templates) >= _TEMPLATES:
            _templates.clear()
        _templates[key] = t
    return t


def _fds(anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """:func:`~sockcreator._channel.unpack_fds`, a violation being the broker's."""
    try:
        return unpack_fds(anc, flags)
    except ProtocolViolation as e:
        raise BrokerProtocolError(str(e)) from None


def _adopt(g: Granted, request: Request | None) -> socket.socket:
    """The granted socket, checked against what the broker said it is and
    what was asked for: the broker is trusted to decide, not to be right.
    Family and type come from the kernel (the socket object asks it:
    getsockname and SO_TYPE), the address from getsockname()."""
    try:  # (the protocol is not asked: a wrong type is refused below anyway)
        sock = socket.socket(-1, -1, _PROTO.get(g.type, 0), fileno=g.fd)
    except OSError as e:  # EBADF, ENOTSOCK: not a socket at all
        os.close(g.fd)
        raise BrokerProtocolError(f"granted descriptor is not a socket: {e}") from None
    try:
        family, kind = _kernel_family(sock), _kernel_type(sock)
        try:
            name = sock.getsockname()
        except OSError as e:
            raise BrokerProtocolError(f"granted descriptor is not usable: {e}") from None
        host, port = name[:2] if isinstance(name, tuple) and len(name) >= 2 else ("", -1)
        try:
            packed = socket.inet_pton(family, host)
        except (OSError, TypeError, ValueError):
            packed = b""
        if (
            family != g.family
            or kind != g.type
            or packed != g.address.packed
            or port != g.port
            or (
                request is not None
                and (
                    request.type != g.type
                    or request.address != g.address
                    or (request.port != 0 and request.port != port)
                )
            )
        ):
            raise BrokerProtocolError(
                f"granted {family}/{kind} {host} {port}, said "
                f"{g.family}/{g.type} {g.address} {g.port}, asked for {request}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def _status(entries: list[StatusEntry]) -> list[HeldSocket]:
    return [
        HeldSocket(e.grant, e.request, e.share, e.name, e.backlog, e.uid, e.gid, e.pid)
        for e in entries
    ]


def _expected(kind: str, msg: BrokerMessage) -> bool:
    if kind == "request":
        return isinstance(msg, (Granted, Denied))
    if kind == "release":
        return isinstance(msg, (Released, Denied))
    return isinstance(msg, (StatusEntry, StatusEnd, Denied))


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
        self._lock = threading.Lock()
        self._decoder = AnswerDecoder()
        self._later: collections.deque[BrokerMessage] = collections.deque()  # read, not taken
        self._next_id = 1
        self._held: dict[socket.socket, int] = {}
        self._dead: str | None = None
        self.max_held = 0
        self.max_pending = 0
        try:
            self._sock.sendall(Hello().encode())
            reply = self._read()
        except OSError as e:
            self._fatal(f"cannot greet the broker: {e}")
        if not isinstance(reply, HelloReply):
            self._fatal(f"the broker answered the hello with {reply!r}")
        self.max_held, self.max_pending = reply.max_held, reply.max_pending

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
    ) -> socket.socket:
        """A bound socket (listening if ``backlog`` is given), non-inheritable.

        ``share``: NO, SAMEAPP (with ``name``) or ANY; ``reuseport``,
        ``v6only`` and ``freebind`` are set before bind.  Raises
        :class:`SocketRefusedError` if refused."""
        with self._lock:
            self._check_alive()
            t = _template(protocol, address, port, share, name, reuseport, v6only, freebind,
                          backlog)  # fmt: skip
            rid = self._next_id
            answer = self._ask(rid, t.frame(rid), "request")[0]
            if isinstance(answer, Denied):
                raise _refused(answer.errno, answer.reason, t.request)
            assert isinstance(answer, Granted)
            try:
                sock = _adopt(answer, t.request)
            except BrokerProtocolError as e:
                self._fatal(str(e))
            self._held[sock] = answer.grant
            return sock

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
        otherwise :class:`SocketRefusedError` with EPERM)."""
        with self._lock:
            self._check_alive()
            answers = self._ask(self._next_id, StatusQuery(self._next_id).encode(), "status")
            if isinstance(answers[-1], Denied):
                raise _refused(answers[-1].errno, answers[-1].reason, None)
            return _status([a for a in answers if isinstance(a, StatusEntry)])

    # Plumbing ----------------------------------------------------------------

    def _ask(self, rid: int, data: bytes, kind: str) -> list[BrokerMessage]:
        self._next_id = rid + 1 if rid < 2**32 - 1 else 1
        try:
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
            if not isinstance(msg, StatusEntry):
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
                self._fatal(f"no answer from the broker within {self._timeout}s")
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

    def _fatal(self, reason: str, code: FatalCode | None = None) -> NoReturn:
        self._dead = reason
        self._drop_later()
        self._sock.close()
        raise BrokerFatalError(reason, code=code)

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
                )
            )
    except BaseException:
        for s in socks:
            s.close()
        broker.close()
        raise
    return broker, socks


# --- asyncio ----------------------------------------------------------------------


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Closed(BrokerProtocolError):
    """The broker sent ``X``: it closes the connection."""


class _Gone(Exception):
    """Wakes a task waiting on the connection when it is closed meanwhile."""


class _Waiter:
    __slots__ = ("answers", "future", "id", "kind", "request", "slot", "sock")

    def __init__(
        self,
        rid: int,
        kind: str,
        fut: asyncio.Future[_Waiter],
        request: Request | None,
        slot: bool,
    ) -> None:
        self.id = rid
        self.kind = kind
        self.future = fut
        self.request = request
        self.slot = slot  # holds one of the max_pending slots until answered
        self.answers: list[BrokerMessage] = []
        self.sock: socket.socket | None = None


class AsyncBroker:
    """asyncio twin of :class:`Broker`: ``async with AsyncBroker(path) as b``,
    or ``b = await AsyncBroker(path).connect()`` and ``await b.close()``.

    Requests from concurrent tasks are pipelined; one reader task hands the
    answers out in order.  A request counts against ``max_pending`` until its
    answer arrives, whether or not anyone still waits for it.

    Cancellation: a cancelled :meth:`request_socket` never leaves a socket
    open nor a grant held, wherever it lands (before the frame is queued:
    nothing was asked; after: the socket that arrives, or had arrived but
    was not yet returned, is closed and its grant released).  A cancelled
    :meth:`release_socket` still releases.  A frame is always written whole
    (a writer task finishes what the socket does not take at once), so
    cancelling never puts the connection out of step."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self._path = os.fspath(path)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = AnswerDecoder()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._lock = asyncio.Lock()  # held while a frame is written (_queue, then _write_rest)
        self._writer: asyncio.Task[None] | None = None
        self._io_waits: set[asyncio.Future[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 1
        self._held: dict[socket.socket, int] = {}
        self._dead: str | None = None
        self._slots: asyncio.Semaphore | None = None  # max_pending, once known
        self._background: set[asyncio.Task[None]] = set()
        self.max_held = 0
        self.max_pending = 0

    async def connect(self) -> AsyncBroker:
        if self._sock is not None:
            raise RuntimeError("already connected")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self._path), self._timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            reply = (await self._ask(0, Hello().encode(), "hello")).answers[0]
        except BaseException as e:  # cancelled too: the handle must not stay half open
            self._fail(f"connect stopped: {e!r}")
            raise
        assert isinstance(reply, HelloReply)  # checked by the reader
        self.max_held, self.max_pending = reply.max_held, reply.max_pending
        self._slots = asyncio.Semaphore(max(1, reply.max_pending))
        return self

    async def request_socket(
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
    ) -> socket.socket:
        """See :meth:`Broker.request_socket`."""
        rid = self._take_id()
        m = build_request(
            rid,
            protocol,
            address,
            port,
            share=share,
            name=name,
            reuseport=reuseport,
            v6only=v6only,
            freebind=freebind,
            backlog=backlog,
        )
        w = await self._ask(rid, m.encode(), "request", m.request)
        answer = w.answers[0]
        if isinstance(answer, Denied):
            raise _refused(answer.errno, answer.reason, m.request)
        assert isinstance(answer, Granted) and w.sock is not None
        self._held[w.sock] = answer.grant
        return w.sock

    def grant_of(self, sock: socket.socket) -> int:
        return self._held[sock]

    async def release_socket(self, sock: socket.socket) -> None:
        """See :meth:`Broker.release_socket`."""
        grant = self._held.pop(sock)
        sock.close()
        await self._release(grant, hand_off=True)

    async def _release(self, grant: int, *, hand_off: bool = False) -> None:
        """Release ``grant``.  ``hand_off``: cancelled before the frame was
        queued, the release is still made, by a background task."""
        rid = self._take_id()
        try:
            w = await self._queue(rid, Release(rid, grant).encode(), "release")
        except asyncio.CancelledError:
            if hand_off:
                self._release_later(grant)
            raise
        answer = (await self._answer(w)).answers[0]
        if isinstance(answer, Denied):
            raise _refused(answer.errno, answer.reason, None)

    async def status(self) -> list[HeldSocket]:
        """See :meth:`Broker.status`."""
        rid = self._take_id()
        answers = (await self._ask(rid, StatusQuery(rid).encode(), "status")).answers
        if isinstance(answers[-1], Denied):
            raise _refused(answers[-1].errno, answers[-1].reason, None)
        return _status([a for a in answers if isinstance(a, StatusEntry)])

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1 if rid < 2**32 - 1 else 1
        return rid

    async def _ask(
        self, rid: int, data: bytes, kind: str, request: Request | None = None
    ) -> _Waiter:
        """Send, and wait for the answer; never more than max_pending at once."""
        return await self._answer(await self._queue(rid, data, kind, request))

    async def _queue(
        self, rid: int, data: bytes, kind: str, request: Request | None = None
    ) -> _Waiter:
        """Take a max_pending slot, queue a waiter and write its frame.  The
        only suspensions (where a cancellation lands) come before anything is
        queued; the frame is written whole (see :meth:`_write`)."""
        slots = self._slots  # None for the hello
        if slots is not None:
            await slots.acquire()
        try:
            await self._lock.acquire()
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        try:
            sock = self._usable()
        except BaseException:
            self._lock.release()
            if slots is not None:
                slots.release()
            raise
        loop = asyncio.get_running_loop()
        w = _Waiter(rid, kind, loop.create_future(), request, slots is not None)
        self._waiters.append(w)
        if self._reader is None:
            self._reader = loop.create_task(self._read_loop())
        self._write(sock, data)
        return w

    async def _answer(self, w: _Waiter) -> _Waiter:
        """Wait for ``w``'s answer.  Given up on (cancelled), the socket it
        brings is closed and its grant released: by the reader if it has not
        arrived yet, here if it has arrived but we had not resumed yet."""
        try:
            return await w.future
        except BaseException:
            if not w.future.done():
                w.future.cancel()  # _dispatch closes and releases what comes
            elif w.sock is not None and not w.future.cancelled():
                sock, w.sock = w.sock, None
                sock.close()
                answer = w.answers[0]
                assert isinstance(answer, Granted)
                self._release_later(answer.grant)
            raise

    def _write(self, sock: socket.socket, data: bytes) -> None:
        """Write a frame, holding the lock: at once if the socket takes it
        all (releasing the lock), else by a writer task that finishes it."""
        try:
            n = sock.send(data, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._lock.release()
            self._fail(f"cannot write to the broker: {e!r}")  # every waiter's error
            return
        if n < len(data):
            self._writer = asyncio.get_running_loop().create_task(self._write_rest(sock, data[n:]))
        else:
            self._lock.release()

    async def _write_rest(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[sock.send(view, SEND_FLAGS) :]
                except (BlockingIOError, InterruptedError):
                    try:
                        await self._wait_io(sock, write=True)
                    except asyncio.TimeoutError:
                        raise BrokerProtocolError(
                            f"the broker took nothing within {self._timeout}s"
                        ) from None
        except _Gone:
            pass  # closed meanwhile: whoever closed it answered the waiters
        except Exception as e:  # OSError, BrokerProtocolError
            self._fail(f"cannot write to the broker: {e!r}")
        except BaseException as e:  # cancelled (the loop is closing): out of step now
            self._fail(f"writer stopped mid-frame: {e!r}")
            raise
        finally:
            self._writer = None
            self._lock.release()

    async def _wait_io(self, sock: socket.socket, *, write: bool) -> None:
        """Until ``sock`` is ready; TimeoutError, or _Gone if closed meanwhile."""
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()
        (loop.add_writer if write else loop.add_reader)(fd, _wake, ready)
        self._io_waits.add(ready)
        try:
            await asyncio.wait_for(ready, self._timeout)
        finally:
            self._io_waits.discard(ready)
            if sock.fileno() == fd:  # else _close_sock removed it before closing
                (loop.remove_writer if write else loop.remove_reader)(fd)

    def _close_sock(self) -> None:
        """Close the connection, first waking (with _Gone) and unregistering
        every task waiting on it, so that no selector entry outlives the fd."""
        sock = self._sock
        if sock is None or sock.fileno() == -1:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (not in a loop: nothing can be registered)
            pass
        else:
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
        for ready in self._io_waits:
            if not ready.done():
                ready.set_exception(_Gone())
        sock.close()

    def _retire(self, w: _Waiter) -> None:
        """``w`` left the queue (answered or failed): its slot is free."""
        if w.slot and self._slots is not None:
            w.slot = False
            self._slots.release()

    def _release_later(self, grant: int) -> None:
        """Release a grant nobody took, in the background (nothing to do once
        the connection is gone: that ended every grant)."""
        if self._dead is not None:
            return
        task = asyncio.get_running_loop().create_task(self._release_quietly(grant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _usable(self) -> socket.socket:
        if self._dead is not None:
            raise BrokerFatalError(f"broker connection unusable: {self._dead}")
        if self._sock is None:
            raise RuntimeError("not connected: use 'async with' or await connect()")
        return self._sock

    async def _recv(self, sock: socket.socket) -> tuple[bytes, list[int]]:
        while True:
            try:
                data, anc, flags, _ = sock.recvmsg(
                    self._decoder.bytes_wanted(), _ANCBUF, RECV_FLAGS
                )
                return data, _fds(anc, flags)
            except (BlockingIOError, InterruptedError):
                pass
            except ConnectionResetError:
                return b"", []
            try:
                await self._wait_io(sock, write=False)
            except asyncio.TimeoutError:
                raise BrokerProtocolError(
                    f"no answer from the broker within {self._timeout}s"
                ) from None

    async def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while self._waiters and self._dead is None:  # (a failed write: nothing to read)
                data, fds = await self._recv(sock)
                if not data:
                    close_fds(fds)
                    raise BrokerProtocolError("the broker closed the connection")
                try:
                    messages = self._decoder.feed(data, fds)
                except BrokerProtocolError as e:
                    close_fds(e.fds)
                    raise
                for msg in messages:
                    self._dispatch(msg)
        except BrokerProtocolError as e:
            self._fail(str(e), e.code if isinstance(e, _Closed) else None)
        except _Gone:
            pass  # closed meanwhile: whoever closed it answered the waiters
        except BaseException as e:
            self._fail(f"reader stopped: {e!r}")
            raise
        finally:
            self._reader = None

    def _dispatch(self, msg: BrokerMessage) -> None:
        if isinstance(msg, Fatal):
            raise _Closed(f"the broker closed the connection: {msg.text}", msg.code)
        w = self._waiters[0]
        if w.kind == "hello":
            ok = isinstance(msg, HelloReply)
        else:
            ok = _expected(w.kind, msg) and getattr(msg, "id", -1) == w.id
        if not ok:
            if isinstance(msg, Granted):
                os.close(msg.fd)
            raise BrokerProtocolError(f"unexpected answer {msg!r} to {w.kind} {w.id}")
        w.answers.append(msg)
        if isinstance(msg, StatusEntry):
            return
        # _adopt may raise: w is still queued then, and _fail hands it the error.
        sock = _adopt(msg, w.request) if isinstance(msg, Granted) else None
        self._waiters.popleft()
        self._retire(w)
        if isinstance(msg, Granted) and sock is not None:
            if w.future.done():  # its waiter was cancelled: give the grant back
                sock.close()
                self._release_later(msg.grant)
                return
            w.sock = sock
        if not w.future.done():
            w.future.set_result(w)

    async def _release_quietly(self, grant: int) -> None:
        try:
            await self._release(grant)
        except (BrokerFatalError, OSError):
            pass

    def _fail(self, reason: str, code: FatalCode | None = None) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._close_sock()
        self._drop_waiters(BrokerFatalError(reason, code=code))

    def _drop_waiters(self, err: BrokerFatalError) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            self._retire(w)
            if not w.future.done():
                w.future.set_exception(err)

    async def close(self) -> None:
        """Close the connection (the broker releases every grant).  Idempotent."""
        self._held.clear()
        if self._dead is None:
            self._dead = "closed"
            self._close_sock()  # the reader and any writer end (on _Gone)
            self._drop_waiters(BrokerFatalError("connection closed"))
            reader = self._reader
            if reader is not None:
                await asyncio.wait([reader])

    async def __aenter__(self) -> AsyncBroker:
        if self._sock is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncBroker {self._dead or 'ready'}, {len(self._held)} held>"
