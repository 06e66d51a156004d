"""The broker's link to its creator (see :mod:`sockcreator.broker`)."""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Union

from ..client._channel import (
    ANCBUFSIZE,
    RECV_FLAGS,
    adopt,
    close_fds,
    descriptor_lost,
    spawn,
    unpack_fds,
)
from ..client._errors import CreatorFatalError, SocketCreationError, socket_creation_error
from ..client._protocol import (
    BindFailed,
    BindingAnswerParser,
    BindRequest,
    Bound,
    DescriptorLost,
    Event,
    ProtocolViolation,
    Request,
    SocketReceived,
)

__all__ = ["BindOutcome", "CreatorChannel", "Outcome"]

#: What a request's callback gets: the socket, or SocketCreationError (the
#: kernel refused, in the creator), CreatorFatalError (the creator is gone), or
#: a plain OSError EMFILE (the socket was made but our own descriptor table was
#: full when it arrived; the creator is fine).
Outcome = Union[socket.socket, SocketCreationError, CreatorFatalError, OSError]
#: What a :meth:`CreatorChannel.bind` callback gets: None (bound), or
#: SocketCreationError (refused, or bind()'s errno), or CreatorFatalError.
BindOutcome = Union[None, SocketCreationError, CreatorFatalError]
_RIGHTS = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_INT = struct.Struct("@i")


class CreatorChannel:
    """The broker's connection to its creator: many requests in flight, one
    reader callback registered for the channel's life, answers handed out in
    order to plain callbacks (no future or task per socket: this is what a
    broker does all day).  Requests made during one turn of the event loop
    go out in one write.  The protocol itself is
    :class:`~sockcreator.client._protocol.AnswerParser`'s; received sockets are
    checked by :func:`~sockcreator.client._channel.adopt`.  A 'B' request
    (:meth:`bind`) goes in the same stream, its descriptor with its first
    byte: ``_fds`` keeps, in stream order, where each one is due.

    Any protocol violation, EOF, or silence past ``timeout`` with answers
    due kills the creator; every waiter then gets CreatorFatalError and
    ``on_fatal`` is called once.
    """

    def __init__(self, argv: Sequence[str], timeout: float = 10.0) -> None:
        self._argv = list(argv)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._parser = BindingAnswerParser()
        # (each gets an Outcome, or a BindOutcome for a 'B')
        self._waiters: collections.deque[Callable[[Any], None]] = collections.deque()
        self._out = bytearray()  # what the creator has not taken yet
        self._taken = 0  # bytes the creator has taken in all: where _out starts
        self._fds: collections.deque[tuple[int, int]] = collections.deque()  # (where, fd)
        self._push_due = False  # a write is scheduled for the end of this turn
        self._writing = False  # waiting for the socket to take more
        self._timer: asyncio.TimerHandle | None = None  # the silence watchdog
        self._since = 0.0  # loop time of the last answer, or of the first request after none
        self._dead: str | None = None
        self._eof: asyncio.Future[None] | None = None
        self.on_fatal: Callable[[CreatorFatalError], None] | None = None
        #: False: requests wait for :meth:`push` (the broker pushes once per
        #: turn of the loop, after its answers); True: pushed at the end of
        #: the turn by the channel itself.
        self.auto_push = True
        self._loop = asyncio.get_running_loop()  # made inside the loop it serves

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the creator (it hardens itself at once)."""
        self._sock, self._proc = spawn(self._argv)
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def request(self, request: Request, callback: Callable[[Outcome], None]) -> None:
        """Ask for one socket; ``callback`` gets the :data:`Outcome` later
        (never before this returns).  It must not raise.

        A request to an idle creator is sent at once: there is nothing to
        batch it with, and the creator starts on it sooner.  While answers
        are due, requests wait for :meth:`push` and go in one write."""
        if self._dead is not None or self._sock is None:
            err = CreatorFatalError(f"creator unusable: {self._dead or 'not started'}")
            self._loop.call_soon(callback, err)
            return
        idle = not self._waiters
        if idle:
            self._since = self._loop.time()  # the silence deadline counts from now
        self._parser.expect(request)
        self._waiters.append(callback)
        data = request.encode()
        if idle and not self._out and not self._writing:
            try:
                n = self._sock.send(data)
                self._taken += n
                data = data[n:]
            except OSError:  # (a broken channel is found, and fatal, in push())
                pass
        self._out += data
        if self._out and self.auto_push and not self._push_due and not self._writing:
            self._push_due = True
            self._loop.call_soon(self.push)
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, self._watch)

    def bind(self, request: BindRequest, fd: int, callback: Callable[[BindOutcome], None]) -> None:
        """Have the creator bind ``fd`` (a 'B' request); ``callback`` gets
        None (bound) or the error, later.  ``fd`` is ours from now on: it is
        closed once it has gone to the creator (or when the channel dies)."""
        if self._dead is not None or self._sock is None:
            os.close(fd)
            err = CreatorFatalError(f"creator unusable: {self._dead or 'not started'}")
            self._loop.call_soon(callback, err)
            return
        if not self._waiters:
            self._since = self._loop.time()
        self._parser.expect_bind(request)
        self._waiters.append(callback)
        self._fds.append((self._taken + len(self._out), fd))
        self._out += request.encode()
        if self.auto_push and not self._push_due and not self._writing:
            self._push_due = True
            self._loop.call_soon(self.push)
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, self._watch)

    @property
    def unsent(self) -> bool:
        """Requests are waiting for :meth:`push`."""
        return bool(self._out) and not self._writing

    async def get(self, request: Request) -> socket.socket:
        """One socket; SocketCreationError or CreatorFatalError."""
        fut: asyncio.Future[socket.socket] = self._loop.create_future()

        def done(outcome: Outcome) -> None:
            if fut.done():  # cancelled: nobody takes it
                if isinstance(outcome, socket.socket):
                    outcome.close()
            elif isinstance(outcome, socket.socket):
                fut.set_result(outcome)
            else:
                fut.set_exception(outcome)

        self.request(request, done)
        try:
            return await fut
        except BaseException:
            # Cancelled after ``done`` set the socket but before we resumed:
            # nobody takes it either.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()
            raise

    # Writing -----------------------------------------------------------------

    def push(self) -> None:
        """Write what the creator has not taken yet (as much as it takes now)."""
        self._push_due = False
        if self._dead is not None or self._sock is None or not self._out:
            return
        fds, sock = self._fds, self._sock
        while True:
            try:
                if not fds:
                    n = sock.send(self._out)
                elif fds[0][0] == self._taken:  # a 'B' is next: its descriptor goes with it
                    end = fds[1][0] - self._taken if len(fds) > 1 else len(self._out)
                    rights = [(*_RIGHTS, _INT.pack(fds[0][1]))]
                    n = sock.sendmsg([memoryview(self._out)[:end]], rights)
                    os.close(fds.popleft()[1])  # it went with the first byte
                else:  # only up to the next 'B'
                    n = sock.send(memoryview(self._out)[: fds[0][0] - self._taken])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._fatal(f"cannot write to the creator: {e}")
                return
            del self._out[:n]
            self._taken += n
            if not n or not self._out or not fds:
                break
            if fds[0][0] != self._taken:  # the creator took less than all we gave
                break
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._writable)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    def _writable(self) -> None:
        self.push()

    # Reading -----------------------------------------------------------------

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
            except ProtocolViolation as e:  # MSG_CTRUNC (unpack_fds closed what came)
                if descriptor_lost(data, anc, flags):  # EMFILE here: lost, unless misplaced
                    self._lost_descriptor(data)
                    continue
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
            if events:
                self._deliver(events)
            if not self._waiters and self._parser.idle:
                return  # nothing more is due (anything else wakes us again)

    def _lost_descriptor(self, data: bytes) -> None:
        """The creator sent a socket our full table could not take: fail that
        one request with EMFILE; the creator and the stream are still in step.
        (A descriptor lost anywhere but on an 'S' answer's byte is fatal.)"""
        try:
            events = self._parser.feed_lost_descriptor(data)
        except ProtocolViolation as e:
            self._fatal(str(e), e.condition)
            return
        self._deliver(events)

    def _deliver(self, events: Sequence[Event | DescriptorLost | Bound | BindFailed]) -> None:
        for i, ev in enumerate(events):
            callback = self._waiters.popleft()
            outcome: Outcome | None
            if isinstance(ev, Bound):
                outcome = None
            elif isinstance(ev, BindFailed):
                outcome = socket_creation_error(ev.errno, ev.stage, None)
            elif isinstance(ev, DescriptorLost):
                outcome = OSError(
                    errno.EMFILE,
                    f"{os.strerror(errno.EMFILE)}: the broker could not receive {ev.request}",
                )
            elif isinstance(ev, SocketReceived):
                try:
                    outcome = adopt(ev.fd, ev.request)
                except ProtocolViolation as e:
                    close_fds(x.fd for x in events[i + 1 :] if isinstance(x, SocketReceived))
                    self._waiters.appendleft(callback)
                    self._fatal(str(e))
                    return
            else:
                outcome = socket_creation_error(ev.errno, ev.stage, ev.request)
            callback(outcome)
        self._since = self._loop.time()  # progress: the deadline moves (see _watch)

    # Ending ------------------------------------------------------------------

    def _watch(self) -> None:
        """The watchdog: fatal once answers are due and none came for
        ``timeout`` seconds.  One timer, moved only when it fires (not
        armed and cancelled for every request)."""
        self._timer = None
        if not self._waiters or self._dead is not None:
            return
        deadline = self._since + self._timeout
        if self._loop.time() >= deadline:
            self._fatal(f"no answer from the creator within {self._timeout}s")
        else:
            self._timer = self._loop.call_at(deadline, self._watch)

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        close_fds(fd for _, fd in self._fds)  # 'B' descriptors never sent
        self._fds.clear()
        if self._sock is not None and self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._sock.fileno())
            self._sock.close()

    def _fatal(self, reason: str, condition: str | None = None) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._close()  # EOF: a creator that is reading exits; one writing gets EPIPE
        self._kill()
        err = CreatorFatalError(reason, condition=condition)
        while self._waiters:
            self._waiters.popleft()(err)
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)
        if self.on_fatal is not None:
            self.on_fatal(err)

    def _kill(self) -> None:
        """SIGKILL the creator if we may.  We may not when it runs as a user of
        its own (``--creator-user``, the broker's case): then closing the
        channel is what ends it (it exits on EOF or EPIPE, and its seccomp
        filter leaves it nothing else to block in)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.kill()
            except PermissionError:
                pass

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
            self._out += b"T"
            self.push()
            try:
                await asyncio.wait_for(asyncio.shield(self._eof), self._timeout)
            except asyncio.TimeoutError:
                self._fatal("the creator did not exit after 'T'")
        proc = self._proc
        if proc is None:
            return None
        deadline = loop.time() + self._timeout
        killed = False
        while (status := proc.poll()) is None:
            if loop.time() > deadline:
                if killed:  # not ours to signal, and not gone: do not hang on it
                    return None
                self._close()
                self._kill()
                killed, deadline = True, loop.time() + self._timeout
            await asyncio.sleep(0.005)
        return status


class AdoptedCreatorChannel(CreatorChannel):
    """A channel to a creator that another process started (the creator
    factory, at a widening reload: see :mod:`._factory`): made from the
    broker's end of its socketpair and its pid.  It is not our child: we
    cannot signal it (it runs as ``--creator-user``) nor reap it (its
    parent does); closing the channel, or 'T', is what ends it."""

    def __init__(self, sock: socket.socket, pid: int, timeout: float = 10.0) -> None:
        super().__init__([], timeout)
        self._adopted_pid = pid
        self._sock = sock
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        return self._adopted_pid

    def start(self) -> None:
        raise RuntimeError("an adopted creator is started already")
