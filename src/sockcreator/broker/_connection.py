"""One client of the broker: its input, its answers in order, its grants and
its end (see :mod:`._server` for the whole).

Size: one class, the connection's state machine; its input, output,
requests and ending share its slots and are read together.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import queue
import socket
import struct
import threading
from collections.abc import Iterator
from time import time as _time
from typing import TYPE_CHECKING

from ..client._errors import SocketCreationError
from ..client._protocol import BindRequest, Request, SocketOptions
from ._audit import json_text
from ._protocol import (
    BindCounts,
    BindFrame,
    BoundReply,
    BrokerProtocolError,
    ClientMessage,
    Denied,
    Fatal,
    FatalCode,
    Hello,
    Reason,
    Release,
    RequestDecoder,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    StatusQuery,
    grant_frame,
)
from ._shared import (
    _ERRNAME,
    _ERRNO,
    _K,
    _NOBODY,
    _POLICY_CACHE,
    _POLL,
    _RECV,
    Peer,
    _Made,
    _unread,
    _Wanted,
    _what,
    peer_credentials,
)
from ._table import Grant
from .policy import PeerPolicy

if TYPE_CHECKING:
    from ._server import BrokerServer

__all__: list[str] = []

_ANCBUF = socket.CMSG_SPACE(4)  # one descriptor: a second, or more, is MSG_CTRUNC
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)  # (an IntFlag's & costs a call into enum)
_SO_DOMAIN, _SO_PROTOCOL = 39, 38
_KINDS: dict[tuple[int, int], socket.SocketKind] = {
    (socket.SOCK_STREAM, 6): socket.SOCK_STREAM,
    (socket.SOCK_DGRAM, 17): socket.SOCK_DGRAM,
}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_INT = struct.Struct("@i")
_DUAL, _PLAIN = SocketOptions.DUALSTACK, SocketOptions(0)
_closer: queue.SimpleQueue[int] | None = None


def is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket, asking nothing of its file system (a
    FUSE file's fstat() may wait for its server): /proc's link says."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:  # no /proc
        try:
            return (os.fstat(fd).st_mode & 0o170000) == 0o140000
        except OSError:
            return False


def dispose(fd: int) -> None:
    """Close a descriptor a client sent.  A socket's close() never blocks;
    another file's may (a FUSE file's flush waits for its server, which the
    client may be), so those are closed by a thread of their own, off the
    loop: a hung close then holds that thread and one descriptor, never the
    broker."""
    global _closer
    if is_socket(fd):
        os.close(fd)
        return
    if _closer is None:
        _closer = queue.SimpleQueue()
        threading.Thread(target=_close_forever, args=(_closer,), daemon=True).start()
    _closer.put(fd)


def _close_forever(fds: queue.SimpleQueue[int]) -> None:
    while True:
        try:
            os.close(fds.get())
        except OSError:
            pass


def bindable(fd: int, version: int) -> socket.SocketKind | int:
    """SOCK_STREAM or SOCK_DGRAM if ``fd`` is a TCP or UDP socket of the
    family of an IPv``version`` address, with the default protocol; else the
    errno to refuse it with."""
    if not is_socket(fd):
        return errno.ENOTSOCK
    try:
        sock = socket.socket(fileno=os.dup(fd))  # (a socket: this cannot fail but EMFILE)
    except OSError as e:
        return e.errno or errno.EMFILE
    with sock:
        try:
            domain = sock.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN)
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            proto = sock.getsockopt(socket.SOL_SOCKET, _SO_PROTOCOL)
        except OSError as e:
            return e.errno or errno.EINVAL
    if domain != _FAMILY[version]:
        return errno.EAFNOSUPPORT
    return _KINDS.get((kind, proto), errno.EPROTONOSUPPORT)


# --- one client -------------------------------------------------------------------


_Out = tuple[bytes, "_Made | None"]  # a frame (or frames), and the socket it carries


class _Connection:
    """One client: see the module doc.  Answers are in request order; while
    a request waits for its socket, a status answer is being produced, or
    answers wait for the client to read them, later frames queue up."""

    __slots__ = (
        "allowed",
        "binding",
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
        "paused",
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
        self.waiting: tuple[int, _Wanted, Grant] | None = None  # (request id, what, grant)
        self.status: Iterator[bytes] | None = None
        self.reading = False
        self.paused = False  # not reading while a 'B' waits (its descriptor is ours)
        self.binding: BindFrame | None = None  # the 'B' the creator is binding
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
        fds: list[int] = []
        try:
            if self.decoder.version < 2:
                data = self.sock.recv(_RECV)  # no ancillary buffer: descriptors are dropped
            else:  # 'B' frames bring one descriptor each (see _protocol)
                data, anc, flags, _ = self.sock.recvmsg(_RECV, _ANCBUF, _CMSG_CLOEXEC)
                for level, k, raw in anc:
                    if level == socket.SOL_SOCKET and k == socket.SCM_RIGHTS:
                        fds += [x for (x,) in _INT.iter_unpack(raw[: len(raw) // 4 * 4])]
                if flags & _CTRUNC:
                    for fd in fds:
                        dispose(fd)
                    return self.shut(FatalCode.MALFORMED, "more than one descriptor at once")
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET: gone, with input unread
            data = b""
        try:
            if not data:
                for fd in fds:
                    dispose(fd)
                self._stop_reading()
                self.eof = True
                if self.decoder.partial:
                    self._error("EOF", "connection closed inside a frame")
            else:
                got = None
                if (  # the usual read: one whole 'Q' or 'R', nothing before it to wait for
                    not fds
                    and not self.inq
                    and self.waiting is None
                    and self.status is None
                    and not self.writing
                    and self.binding is None
                    and not self.paused
                    and self.in_timer is None
                ):
                    got = self.decoder.whole(data)
                if got is not None:  # handled at once, as _pump would (with nothing after it)
                    kind, rid, arg = got
                    if kind == b"R":
                        return self._release(rid, arg)
                    try:
                        w = self.server.wanted_bytes(arg)
                    except BrokerProtocolError as e:
                        return self.shut(e.code, str(e))
                    return self._request(rid, w, None)
                try:
                    msgs = self.decoder.feed(data, fds)
                except BrokerProtocolError as e:
                    for fd in e.fds:
                        dispose(fd)
                    return self.shut(e.code, str(e))
                inq = self.inq
                busy = (
                    self.waiting is not None
                    or self.status is not None
                    or self.writing
                    or self.binding is not None
                )
                if len(inq) + len(msgs) + busy > self.server.config.max_pending:
                    for m in msgs:
                        if type(m) is BindFrame:
                            dispose(m.fd)
                    n = self.server.config.max_pending
                    return self.shut(FatalCode.PENDING, f"more than {n} requests pending")
                inq.extend(msgs)
                if fds and not self.paused and any(type(m) is BindFrame for m in msgs):
                    self._pause()  # at most one 'B' descriptor held, and one more arriving
                self._arm_in_timer()
            self._pump()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _pause(self) -> None:
        if self.reading:
            self.paused = True
            self.reading = False
            self.server.loop.remove_reader(self.fd)

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closed and not self.eof:
                self.reading = True
                self.server.loop.add_reader(self.fd, self._readable)

    def _arm_in_timer(self) -> None:
        """A deadline while a frame is unfinished (or the hello missing)."""
        stalled = (self.decoder.partial or not self.decoder.greeted) and not self.paused
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
        while (
            inq
            and self.waiting is None
            and self.status is None
            and not self.writing
            and self.binding is None
        ):
            m = inq.popleft()
            kind = type(m)
            if kind is SocketRequest:
                self._request(m.id, self.server.wanted(m), m.linger)  # type: ignore[union-attr,arg-type]
            elif kind is BindFrame:
                self._bind(m)  # type: ignore[arg-type]
            elif kind is Release:
                self._release(m.id, m.grant)  # type: ignore[union-attr]
            elif kind is StatusQuery:
                self._status(m)  # type: ignore[arg-type]
            elif kind is Hello:
                self._queue(self.server.hello_replies[m.version])  # type: ignore[union-attr]
            if self.closed:
                return
        if (
            self.eof
            and not self.out
            and not inq
            and self.waiting is None
            and self.status is None
            and self.binding is None
        ):
            self.close()
        elif self.paused and self.binding is None and not any(type(m) is BindFrame for m in inq):
            self._resume()

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
        if server.audit.lines:
            server.audit.flush()  # every answer's line is written before it is sent
        out, sock = self.out, self.sock
        while out:
            data, made = out[0]
            if made is not None and not server.room_for(self):
                return self._hold_back()
            frames = len(out)
            if frames > 1 and out[1][1] is None:
                parts, k = [data], 1
                while k < frames and out[k][1] is None:
                    parts.append(out[k][0])
                    k += 1
                data = b"".join(parts)
                frames = k
            else:
                frames = 1
            try:
                n = sock.sendmsg([data], made.anc) if made is not None else sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:  # EPIPE, ECONNRESET: gone; ETOOMANYREFS: this one only
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    self._error("SEND", _ERRNAME.get(e.errno or 0, str(e.errno)))
                self.close()
                return
            if n == len(data):  # all of it: the frames joined in it are gone
                if made is not None:
                    server.charge(self)
                    server.sent(made)  # the descriptor went with the first byte
                out.popleft()
                if frames > 1:
                    for _ in range(frames - 1):
                        out.popleft()
                self.partial = False
                continue
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
            # the client is not taking it: wait until it does
            self._block()
            if not self.watching:
                self.watching = True
                server.loop.add_writer(self.fd, self._writable)
            return
        if self.writing:
            self._stop_writing()
        if resume:
            if self.status is not None:
                self._pump_status()
            if self.inq or self.eof or self.paused:  # (else _pump has nothing to do)
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
            server.let_go(g.entry, sock, self.who)
        for _, made in self.out:
            if made is not None:
                server.sent(made)
        self.out.clear()
        for m in self.inq:
            if type(m) is BindFrame:
                dispose(m.fd)
        for fd in self.decoder.take_fds():
            dispose(fd)
        self.inq.clear()
        self.paused = False
        self.binding = None  # (its descriptor is the creator channel's now)
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

    def _request(self, rid: int, w: _Wanted, linger: float | None) -> None:
        """Request ``rid`` for ``w`` (with its own ``linger`` time: 'q')."""
        server = self.server
        allowed = self.allowed.get(w)
        if allowed is None:  # the policy is fixed: the same peer and request, the same answer
            if len(self.allowed) >= _POLICY_CACHE:
                self.allowed.clear()
            allowed = self.allowed[w] = self.policy.allows(w.request)
        if not allowed:
            return self._deny(rid, w, Reason.POLICY, errno.EPERM)
        if w.refusal is not None:
            return self._deny(rid, w, *w.refusal)
        g = server.table.claim(self, self.peer.uid, w.request, w.backlog, w.share, w.name, w.key)
        if isinstance(g, Reason):
            return self._deny(rid, w, g, _ERRNO[g])
        if linger is not None:  # its own ('q'), capped by the broker's --max-linger
            g.linger = min(linger, server.max_linger)
        if g.entry.sock is not None:
            return self._granted(rid, w, g)
        self.waiting = (rid, w, g)  # until the socket (or its refusal) comes
        if g.creates:
            server.create(g.entry, w)

    def ready(self, g: Grant, failure: tuple[Reason, int] | None) -> None:
        """The socket that ``g`` waited for exists now (or never will)."""
        waiting = self.waiting
        if waiting is None or waiting[2] is not g or self.closed:
            return
        self.waiting = None
        rid, w, _ = waiting
        try:
            if failure is None:
                self._granted(rid, w, g)
            else:
                self._deny(rid, w, *failure)
            if self.inq or self.eof or self.paused:  # (else _pump has nothing to do)
                self._pump()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _granted(self, rid: int, w: _Wanted, g: Grant) -> None:
        entry = g.entry
        made: _Made = entry.extra
        lines = self.server.audit.lines  # (Audit.event inlined, its line in one format)
        if not lines:
            self.server.audit.wake()
        lines.append(
            f'{{"ts":{_time():.3f},"event":"grant",{self.who},"id":{rid},"grant":{g.id},'
            f'{w.share_name},"holders":{len(entry.grants)},"result":"ok",{made.what}}}'
        )
        made.sending += 1  # (_queue inlined)
        self.out.append((grant_frame(rid, g.id, made.suffix), made))
        if not self.queued:
            self.queued = True
            self.server.queued(self)

    def _deny(self, rid: int, w: _Wanted, reason: Reason, err: int) -> None:
        self.server.audit.event(
            "deny",
            f'{self.who},"id":{rid},{w.share_name},"result":"{_ERRNAME.get(err, err)}",'
            f'"reason":"{reason.name.lower()}",{w.what}',
        )
        self._queue(Denied(rid, err, reason).encode())

    # Binding a client's own socket ('B': run --broker --intercept) -----------

    def _bind(self, m: BindFrame) -> None:
        """Check the socket and the policy, then have the creator bind it;
        the answer waits for the creator's (see :meth:`_bound`)."""
        fd, addr = m.fd, m.address
        kind = bindable(fd, addr.version)
        if not isinstance(kind, socket.SocketKind):  # (an IntEnum: check this way round)
            dispose(fd)
            return self._bind_answer(m, None, kind, Reason.SOCKET)
        dual = addr.version == 6 and (addr.is_unspecified or addr.ipv4_mapped is not None)
        # '::' and mapped addresses take IPv4 traffic once V6ONLY is off, which
        # the client may yet do: the policy must allow the IPv4 address too.
        request = Request(kind, addr, m.port, _DUAL if dual else _PLAIN)
        if not self.policy.allows(request):
            os.close(fd)  # (a socket: bindable() said so)
            return self._bind_answer(m, request, errno.EPERM, Reason.POLICY)
        self.binding = m
        bind = BindRequest(kind, addr, m.port)
        self.server.bind(bind, fd, lambda outcome: self._bound(m, request, outcome))

    def _bound(self, m: BindFrame, request: Request, outcome: object) -> None:
        if self.binding is not m or self.closed:
            return
        self.binding = None
        try:
            if outcome is None:
                self._bind_answer(m, request, 0, Reason.BIND)
            elif isinstance(outcome, SocketCreationError):
                reason = Reason.SOCKET if outcome.stage == "socket" else Reason.BIND
                if reason is Reason.BIND and outcome.errno == errno.EPERM:  # its policy
                    reason = Reason.POLICY
                self._bind_answer(m, request, outcome.errno or errno.EIO, reason)
            else:  # CreatorFatalError: on_fatal stops the broker
                self._bind_answer(m, request, errno.EIO, Reason.UNAVAILABLE)
            self._pump()
        except Exception as e:  # a bug: this connection only
            self._internal(e)

    def _bind_answer(self, m: BindFrame, request: Request | None, err: int, reason: Reason) -> None:
        server = self.server
        server.binds[0 if err == 0 else 1] += 1
        a = m.address
        what = (
            f'"what":"bind","proto":"{request.protocol if request else "?"}",'
            f'"address":"{a}","port":{m.port}'
        )
        if err:
            server.audit.event(
                "deny",
                f'{self.who},"id":{m.id},"result":"{_ERRNAME.get(err, err)}",'
                f'"reason":"{reason.name.lower()}",{what}',
            )
            self._queue(Denied(m.id, err, reason).encode())
        else:
            server.audit.event("bind", f'{self.who},"id":{m.id},"result":"ok",{what}')
            self._queue(BoundReply(m.id).encode())

    def _release(self, rid: int, grant: int) -> None:
        server = self.server
        g = server.table.grant(self, grant)
        if g is None:
            server.audit.event(
                "deny",
                f'{self.who},"id":{rid},"grant":{grant},"what":"release",'
                '"result":"EBADF","reason":"unknown"',
            )
            self._queue(Denied(rid, errno.EBADF, Reason.UNKNOWN_GRANT).encode())
            return
        entry = g.entry
        sock = server.table.release(g)
        audit = server.audit
        lines = audit.lines  # (Audit.event inlined, its line in one format)
        if not lines:
            audit.wake()
        lines.append(
            f'{{"ts":{_time():.3f},"event":"release",{self.who},"id":{rid},"grant":{g.id},'
            f'"cause":"request","holders":{len(entry.grants)},{entry.extra.what}}}'
        )
        if sock is not None or entry.phantom is not None:
            server.let_go(entry, sock, self.who)
        self.out.append((_K.pack(b"K", 4, rid), None))  # (_queue inlined)
        if not self.queued:
            self.queued = True
            self.server.queued(self)

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
            if entry.phantom is not None:  # lingering: grant 0, its last holder's share and uid
                share, name, uid = entry.phantom
                chunk.append(
                    StatusEntry(
                        rid, 0, entry.request, share, name, entry.backlog, uid, 0, 0
                    ).encode()
                )
                count += 1
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
        if self.decoder.version >= 2:  # what 'B' did, which no entry shows
            chunk.append(BindCounts(rid, *self.server.binds).encode())
        chunk.append(StatusEnd(rid, count).encode())
        self.server.audit.event("status", f'{self.who},"id":{rid},"entries":{count}')
        yield b"".join(chunk)
