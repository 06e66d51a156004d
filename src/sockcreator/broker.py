"""``sockcreator serve``: one broker hands privileged sockets to many programs.

::

    sockcreator serve --socket PATH [--policy FILE] [--user U] [--mode 0666]
                      [--group G] [--admin-group G] [limits...]

Started as root, in this order:

1. Load the policy file (:mod:`sockcreator.broker_policy`), resolve U and
   the groups, and check PATH's directory -- before anything is started.
2. Start the hardened creator (dropping to U, keeping only
   CAP_NET_BIND_SERVICE) with the union of the policy as its allow-list: the
   creator fences in everything, the broker checks each user exactly.
3. Create the listening socket at PATH safely: bound under a temporary name
   in the same directory with umask 0177, then chown/chmod, listen, and
   rename over PATH.  The directory and every ancestor must be owned by root
   (or us) and not writable by others unless sticky.  An existing PATH is
   replaced only if it is a socket nobody answers on.
4. Drop privileges to U for good (:func:`~.privileges.drop_privileges`).
5. Serve, in one asyncio process: one task per connection, every read and
   write bounded and, while a frame is unfinished or an answer unread,
   timed out.  A slow or stuck client delays nobody else.

Each peer is identified by SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS (its
supplementary groups) when it connects.  The wire protocol is in
:mod:`sockcreator._broker_protocol`; the sharing rules are BIND 10's:

- one cached socket per (protocol, address, port), with the options and
  backlog it was made with, and one reference per grant;
- NO: nobody else may hold it; SAMEAPP: only requests with the same share
  name, from the same uid; ANY: anyone whose own mode allows it.  Both the
  holder's mode and the requester's count;
- another request for a held socket with other options (or another backlog)
  is a conflict (EBUSY);
- a grant ends by an explicit release, or when its connection closes (its
  process died); the cached socket is closed with its last grant;
- port 0 asks for a new socket on an ephemeral port each time; it is cached
  under the port it got.

Every grant, denial and release is one JSON line on stderr (the audit log).

Exit statuses: 0 stopped by SIGTERM/SIGINT; 1 the creator died; 3 bad
configuration (policy, user, group, limits); 4 the socket path cannot be
used; 5 the creator cannot be started; 6 privileges cannot be dropped.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import dataclasses
import errno
import grp
import json
import os
import resource
import secrets
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

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
    Released,
    RequestDecoder,
    ShareMode,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    StatusQuery,
    grant_frame,
    grant_suffix,
)
from ._channel import ANCBUFSIZE, RECV_FLAGS, adopt, close_fds, creator_argv, spawn, unpack_fds
from ._errors import CreatorFatalError, SocketCreationError, socket_creation_error
from ._protocol import (
    AnswerParser,
    Event,
    ProtocolViolation,
    Request,
    SocketOptions,
    SocketReceived,
)
from .broker_policy import PeerPolicy, Policy, PolicyError, load_policy
from .privileges import drop_privileges, resolve_credentials

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CREATOR",
    "EXIT_CREATOR_DIED",
    "EXIT_OK",
    "EXIT_PRIVILEGES",
    "EXIT_SOCKET",
    "BrokerConfig",
    "BrokerServer",
    "CreatorChannel",
    "Peer",
    "bind_unix_socket",
    "build_parser",
    "main",
    "peer_credentials",
    "shareable",
    "status_main",
]

EXIT_OK, EXIT_CREATOR_DIED, EXIT_CONFIG, EXIT_SOCKET, EXIT_CREATOR, EXIT_PRIVILEGES = (
    0,
    1,
    3,
    4,
    5,
    6,
)
DEFAULT_POLICY = "/etc/sockcreator/broker.toml"
_PROG = "sockcreator serve"
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_INT = struct.Struct("@i")
_RECV = 4096


class _Close(Exception):
    """End this connection (with an ``X`` frame if ``code`` is set)."""

    def __init__(self, code: FatalCode | None, text: str) -> None:
        super().__init__(text)
        self.code = code


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

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_uid", "max_held", "max_sockets"):
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


# --- sharing --------------------------------------------------------------------


def _lets(mode: ShareMode, name: str, uid: int, other_name: str, other_uid: int) -> bool:
    if mode is ShareMode.ANY:
        return True
    if mode is ShareMode.SAMEAPP:
        return name == other_name and uid == other_uid
    return False


def shareable(
    holders: Sequence[tuple[ShareMode, str, int]], mode: ShareMode, name: str, uid: int
) -> bool:
    """BIND 10's rule: every holder's mode must let the requester in, and the
    requester's mode must let every holder stay.  ``holders`` are
    (mode, name, uid)."""
    return all(
        _lets(h_mode, h_name, h_uid, name, uid) and _lets(mode, name, uid, h_name, h_uid)
        for h_mode, h_name, h_uid in holders
    )


class _Holders:
    """What :func:`shareable` needs to know about an entry's grants, kept up
    to date as grants come and go, so that the check costs the same with one
    holder or thousands."""

    __slots__ = ("keys", "no", "sameapp")

    def __init__(self) -> None:
        self.no = 0  # holders in mode NO
        self.sameapp: collections.Counter[tuple[str, int]] = collections.Counter()
        self.keys: collections.Counter[tuple[str, int]] = collections.Counter()  # every holder

    def change(self, mode: ShareMode, key: tuple[str, int], delta: int) -> None:
        if mode is ShareMode.NO:
            self.no += delta
        elif mode is ShareMode.SAMEAPP:
            self.sameapp[key] += delta
            if not self.sameapp[key]:
                del self.sameapp[key]
        self.keys[key] += delta
        if not self.keys[key]:
            del self.keys[key]

    def admit(self, mode: ShareMode, key: tuple[str, int]) -> bool:
        """The same answer as :func:`shareable` over the holders."""
        if not self.keys:
            return True
        if self.no or not self.sameapp.keys() <= {key}:
            return False  # a holder's mode refuses the requester
        if mode is ShareMode.ANY:
            return True
        return mode is ShareMode.SAMEAPP and self.keys.keys() == {key}


class _Entry:
    """One cached socket and its grants."""

    __slots__ = (
        "backlog", "desc", "grants", "holders", "key", "ready", "request", "sock", "suffix"
    )  # fmt: skip

    def __init__(self, key: tuple[Any, ...], request: Request, backlog: int | None) -> None:
        self.key = key
        self.request = request
        self.backlog = backlog
        self.sock: socket.socket | None = None
        self.suffix = b""
        self.grants: dict[int, _Grant] = {}
        self.holders = _Holders()
        self.ready: asyncio.Future[tuple[Reason, int] | None] | None = None
        self.desc = _describe(request, backlog)  # for the audit log


class _Grant:
    __slots__ = ("conn", "entry", "id", "name", "share")

    def __init__(
        self, gid: int, conn: _Connection, entry: _Entry, share: ShareMode, name: str
    ) -> None:
        self.id = gid
        self.conn = conn
        self.entry = entry
        self.share = share
        self.name = name


# --- the audit log --------------------------------------------------------------


class _Audit:
    """One JSON object per line, written before the answer it records is sent."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    _encode = json.JSONEncoder(separators=(",", ":")).encode

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        data = (self._encode(record) + "\n").encode("utf-8", "replace")
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:  # a non-blocking stderr: wait, never drop a line
                select.select([], [self._fd], [], 1.0)
            except OSError:
                return

    def flush(self) -> None:
        """Nothing is buffered (kept for callers that flush before exit)."""


_OPTION_NAMES = [
    [o.name.lower() for o in SocketOptions if o.value & bits and o.name] for bits in range(8)
]


def _describe(request: Request, backlog: int | None) -> dict[str, Any]:
    return {
        "proto": request.protocol,
        "addr": str(request.address),
        "port": request.port,
        "options": _OPTION_NAMES[int(request.options) & 7],
        "backlog": backlog,
    }


# --- the creator --------------------------------------------------------------------


class CreatorChannel:
    """The broker's connection to its creator: many requests in flight, one
    reader callback registered for the channel's life, answers handed out in
    order.  (AsyncSocketCreator waits on a future and re-registers the
    descriptor for every read; this costs half as much per socket, which is
    what a broker does all day.)  The protocol itself is
    :class:`~sockcreator._protocol.AnswerParser`'s; received sockets are
    checked by :func:`~sockcreator._channel.adopt`.

    Any protocol violation, EOF, or silence past ``timeout`` with answers
    due kills the creator; every waiter then gets CreatorFatalError and
    ``on_fatal`` is called once.
    """

    def __init__(self, argv: Sequence[str], timeout: float = 10.0) -> None:
        self._argv = list(argv)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._parser = AnswerParser()
        self._waiters: collections.deque[asyncio.Future[socket.socket]] = collections.deque()
        self._out = b""  # what the creator has not taken yet
        self._timer: asyncio.TimerHandle | None = None
        self._dead: str | None = None
        self._eof: asyncio.Future[None] | None = None
        self.on_fatal: Callable[[CreatorFatalError], None] | None = None
        self._loop = asyncio.get_running_loop()  # made inside the loop it serves

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the creator (it hardens itself at once)."""
        self._sock, self._proc = spawn(self._argv)
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._readable)

    async def get(self, request: Request) -> socket.socket:
        """One socket; SocketCreationError or CreatorFatalError."""
        if self._dead is not None or self._sock is None:
            raise CreatorFatalError(f"creator unusable: {self._dead or 'not started'}")
        fut: asyncio.Future[socket.socket] = self._loop.create_future()
        self._parser.expect(request)
        self._waiters.append(fut)
        self._write(request.encode())
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._silent)
        return await fut

    def _write(self, data: bytes) -> None:
        assert self._sock is not None
        if not self._out:
            try:
                data = data[self._sock.send(data) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._fatal(f"cannot write to the creator: {e}")
                return
            if not data:
                return
            self._loop.add_writer(self._sock.fileno(), self._writable)
        self._out += data

    def _writable(self) -> None:
        assert self._sock is not None
        try:
            self._out = self._out[self._sock.send(self._out) :]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fatal(f"cannot write to the creator: {e}")
            return
        if not self._out:
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        assert self._sock is not None
        while self._dead is None:
            try:
                data, anc, flags, _ = self._sock.recvmsg(
                    self._parser.bytes_wanted() or 1, ANCBUFSIZE, RECV_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNRESET
                data, anc, flags = b"", [], 0
            try:
                fds = unpack_fds(anc, flags)
            except ProtocolViolation as e:
                self._fatal(str(e))
                return
            if not data:
                close_fds(fds)
                if self._eof is not None and not self._waiters:
                    self._finish_eof()
                else:
                    self._fatal("the creator closed the connection")
                return
            try:
                events = self._parser.feed(data, fds)
            except ProtocolViolation as e:
                close_fds(fds)
                self._fatal(str(e), e.condition)
                return
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        for i, ev in enumerate(events):
            fut = self._waiters.popleft()
            if isinstance(ev, SocketReceived):
                try:
                    sock = adopt(ev.fd, ev.request)
                except ProtocolViolation as e:
                    close_fds(x.fd for x in events[i + 1 :] if isinstance(x, SocketReceived))
                    self._waiters.appendleft(fut)
                    self._fatal(str(e))
                    return
                if fut.done():  # its waiter was cancelled
                    sock.close()
                else:
                    fut.set_result(sock)
            elif not fut.done():
                fut.set_exception(socket_creation_error(ev.errno, ev.stage, ev.request))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiters:  # progress: a fresh deadline for the rest
            self._timer = self._loop.call_later(self._timeout, self._silent)

    def _silent(self) -> None:
        self._timer = None
        self._fatal(f"no answer from the creator within {self._timeout}s")

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None and self._sock.fileno() != -1:
            loop = self._loop
            loop.remove_reader(self._sock.fileno())
            loop.remove_writer(self._sock.fileno())
            self._sock.close()

    def _fatal(self, reason: str, condition: str | None = None) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        err = CreatorFatalError(reason, condition=condition)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)
        if self.on_fatal is not None:
            self.on_fatal(err)

    def _finish_eof(self) -> None:
        self._dead = "terminated"
        self._close()
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)

    async def terminate(self) -> int | None:
        """'T', then EOF (or the timeout), then reap; the exit status."""
        loop = self._loop
        if self._dead is None and self._sock is not None:
            self._eof = loop.create_future()
            self._write(b"T")
            try:
                await asyncio.wait_for(asyncio.shield(self._eof), self._timeout)
            except asyncio.TimeoutError:
                self._fatal("the creator did not exit after 'T'")
        proc = self._proc
        if proc is None:
            return None
        deadline = loop.time() + self._timeout
        while (status := proc.poll()) is None:
            if loop.time() > deadline:
                proc.kill()
                deadline = float("inf")
            await asyncio.sleep(0.005)
        return status


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
        self.listener = listener
        self.audit = _Audit(audit_fd)
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self.grants: dict[int, _Grant] = {}
        self.connections: set[_Connection] = set()
        self.per_uid: dict[int, int] = {}
        self._next_grant = 1
        self._next_conn = 1
        self._stopped: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # The shared table ------------------------------------------------------

    def new_grant(self, conn: _Connection, entry: _Entry, share: ShareMode, name: str) -> _Grant:
        g = _Grant(self._next_grant, conn, entry, share, name)
        self._next_grant += 1
        entry.grants[g.id] = g
        entry.holders.change(share, (name, conn.peer.uid), 1)
        self.grants[g.id] = g
        conn.grants[g.id] = g
        return g

    def drop_grant(self, g: _Grant) -> None:
        """Forget ``g``; close the cached socket with its last grant."""
        entry = g.entry
        if entry.grants.pop(g.id, None) is not None:
            entry.holders.change(g.share, (g.name, g.conn.peer.uid), -1)
        self.grants.pop(g.id, None)
        g.conn.grants.pop(g.id, None)
        if not entry.grants and entry.sock is not None:
            entry.sock.close()
            entry.sock = None
            if self.entries.get(entry.key) is entry:
                del self.entries[entry.key]

    def fail_entry(self, entry: _Entry, reason: Reason, err: int) -> None:
        """Creation failed: every grant waiting on it is refused."""
        for g in list(entry.grants.values()):
            self.drop_grant(g)
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.ready is not None and not entry.ready.done():
            entry.ready.set_result((reason, err))

    # Running -----------------------------------------------------------------

    async def serve(self) -> int:
        """Accept until :meth:`stop`; returns the exit status."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        try:
            return await self._stopped
        finally:
            loop.remove_reader(self.listener.fileno())
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for entry in list(self.entries.values()):
                if entry.sock is not None:
                    entry.sock.close()
            self.entries.clear()
            self.audit.flush()

    def stop(self, status: int = EXIT_OK) -> None:
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
                loop = asyncio.get_running_loop()
                loop.remove_reader(self.listener.fileno())
                loop.call_later(0.1, loop.add_reader, self.listener.fileno(), self._accept)
                return
            conn = _Connection(self, sock, self._next_conn)
            self._next_conn += 1
            task = asyncio.get_running_loop().create_task(conn.run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class _Connection:
    """One client.  A reader callback (registered once) takes in whatever
    arrives and decodes it; one task handles the frames in order, one at a
    time.  Unfinished frames and unread answers are timed out."""

    def __init__(self, server: BrokerServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # once: each call costs a getpid()
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.grants: dict[int, _Grant] = {}
        self.peer = Peer(0, 0, 0, frozenset())
        self.policy = PeerPolicy(())
        self.counted = False
        self._decoder = RequestDecoder()
        self._queue: collections.deque[ClientMessage] = collections.deque()
        self._busy = False  # a frame is being handled
        self._eof = False
        self._error: _Close | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False

    # Input: a callback, so nothing waits on a future per read ----------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV)  # no ancillary buffer: descriptors are dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET: gone, with input unread
            data = b""
        if not data:
            self._stop_reading()
            self._eof = True
            if self._decoder.partial:
                self._log("error", code="EOF", text="connection closed inside a frame")
        else:
            try:
                self._queue.extend(self._decoder.feed(data))
            except BrokerProtocolError as e:
                self._fail(_Close(e.code, str(e)))
                return
            if len(self._queue) + self._busy > self.server.config.max_pending:
                n = self.server.config.max_pending
                self._fail(_Close(FatalCode.PENDING, f"more than {n} requests pending"))
                return
            self._arm_timer()
        self._wake()

    def _arm_timer(self) -> None:
        """A deadline while a frame is unfinished (or the hello missing)."""
        waiting = self._decoder.partial or not self._decoder.greeted
        if waiting and self._timer is None and not self._eof:
            loop = self.loop
            self._timer = loop.call_later(self.server.config.client_timeout, self._stalled)
        elif not waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        self._fail(_Close(FatalCode.TIMEOUT, "frame left unfinished too long"))

    def _fail(self, error: _Close) -> None:
        self._stop_reading()
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _next(self) -> ClientMessage | None:
        """The next frame, or None at EOF; raises _Close on an error."""
        while True:
            if self._error is not None:
                raise self._error
            if self._queue:
                return self._queue.popleft()
            if self._eof:
                return None
            self._wakeup = self.loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None

    # Output ------------------------------------------------------------------

    async def _send(self, data: bytes, fd: int = -1) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _INT.pack(fd))] if fd >= 0 else []
        while True:
            try:
                n = self.sock.sendmsg([data], anc) if anc else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:  # EPIPE, ECONNRESET: the client is gone
                raise _Close(None, f"send failed: {errno.errorcode.get(e.errno or 0)}") from None
            if n == len(data):
                return
            if n:
                data, anc = data[n:], []  # the descriptor went with the first byte
            loop = self.loop
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(self.fd, _wake, fut)
            timer = loop.call_later(self.server.config.client_timeout, _expire, fut)
            try:
                await fut
            except TimeoutError:
                raise _Close(FatalCode.TIMEOUT, "answers left unread too long") from None
            finally:
                loop.remove_writer(self.fd)
                timer.cancel()

    # The connection's life ---------------------------------------------------

    async def run(self) -> None:
        server, cfg = self.server, self.server.config
        server.connections.add(self)
        try:
            self.sock.setblocking(False)
            self.peer = peer_credentials(self.sock)
            if len(server.connections) > cfg.max_connections:
                raise _Close(FatalCode.BUSY, "too many connections")
            n = server.per_uid.get(self.peer.uid, 0)
            if n >= cfg.max_connections_per_uid:
                raise _Close(FatalCode.BUSY, "too many connections from this user")
            server.per_uid[self.peer.uid] = n + 1
            self.counted = True
            self.policy = cfg.policy.for_peer(self.peer.uid, self.peer.groups)
            self.loop.add_reader(self.fd, self._readable)
            self._reading = True
            self._arm_timer()
            while (m := await self._next()) is not None:
                self._busy = True
                await self._handle(m)
                self._busy = False
        except _Close as e:
            if e.code is not None:
                self._log("error", code=e.code.name, text=str(e))
                try:  # best effort: one non-blocking send
                    self.sock.send(Fatal(e.code, str(e)).encode())
                except OSError:
                    pass
        except asyncio.CancelledError:
            try:
                self.sock.send(Fatal(FatalCode.SHUTDOWN, "the broker is stopping").encode())
            except OSError:
                pass
            raise
        except Exception as e:  # a bug, or the kernel refusing SO_PEERCRED: this one only
            self._log("error", code="INTERNAL", text=f"{type(e).__name__}: {e}"[:200])
        finally:
            self._stop_reading()
            for g in list(self.grants.values()):
                server.drop_grant(g)
                self._log(
                    "release",
                    grant=g.id,
                    cause="disconnect",
                    holders=len(g.entry.grants),
                    **self._what(g.entry),
                )
            if self.counted:
                left = server.per_uid[self.peer.uid] - 1
                if left:
                    server.per_uid[self.peer.uid] = left
                else:
                    del server.per_uid[self.peer.uid]
            server.connections.discard(self)
            self.sock.close()

    async def _handle(self, m: ClientMessage) -> None:
        if isinstance(m, SocketRequest):
            await self._request(m)
        elif isinstance(m, Release):
            await self._release(m)
        elif isinstance(m, StatusQuery):
            await self._status(m)
        elif isinstance(m, Hello):
            cfg = self.server.config
            await self._send(HelloReply(VERSION, cfg.max_held, cfg.max_pending).encode())

    # Requests ----------------------------------------------------------------

    def _log(self, event: str, **fields: Any) -> None:
        p = self.peer
        self.server.audit.log(event, uid=p.uid, gid=p.gid, pid=p.pid, conn=self.number, **fields)

    def _what(self, entry: _Entry) -> dict[str, Any]:
        return entry.desc

    async def _deny(self, m: SocketRequest, reason: Reason, err: int) -> None:
        self._log(
            "deny",
            id=m.id,
            share=m.share.name,
            name=m.name,
            result=errno.errorcode.get(err, str(err)),
            reason=reason.name.lower(),
            **_describe(m.request, m.backlog),
        )
        await self._send(Denied(m.id, err, reason).encode())

    async def _grant(self, m: SocketRequest, g: _Grant) -> None:
        entry = g.entry
        assert entry.sock is not None
        self._log(
            "grant",
            id=m.id,
            grant=g.id,
            share=m.share.name,
            name=m.name,
            holders=len(entry.grants),
            result="ok",
            **self._what(entry),
        )
        await self._send(grant_frame(m.id, g.id, entry.suffix), entry.sock.fileno())

    async def _request(self, m: SocketRequest) -> None:
        server, req = self.server, m.request
        if not self.policy.allows(req):
            return await self._deny(m, Reason.POLICY, errno.EPERM)
        if len(self.grants) >= server.config.max_held:
            return await self._deny(m, Reason.LIMIT, errno.EMFILE)
        key = (req.type, req.address, req.port)
        entry = server.entries.get(key) if req.port else None
        if entry is not None:
            if entry.request.options != req.options or entry.backlog != m.backlog:
                return await self._deny(m, Reason.OPTIONS, errno.EBUSY)
            if not entry.holders.admit(m.share, (m.name, self.peer.uid)):
                return await self._deny(m, Reason.SHARE, errno.EBUSY)
            g = server.new_grant(self, entry, m.share, m.name)
            if entry.sock is None:  # another request is still creating it
                assert entry.ready is not None
                failed = await asyncio.shield(entry.ready)
                if failed is not None:
                    return await self._deny(m, *failed)
            return await self._grant(m, g)
        if len(server.entries) >= server.config.max_sockets:
            return await self._deny(m, Reason.LIMIT, errno.EMFILE)
        entry = _Entry(key, req, m.backlog)
        entry.ready = self.loop.create_future()
        if req.port:
            server.entries[key] = entry  # later requests for it wait for this one
        g = server.new_grant(self, entry, m.share, m.name)
        failed = await self._create(entry)
        if failed is not None:
            return await self._deny(m, *failed)
        return await self._grant(m, g)

    async def _create(self, entry: _Entry) -> tuple[Reason, int] | None:
        server = self.server
        try:
            sock = await server.creator.get(entry.request)
        except SocketCreationError as e:
            reason = Reason.SOCKET if e.stage == "socket" else Reason.BIND
            server.fail_entry(entry, reason, e.errno or errno.EIO)
            return reason, e.errno or errno.EIO
        except CreatorFatalError:  # on_fatal stops the server
            server.fail_entry(entry, Reason.UNAVAILABLE, errno.EIO)
            return Reason.UNAVAILABLE, errno.EIO
        except BaseException:
            server.fail_entry(entry, Reason.UNAVAILABLE, errno.EIO)
            raise
        try:
            if entry.backlog is not None:
                sock.listen(entry.backlog)
            port = entry.request.port or sock.getsockname()[1]  # adopt() checked a fixed one
        except OSError as e:
            sock.close()
            server.fail_entry(entry, Reason.LISTEN, e.errno or errno.EIO)
            return Reason.LISTEN, e.errno or errno.EIO
        if not entry.grants:  # everyone waiting for it went away meanwhile
            sock.close()
            server.fail_entry(entry, Reason.UNAVAILABLE, errno.EIO)
            return Reason.UNAVAILABLE, errno.EIO
        if entry.request.port == 0:  # cached under the port it got
            entry.request = dataclasses.replace(entry.request, port=port)
            entry.desc = _describe(entry.request, entry.backlog)
            entry.key = (entry.request.type, entry.request.address, port)
            if entry.key not in server.entries:
                server.entries[entry.key] = entry
        entry.sock = sock
        entry.suffix = grant_suffix(
            sock.family, sock.type, entry.backlog is not None, entry.request.address, port
        )
        assert entry.ready is not None
        entry.ready.set_result(None)
        return None

    async def _release(self, m: Release) -> None:
        g = self.grants.get(m.grant)
        if g is None:
            self._log(
                "deny", id=m.id, grant=m.grant, what="release", result="EBADF", reason="unknown"
            )
            await self._send(Denied(m.id, errno.EBADF, Reason.UNKNOWN_GRANT).encode())
            return
        entry = g.entry
        self.server.drop_grant(g)
        self._log(
            "release",
            id=m.id,
            grant=g.id,
            cause="request",
            holders=len(entry.grants),
            **self._what(entry),
        )
        await self._send(Released(m.id).encode())

    async def _status(self, m: StatusQuery) -> None:
        admin = self.server.config.admin_gid
        if self.peer.uid != 0 and (admin is None or admin not in self.peer.groups):
            self._log("deny", id=m.id, what="status", result="EPERM", reason="policy")
            await self._send(Denied(m.id, errno.EPERM, Reason.POLICY).encode())
            return
        chunk: list[bytes] = []
        count = 0
        for entry in list(self.server.entries.values()):
            if entry.sock is None:
                continue
            for g in list(entry.grants.values()):
                p = g.conn.peer
                frame = StatusEntry(
                    m.id, g.id, entry.request, g.share, g.name, entry.backlog, p.uid, p.gid, p.pid
                ).encode()
                chunk.append(frame)
                count += 1
                if len(chunk) >= 256:
                    await self._send(b"".join(chunk))
                    chunk.clear()
        chunk.append(StatusEnd(m.id, count).encode())
        await self._send(b"".join(chunk))
        self._log("status", id=m.id, entries=count)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


# --- the socket file --------------------------------------------------------------


class SocketPathError(Exception):
    """PATH cannot be used safely (the message says why)."""


def _check_directory(directory: str) -> None:
    """The directory and its ancestors: owned by root or us, and not
    writable by others unless sticky."""
    me = os.geteuid()
    path = os.path.realpath(directory)
    while True:
        try:
            st = os.stat(path)
        except OSError as e:
            raise SocketPathError(f"{path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SocketPathError(f"{path} is not a directory")
        if st.st_uid not in (0, me):
            raise SocketPathError(f"{path} is owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise SocketPathError(f"{path} is writable by others and not sticky")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _check_stale(path: str) -> None:
    """Refuse if PATH exists and is not a socket, or a broker answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: nobody listens; the rename replaces it
        except OSError as e:
            raise SocketPathError(f"{path}: cannot tell whether it is in use: {e}") from None
    raise SocketPathError(f"{path}: another process is answering there")


def bind_unix_socket(path: str, mode: int = 0o666, gid: int | None = None) -> socket.socket:
    """A listening Unix stream socket at ``path``, created safely (see step 3
    in the module doc).  SocketPathError if it cannot be."""
    if not 0 <= mode <= 0o777:
        raise SocketPathError(f"bad mode {mode:o}")
    directory, base = os.path.split(os.path.abspath(path))
    _check_directory(directory)
    _check_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = os.path.join(directory, f".{base[:40]}.{secrets.token_hex(6)}")
    try:
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
            sock.listen(socket.SOMAXCONN)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        sock.close()
        raise SocketPathError(f"{path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


# --- the command ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def _mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_PROG,
        description="Hand privileged sockets to unprivileged programs over a Unix socket, "
        "with per-user policy and BIND 10's sharing rules.  Start as root.",
        epilog="Exit statuses: 0 stopped; 1 the creator died; 3 bad configuration; "
        "4 the socket path cannot be used; 5 the creator cannot start; "
        "6 privileges cannot be dropped.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="the broker's Unix socket")
    p.add_argument(
        "--policy", default=DEFAULT_POLICY, metavar="FILE", help=f"TOML (default {DEFAULT_POLICY})"
    )
    p.add_argument("--user", "-u", help="run the broker and its creator as this user")
    p.add_argument(
        "--mode", type=_mode, default=0o666, help="socket file mode, octal (default 0666)"
    )
    p.add_argument("--group", "-g", help="socket file group")
    p.add_argument("--admin-group", help="members may ask for status (root always may)")
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--max-connections-per-user", type=int, default=64)
    p.add_argument("--max-held", type=int, default=4096, help="grants per connection")
    p.add_argument("--max-pending", type=int, default=32, help="unanswered requests per connection")
    p.add_argument(
        "--max-sockets", type=int, help="cached sockets in all (default: from RLIMIT_NOFILE)"
    )
    p.add_argument("--client-timeout", type=float, default=10.0, metavar="SECONDS")
    return p


def _fail(status: int, message: str) -> int:
    print(f"{_PROG}: {message}", file=sys.stderr)
    return status


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


async def _run(args: argparse.Namespace, config: BrokerConfig, allow: list[str] | None) -> int:
    root = os.geteuid() == 0
    try:
        creator = CreatorChannel(creator_argv(allow=allow, user=args.user if root else None))
        creator.start()
    except (OSError, ValueError, KeyError) as e:
        return _fail(EXIT_CREATOR, f"cannot start the creator: {e}")
    try:
        gid = grp.getgrnam(args.group).gr_gid if args.group else None
        try:
            listener = bind_unix_socket(args.socket, args.mode, gid)
            inode = os.lstat(args.socket).st_ino
        except (SocketPathError, OSError) as e:
            return _fail(EXIT_SOCKET, str(e))
        with listener:
            if root:
                try:
                    drop_privileges(args.user)
                except (OSError, ValueError, LookupError) as e:
                    return _fail(EXIT_PRIVILEGES, f"cannot drop privileges: {e}")
            server = BrokerServer(config, creator, listener)

            def creator_died(e: CreatorFatalError) -> None:
                server.audit.log("fatal", what="creator", error=str(e))
                server.stop(EXIT_CREATOR_DIED)

            creator.on_fatal = creator_died
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, server.stop, EXIT_OK)
            server.audit.log(
                "start",
                pid=os.getpid(),
                creator_pid=creator.pid,
                socket=os.path.abspath(args.socket),
                uid=os.getuid(),
                allow=allow,
            )
            status = await server.serve()
            server.audit.log("stop", status=status)
            server.audit.flush()
            try:  # ours still? (needs write access to the directory: may fail)
                if os.lstat(args.socket).st_ino == inode:
                    os.unlink(args.socket)
            except OSError:
                pass
            return status
    finally:
        await creator.terminate()


def main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator serve``: run until SIGTERM; the exit status."""
    args = build_parser().parse_args(argv)
    root = os.geteuid() == 0
    if root and args.user is None:
        return _fail(EXIT_CONFIG, "give --user: the broker does not run as root")
    try:
        if args.user is not None:
            creds = resolve_credentials(args.user)
            if creds.uid == 0:
                return _fail(EXIT_CONFIG, "--user must not be root")
            if not root and creds.uid != os.geteuid():
                return _fail(EXIT_CONFIG, "--user needs root (we are not root)")
        admin = grp.getgrnam(args.admin_group).gr_gid if args.admin_group else None
        if args.group:
            grp.getgrnam(args.group)
    except (LookupError, ValueError) as e:
        return _fail(EXIT_CONFIG, str(e).strip("'\""))
    try:
        policy = load_policy(args.policy)
    except (OSError, PolicyError) as e:
        return _fail(EXIT_CONFIG, f"policy {args.policy}: {e}")
    if not policy.rules:
        return _fail(EXIT_CONFIG, f"policy {args.policy} allows nothing")
    nofile = _raise_nofile()
    max_sockets = args.max_sockets or max(16, nofile - args.max_connections - 64)
    if max_sockets + args.max_connections + 64 > nofile:
        return _fail(
            EXIT_CONFIG,
            f"RLIMIT_NOFILE {nofile} is too low for {max_sockets} sockets and "
            f"{args.max_connections} connections (raise it, or lower the limits)",
        )
    try:
        config = BrokerConfig(
            policy=policy,
            admin_gid=admin,
            max_connections=args.max_connections,
            max_connections_per_uid=args.max_connections_per_user,
            max_held=args.max_held,
            max_pending=args.max_pending,
            max_sockets=max_sockets,
            client_timeout=args.client_timeout,
        )
    except ValueError as e:
        return _fail(EXIT_CONFIG, str(e))
    return asyncio.run(_run(args, config, policy.creator_allow()))


def status_main(argv: Sequence[str] | None = None) -> int:
    """``sockcreator status --socket PATH [--json]``: list held sockets."""
    from .broker_client import Broker, SocketRefusedError

    p = argparse.ArgumentParser(
        prog="sockcreator status",
        description="List the broker's held sockets and their holders (root or the "
        "broker's admin group only).",
    )
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--json", action="store_true", help="one JSON object per grant")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    try:
        with Broker(args.socket, timeout=args.timeout) as broker:
            held = broker.status()
    except SocketRefusedError as e:
        print(f"sockcreator status: refused: {e.strerror} (root or the admin group only)",
              file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, CreatorFatalError) as e:
        print(f"sockcreator status: {args.socket}: {e}", file=sys.stderr)
        return 1
    for h in held:
        if args.json:
            record = {"grant": h.grant, "share": h.share.name, "name": h.name,
                      "uid": h.uid, "gid": h.gid, "pid": h.pid,
                      **_describe(h.request, h.backlog)}  # fmt: skip
            print(json.dumps(record, separators=(",", ":")))
        else:
            print(h)
    if not args.json:
        sockets = {(h.request.type, h.request.address, h.request.port) for h in held}
        print(f"{len(sockets)} sockets held, {len(held)} grants")
    return 0
