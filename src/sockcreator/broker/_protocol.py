"""The broker's wire protocol, with no I/O at all (see :mod:`sockcreator.broker`).

Both directions are a stream of frames over one Unix stream socket::

    frame   kind[1] length[2] body[length]

All integers are unsigned and big-endian; every kind has a fixed body length
or an exact length computed from its own fixed part, and no body is longer
than :data:`MAX_BODY` bytes, so every message is bounded and checked before it
is used.  The client speaks first (``H``); the broker answers every later
request exactly once, in order (a status query with ``S`` lines then ``Z``).

Client to broker::

    H  version[1]                                    hello: the first frame (again
                                                     later is allowed, and answered)
    Q  id[4] proto[1] family[1] port[2] share[1] flags[1] backlog[4]
       name_len[1] addr[4|16] name[name_len]         request a socket
    R  id[4] grant[8]                                release a grant
    L  id[4]                                         list held sockets (status)
    B  id[4] family[1] port[2] addr[4|16]            bind the descriptor that comes
                                                     with this frame (version 2)
    q  (a Q body) linger_ms[4]                       Q with its own linger time
                                                     (version 2; capped by the broker)

    proto 'T' tcp | 'U' udp; family '4' | '6'; share 'N' NO | 'S' SAMEAPP |
    'A' ANY; flags: 1 SO_REUSEPORT, 2 IPV6_V6ONLY off (IPv6 only),
    4 IP_FREEBIND; backlog 0..65535 (TCP only: listen(backlog)) or
    0xFFFFFFFF (not listening); name: 0..64 bytes of printable ASCII
    (0x21-0x7E), required for SAMEAPP.

Broker to client::

    H  version[1] max_held[4] max_pending[2]         hello answer: our limits
    G  id[4] grant[8] family[1] type[1] listening[1] port[2] addr[4|16]
                                                     granted: carries exactly one
                                                     descriptor (SCM_RIGHTS)
    D  id[4] errno[4] reason[1]                      refused (see Reason)
    K  id[4]                                         released
    S  id[4] grant[8] proto[1] family[1] port[2] share[1] flags[1] backlog[4]
       uid[4] gid[4] pid[4] name_len[1] addr[4|16] name[name_len]
                                                     one holder, for 'L'
    Y  id[4] bound[4] refused[4]                     client sockets bound ('B') and
                                                     refused, just before Z (version 2)
    Z  id[4] count[4]                                end of the 'L' answer
    O  id[4]                                         bound (the answer to 'B')
    X  code[1] text_len[1] text[text_len]            fatal: the broker closes

Descriptors: the broker sends each ``G`` frame with one ``sendmsg`` carrying
its descriptor, so the descriptor arrives with the frame's first byte if the
client never reads across a frame boundary (:meth:`AnswerDecoder.bytes_wanted`
says how much to read).  Anything else carrying descriptors is a violation.

Versions: a client says 1 or 2 in its hello and the broker answers with the
same.  Version 2 adds ``B`` (``sockcreator run --broker --intercept``): the
client sends the frame with one ``sendmsg`` carrying exactly one descriptor,
its own AF_INET/AF_INET6 TCP or UDP socket, and the broker has its creator
bind it to the address if the client's policy allows, answering ``O`` or
``D``.  ``recvmsg`` hands a descriptor out with the bytes of the message it
came with, never after them, so the broker takes each one for the next
``B`` frame; a ``B`` without one, or one that no ``B`` frame takes, is a
violation.  A version 1 connection sending ``B`` breaks the protocol.

Size: the whole wire format in one module, each frame's encoder next to
its decoder and its bounds, so that the two directions cannot drift apart.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
import struct
from collections.abc import Sequence

from ..client._protocol import IPAddress, Request, SocketOptions

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any
else:
    from .._record import dataclass

__all__ = [
    "MAX_BODY",
    "MAX_NAME",
    "NO_BACKLOG",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "AnswerDecoder",
    "BindCounts",
    "BindFrame",
    "BoundReply",
    "BrokerMessage",
    "BrokerProtocolError",
    "ClientMessage",
    "Denied",
    "Fatal",
    "FatalCode",
    "Granted",
    "Hello",
    "HelloReply",
    "Reason",
    "Release",
    "Released",
    "RequestDecoder",
    "ShareMode",
    "SocketRequest",
    "StatusEnd",
    "StatusEntry",
    "StatusQuery",
    "check_name",
    "grant_frame",
    "grant_suffix",
    "lingering",
    "request_fields",
]

VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_BODY = 255
MAX_NAME = 64
MAX_TEXT = 200
NO_BACKLOG = 0xFFFFFFFF
MAX_BACKLOG = 65535
_ALL_FLAGS = int(SocketOptions.REUSEPORT | SocketOptions.DUALSTACK | SocketOptions.FREEBIND)

_HEADER = struct.Struct("!cH")
_REQ = struct.Struct("!I1s1sH1sBIB")  # 15 bytes before addr and name
_REQ_REST = struct.Struct("!1s1sH1sBIB")  # the same after the id
_GRANT = struct.Struct("!IQ1s1s?H")  # 17 bytes before addr
_DENY = struct.Struct("!IIc")
_RELEASE = struct.Struct("!IQ")
_G_HEAD = struct.Struct("!cHIQ")  # a G frame's header, id and grant
_ID = struct.Struct("!I")
_LEN = struct.Struct("!H")
_END = struct.Struct("!II")
_COUNTS = struct.Struct("!III")
_HELLO_REPLY = struct.Struct("!BIH")
_ENTRY = struct.Struct("!IQ1s1sH1sBIIIIB")  # 35 bytes before addr and name

_BIND = struct.Struct("!I1sH")  # 7 bytes before addr
_TYPES = {b"T": socket.SOCK_STREAM, b"U": socket.SOCK_DGRAM}
_TYPE_BYTES = {v: k for k, v in _TYPES.items()}
_ADDR_LEN = {b"4": 4, b"6": 16}
_FAMILIES = {b"4": socket.AF_INET, b"6": socket.AF_INET6}
_FAMILY_BYTES = {v: k for k, v in _FAMILIES.items()}


class BrokerProtocolError(Exception):
    """Malformed input: the peer broke the protocol.  ``code`` is the
    :class:`FatalCode` the broker sends before closing."""

    def __init__(self, message: str, code: FatalCode | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else FatalCode.MALFORMED
        self.fds: list[int] = []  # descriptors the caller must close (AnswerDecoder)


class ShareMode(enum.Enum):
    """Who else may hold the same socket (BIND 10's share modes)."""

    NO = b"N"  # nobody else
    SAMEAPP = b"S"  # only requests with the same share name (and the same uid)
    ANY = b"A"  # anyone whose own mode allows it


class Reason(enum.Enum):
    """Why a request was refused (with the errno in the ``D`` frame)."""

    POLICY = b"P"  # EPERM: the policy does not allow it (or status: not an admin)
    SHARE = b"C"  # EBUSY: a holder's or the requester's share mode forbids sharing
    OPTIONS = b"O"  # EBUSY: held with other options or another backlog
    SOCKET = b"S"  # kernel errno: socket() failed in the creator
    BIND = b"B"  # kernel errno: setsockopt()/bind() failed in the creator
    LISTEN = b"L"  # kernel errno: listen() failed in the broker
    LIMIT = b"H"  # EMFILE: this connection holds its maximum of sockets
    UNKNOWN_GRANT = b"N"  # EBADF: release of a grant this connection does not hold
    UNAVAILABLE = b"U"  # EIO: the creator is gone


class FatalCode(enum.Enum):
    """Why the broker closes a connection (the ``X`` frame)."""

    MALFORMED = b"M"  # a frame that breaks the protocol
    VERSION = b"V"  # unsupported protocol version
    PENDING = b"P"  # more unanswered requests than max_pending
    TIMEOUT = b"T"  # a frame left unfinished, or answers left unread, too long
    BUSY = b"B"  # too many connections
    SHUTDOWN = b"S"  # the broker is stopping


def check_name(name: str) -> bytes:
    """A share name as sent: 0..64 printable ASCII characters, no spaces."""
    raw = name.encode("ascii", "replace")
    if not name.isascii() or len(raw) > MAX_NAME or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValueError(f"a share name is 0..{MAX_NAME} printable ASCII characters: {name!r}")
    return raw


def _frame(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body)) + body


@functools.lru_cache(maxsize=1024)
def _address(family: bytes, packed: bytes) -> IPAddress:
    """Cached: a few addresses recur, and parsing costs more than the rest
    of a request (the objects are immutable)."""
    if family == b"4":
        return ipaddress.IPv4Address(packed)
    return ipaddress.IPv6Address(packed)


_OPTIONS = tuple(SocketOptions(bits) for bits in range(_ALL_FLAGS + 1))


# --- client to broker ---------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int = VERSION

    def encode(self) -> bytes:
        return _frame(b"H", bytes((self.version,)))


@dataclass(frozen=True)
class SocketRequest:
    """``request`` says what (protocol, address, port, creator options)."""

    id: int
    request: Request
    share: ShareMode = ShareMode.NO
    name: str = ""
    backlog: int | None = None
    #: seconds the socket stays open after its last grant ends, if this is
    #: that grant ('q'; None: the broker's default, 'Q')
    linger: float | None = None

    def encode(self) -> bytes:
        frame = self._encode()
        return frame if self.linger is None else lingering(frame, self.linger)

    def _encode(self) -> bytes:
        r = self.request
        name = check_name(self.name)
        backlog = NO_BACKLOG if self.backlog is None else self.backlog
        body = (
            _REQ.pack(
                self.id,
                _TYPE_BYTES[r.type],
                b"4" if r.address.version == 4 else b"6",
                r.port,
                self.share.value,
                int(r.options),
                backlog,
                len(name),
            )
            + r.address.packed
            + name
        )
        return _frame(b"Q", body)


MAX_LINGER_MS = 3_600_000


def lingering(frame: bytes, seconds: float) -> bytes:
    """A whole ``Q`` frame made a ``q`` frame asking for ``seconds`` of linger."""
    ms = round(seconds * 1000)
    if not 0 <= ms <= MAX_LINGER_MS:
        raise ValueError(f"linger must be 0..{MAX_LINGER_MS // 1000} seconds: {seconds!r}")
    return b"q" + _LEN.pack(len(frame) - 3 + 4) + frame[3:] + _ID.pack(ms)


@dataclass(frozen=True)
class Release:
    id: int
    grant: int

    def encode(self) -> bytes:
        return _frame(b"R", _RELEASE.pack(self.id, self.grant))


@dataclass(frozen=True)
class StatusQuery:
    id: int

    def encode(self) -> bytes:
        return _frame(b"L", _ID.pack(self.id))


@dataclass(frozen=True)
class BindFrame:
    """Bind the descriptor that came with the frame (``fd``: -1 when
    encoding; the decoder's caller owns it once decoded)."""

    id: int
    address: IPAddress
    port: int
    fd: int = -1

    def encode(self) -> bytes:
        family = b"4" if self.address.version == 4 else b"6"
        return _frame(b"B", _BIND.pack(self.id, family, self.port) + self.address.packed)


ClientMessage = Hello | SocketRequest | Release | StatusQuery | BindFrame


def _decode_request(body: bytes) -> SocketRequest:
    if len(body) < _REQ.size:
        raise BrokerProtocolError("request too short")
    return SocketRequest(_ID.unpack_from(body)[0], *request_fields(body[4:]))


_RequestFields = tuple[Request, ShareMode, str, int | None]


@functools.lru_cache(maxsize=4096)
def request_fields(rest: bytes) -> _RequestFields:
    """A request's fields after its id, checked.  Cached: a server sees the
    same few requests again and again, and identical bytes give identical
    (immutable) objects, which lets it cache what it derives from them too.
    Errors are raised, never cached."""
    proto, family, port, share, flags, backlog, nlen = _REQ_REST.unpack_from(rest)
    alen = _ADDR_LEN.get(family)
    kind = _TYPES.get(proto)
    if alen is None or kind is None:
        raise BrokerProtocolError(f"bad protocol or family {proto!r} {family!r}")
    if len(rest) != _REQ_REST.size + alen + nlen:
        raise BrokerProtocolError("request length does not match its fields")
    try:
        mode = ShareMode(share)
    except ValueError:
        raise BrokerProtocolError(f"bad share mode {share!r}") from None
    if flags & ~_ALL_FLAGS or (flags & SocketOptions.DUALSTACK and family == b"4"):
        raise BrokerProtocolError(f"bad option flags {flags:#x}")
    if backlog == NO_BACKLOG:
        listen = None
    elif backlog <= MAX_BACKLOG and kind == socket.SOCK_STREAM:
        listen = backlog
    else:
        raise BrokerProtocolError(f"bad backlog {backlog} for {proto!r}")
    raw_name = rest[_REQ_REST.size + alen :]
    if nlen > MAX_NAME or not all(0x21 <= b <= 0x7E for b in raw_name):
        raise BrokerProtocolError("bad share name")
    if mode is ShareMode.SAMEAPP and not raw_name:
        raise BrokerProtocolError("SAMEAPP needs a share name")
    addr = _address(family, rest[_REQ_REST.size : _REQ_REST.size + alen])
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        raise BrokerProtocolError("scope id")  # not reachable: packed has none
    return Request(kind, addr, port, _OPTIONS[flags]), mode, raw_name.decode("ascii"), listen


class RequestDecoder:
    """The broker's side: bytes from a client -> :data:`ClientMessage` list.

    Raises :class:`BrokerProtocolError` on anything malformed; after that the
    connection must be closed.  The first frame must be ``H``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._hello = False
        self.version = 0  # what the client said in its hello
        self._fds: list[int] = []  # received, for the next 'B' frame

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished frame are buffered."""
        return bool(self._buf)

    @property
    def greeted(self) -> bool:
        return self._hello

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[ClientMessage]:
        """The whole frames in ``data``.  ``fds`` came with it: each goes to
        the next ``B`` frame (see the module doc).  On an error the error's
        ``fds`` are every descriptor the caller must close (the ones given
        now, held, or decoded into a ``BindFrame`` in this call)."""
        try:
            return self._feed(data, fds)
        except BrokerProtocolError as e:
            e.fds = [*self._fds, *(fd for fd in fds if fd not in self._fds)]
            self._fds = []
            raise

    def whole(self, data: bytes) -> tuple[bytes, int, Any] | None:
        """The common read without building a message: exactly one whole
        ``Q`` or ``R`` frame, after the hello, with nothing buffered and no
        descriptor held (the caller passes no descriptors).  ``(b"R", id,
        grant)``, or ``(b"Q", id, rest)``: ``rest`` is the body after the id,
        for :func:`request_fields` to check (``feed`` would check it there
        too: the same bytes, the same answer).  None: anything else, for
        :meth:`feed`."""
        if self._buf or self._fds or not self._hello or len(data) < 3:
            return None
        kind, length = _HEADER.unpack_from(data)
        if length != len(data) - 3:
            return None
        if kind == b"R":
            if length != _RELEASE.size:
                return None
            rid, grant = _RELEASE.unpack_from(data, 3)
            return kind, rid, grant
        if kind == b"Q" and _REQ.size <= length <= MAX_BODY:
            return kind, _ID.unpack_from(data, 3)[0], data[7:]
        return None

    def take_fds(self) -> list[int]:
        """The descriptors held for a ``B`` frame not complete yet (for the
        caller to close when it gives up the connection)."""
        fds, self._fds = self._fds, []
        return fds

    def _feed(self, data: bytes, fds: Sequence[int]) -> list[ClientMessage]:
        if fds:
            self._fds.extend(fds)
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        out: list[ClientMessage] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 3:
                kind, length = _HEADER.unpack_from(buf, pos)
                if length > MAX_BODY:
                    raise BrokerProtocolError(f"frame of {length} bytes is over the limit")
                if end - pos - 3 < length:
                    break
                body = bytes(buf[pos + 3 : pos + 3 + length])
                pos += 3 + length
                out.append(self._decode(kind, body))
        except BrokerProtocolError:
            self._fds.extend(m.fd for m in out if type(m) is BindFrame)
            raise
        if buf is data:
            if pos < end:  # the start of a frame: kept for the next read
                self._buf += data[pos:]
        else:
            del self._buf[:pos]
        if self._fds and (len(self._fds) > 1 or self._buf[:1] != b"B"):
            self._fds.extend(m.fd for m in out if type(m) is BindFrame)
            raise BrokerProtocolError("a descriptor that no 'B' frame came with")
        return out

    def _decode(self, kind: bytes, body: bytes) -> ClientMessage:
        if not self._hello:
            if kind != b"H" or len(body) != 1:
                raise BrokerProtocolError("the first frame must be a hello")
            if body[0] not in SUPPORTED_VERSIONS:
                raise BrokerProtocolError(
                    f"protocol version {body[0]} is not supported (only "
                    f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                    FatalCode.VERSION,
                )
            self._hello = True
            self.version = body[0]
            return Hello(body[0])
        if kind == b"H":  # again: a connection handed on (SOCKCREATOR_BROKER_FD) greets anew
            if len(body) != 1 or body[0] not in SUPPORTED_VERSIONS:
                raise BrokerProtocolError("a hello for another version", FatalCode.VERSION)
            self.version = body[0]
            return Hello(body[0])
        if kind == b"B":
            return self._decode_bind(body)
        if kind == b"Q":
            return _decode_request(body)
        if kind == b"q":
            if self.version < 2:
                raise BrokerProtocolError("a 'q' frame on a version 1 connection")
            if len(body) < _REQ.size + 4:
                raise BrokerProtocolError("request too short")
            (ms,) = _ID.unpack_from(body, len(body) - 4)
            if ms > MAX_LINGER_MS:
                raise BrokerProtocolError(f"linger of {ms} ms is over the limit")
            m = _decode_request(body[:-4])
            return SocketRequest(m.id, m.request, m.share, m.name, m.backlog, ms / 1000)
        if kind == b"R":
            if len(body) != _RELEASE.size:
                raise BrokerProtocolError("bad release length")
            return Release(*_RELEASE.unpack(body))
        if kind == b"L":
            if len(body) != _ID.size:
                raise BrokerProtocolError("bad status length")
            return StatusQuery(_ID.unpack(body)[0])
        raise BrokerProtocolError(f"unknown frame kind {kind!r}")

    def _decode_bind(self, body: bytes) -> BindFrame:
        if self.version < 2:
            raise BrokerProtocolError("a 'B' frame on a version 1 connection")
        if len(body) < _BIND.size:
            raise BrokerProtocolError("bind too short")
        rid, family, port = _BIND.unpack_from(body)
        if len(body) != _BIND.size + _ADDR_LEN.get(family, -1):
            raise BrokerProtocolError(f"bad bind family {family!r} or length")
        if not self._fds:
            raise BrokerProtocolError("a 'B' frame without its descriptor")
        addr = _address(family, body[_BIND.size :])
        return BindFrame(rid, addr, port, self._fds.pop(0))


# --- broker to client ---------------------------------------------------------


@dataclass(frozen=True)
class HelloReply:
    version: int
    max_held: int
    max_pending: int

    def encode(self) -> bytes:
        return _frame(b"H", _HELLO_REPLY.pack(self.version, self.max_held, self.max_pending))


@dataclass(frozen=True)
class Granted:
    """A grant; ``fd`` is the descriptor that came with it (-1 when encoding)."""

    id: int
    grant: int
    family: socket.AddressFamily
    type: socket.SocketKind
    listening: bool
    address: IPAddress
    port: int
    fd: int = -1

    def encode(self) -> bytes:
        suffix = grant_suffix(self.family, self.type, self.listening, self.address, self.port)
        return grant_frame(self.id, self.grant, suffix)


def grant_suffix(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    listening: bool,
    address: IPAddress,
    port: int,
) -> bytes:
    """The part of a ``G`` frame that describes the socket (the same for
    every grant of one cached socket: the broker computes it once)."""
    meta = struct.pack("!1s1s?H", _FAMILY_BYTES[family], _TYPE_BYTES[kind], listening, port)
    return meta + address.packed


def grant_frame(rid: int, grant: int, suffix: bytes) -> bytes:
    """A whole ``G`` frame from :func:`grant_suffix`."""
    return _G_HEAD.pack(b"G", 12 + len(suffix), rid, grant) + suffix


@dataclass(frozen=True)
class Denied:
    id: int
    errno: int
    reason: Reason

    def encode(self) -> bytes:
        return _frame(b"D", _DENY.pack(self.id, self.errno, self.reason.value))


@dataclass(frozen=True)
class Released:
    id: int

    def encode(self) -> bytes:
        return _frame(b"K", _ID.pack(self.id))


@dataclass(frozen=True)
class StatusEntry:
    """One holder of one held socket."""

    id: int
    grant: int
    request: Request
    share: ShareMode
    name: str
    backlog: int | None
    uid: int
    gid: int
    pid: int

    def encode(self) -> bytes:
        r = self.request
        name = check_name(self.name)
        body = (
            _ENTRY.pack(
                self.id,
                self.grant,
                _TYPE_BYTES[r.type],
                b"4" if r.address.version == 4 else b"6",
                r.port,
                self.share.value,
                int(r.options),
                NO_BACKLOG if self.backlog is None else self.backlog,
                self.uid,
                self.gid,
                self.pid,
                len(name),
            )
            + r.address.packed
            + name
        )
        return _frame(b"S", body)


@dataclass(frozen=True)
class BoundReply:
    id: int

    def encode(self) -> bytes:
        return _frame(b"O", _ID.pack(self.id))


@dataclass(frozen=True)
class BindCounts:
    """In a status answer (version 2): the client sockets the broker has
    bound ('B') and refused since it started."""

    id: int
    bound: int
    refused: int

    def encode(self) -> bytes:
        return _frame(b"Y", _COUNTS.pack(self.id, self.bound, self.refused))


@dataclass(frozen=True)
class StatusEnd:
    id: int
    count: int

    def encode(self) -> bytes:
        return _frame(b"Z", _END.pack(self.id, self.count))


@dataclass(frozen=True)
class Fatal:
    code: FatalCode
    text: str

    def encode(self) -> bytes:
        text = self.text.encode("ascii", "replace")[:MAX_TEXT]
        return _frame(b"X", self.code.value + bytes((len(text),)) + text)


BrokerMessage = (
    HelloReply
    | Granted
    | Denied
    | Released
    | StatusEntry
    | StatusEnd
    | Fatal
    | BoundReply
    | BindCounts
)


def _decode_grant(body: bytes, fd: int = -1) -> Granted:
    if len(body) < _GRANT.size:
        raise BrokerProtocolError("grant too short")
    rid, grant, family, kind, listening, port = _GRANT.unpack_from(body)
    alen = _ADDR_LEN.get(family)
    if alen is None or kind not in _TYPES or len(body) != _GRANT.size + alen:
        raise BrokerProtocolError("malformed grant")
    addr = _address(family, body[_GRANT.size :])
    return Granted(rid, grant, _FAMILIES[family], _TYPES[kind], listening, addr, port, fd)


def _decode_entry(body: bytes) -> StatusEntry:
    if len(body) < _ENTRY.size:
        raise BrokerProtocolError("status entry too short")
    rid, grant, proto, family, port, share, flags, backlog, uid, gid, pid, nlen = (
        _ENTRY.unpack_from(body)
    )
    alen = _ADDR_LEN.get(family)
    if alen is None or proto not in _TYPES or len(body) != _ENTRY.size + alen + nlen:
        raise BrokerProtocolError("malformed status entry")
    try:
        mode = ShareMode(share)
    except ValueError:
        raise BrokerProtocolError(f"bad share mode {share!r}") from None
    if flags & ~_ALL_FLAGS:
        raise BrokerProtocolError(f"bad option flags {flags:#x}")
    addr = _address(family, body[_ENTRY.size : _ENTRY.size + alen])
    name = body[_ENTRY.size + alen :].decode("ascii", "replace")
    req = Request(_TYPES[proto], addr, port, SocketOptions(flags))
    return StatusEntry(
        rid, grant, req, mode, name, None if backlog == NO_BACKLOG else backlog, uid, gid, pid
    )


def _decode_answer(kind: bytes, body: bytes) -> BrokerMessage:
    n = len(body)
    if kind == b"G":
        return _decode_grant(body)
    if kind == b"D" and n == _DENY.size:
        rid, err, reason = _DENY.unpack(body)
        try:
            return Denied(rid, err, Reason(reason))
        except ValueError:
            raise BrokerProtocolError(f"unknown reason {reason!r}") from None
    if kind == b"K" and n == _ID.size:
        return Released(_ID.unpack(body)[0])
    if kind == b"O" and n == _ID.size:
        return BoundReply(_ID.unpack(body)[0])
    if kind == b"S":
        return _decode_entry(body)
    if kind == b"Z" and n == _END.size:
        return StatusEnd(*_END.unpack(body))
    if kind == b"Y" and n == _COUNTS.size:
        return BindCounts(*_COUNTS.unpack(body))
    if kind == b"H" and n == _HELLO_REPLY.size:
        return HelloReply(*_HELLO_REPLY.unpack(body))
    if kind == b"X" and n >= 2 and n == 2 + body[1]:
        try:
            code = FatalCode(body[:1])
        except ValueError:
            code = FatalCode.MALFORMED
        return Fatal(code, body[2:].decode("ascii", "replace"))
    raise BrokerProtocolError(f"unknown or malformed frame {kind!r} ({n} bytes)")


class AnswerDecoder:
    """The client's side: exact reads (:meth:`bytes_wanted`) -> messages.

    Descriptors passed to :meth:`feed` belong to the first byte of the data
    passed with them, and only a ``G`` frame may carry one (exactly one).  If
    ``feed`` raises, the error's ``fds`` lists every descriptor the caller
    must close (given now or held from an earlier call); otherwise each one
    ends up in exactly one returned :class:`Granted` (or stays held until
    its frame is complete).
    """

    def __init__(self) -> None:
        self._head = b""
        self._body = b""
        self._need = 3  # header bytes, then body bytes
        self._kind = b""
        self._fd = -1
        self._dead = False

    @property
    def idle(self) -> bool:
        """Between frames (EOF here cuts no frame short)."""
        return self._need == 3 and not self._head

    def bytes_wanted(self) -> int:
        return self._need

    def feed_any(self, data: bytes, fds: Sequence[int] = ()) -> list[BrokerMessage]:
        """Like :meth:`feed` for a read of any size (up to several frames):
        ``fds`` still belong to the first byte of ``data``, which must then
        start a ``G`` frame.  For a client with one request outstanding,
        whose answer is the only frame that can carry a descriptor: a
        ``recvmsg`` never returns bytes after a message that carried
        descriptors, so such a read starts with that ``G`` frame unless the
        broker broke the protocol (which this then reports)."""
        if (  # the usual read: exactly one whole frame, at a frame boundary
            self._need == 3
            and not self._head
            and not self._dead
            and len(data) >= 3
            and len(data) == 3 + _HEADER.unpack_from(data)[1]
            and len(fds) == (data[:1] == b"G")
        ):
            try:
                if fds:
                    return [_decode_grant(data[3:], fds[0])]
                return [_decode_answer(data[:1], data[3:])]
            except BrokerProtocolError as e:
                self._dead = True
                e.fds = [*fds]
                raise
        out: list[BrokerMessage] = []
        pos, end = 0, len(data)
        first = True
        try:
            while pos < end or first:
                piece = data[pos : pos + self._need] if pos or end > self._need else data
                out += self.feed(piece, fds if first else ())
                first = False
                pos += len(piece)
        except BrokerProtocolError as e:  # what was handed out in this call is lost too
            e.fds = [*(m.fd for m in out if isinstance(m, Granted)), *e.fds]
            raise
        return out

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[BrokerMessage]:
        try:
            return self._feed(data, fds)
        except BrokerProtocolError as e:
            self._dead = True
            e.fds = [*fds, self._fd] if self._fd != -1 and self._fd not in fds else [*fds]
            self._fd = -1
            raise

    def _feed(self, data: bytes, fds: Sequence[int]) -> list[BrokerMessage]:
        if self._dead:
            raise BrokerProtocolError("data after a protocol violation")
        if len(data) > self._need or (not data and fds):
            raise BrokerProtocolError("read across a frame boundary")
        if fds:
            if len(fds) != 1 or self._head or self._body or self._fd != -1:
                raise BrokerProtocolError(f"{len(fds)} descriptor(s) in the middle of a frame")
            self._fd = fds[0]
        if not self._kind:
            self._head += data
            self._need = 3 - len(self._head)
            if self._need:
                return []
            kind, length = _HEADER.unpack(self._head)
            if (kind == b"G") != (self._fd != -1):
                raise BrokerProtocolError(f"a {kind!r} frame came with the wrong descriptors")
            self._kind, self._need = kind, length
            if length:
                return []
        else:
            self._body += data
            self._need -= len(data)
            if self._need:
                return []
        if self._kind == b"G":
            msg: BrokerMessage = _decode_grant(self._body, self._fd)
        else:
            msg = _decode_answer(self._kind, self._body)
        self._head, self._body, self._kind, self._need, self._fd = b"", b"", b"", 3, -1
        return [msg]
