"""What the broker's server and its connections share: the configuration,
who a peer is, what is derived once from a request or a socket, and the
kernel's count of what a client has not read (see :mod:`._server`)."""

from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import socket
import struct
import sys
from dataclasses import dataclass

from ..client._protocol import SocketOptions
from ._audit import describe, fragment, json_text
from ._protocol import (
    Reason,
    ShareMode,
    SocketRequest,
    grant_suffix,
)
from ._table import Entry, Key, entry_key
from .policy import Policy

__all__ = ["BrokerConfig", "Peer", "peer_credentials"]

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_INT = struct.Struct("@i")
_RECV = 4096
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
_OUT_HIGH = 65536  # a status answer is produced while less than this is queued
_CACHE = 4096  # request descriptions remembered (then forgotten all at once)
_POLICY_CACHE = 256  # policy decisions remembered per connection

_ERRNO = {
    Reason.POLICY: errno.EPERM,
    Reason.SHARE: errno.EBUSY,
    Reason.OPTIONS: errno.EBUSY,
    Reason.LIMIT: errno.EMFILE,
}
_ERRNAME = errno.errorcode
_SIOCOUTQ = 0x5411  # Linux: what a socket has sent that its peer has not read yet
_OUTQ_ARG = bytes(4)
_POLL = 0.02  # seconds between looks at a held-back connection
_SWEEP = 1.0  # seconds between looks at draining connections


def _unread(fd: int) -> int:
    """SIOCOUTQ: bytes (with their overhead) sent on ``fd`` and not read by
    the peer yet; 0 on a system without it (nothing is counted there)."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, _SIOCOUTQ, _OUTQ_ARG), sys.byteorder)
    except OSError:
        return 0


# --- configuration ------------------------------------------------------------


@dataclass(frozen=True)
class BrokerConfig:
    policy: Policy
    admin_gid: int | None = None
    max_connections: int = 1024
    max_connections_per_uid: int = 64
    max_held: int = 4096  # grants per connection
    max_pending: int = 32  # unanswered requests per connection
    max_sockets: int = 8192  # cached sockets in all
    client_timeout: float = 10.0
    linger: float = 0.0  # seconds a socket stays open after its last grant ends
    max_linger: float | None = None  # the most a request may ask for (None: ``linger``)
    max_inflight_per_uid: int = 256  # descriptors sent to a uid's connections, not yet read
    max_inflight: int = 4096  # the same for every client together

    def __post_init__(self) -> None:
        limits = (
            "max_connections", "max_connections_per_uid", "max_held", "max_sockets",
            "max_inflight_per_uid", "max_inflight",
        )  # fmt: skip
        if self.max_inflight_per_uid > self.max_inflight:
            raise ValueError("max_inflight_per_uid must not exceed max_inflight")
        for name in limits:
            if not 1 <= getattr(self, name) <= 2**31 - 1:
                raise ValueError(f"{name} must be a positive number")
        if not 1 <= self.max_pending <= 65535:
            raise ValueError("max_pending must be in 1..65535")
        if not 0 <= self.linger <= 3600:
            raise ValueError("linger must be in 0..3600 seconds")
        if self.max_linger is not None and not 0 <= self.max_linger <= 3600:
            raise ValueError("max_linger must be in 0..3600 seconds")
        if not self.client_timeout > 0:
            raise ValueError("client_timeout must be positive")


@dataclass(frozen=True)
class Peer:
    """Who is at the other end, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # primary and supplementary


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups = {gid}
    for size in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            break  # no SO_PEERGROUPS: the primary group only
        ids = array.array("I")
        ids.frombytes(raw[: len(raw) - len(raw) % 4])
        groups.update(ids)
        break
    return Peer(pid, uid, gid, frozenset(groups))


_NOBODY = Peer(0, 0, 0, frozenset())


# --- what the broker derives from a request or a socket, once --------------------


class _Wanted:
    """A decoded request without its id, and what the broker derives from
    it: the table key and the audit text.  Shared by every message with the
    same bytes (the decoder hands out identical objects for those)."""

    __slots__ = (
        "backlog", "key", "made_as", "name", "refusal", "request", "share", "share_name",
        "suffix", "what",
    )  # fmt: skip

    def __init__(self, m: SocketRequest) -> None:
        r = self.request = m.request
        self.share = m.share
        # What the kernel is to enforce (see "Exclusive sockets" in docs/broker.md):
        # a UDP socket co-binds with another only if both have SO_REUSEADDR,
        # so only a socket made for ANY gets it; SO_REUSEPORT lets any later
        # reuseport socket of the creator's uid join, so only ANY may ask.
        self.refusal = (
            (Reason.OPTIONS, errno.EINVAL)
            if r.options & SocketOptions.REUSEPORT and m.share is not ShareMode.ANY
            else None
        )
        exclusive = r.type == socket.SOCK_DGRAM and m.share is not ShareMode.ANY
        self.made_as = (
            dataclasses.replace(r, options=r.options | SocketOptions.NOREUSEADDR)
            if exclusive
            else r
        )
        self.name = m.name
        self.backlog = m.backlog
        self.key: Key = entry_key(r)
        self.share_name = f'"share":"{m.share.name}","name":{json_text(m.name)}'
        self.what = fragment(describe(r, m.backlog))
        # a G frame's description of the socket (adopt() checked family, type, address)
        self.suffix = grant_suffix(r.family, r.type, m.backlog is not None, r.address, r.port)

    def matches(self, m: SocketRequest) -> bool:
        return (
            self.request is m.request
            and self.share is m.share
            and self.name == m.name
            and self.backlog == m.backlog
        )


class _Made:
    """What the broker keeps with a cached socket (``Entry.extra``).
    ``sending``: queued ``G`` frames that will carry it; a socket released
    meanwhile is closed only when the last of them has gone (``doomed``)."""

    __slots__ = ("anc", "doomed", "sending", "suffix", "what")

    def __init__(self, entry: Entry, w: _Wanted, sock: socket.socket) -> None:
        r = entry.request
        if r.port == w.request.port:  # as asked: derived once per request already
            self.what, self.suffix = w.what, w.suffix
        else:  # port 0: cached under the port it got
            self.what = fragment(describe(r, entry.backlog))
            listening = entry.backlog is not None
            self.suffix = grant_suffix(r.family, r.type, listening, r.address, r.port)
        self.anc = [(_SOL_SOCKET, _SCM_RIGHTS, _INT.pack(sock.fileno()))]
        self.sending = 0
        self.doomed: socket.socket | None = None


def _what(entry: Entry) -> str:
    """``entry.extra``: its _Wanted while it is being created, then its _Made."""
    extra: _Made | _Wanted = entry.extra
    return extra.what


_K = struct.Struct("!cHI")  # a whole 'K' frame
