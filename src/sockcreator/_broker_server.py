"""The broker's server: connections, requests and answers on one event loop.

Each connection is a pair of plain callbacks: a reader registered once for
the connection's life, and a writer registered only while the client is
not reading its answers.  A frame is handled as soon as it is complete, in
the reader callback; nothing waits on a future, and no task runs per
connection or per message.  Answers go into the connection's output queue,
and once per turn of the event loop the server writes the audit log (one
write for every line of that turn) and then sends each connection's queue
(one ``sendmsg`` per descriptor, the frames without one joined).

A request that needs a new socket from the creator leaves its connection
*waiting*: its later frames queue up (at most ``max_pending``) and are
handled, in order, when the socket (or its refusal) arrives.  So are the
frames after answers that the client has not read yet: a stuck client
never stops the loop, it only stops being served.

The sharing rules and the bookkeeping are :class:`~._broker_table.ShareTable`'s;
this module does the I/O around it.

Descriptors in flight
---------------------
Linux charges every descriptor sent over a Unix socket and not yet received
to the *sender's* user (``unix_inflight``), and refuses further sends with
ETOOMANYREFS once that count passes the sender's RLIMIT_NOFILE.  A client
that asks and never reads would spend the broker's budget for everybody,
even after the broker has closed its connection, since what is queued stays
in flight as long as the client keeps its end open.  So the broker counts
every descriptor it sends, per connection and per client uid, and forgets a
connection's count only once ``SIOCOUTQ`` says the client has read all that
was sent to it (an upper bound, never an estimate).  A connection whose uid
is at ``max_inflight_per_uid`` (or the broker at ``max_inflight``) is held
back, not failed: its answers wait until the client reads, and past
``client_timeout`` it is cut off like any client that does not read.  A
connection closed with descriptors still unread is *draining*: shut down,
kept open to ask ``SIOCOUTQ``, and still counted against its uid (in flight
and as a connection) until the client has read or closed its end.
"""

from __future__ import annotations

import array
import asyncio
import collections
import dataclasses
import errno
import fcntl
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from ._broker_audit import Audit, describe, fragment, json_text
from ._broker_creator import CreatorChannel, Outcome
from ._broker_protocol import (
    VERSION,
    BrokerProtocolError,
    ClientMessage,
    Denied,
    Fatal,
    FatalCode,
    Hello,
    HelloReply,
    Reason,
    Release,
    RequestDecoder,
    ShareMode,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    StatusQuery,
    grant_frame,
    grant_suffix,
)
from ._broker_table import Entry, Grant, Key, ShareTable, entry_key
from ._errors import CreatorFatalError, SocketCreationError
from ._protocol import SocketOptions
from .broker_policy import PeerPolicy, Policy

__all__ = ["BrokerConfig", "BrokerServer", "Peer", "peer_credentials"]

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


# --- the server -----------------------------------------------------------------


class BrokerServer:
    """The broker's state and its accept loop (I/O on an asyncio loop)."""

    def __init__(
        self,
        config: BrokerConfig,
        creator: CreatorChannel,
        listener: socket.socket,
        audit_fd: int = 2,
    ) -> None:
        self.config = config
        self.creator = creator
        creator.auto_push = False  # pushed by _flush, after the answers of the turn
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.audit = Audit(audit_fd, self._want_flush)
        self.table = ShareTable(config.max_sockets, config.max_held)
        self.connections: set[_Connection] = set()
        self.per_uid: dict[int, int] = {}  # connections (draining ones too) by uid
        self.draining: set[_Connection] = set()  # closed, with descriptors still unread
        self.inflight = 0  # descriptors sent and maybe not read yet, all connections
        self.inflight_by_uid: dict[int, int] = {}
        self.owing: dict[int, set[_Connection]] = {}  # by uid: connections with inflight
        self._sweeper: asyncio.TimerHandle | None = None
        self.hello_reply = HelloReply(VERSION, config.max_held, config.max_pending).encode()
        self._next_conn = 1
        self._stopped: asyncio.Future[int] | None = None
        self._dirty: list[_Connection] = []
        self._flush_due = False
        self._wanted: dict[int, _Wanted] = {}

    # Once per turn of the loop: the audit log, then the answers ---------------

    def _want_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def queued(self, conn: _Connection) -> None:
        self._dirty.append(conn)
        self._want_flush()

    def _flush(self) -> None:
        self._flush_due = False
        self.audit.flush()
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.queued = False
            if not conn.closed and not conn.writing:
                try:
                    conn.send_out()
                except Exception as e:  # a bug: this connection only
                    conn._internal(e)
        self.creator.push()

    # The table's sockets -------------------------------------------------------

    def wanted(self, m: SocketRequest) -> _Wanted:
        w = self._wanted.get(id(m.request))
        if w is None or not w.matches(m):  # (w holds its request: the id is not reused)
            if len(self._wanted) >= _CACHE:
                self._wanted.clear()
            w = self._wanted[id(m.request)] = _Wanted(m)
        return w

    def create(self, entry: Entry, w: _Wanted) -> None:
        entry.extra = w
        self.creator.request(w.made_as, lambda outcome: self._created(entry, w, outcome))
        if self.creator.unsent:
            self._want_flush()  # which pushes the request to the creator

    def _created(self, entry: Entry, w: _Wanted, outcome: Outcome) -> None:
        if not isinstance(outcome, socket.socket):
            if isinstance(outcome, CreatorFatalError):  # on_fatal stops the server
                failure = (Reason.UNAVAILABLE, errno.EIO)
            elif isinstance(outcome, SocketCreationError):
                reason = Reason.SOCKET if outcome.stage == "socket" else Reason.BIND
                failure = (reason, outcome.errno or errno.EIO)
            else:  # our own descriptor table was full when the socket came
                failure = (Reason.LIMIT, errno.EMFILE)
            for g in self.table.failed(entry):
                g.owner.ready(g, failure)
            return
        sock = outcome
        try:
            if entry.backlog is not None:
                sock.listen(entry.backlog)
            port = entry.request.port or sock.getsockname()[1]  # adopt() checked a fixed one
        except OSError as e:
            sock.close()
            for g in self.table.failed(entry):
                g.owner.ready(g, (Reason.LISTEN, e.errno or errno.EIO))
            return
        grants = self.table.created(entry, sock, port)
        if grants is None:  # everyone waiting for it went away meanwhile
            sock.close()
            return
        entry.extra = _Made(entry, w, sock)
        for g in grants:
            g.owner.ready(g, None)

    def close_socket(self, entry: Entry, sock: socket.socket) -> None:
        """Close a socket the table let go of (once its queued grants are sent)."""
        made = entry.extra
        if isinstance(made, _Made) and made.sending:
            made.doomed = sock
        else:
            sock.close()

    def sent(self, made: _Made) -> None:
        """A queued ``G`` frame went out, or will never go."""
        made.sending -= 1
        if not made.sending and made.doomed is not None:
            made.doomed.close()
            made.doomed = None

    # Descriptors in flight (see the module doc) -------------------------------

    def charge(self, conn: _Connection) -> None:
        """One more descriptor sent on ``conn``."""
        uid = conn.peer.uid
        conn.inflight += 1
        self.inflight += 1
        self.inflight_by_uid[uid] = self.inflight_by_uid.get(uid, 0) + 1
        if conn.inflight == 1:
            self.owing.setdefault(uid, set()).add(conn)

    def settle(self, conn: _Connection) -> None:
        """``conn``'s client has read everything sent to it."""
        n = conn.inflight
        if not n:
            return
        uid = conn.peer.uid
        conn.inflight = 0
        self.inflight -= n
        left = self.inflight_by_uid[uid] - n
        if left:
            self.inflight_by_uid[uid] = left
        else:
            del self.inflight_by_uid[uid]
        owing = self.owing[uid]
        owing.discard(conn)
        if not owing:
            del self.owing[uid]

    def recount(self, conns: list[_Connection]) -> None:
        """Ask the kernel about each of ``conns``: settle those whose client
        has read everything, and let go of draining ones that are done."""
        for conn in conns:
            if conn.inflight and not _unread(conn.fd):
                self.settle(conn)
                if conn in self.draining:
                    conn.finish()

    def room_for(self, conn: _Connection) -> bool:
        """Whether one more descriptor may go to ``conn`` now."""
        cfg = self.config
        if conn.inflight and not _unread(conn.fd):
            self.settle(conn)
        uid = conn.peer.uid
        if self.inflight_by_uid.get(uid, 0) >= cfg.max_inflight_per_uid:
            self.recount(list(self.owing.get(uid, ())))
            if self.inflight_by_uid.get(uid, 0) >= cfg.max_inflight_per_uid:
                return False
        if self.inflight >= cfg.max_inflight:
            self.recount([c for owing in self.owing.values() for c in owing])
            if self.inflight >= cfg.max_inflight:
                return False
        return True

    def drain(self, conn: _Connection) -> None:
        """Keep a closed connection until its client has read (or closed)."""
        self.draining.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        self.recount(list(self.draining))
        if self.draining:
            self._sweeper = self.loop.call_later(_SWEEP, self._sweep)

    # Running -----------------------------------------------------------------

    async def serve(self) -> int:
        """Accept until :meth:`stop`; returns the exit status."""
        loop = self.loop
        self._stopped = loop.create_future()
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        try:
            return await self._stopped
        finally:
            loop.remove_reader(self.listener.fileno())
            for conn in list(self.connections):
                conn.shut(FatalCode.SHUTDOWN, "the broker is stopping", log=False)
            for entry in list(self.table.entries.values()):
                if entry.sock is not None:
                    entry.sock.close()
            for conn in list(self.draining):
                conn.finish()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            self.audit.flush()

    def stop(self, status: int = 0) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(status)

    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time: then let the connections run
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: stop accepting for a moment
                self.audit.log("error", what="accept", error=errno.errorcode.get(e.errno or 0))
                loop = self.loop
                loop.remove_reader(self.listener.fileno())
                loop.call_later(0.1, loop.add_reader, self.listener.fileno(), self._accept)
                return
            conn = _Connection(self, sock, self._next_conn)
            self._next_conn += 1
            try:
                conn.start()
            except Exception as e:  # a bug: this connection only
                conn._internal(e)


# --- one client -------------------------------------------------------------------


_Out = tuple[bytes, "_Made | None"]  # a frame (or frames), and the socket it carries


class _Connection:
    """One client: see the module doc.  Answers are in request order; while
    a request waits for its socket, a status answer is being produced, or
    answers wait for the client to read them, later frames queue up."""

    __slots__ = (
        "allowed",
        "closed",
        "counted",
        "decoder",
        "eof",
        "fd",
        "held_back",
        "in_timer",
        "inflight",
        "inq",
        "number",
        "out",
        "out_timer",
        "partial",
        "peer",
        "policy",
        "poll_timer",
        "queued",
        "reading",
        "server",
        "sock",
        "status",
        "waiting",
        "watching",
        "who",
        "writing",
    )  # fmt: skip

    def __init__(self, server: BrokerServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.peer = _NOBODY
        self.who = f'"uid":0,"gid":0,"pid":0,"conn":{number}'  # the audit's "who" fields
        self.policy = PeerPolicy(())
        self.allowed: dict[_Wanted, bool] = {}  # this peer's policy decisions
        self.counted = False
        self.decoder = RequestDecoder()
        self.inq: collections.deque[ClientMessage] = collections.deque()  # not handled yet
        self.out: collections.deque[_Out] = collections.deque()  # not sent yet
        self.partial = False  # out[0] is the rest of a frame partly sent
        self.queued = False  # in the server's list for this turn's flush
        self.waiting: tuple[SocketRequest, _Wanted, Grant] | None = None
        self.status: Iterator[bytes] | None = None
        self.reading = False
        self.writing = False  # output is blocked: the client is not reading
        self.watching = False  # a writer callback is registered (the buffer is full)
        self.held_back = False  # was held back for unread descriptors (logged once)
        self.inflight = 0  # descriptors sent since the client was last seen to have read all
        self.poll_timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.closed = False
        self.in_timer: asyncio.TimerHandle | None = None
        self.out_timer: asyncio.TimerHandle | None = None

    # Setting up --------------------------------------------------------------

    def start(self) -> None:
        server, cfg = self.server, self.server.config
        server.connections.add(self)
        try:
            self.sock.setblocking(False)
            p = self.peer = peer_credentials(self.sock)
        except OSError as e:  # the kernel refusing SO_PEERCRED: this one only
            self._error("INTERNAL", f"{type(e).__name__}: {e}"[:200])
            self.close()
            return
        self.who = f'"uid":{p.uid},"gid":{p.gid},"pid":{p.pid},"conn":{self.number}'
        if len(server.connections) + len(server.draining) > cfg.max_connections:
            return self.shut(FatalCode.BUSY, "too many connections")
        n = server.per_uid.get(p.uid, 0)
        if n >= cfg.max_connections_per_uid:
            return self.shut(FatalCode.BUSY, "too many connections from this user")
        server.per_uid[p.uid] = n + 1
        self.counted = True
        self.policy = cfg.policy.for_peer(p.uid, p.groups)
        server.loop.add_reader(self.fd, self._readable)
        self.reading = True
        self._arm_in_timer()

    # Input -------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV)  # no ancillary buffer: descriptors are dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET: gone, with input unread
            data = b""
        try:
            if not data:
                self._stop_reading()
                self.eof = True
                if self.decoder.partial:
                    self._error("EOF", "connection closed inside a frame")
            else:
                try:
                    msgs = self.decoder.feed(data)
                except BrokerProtocolError as e:
                    return self.shut(e.code, str(e))
                inq = self.inq
                busy = self.waiting is not None or self.status is not None or self.writing
                if len(inq) + len(msgs) + busy > self.server.config.max_pending:
                    n = self.server.config.max_pending
                    return self.shut(FatalCode.PENDING, f"more than {n} requests pending")
                inq.extend(msgs)
                self._arm_in_timer()
            self._pump()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _arm_in_timer(self) -> None:
        """A deadline while a frame is unfinished (or the hello missing)."""
        stalled = self.decoder.partial or not self.decoder.greeted
        if stalled and self.in_timer is None and not self.eof:
            loop = self.server.loop
            self.in_timer = loop.call_later(self.server.config.client_timeout, self._stalled)
        elif not stalled and self.in_timer is not None:
            self.in_timer.cancel()
            self.in_timer = None

    def _stalled(self) -> None:
        self.in_timer = None
        self.shut(FatalCode.TIMEOUT, "frame left unfinished too long")

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fd)
        if self.in_timer is not None:
            self.in_timer.cancel()
            self.in_timer = None

    def _stop_writing(self) -> None:
        self.writing = False
        if self.watching:
            self.watching = False
            self.server.loop.remove_writer(self.fd)
        if self.out_timer is not None:
            self.out_timer.cancel()
            self.out_timer = None
        if self.poll_timer is not None:
            self.poll_timer.cancel()
            self.poll_timer = None

    def _block(self) -> None:
        """Output waits (the deadline counts from the first time)."""
        if not self.writing:
            self.writing = True
            server = self.server
            self.out_timer = server.loop.call_later(server.config.client_timeout, self._unread)

    def _hold_back(self) -> None:
        """Too many descriptors unread: look again in a moment."""
        self._block()
        if self.watching:
            self.watching = False
            self.server.loop.remove_writer(self.fd)
        if not self.held_back:
            self.held_back = True
            self._error("INFLIGHT", "held back: descriptors sent and not read yet")
        if self.poll_timer is None:
            self.poll_timer = self.server.loop.call_later(_POLL, self._poll)

    def _poll(self) -> None:
        self.poll_timer = None
        self._writable()

    def _pump(self) -> None:
        """Handle queued frames until one has to wait; close after EOF once
        everything is answered and sent."""
        inq = self.inq
        while inq and self.waiting is None and self.status is None and not self.writing:
            m = inq.popleft()
            kind = type(m)
            if kind is SocketRequest:
                self._request(m)  # type: ignore[arg-type]
            elif kind is Release:
                self._release(m)  # type: ignore[arg-type]
            elif kind is StatusQuery:
                self._status(m)  # type: ignore[arg-type]
            elif kind is Hello:
                self._queue(self.server.hello_reply)
            if self.closed:
                return
        if self.eof and not self.out and not inq and self.waiting is None and self.status is None:
            self.close()

    # Output ------------------------------------------------------------------

    def _queue(self, data: bytes, made: _Made | None = None) -> None:
        if made is not None:
            made.sending += 1
        self.out.append((data, made))
        if not self.queued:
            self.queued = True
            self.server.queued(self)

    def send_out(self, resume: bool = True) -> None:
        """Send what is queued: each descriptor with the first byte of its
        ``G`` frame, in one ``sendmsg`` with the frames after it that carry
        none.  What the client does not take waits for the writer callback
        (and the answers-unread deadline).  ``resume``: once all is sent,
        go on with the queued frames."""
        server = self.server
        if server.audit.pending:  # every answer's line is written before it is sent
            server.audit.flush()
        out, sock = self.out, self.sock
        while out:
            data, made = out[0]
            if made is not None and not server.room_for(self):
                return self._hold_back()
            if len(out) > 1 and out[1][1] is None:
                parts, k = [data], 1
                while k < len(out) and out[k][1] is None:
                    parts.append(out[k][0])
                    k += 1
                data = b"".join(parts)
            try:
                n = sock.sendmsg([data], made.anc) if made is not None else sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:  # EPIPE, ECONNRESET: gone; ETOOMANYREFS: this one only
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    self._error("SEND", _ERRNAME.get(e.errno or 0, str(e.errno)))
                self.close()
                return
            if n and made is not None:
                server.charge(self)
                server.sent(made)  # the descriptor went with the first byte
                out[0] = (out[0][0], None)
            while n:
                head = out[0][0]
                if n < len(head):
                    out[0] = (head[n:], None)
                    self.partial = True
                    break
                out.popleft()
                n -= len(head)
                self.partial = False
            if n < len(data) and out:  # the client is not taking it: wait until it does
                self._block()
                if not self.watching:
                    self.watching = True
                    server.loop.add_writer(self.fd, self._writable)
                return
        self._stop_writing()
        if resume:
            if self.status is not None:
                self._pump_status()
            self._pump()

    def _writable(self) -> None:
        try:
            self.send_out()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _unread(self) -> None:
        self.out_timer = None
        self.shut(FatalCode.TIMEOUT, "answers left unread too long")

    # Ending ------------------------------------------------------------------

    def _error(self, code: str, text: str) -> None:
        self.server.audit.event("error", f'{self.who},"code":"{code}","text":{json_text(text)}')

    def _internal(self, e: Exception) -> None:
        if not self.closed:
            self._error("INTERNAL", f"{type(e).__name__}: {e}"[:200])
            self.close()

    def shut(self, code: FatalCode, text: str, *, log: bool = True) -> None:
        """Close with an ``X`` frame: after the answers already queued, if
        they can be sent at once, and only at a frame boundary."""
        if self.closed:
            return
        if log:
            self._error(code.name, text)
        self._stop_reading()
        if self.out and not self.writing:
            self.send_out(resume=False)
        if not self.closed and not self.out and not self.partial:
            self.server.audit.flush()  # the line first, as for every answer
            try:  # best effort: one non-blocking send
                self.sock.send(Fatal(code, text).encode())
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        """Gone: every grant released, the connection closed."""
        if self.closed:
            return
        self.closed = True
        server = self.server
        self._stop_reading()
        self._stop_writing()
        for g, sock in server.table.release_all(self):
            server.audit.event(
                "release",
                f'{self.who},"grant":{g.id},"cause":"disconnect",'
                f'"holders":{len(g.entry.grants)},{_what(g.entry)}',
            )
            if sock is not None:
                server.close_socket(g.entry, sock)
        for _, made in self.out:
            if made is not None:
                server.sent(made)
        self.out.clear()
        self.inq.clear()
        self.waiting = None
        self.status = None
        server.connections.discard(self)
        if self.inflight and _unread(self.fd):
            try:  # the client reads what is queued, then EOF
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.drain(self)
        else:
            self.finish()

    def finish(self) -> None:
        """Let go of a closed connection for good: its counts and descriptor."""
        server = self.server
        server.draining.discard(self)
        server.settle(self)
        if self.counted:
            self.counted = False
            uid = self.peer.uid
            left = server.per_uid[uid] - 1
            if left:
                server.per_uid[uid] = left
            else:
                del server.per_uid[uid]
        self.sock.close()

    # Requests ----------------------------------------------------------------

    def _request(self, m: SocketRequest) -> None:
        server = self.server
        w = server.wanted(m)
        allowed = self.allowed.get(w)
        if allowed is None:  # the policy is fixed: the same peer and request, the same answer
            if len(self.allowed) >= _POLICY_CACHE:
                self.allowed.clear()
            allowed = self.allowed[w] = self.policy.allows(m.request)
        if not allowed:
            return self._deny(m, w, Reason.POLICY, errno.EPERM)
        if w.refusal is not None:
            return self._deny(m, w, *w.refusal)
        g = server.table.claim(self, self.peer.uid, m.request, m.backlog, m.share, m.name, w.key)
        if isinstance(g, Reason):
            return self._deny(m, w, g, _ERRNO[g])
        if g.entry.sock is not None:
            return self._granted(m, w, g)
        self.waiting = (m, w, g)  # until the socket (or its refusal) comes
        if g.creates:
            server.create(g.entry, w)

    def ready(self, g: Grant, failure: tuple[Reason, int] | None) -> None:
        """The socket that ``g`` waited for exists now (or never will)."""
        waiting = self.waiting
        if waiting is None or waiting[2] is not g or self.closed:
            return
        self.waiting = None
        m, w, _ = waiting
        try:
            if failure is None:
                self._granted(m, w, g)
            else:
                self._deny(m, w, *failure)
            self._pump()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _granted(self, m: SocketRequest, w: _Wanted, g: Grant) -> None:
        entry = g.entry
        made: _Made = entry.extra
        self.server.audit.event(
            "grant",
            f'{self.who},"id":{m.id},"grant":{g.id},{w.share_name},'
            f'"holders":{len(entry.grants)},"result":"ok",{made.what}',
        )
        self._queue(grant_frame(m.id, g.id, made.suffix), made)

    def _deny(self, m: SocketRequest, w: _Wanted, reason: Reason, err: int) -> None:
        self.server.audit.event(
            "deny",
            f'{self.who},"id":{m.id},{w.share_name},"result":"{_ERRNAME.get(err, err)}",'
            f'"reason":"{reason.name.lower()}",{w.what}',
        )
        self._queue(Denied(m.id, err, reason).encode())

    def _release(self, m: Release) -> None:
        server = self.server
        g = server.table.grant(self, m.grant)
        if g is None:
            server.audit.event(
                "deny",
                f'{self.who},"id":{m.id},"grant":{m.grant},"what":"release",'
                '"result":"EBADF","reason":"unknown"',
            )
            self._queue(Denied(m.id, errno.EBADF, Reason.UNKNOWN_GRANT).encode())
            return
        entry = g.entry
        sock = server.table.release(g)
        server.audit.event(
            "release",
            f'{self.who},"id":{m.id},"grant":{g.id},"cause":"request",'
            f'"holders":{len(entry.grants)},{_what(entry)}',
        )
        if sock is not None:
            server.close_socket(entry, sock)
        self._queue(_K.pack(b"K", 4, m.id))

    def _status(self, m: StatusQuery) -> None:
        admin = self.server.config.admin_gid
        if self.peer.uid != 0 and (admin is None or admin not in self.peer.groups):
            self.server.audit.event(
                "deny",
                f'{self.who},"id":{m.id},"what":"status","result":"EPERM","reason":"policy"',
            )
            self._queue(Denied(m.id, errno.EPERM, Reason.POLICY).encode())
            return
        self.status = self._status_frames(m.id)
        self._pump_status()

    def _pump_status(self) -> None:
        """Produce the status answer a few chunks at a time, as it is sent."""
        while self.status is not None and len(self.out) < 4:
            chunk = next(self.status, None)
            if chunk is None:
                self.status = None
            else:
                self._queue(chunk)

    def _status_frames(self, rid: int) -> Iterator[bytes]:
        chunk: list[bytes] = []
        count = 0
        for entry in list(self.server.table.entries.values()):
            if entry.sock is None:
                continue
            for g in list(entry.grants.values()):
                p: Peer = g.owner.peer
                frame = StatusEntry(
                    rid, g.id, entry.request, g.share, g.name, entry.backlog, p.uid, p.gid, p.pid
                ).encode()
                chunk.append(frame)
                count += 1
                if len(chunk) >= 256:
                    yield b"".join(chunk)
                    chunk.clear()
        chunk.append(StatusEnd(rid, count).encode())
        self.server.audit.event("status", f'{self.who},"id":{rid},"entries":{count}')
        yield b"".join(chunk)
