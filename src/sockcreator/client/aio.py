"""The asyncio client: the same protocol shell as :mod:`sockcreator.client.blocking`.

Requests from concurrent tasks are written in order under a lock and their
answers are dispatched to futures in the same order by one reader task, so
concurrent awaits pipeline.

Cancellation (or any failure) of a call leaves no descriptor behind,
wherever it lands:

- waiting for the write lock: nothing was queued, nothing is asked;
- once queued, nothing in ``_submit`` suspends: the batch is written at once
  or, if the channel does not take it all, by a writer task that finishes it
  (holding the lock), so the stream never stays out of step because a caller
  was cancelled;
- waiting for answers: the sockets that have arrived are closed by the call,
  its other futures are cancelled and the reader closes their sockets when
  they arrive;
- answered but not yet resumed (the socket set as the future's result, the
  task cancelled before it ran again): the call closes it too.

Only a writer task cancelled mid-batch (the loop shutting down) or a write
error leaves the channel out of step; that is fatal (CreatorFatalError).

Size: the asyncio shell around the same protocol as :mod:`.blocking`,
plus what only asyncio needs (concurrent waiters, cancellation at every
point, a writer that finishes what a cancelled caller started).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import subprocess
from collections.abc import Iterable, Sequence
from types import TracebackType

from ._channel import (
    ANCBUFSIZE,
    RECV_FLAGS,
    SEND_FLAGS,
    RequestSpec,
    adopt,
    close_fds,
    creator_argv,
    descriptor_lost,
    descriptor_lost_error,
    normalize,
    spawn,
    unpack_fds,
)
from ._errors import CreatorFatalError, socket_creation_error
from ._protocol import (
    AddressSpec,
    AnswerParser,
    DescriptorLost,
    Event,
    ProtocolSpec,
    ProtocolViolation,
    Request,
    SocketReceived,
)

__all__ = ["AsyncSocketCreator"]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _abandon(futs: Iterable[asyncio.Future[socket.socket]]) -> None:
    """A call gave up on ``futs``: close the sockets that have arrived; cancel
    the rest, so that the reader closes theirs when they arrive."""
    for f in futs:
        if not f.done():
            f.cancel()
        elif not f.cancelled() and f.exception() is None:
            f.result().close()


class _ChannelClosed(Exception):
    """Wakes a task waiting on the channel when a fatal error closes it."""


class AsyncSocketCreator:
    """asyncio twin of :class:`sockcreator.SocketCreator`.

    ``async with AsyncSocketCreator() as c: sock = await c.get_socket(...)``;
    or ``await AsyncSocketCreator().start()``, and ``await c.terminate()``.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        timeout: float = 10.0,
        allow: Sequence[str] | None = None,
        user: str | int | None = None,
        harden: bool = True,
    ) -> None:
        if command is not None and (allow is not None or user is not None or not harden):
            raise ValueError("allow/user/harden apply only to this package's creator")
        self._argv = (
            list(command)
            if command is not None
            else creator_argv(allow=allow, user=user, harden=harden)
        )
        self._init_state(timeout)

    def _init_state(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._parser = AnswerParser()
        self._waiters: collections.deque[asyncio.Future[socket.socket]] = collections.deque()
        self._write_lock = asyncio.Lock()  # held by _submit, then by _write_rest if any
        self._writer: asyncio.Task[None] | None = None  # finishing a batch's write
        self._reader: asyncio.Task[None] | None = None
        self._io_waits: set[asyncio.Future[None]] = set()  # tasks waiting on the channel
        self._closing = False
        self._terminator: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self._failure: asyncio.Task[CreatorFatalError] | None = None

    async def start(self) -> AsyncSocketCreator:
        """Start the creator (fork/exec, as asyncio's own subprocess support does)."""
        if self._sock is not None:
            raise RuntimeError("already started")
        sock, self._proc = spawn(self._argv)
        self._attach(sock)
        return self

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float = 10.0) -> AsyncSocketCreator:
        """Wrap an already connected channel (the handle then owns ``sock``)."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("the creator channel must be a Unix stream socket")
        self = cls.__new__(cls)
        self._argv = []
        self._init_state(timeout)
        self._attach(sock)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def get_socket(
        self, protocol: ProtocolSpec, address: AddressSpec, port: int
    ) -> socket.socket:
        return (await self.get_sockets([(protocol, address, port)]))[0]

    async def get_sockets(self, requests: Iterable[RequestSpec]) -> list[socket.socket]:
        """Pipelined, all or nothing (see the blocking client).

        Cancelled (or interrupted) anywhere, this call leaves nothing open:
        the sockets that had arrived are closed here, the others by the
        reader when they arrive; the creator stays usable."""
        reqs = normalize(requests)
        if not reqs:
            return []
        futs = await self._submit(reqs)  # cancelled there: nothing was queued
        socks: list[socket.socket] = []
        error: Exception | None = None
        try:
            # Answers come in order: once the first is here, the rest of a
            # batch that came in the same read are done, and awaiting a done
            # future does not suspend.
            for f in futs:
                try:
                    socks.append(await f)
                except Exception as e:  # the batch goes on: all or nothing below
                    if error is None:
                        error = e
        except BaseException:
            # Cancelled while waiting, or after an answer was set but before
            # we resumed: close what came, and let the reader close the rest.
            _abandon(futs)
            raise
        if error is not None:
            for s in socks:
                s.close()
            raise error
        return socks

    async def _submit(self, reqs: list[Request]) -> list[asyncio.Future[socket.socket]]:
        """Queue ``reqs`` and write them.  Cancellation lands only while waiting
        for the lock, before anything is queued: the rest is synchronous, and a
        write the channel does not take at once is finished by a writer task
        (so a cancelled caller never leaves half a request in the stream)."""
        loop = asyncio.get_running_loop()
        await self._write_lock.acquire()
        try:
            sock = self._usable()
        except BaseException:
            self._write_lock.release()
            raise
        futs = [loop.create_future() for _ in reqs]
        for r, f in zip(reqs, futs, strict=True):
            self._parser.expect(r)
            self._waiters.append(f)
        # Read while we write: a batch larger than the socket buffers
        # would otherwise deadlock against a creator blocked on answers.
        self._ensure_reader()
        data = b"".join(r.encode() for r in reqs)
        try:
            n = sock.send(data, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            n = -1
            self._write_lock.release()
            # Every waiter, ours too, gets the CreatorFatalError from _fail.
            self._start_failure(f"cannot write to the creator: {e!r}")
        if 0 <= n < len(data):
            self._writer = loop.create_task(self._write_rest(sock, data[n:]))
        elif n == len(data):
            self._write_lock.release()
        return futs

    async def _write_rest(self, sock: socket.socket, data: bytes) -> None:
        """Finish a batch's write, holding the write lock (released here)."""
        try:
            await self._sendall(sock, data)
        except _ChannelClosed:
            pass  # a fatal error elsewhere closed the channel and handles the rest
        except Exception as e:  # OSError, or TimeoutError: the creator takes nothing
            await self._fail(f"cannot write to the creator: {e!r}")
        except BaseException as e:  # cancelled (loop closing): out of step now
            await self._fail(f"writer stopped mid-request: {e!r}")
            raise
        finally:
            self._writer = None
            self._write_lock.release()

    def _usable(self) -> socket.socket:
        if self._dead is not None:
            raise CreatorFatalError(f"creator unusable: {self._dead}")
        if self._sock is None:
            raise RuntimeError("not started: use 'async with' or await start()")
        if self._closing:
            raise CreatorFatalError("creator unusable: terminating")
        return self._sock

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _wait_io(self, sock: socket.socket, *, write: bool) -> None:
        """Until ``sock`` is ready; TimeoutError, or _ChannelClosed if closed meanwhile."""
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()
        (loop.add_writer if write else loop.add_reader)(fd, _wake, ready)
        self._io_waits.add(ready)
        try:
            await asyncio.wait_for(ready, self._timeout)
        finally:
            self._io_waits.discard(ready)
            if sock.fileno() == fd:  # else _close_channel removed it before closing
                (loop.remove_writer if write else loop.remove_reader)(fd)

    async def _sendall(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view, SEND_FLAGS) :]
            except (BlockingIOError, InterruptedError):
                await self._wait_io(sock, write=True)

    async def _recvmsg(self, sock: socket.socket, n: int) -> tuple[bytes, list[int] | None]:
        """Data and descriptors; None for descriptors the kernel could not
        install because our descriptor table is full (EMFILE)."""
        while True:
            try:
                data, anc, flags, _ = sock.recvmsg(n, ANCBUFSIZE, RECV_FLAGS)
                if descriptor_lost(data, anc, flags):
                    return data, None
                return data, unpack_fds(anc, flags)
            except (BlockingIOError, InterruptedError):
                pass
            except ConnectionResetError:
                return b"", []
            await self._wait_io(sock, write=False)

    def _close_channel(self) -> None:
        """Close the channel, first waking (with _ChannelClosed) and unregistering
        every task waiting on it, so that no selector entry outlives the fd."""
        sock = self._sock
        if sock is None or sock.fileno() == -1:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
        for ready in self._io_waits:
            if not ready.done():
                ready.set_exception(_ChannelClosed())
        sock.close()

    def _dispatch(self, events: Sequence[Event | DescriptorLost]) -> None:
        """Hand each answer to its waiter, in order; the socket of a waiter
        already given up on (cancelled) is closed here."""
        for i, ev in enumerate(events):
            fut = self._waiters.popleft()
            if isinstance(ev, SocketReceived):
                try:
                    sock = adopt(ev.fd, ev.request)
                except ProtocolViolation:
                    rest = events[i + 1 :]
                    close_fds(e.fd for e in rest if isinstance(e, SocketReceived))
                    self._waiters.appendleft(fut)  # so that _fail answers it too
                    raise
                if fut.done():  # its waiter was cancelled
                    sock.close()
                else:
                    fut.set_result(sock)
            elif fut.done():
                continue
            elif isinstance(ev, DescriptorLost):
                fut.set_exception(descriptor_lost_error(ev.request))
            else:
                fut.set_exception(socket_creation_error(ev.errno, ev.stage, ev.request))

    async def _read_loop(self) -> None:
        assert self._sock is not None
        try:
            while (self._waiters or self._closing) and self._dead is None:
                try:
                    data, fds = await self._recvmsg(self._sock, self._parser.bytes_wanted())
                except asyncio.TimeoutError:
                    raise ProtocolViolation(
                        f"no answer from the creator within {self._timeout}s"
                    ) from None
                if fds is None:  # lost to EMFILE: that answer fails, the channel is in step
                    self._dispatch(self._parser.feed_lost_descriptor(data))
                    continue
                if not data:
                    close_fds(fds)
                    if self._closing and not self._waiters:
                        break  # the clean end after 'T'
                    raise ProtocolViolation("the creator closed the connection")
                if not self._waiters and self._closing:
                    close_fds(fds)
                    raise ProtocolViolation(f"creator sent {data!r} instead of closing after 'T'")
                try:
                    events = self._parser.feed(data, fds)
                except ProtocolViolation:
                    close_fds(fds)
                    raise
                self._dispatch(events)
        except ProtocolViolation as e:
            await self._fail(str(e), e.condition)
        except _ChannelClosed:
            pass  # a fatal error elsewhere closed the channel and handles the rest
        except BaseException as e:  # cancelled (loop closing) or a bug: never half-alive
            await self._fail(f"reader stopped: {e!r}")
            raise
        finally:
            self._reader = None

    async def _fail(self, reason: str, condition: str | None = None) -> CreatorFatalError:
        """Close the channel, kill and reap the creator; every waiter gets the
        CreatorFatalError.  Only the first call's reason counts; every call
        returns once that is done."""
        return await asyncio.shield(self._start_failure(reason, condition))

    def _start_failure(
        self, reason: str, condition: str | None = None
    ) -> asyncio.Task[CreatorFatalError]:
        """The synchronous part of :meth:`_fail`: the channel is closed at once."""
        if self._failure is None:
            self._dead = reason
            self._close_channel()
            self._failure = asyncio.get_running_loop().create_task(
                self._finish_failure(reason, condition)
            )
        return self._failure

    async def _finish_failure(self, reason: str, condition: str | None) -> CreatorFatalError:
        status = await self._reap(min(1.0, self._timeout))
        err = CreatorFatalError(reason, condition=condition, exit_status=status)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        return err

    async def _reap(self, grace: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        delay = 0.001
        while (status := proc.poll()) is None:
            if loop.time() >= deadline:
                proc.kill()
                deadline = float("inf")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return status

    async def terminate(self) -> None:
        """Send 'T' after any pending requests, wait for EOF, reap.  Idempotent;
        concurrent calls all return once the creator is reaped.

        Raises CreatorFatalError if the creator answers 'T' with data, stays
        silent past the timeout, or fails a request still pending."""
        if self._sock is None:
            return
        if self._terminator is None:
            if self._dead is not None:
                return  # already dead and reaped
            self._closing = True  # new requests are refused from now on
            self._terminator = asyncio.get_running_loop().create_task(self._terminate())
        elif self._terminator.done():
            return  # ended already; any error went to the calls that waited for it
        await asyncio.shield(self._terminator)

    async def _terminate(self) -> None:
        assert self._sock is not None
        async with self._write_lock:  # after any batch still being written
            if self._dead is None:
                try:
                    await self._sendall(self._sock, b"T")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # already gone: the reader sees EOF
                except _ChannelClosed:
                    pass  # a fatal error: raised below
                except Exception as e:
                    await self._fail(f"cannot terminate the creator: {e!r}")
        if self._dead is None:
            self._ensure_reader()
        if self._reader is not None:
            await asyncio.wait([self._reader])
        if self._failure is not None:
            raise await asyncio.shield(self._failure)
        self._dead = "terminated"
        self._close_channel()
        await self._reap(self._timeout)

    close = terminate

    async def __aenter__(self) -> AsyncSocketCreator:
        if self._sock is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.terminate()

    def __repr__(self) -> str:
        return f"<AsyncSocketCreator pid={self.pid} {self._dead or 'ready'}>"
