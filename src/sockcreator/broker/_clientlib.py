"""What both broker clients share, with no I/O of their own: the errors,
building and encoding requests, and turning answers into sockets and
status entries (see :mod:`.client` and :mod:`.aio`)."""

from __future__ import annotations

import array
import ipaddress
import os
import socket
import struct

from ..client._channel import unpack_fds
from ..client._errors import CreatorError, CreatorFatalError, errno_error
from ..client._protocol import (
    AddressSpec,
    ProtocolSpec,
    ProtocolViolation,
    Request,
    SocketOptions,
    make_request,
)
from ._protocol import (
    MAX_BODY,
    BindCounts,
    BoundReply,
    BrokerMessage,
    BrokerProtocolError,
    Denied,
    FatalCode,
    Granted,
    Reason,
    Released,
    ShareMode,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    check_name,
)

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from .._record import dataclass

__all__ = [
    "ENV_BROKER_FD",
    "BrokerFatalError",
    "HeldSocket",
    "SocketRefusedError",
    "build_request",
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
ShareSpec = ShareMode | str


class SocketRefusedError(CreatorError, OSError):
    """The broker refused: ``errno`` says how (EPERM, EBUSY, or the kernel's),
    ``reason`` (a :class:`~sockcreator.broker._protocol.Reason`) says why."""

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
    """The broker is gone or broke the protocol; ``code`` is its ``X`` code;
    ``timed_out``: it did not answer within the handle's timeout."""

    def __init__(
        self, message: str, *, code: FatalCode | None = None, timed_out: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.timed_out = timed_out


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
    """:func:`~sockcreator.client._channel.unpack_fds`, a violation being the broker's."""
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
    if kind == "bind":
        return isinstance(msg, (BoundReply, Denied))
    return isinstance(msg, (StatusEntry, BindCounts, StatusEnd, Denied))
