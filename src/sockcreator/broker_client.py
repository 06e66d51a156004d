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
from ._channel import RECV_FLAGS, close_fds, set_kernel_timeouts, unpack_fds
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


class _Waiter:
    __slots__ = ("answers", "future", "id", "kind", "request", "sock")

    def __init__(
        self, rid: int, kind: str, fut: asyncio.Future[_Waiter], request: Request | None
    ) -> None:
        self.id = rid
        self.kind = kind
        self.future = fut
        self.request = request
        self.answers: list[BrokerMessage] = []
        self.sock: socket.socket | None = None


class AsyncBroker:
    """asyncio twin of :class:`Broker`: ``async with AsyncBroker(path) as b``,
    or ``b = await AsyncBroker(path).connect()`` and ``await b.close()``.

    Requests from concurrent tasks are pipelined; one reader task hands the
    answers out in order.  A request whose waiter is cancelled before its
    socket arrives has the socket released."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self._path = os.fspath(path)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = AnswerDecoder()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._lock = asyncio.Lock()
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
        reply = (await self._ask(0, Hello().encode(), "hello")).answers[0]
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
        await self._release(grant)

    async def _release(self, grant: int) -> None:
        rid = self._take_id()
        answer = (await self._ask(rid, Release(rid, grant).encode(), "release")).answers[0]
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
        if self._slots is None:  # the hello
            return await self._ask_now(rid, data, kind, request)
        async with self._slots:
            return await self._ask_now(rid, data, kind, request)

    async def _ask_now(self, rid: int, data: bytes, kind: str, request: Request | None) -> _Waiter:
        loop = asyncio.get_running_loop()
        async with self._lock:
            sock = self._usable()
            w = _Waiter(rid, kind, loop.create_future(), request)
            self._waiters.append(w)
            try:
                await loop.sock_sendall(sock, data)
            except BaseException as e:
                await self._fail(f"cannot write to the broker: {e!r}")
                raise
            if self._reader is None:
                self._reader = loop.create_task(self._read_loop())
        return await w.future

    def _usable(self) -> socket.socket:
        if self._dead is not None:
            raise BrokerFatalError(f"broker connection unusable: {self._dead}")
        if self._sock is None:
            raise RuntimeError("not connected: use 'async with' or await connect()")
        return self._sock

    async def _recv(self, sock: socket.socket) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
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
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await asyncio.wait_for(ready, self._timeout)
            except asyncio.TimeoutError:
                raise BrokerProtocolError(
                    f"no answer from the broker within {self._timeout}s"
                ) from None
            finally:
                loop.remove_reader(sock.fileno())

    async def _read_loop(self) -> None:
        sock = self._usable()
        try:
            while self._waiters:
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
            await self._fail(str(e), e.code if isinstance(e, _Closed) else None)
        except BaseException as e:
            await self._fail(f"reader stopped: {e!r}")
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
        if isinstance(msg, Granted) and sock is not None:
            if w.future.done():  # its waiter was cancelled: give the grant back
                sock.close()
                task = asyncio.get_running_loop().create_task(self._release_quietly(msg.grant))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return
            w.sock = sock
        if not w.future.done():
            w.future.set_result(w)

    async def _release_quietly(self, grant: int) -> None:
        try:
            await self._release(grant)
        except (BrokerFatalError, OSError):
            pass

    async def _fail(self, reason: str, code: FatalCode | None = None) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        if self._sock is not None:
            self._sock.close()
        err = BrokerFatalError(reason, code=code)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.future.done():
                w.future.set_exception(err)

    async def close(self) -> None:
        """Close the connection (the broker releases every grant).  Idempotent."""
        self._held.clear()
        if self._dead is None:
            self._dead = "closed"
            if self._sock is not None:
                self._sock.close()
            reader = self._reader
            if reader is not None:
                reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, BrokerFatalError):
                    pass
            err = BrokerFatalError("connection closed")
            while self._waiters:
                w = self._waiters.popleft()
                if not w.future.done():
                    w.future.set_exception(err)

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
