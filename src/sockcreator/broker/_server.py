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

import asyncio
import dataclasses
import errno
import socket
from collections.abc import Callable

from ..client._errors import CreatorFatalError, SocketCreationError
from ..client._protocol import BindRequest
from ._audit import Audit
from ._connection import _Connection
from ._creator import BindOutcome, CreatorChannel, Outcome
from ._protocol import (
    SUPPORTED_VERSIONS,
    FatalCode,
    HelloReply,
    Reason,
    SocketRequest,
    request_fields,
)
from ._shared import (
    _CACHE,
    _SWEEP,
    BrokerConfig,
    Peer,
    _Made,
    _unread,
    _Wanted,
    _what,
    peer_credentials,
)
from ._table import Entry, ShareTable
from .policy import Policy

__all__ = ["BrokerConfig", "BrokerServer", "Peer", "peer_credentials"]


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
        self.table = ShareTable(config.max_sockets, config.max_held, linger=config.linger)
        self.connections: set[_Connection] = set()
        self.per_uid: dict[int, int] = {}  # connections (draining ones too) by uid
        self.draining: set[_Connection] = set()  # closed, with descriptors still unread
        self.inflight = 0  # descriptors sent and maybe not read yet, all connections
        self.inflight_by_uid: dict[int, int] = {}
        self.owing: dict[int, set[_Connection]] = {}  # by uid: connections with inflight
        self._sweeper: asyncio.TimerHandle | None = None
        cap = config.max_linger
        self.max_linger = config.linger if cap is None else cap  # what a 'q' may ask for
        self.binds = [0, 0]  # client sockets bound ('B'), refused
        self.hello_replies = {  # (answered in the version the client asked for)
            v: HelloReply(v, config.max_held, config.max_pending).encode()
            for v in SUPPORTED_VERSIONS
        }
        self._next_conn = 1
        self._stopped: asyncio.Future[int] | None = None
        self._dirty: list[_Connection] = []
        self._flush_due = False
        self._wanted: dict[int, _Wanted] = {}
        self._by_bytes: dict[bytes, _Wanted] = {}  # the same, by a 'Q' body after its id

    # Once per turn of the loop: the audit log, then the answers ---------------

    def _want_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def queued(self, conn: _Connection) -> None:
        self._dirty.append(conn)
        if not self._flush_due:  # (_want_flush inlined)
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.audit.lines:
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

    def wanted_bytes(self, rest: bytes) -> _Wanted:
        """:meth:`wanted` for a ``Q`` frame's body after its id
        (:meth:`RequestDecoder.whole`), checked as the decoder checks it:
        raises :class:`BrokerProtocolError` for a malformed one.  The same
        bytes, the same object, with no message built."""
        w = self._by_bytes.get(rest)
        if w is None:
            m = SocketRequest(0, *request_fields(rest))
            if len(self._by_bytes) >= _CACHE:
                self._by_bytes.clear()
            w = self._by_bytes[rest] = self.wanted(m)
        return w

    def create(self, entry: Entry, w: _Wanted) -> None:
        entry.extra = w
        self.creator.request(w.made_as, lambda outcome: self._created(entry, w, outcome))
        if self.creator.unsent:
            self._want_flush()  # which pushes the request to the creator

    def bind(self, request: BindRequest, fd: int, callback: Callable[[BindOutcome], None]) -> None:
        """A client's own socket, for the creator to bind (``fd`` is the
        channel's from now on)."""
        self.creator.bind(request, fd, callback)
        if self.creator.unsent:
            self._want_flush()

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

    def let_go(self, entry: Entry, sock: socket.socket | None, who: str) -> None:
        """After the table released a grant: close what it handed back, or,
        if the socket now lingers, say so and set its expiry."""
        if sock is not None:
            self.close_socket(entry, sock)
        elif entry.phantom is not None and not entry.grants:
            seconds = entry.lingers
            self.audit.event("linger", f'{who},"seconds":{seconds},{_what(entry)}')
            self.loop.call_later(seconds, self._expire, entry, entry.gen)

    def _expire(self, entry: Entry, gen: int) -> None:
        sock = self.table.expire(entry, gen)
        if sock is not None:  # (else it was taken again, or lingers anew)
            self.audit.event("expire", f'"holders":0,{_what(entry)}')
            self.close_socket(entry, sock)

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
        """Whether one more descriptor may go to ``conn`` now.  The kernel is
        asked (SIOCOUTQ) only once a count is at its limit: until then an
        upper bound is as good as the exact figure, and asking on every
        grant cost a system call per grant."""
        cfg = self.config
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

    # Reloading ---------------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        """Decide every later request by ``policy``: new connections take it
        from the configuration; each live one gets its peer's rules again,
        and forgets the decisions it had cached.  Grants already made stay,
        and so does a request already waiting for its socket (it was decided
        before).  Frames queued behind it are decided when they are handled:
        by ``policy``."""
        self.config = dataclasses.replace(self.config, policy=policy)
        for conn in self.connections:
            conn.policy = policy.for_peer(conn.peer.uid, conn.peer.groups)
            conn.allowed.clear()

    def use_creator(self, creator: CreatorChannel) -> CreatorChannel:
        """Send every later request to ``creator`` (a widening reload's new
        one); the old one, returned, still answers what it has in flight
        (its callbacks are the requests' own) and is the caller's to retire."""
        old, self.creator = self.creator, creator
        creator.auto_push = False  # pushed by _flush, as the first one
        return old

    def counts(self) -> tuple[int, int, int]:
        """(connections, sockets held, grants): for STATUS= and the audit."""
        sockets = sum(1 for e in self.table.entries.values() if e.sock is not None)
        grants = sum(len(h) for h in self.table.held.values())
        return len(self.connections), sockets, grants

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
