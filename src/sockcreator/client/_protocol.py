"""The socket creator's wire protocol, with no I/O at all.

This module turns requests into bytes and bytes (plus received descriptors)
into answers.  It never reads, writes, closes or sleeps: the blocking client
(:mod:`sockcreator.client.blocking`) and the asyncio client (:mod:`sockcreator.client.aio`)
are thin shells that move bytes between a socket and an :class:`AnswerParser`.

Wire format (BIND 10's socket creator, byte for byte)::

    request  'T'                                  terminate, no answer
    request  'S' ('T'|'U') ('4'|'6') port[2] addr[4|16]
    request  'P' ('T'|'U') ('4'|'6') port[2] addr[4|16] flags[1]
                                                  an extension: 'S' plus options
    answer   'S' then one data byte carrying the descriptor (SCM_RIGHTS)
    answer   'E' ('S'|'B') errno[native int]
    answer   'F' condition[1]                     creator exits after this
    request  'B' ('4'|'6') port[2] addr[4|16]     an extension: bind the descriptor
                                                  that comes with the 'B' byte
    answer   'O'                                  to 'B': bound (or 'E' as above)

Descriptor ownership: descriptors given to :meth:`AnswerParser.feed` belong to
the first byte of the data given with them (that is how ``recvmsg`` hands them
out).  If ``feed`` raises, it handed none of them out and the caller must
close them all; otherwise each one is in exactly one returned
:class:`SocketReceived`.

Size: the creator's whole wire format, 'S'/'P' and the 'B' extension, each
request's encoder next to the parser of its answers, so they cannot drift.
"""

from __future__ import annotations

import collections
import enum
import functools
import ipaddress
import socket
import struct
from collections.abc import Sequence

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from .._record import dataclass

__all__ = [
    "INT",
    "AnswerParser",
    "BindFailed",
    "BindRequest",
    "BindingAnswerParser",
    "Bound",
    "CreationFailed",
    "DescriptorLost",
    "Event",
    "ProtocolViolation",
    "Request",
    "SocketOptions",
    "SocketReceived",
    "bind_answer",
    "bind_request",
    "make_request",
]

#: The errno in an 'E' answer: a C int, native size and byte order.
INT = struct.Struct("@i")

# (``X | Y``, not typing.Union: no typing at run time)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ProtocolSpec = str | int
AddressSpec = str | ipaddress.IPv4Address | ipaddress.IPv6Address

_TYPE_BYTE = {socket.SOCK_STREAM: b"T", socket.SOCK_DGRAM: b"U"}
_FAMILY_BYTE = {4: b"4", 6: b"6"}
_STAGES = {b"S": "socket", b"B": "bind"}
_PROTOCOL_NAMES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


class SocketOptions(enum.IntFlag):
    """Options the creator sets before bind(): the flags byte of a 'P' request."""

    REUSEPORT = 1  # SO_REUSEPORT
    DUALSTACK = 2  # IPV6_V6ONLY off (IPv6 only; without it V6ONLY is on, as for 'S')
    FREEBIND = 4  # IP_FREEBIND
    #: SO_REUSEADDR left off ('S' always sets it): the kernel then refuses to
    #: bind this socket where another socket overlaps, and another socket
    #: where this one does (UDP's co-binding needs SO_REUSEADDR on both)
    NOREUSEADDR = 8


_NO_OPTIONS = SocketOptions(0)
_ALL_OPTIONS = (
    SocketOptions.REUSEPORT
    | SocketOptions.DUALSTACK
    | SocketOptions.FREEBIND
    | SocketOptions.NOREUSEADDR
)


class _Endpoint:
    """What Request and BindRequest both derive from their type and address."""

    type: socket.SocketKind
    address: IPAddress

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET if self.address.version == 4 else socket.AF_INET6

    @property
    def protocol(self) -> str:
        return "tcp" if self.type == socket.SOCK_STREAM else "udp"


@dataclass(frozen=True)
class Request(_Endpoint):
    """One validated request: 'S', or 'P' if it has options.  Build it with
    :func:`make_request`."""

    type: socket.SocketKind  # SOCK_STREAM or SOCK_DGRAM
    address: IPAddress
    port: int
    options: SocketOptions = _NO_OPTIONS

    def encode(self) -> bytes:
        return self._wire

    @functools.cached_property
    def _expected(self) -> tuple[int, int, str, int]:
        """(family, type, address as inet_ntop writes it, port), made once:
        what a received socket is checked against."""
        host = socket.inet_ntop(self.family, self.address.packed)
        return int(self.family), int(self.type), host, self.port

    @functools.cached_property
    def _wire(self) -> bytes:
        """The bytes on the wire, made once: a Request never changes."""
        options = int(self.options)
        data = (
            (b"P" if options else b"S")
            + _TYPE_BYTE[self.type]
            + _FAMILY_BYTE[self.address.version]
            + self.port.to_bytes(2, "big")
            + self.address.packed
        )
        return data + bytes((options,)) if options else data

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        text = f"{self.protocol}:{host}:{self.port}"
        if self.options:
            names = [o.name.lower() for o in SocketOptions if o & self.options and o.name]
            text += f" ({','.join(names)})"
        return text


@dataclass(frozen=True)
class BindRequest(_Endpoint):
    """A 'B' request: bind the descriptor sent with it (the peer's own
    socket, ``run --intercept``).  ``type`` is the socket's, as its sender
    saw it (for policy and logs; not on the wire)."""

    type: socket.SocketKind
    address: IPAddress
    port: int

    def encode(self) -> bytes:
        return bind_request(self.family, self.address.packed, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"bind {self.protocol}:{host}:{self.port}"


@functools.lru_cache(maxsize=256)
def _parse_address(text: str) -> IPAddress:
    """ipaddress.ip_address, cached: parsing costs more than a round trip's
    bookkeeping.  Errors are not cached; the objects are immutable."""
    return ipaddress.ip_address(text)  # ValueError if not an address


def make_request(
    protocol: ProtocolSpec,
    address: AddressSpec,
    port: int,
    *,
    options: SocketOptions | int = _NO_OPTIONS,
) -> Request:
    """Validate arguments into a :class:`Request`; TypeError/ValueError if bad.

    ``options`` (:class:`SocketOptions`) makes it a 'P' request; none, the
    default, makes it an 'S' request exactly as BIND 10 sends it."""
    kind: socket.SocketKind
    if isinstance(protocol, str):
        try:
            kind = _PROTOCOL_NAMES[protocol.lower()]
        except KeyError:
            raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}") from None
    elif isinstance(protocol, int) and not isinstance(protocol, bool):
        if protocol not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"protocol must be SOCK_STREAM or SOCK_DGRAM, not {protocol!r}")
        kind = socket.SocketKind(protocol)
    else:
        raise TypeError(f"protocol must be str or int, not {type(protocol).__name__}")

    addr: IPAddress
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = address
    elif type(address) is str:  # exactly str: the cache must be keyed by plain strings
        addr = _parse_address(address)
    elif isinstance(address, str):
        addr = ipaddress.ip_address(address)  # ValueError if not an address
    else:
        raise TypeError(f"address must be str or an ipaddress object, not {type(address).__name__}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        raise ValueError("the protocol cannot carry an IPv6 scope id")

    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, not {port}")
    if not isinstance(options, int) or isinstance(options, bool):
        raise TypeError(f"options must be SocketOptions, not {type(options).__name__}")
    if not options:
        return Request(kind, addr, port)
    if int(options) & ~int(_ALL_OPTIONS):
        raise ValueError(f"unknown socket option bits {int(options) & ~int(_ALL_OPTIONS):#x}")
    if options & SocketOptions.DUALSTACK and addr.version != 6:
        raise ValueError("DUALSTACK (IPV6_V6ONLY off) needs an IPv6 address")
    return Request(kind, addr, port, SocketOptions(options))


class ProtocolViolation(Exception):
    """The creator sent something the protocol does not allow, or said 'F'.

    ``condition`` is the 'F' answer's condition byte as a str (e.g. ``"I"``),
    or None when the creator broke the protocol itself.
    """

    def __init__(self, message: str, condition: str | None = None) -> None:
        super().__init__(message)
        self.condition = condition


@dataclass(frozen=True)
class SocketReceived:
    """An 'S' answer: ``fd`` is the received descriptor, now the caller's."""

    request: Request
    fd: int


@dataclass(frozen=True)
class CreationFailed:
    """An 'E' answer: ``stage`` is "socket" or "bind"."""

    request: Request
    stage: str
    errno: int


@dataclass(frozen=True)
class DescriptorLost:
    """An 'S' answer whose descriptor never reached us: the kernel could not
    install it in the receiver's table (``MSG_CTRUNC`` with none received,
    i.e. EMFILE on our side).  Only :meth:`AnswerParser.feed_lost_descriptor`
    yields it; the creator did its part and the stream is still in step."""

    request: Request


Event = SocketReceived | CreationFailed

# Parser states, and how many bytes each one needs before it can move on.
_IDLE = "idle"  # between answers: one status byte
_FD_BYTE = "fd-byte"  # after 'S': the one data byte that carries the descriptor
_ERROR = "error"  # after 'E': stage byte + native int
_FATAL = "fatal"  # after 'F': the condition byte
_DEAD = "dead"  # after a violation: nothing more is accepted
_NEEDS = {_IDLE: 1, _FD_BYTE: 1, _ERROR: 1 + INT.size, _FATAL: 1, _DEAD: 0}


class AnswerParser:
    """Incremental parser of the creator's answers, in request order.

    Call :meth:`expect` for each request as it is sent, then :meth:`feed`
    whatever arrives, in pieces of any size.  :meth:`bytes_wanted` is the
    exact size of the next read that never crosses an answer boundary.
    """

    def __init__(self) -> None:
        self._pending: collections.deque[Request] = collections.deque()
        self._state = _IDLE
        self._buf = b""

    @property
    def pending(self) -> int:
        """Requests sent whose answers have not arrived yet."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """True between answers (so EOF here loses no partial answer)."""
        return self._state == _IDLE

    def expect(self, request: Request) -> None:
        self._pending.append(request)

    def bytes_wanted(self) -> int:
        if self._state == _DEAD:  # a violation may have left a partial answer behind
            return 0
        return _NEEDS[self._state] - len(self._buf)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Consume ``data`` (and ``fds``, which came with its first byte)."""
        if len(data) == 1 and not self._buf:  # the usual reads, as bytes_wanted() sizes them
            if self._state == _FD_BYTE and len(fds) == 1:
                self._state = _IDLE
                return [SocketReceived(self._pending.popleft(), fds[0])]
            if (
                self._state == _IDLE
                and not fds
                and data == b"S"
                and self._pending
                and type(self._pending[0]) is Request  # (not a 'B': see BindingAnswerParser)
            ):
                self._state = _FD_BYTE
                return []
        events: list[Event] = []
        unclaimed = list(fds)
        pos = 0
        while pos < len(data):
            if self._state == _DEAD:
                raise ProtocolViolation("data after a protocol violation")
            if self._state == _FD_BYTE:
                if pos != 0 or len(unclaimed) != 1:
                    self._state = _DEAD
                    got = len(unclaimed) if pos == 0 else 0
                    raise ProtocolViolation(f"'S' answer came with {got} descriptors, not 1")
                events.append(SocketReceived(self._pending.popleft(), unclaimed.pop()))
                self._state = _IDLE
                pos += 1
                continue
            if unclaimed:
                self._state = _DEAD
                raise ProtocolViolation("descriptor received outside an 'S' answer")
            take = min(len(data) - pos, _NEEDS[self._state] - len(self._buf))
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == _NEEDS[self._state]:
                event = self._complete()
                if event is not None:
                    events.append(event)
        if unclaimed:  # descriptors arrived with no data byte at all
            self._state = _DEAD
            raise ProtocolViolation("descriptor received without a data byte")
        return events

    def feed_lost_descriptor(self, data: bytes) -> list[Event | DescriptorLost]:
        """Consume ``data`` whose first byte came with a descriptor that was
        lost on the receiving side (``MSG_CTRUNC``, none received).

        That byte must be the descriptor byte of an 'S' answer: the answer
        then becomes :class:`DescriptorLost` and the rest of ``data`` is fed
        as usual.  A lost descriptor anywhere else is a protocol violation."""
        if not data or self._state != _FD_BYTE or self._buf:
            where = "without a data byte" if not data else f"outside an 'S' answer ({self._state})"
            self._state = _DEAD
            raise ProtocolViolation(f"a descriptor was lost {where}")
        self._state = _IDLE
        events: list[Event | DescriptorLost] = [DescriptorLost(self._pending.popleft())]
        if len(data) > 1:
            events.extend(self.feed(data[1:]))
        return events

    def _complete(self) -> Event | None:
        buf, self._buf = self._buf, b""
        state = self._state
        if state == _IDLE:
            if buf == b"F":
                self._state = _FATAL
            elif not self._pending:
                self._state = _DEAD
                raise ProtocolViolation(f"unsolicited answer {buf!r}")
            elif buf == b"S" and type(self._pending[0]) is Request:
                self._state = _FD_BYTE
            elif buf == b"E":
                self._state = _ERROR
            else:
                self._state = _DEAD
                raise ProtocolViolation(f"unknown answer {buf!r}")
            return None
        if state == _ERROR:
            stage = _STAGES.get(buf[:1])
            if stage is None:
                self._state = _DEAD
                raise ProtocolViolation(f"unknown failure stage {buf[:1]!r}")
            self._state = _IDLE
            return CreationFailed(self._pending.popleft(), stage, INT.unpack(buf[1:])[0])
        # state == _FATAL
        self._state = _DEAD
        condition = buf.decode("ascii", "backslashreplace")
        raise ProtocolViolation(f"creator reported fatal error {condition!r}", condition)


# --- 'B': bind the peer's own socket (sockcreator run --intercept) -------------


@dataclass(frozen=True)
class Bound:
    """An 'O' answer: the descriptor sent with the 'B' request is bound."""

    request: BindRequest


@dataclass(frozen=True)
class BindFailed:
    """An 'E' answer to a 'B': ``stage`` "socket" (not a socket we bind) or
    "bind" (the policy's EPERM, or bind()'s own errno)."""

    request: BindRequest
    stage: str
    errno: int


class BindingAnswerParser(AnswerParser):
    """:class:`AnswerParser` for a peer that also sends 'B' requests (the
    broker): :meth:`expect_bind` queues one in request order, and its answer
    comes back as :class:`Bound` or :class:`BindFailed` among the events;
    an 'S' answer to it is a protocol violation."""

    def expect_bind(self, request: BindRequest) -> None:
        self._pending.append(request)  # type: ignore[arg-type]

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Event | Bound | BindFailed]:  # type: ignore[override]
        return super().feed(data, fds)  # type: ignore[return-value]

    def _complete(self) -> Event | None:
        pending: collections.deque[object] = self._pending  # type: ignore[assignment]
        if not pending or type(pending[0]) is not BindRequest:
            return super()._complete()
        buf, state = self._buf, self._state
        if state == _IDLE and buf == b"O":
            self._buf = b""
            return Bound(pending.popleft())  # type: ignore[return-value,arg-type]
        if state == _IDLE and buf not in (b"E", b"F"):
            self._state = _DEAD
            raise ProtocolViolation(f"answer {buf!r} to a 'B' request")
        event = super()._complete()
        if isinstance(event, CreationFailed):  # (its request is the BindRequest)
            return BindFailed(event.request, event.stage, event.errno)  # type: ignore[return-value,arg-type]
        return event


#: The longest answer to 'B': 'E', the stage byte, the errno.
BIND_ANSWER_MAX = 2 + INT.size


def bind_request(family: int, packed: bytes, port: int) -> bytes:
    """The 'B' request for ``packed`` (4 or 16 bytes) and ``port``; its
    descriptor goes with its first byte (SCM_RIGHTS)."""
    if family == socket.AF_INET and len(packed) == 4:
        code = b"4"
    elif family == socket.AF_INET6 and len(packed) == 16:
        code = b"6"
    else:
        raise ValueError(f"not an IPv4 or IPv6 address: {family} {packed!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port}")
    return b"B" + code + port.to_bytes(2, "big") + packed


def bind_answer(data: bytes) -> int | None:
    """The answer to a 'B' so far: 0 (bound) or the errno; None if more bytes
    are needed (see :data:`BIND_ANSWER_MAX`).  ProtocolViolation otherwise."""
    if data[:1] == b"O":
        if len(data) != 1:
            raise ProtocolViolation(f"data after 'O': {data!r}")
        return 0
    if data[:1] == b"E":
        if len(data) < BIND_ANSWER_MAX:
            return None
        if len(data) > BIND_ANSWER_MAX or data[1:2] not in _STAGES:
            raise ProtocolViolation(f"bad 'E' answer to 'B': {data!r}")
        return int(INT.unpack(data[2:])[0])
    if data[:1] == b"F":
        raise ProtocolViolation("the creator refused the request as invalid", data[1:2].decode(
            "ascii", "replace") or None)  # fmt: skip
    raise ProtocolViolation(f"unknown answer to 'B': {data!r}")
