"""The asyncio client of the broker: :class:`AsyncBroker`, the twin of
:class:`~.client.Broker` (see there for what a grant is and who is at fault).

Size: the asyncio shell around :mod:`._clientlib` (which holds what the two
share), plus what only asyncio needs: concurrent requests, their pending
slots, and cancellation at every point, a cancelled grant released at the
broker.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from types import TracebackType

from ..client._channel import RECV_FLAGS, SEND_FLAGS, close_fds
from ..client._protocol import (
    AddressSpec,
    ProtocolSpec,
    Request,
)
from ._clientlib import (
    _ANCBUF,
    BrokerFatalError,
    HeldSocket,
    ShareSpec,
    _adopt,
    _expected,
    _fds,
    _refused,
    _status,
    build_request,
)
from ._protocol import (
    AnswerDecoder,
    BindCounts,
    BrokerMessage,
    BrokerProtocolError,
    Denied,
    Fatal,
    FatalCode,
    Granted,
    Hello,
    HelloReply,
    Release,
    ShareMode,
    StatusEntry,
    StatusQuery,
)

__all__ = ["AsyncBroker"]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Closed(BrokerProtocolError):
    """The broker sent ``X``: it closes the connection."""


class _Gone(Exception):
    """Wakes a task waiting on the connection when it is closed meanwhile."""


class _Waiter:
    __slots__ = ("answers", "future", "id", "kind", "request", "slot", "sock")

    def __init__(
        self,
        rid: int,
        kind: str,
        fut: asyncio.Future[_Waiter],
        request: Request | None,
        slot: bool,
    ) -> None:
        self.id = rid
        self.kind = kind
        self.future = fut
        self.request = request
        self.slot = slot  # holds one of the max_pending slots until answered
        self.answers: list[BrokerMessage] = []
        self.sock: socket.socket | None = None


class AsyncBroker:
    """asyncio twin of :class:`Broker`: ``async with AsyncBroker(path) as b``,
    or ``b = await AsyncBroker(path).connect()`` and ``await b.close()``.

    Requests from concurrent tasks are pipelined; one reader task hands the
    answers out in order.  A request counts against ``max_pending`` until its
    answer arrives, whether or not anyone still waits for it.

    Cancellation: a cancelled :meth:`request_socket` never leaves a socket
    open nor a grant held, wherever it lands (before the frame is queued:
    nothing was asked; after: the socket that arrives, or had arrived but
    was not yet returned, is closed and its grant released).  A cancelled
    :meth:`release_socket` still releases.  A frame is always written whole
    (a writer task finishes what the socket does not take at once), so
    cancelling never puts the connection out of step."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self._path = os.fspath(path)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = AnswerDecoder()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._lock = asyncio.Lock()  # held while a frame is written (_queue, then _write_rest)
        self._writer: asyncio.Task[None] | None = None
        self._io_waits: set[asyncio.Future[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 1
        self._held: dict[socket.socket, int] = {}
        self._dead: str | None = None
        self._slots: asyncio.Semaphore | None = None  # max_pending, once known
        self._background: set[asyncio.Task[None]] = set()
        self.max_held = 0
        self.max_pending = 0

    async def connect(self) -> AsyncBroker:
        if self._sock is not None:
            raise RuntimeError("already connected")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self._path), self._timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            reply = (await self._ask(0, Hello().encode(), "hello")).answers[0]
        except BaseException as e:  # cancelled too: the handle must not stay half open
            self._fail(f"connect stopped: {e!r}")
            raise
        assert isinstance(reply, HelloReply)  # checked by the reader
        self.max_held, self.max_pending = reply.max_held, reply.max_pending
        self._slots = asyncio.Semaphore(max(1, reply.max_pending))
        return self

    async def request_socket(
        self,
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
    ) -> socket.socket:
        """See :meth:`Broker.request_socket`."""
        rid = self._take_id()
        m = build_request(
            rid,
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
        w = await self._ask(rid, m.encode(), "request", m.request)
        answer = w.answers[0]
        if isinstance(answer, Denied):
            raise _refused(answer.errno, answer.reason, m.request)
        assert isinstance(answer, Granted) and w.sock is not None
        self._held[w.sock] = answer.grant
        return w.sock

    def grant_of(self, sock: socket.socket) -> int:
        return self._held[sock]

    async def release_socket(self, sock: socket.socket) -> None:
        """See :meth:`Broker.release_socket`."""
        grant = self._held.pop(sock)
        sock.close()
        await self._release(grant, hand_off=True)

    async def _release(self, grant: int, *, hand_off: bool = False) -> None:
        """Release ``grant``.  ``hand_off``: cancelled before the frame was
        queued, the release is still made, by a background task."""
        rid = self._take_id()
        try:
            w = await self._queue(rid, Release(rid, grant).encode(), "release")
        except asyncio.CancelledError:
            if hand_off:
                self._release_later(grant)
            raise
        answer = (await self._answer(w)).answers[0]
        if isinstance(answer, Denied):
            raise _refused(answer.errno, answer.reason, None)

    async def status(self) -> list[HeldSocket]:
        """See :meth:`Broker.status`."""
        rid = self._take_id()
        answers = (await self._ask(rid, StatusQuery(rid).encode(), "status")).answers
        if isinstance(answers[-1], Denied):
            raise _refused(answers[-1].errno, answers[-1].reason, None)
        return _status([a for a in answers if isinstance(a, StatusEntry)])

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1 if rid < 2**32 - 1 else 1
        return rid

    async def _ask(
        self, rid: int, data: bytes, kind: str, request: Request | None = None
    ) -> _Waiter:
        """Send, and wait for the answer; never more than max_pending at once."""
        return await self._answer(await self._queue(rid, data, kind, request))

    async def _queue(
        self, rid: int, data: bytes, kind: str, request: Request | None = None
    ) -> _Waiter:
        """Take a max_pending slot, queue a waiter and write its frame.  The
        only suspensions (where a cancellation lands) come before anything is
        queued; the frame is written whole (see :meth:`_write`)."""
        slots = self._slots  # None for the hello
        if slots is not None:
            await slots.acquire()
        try:
            await self._lock.acquire()
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        try:
            sock = self._usable()
        except BaseException:
            self._lock.release()
            if slots is not None:
                slots.release()
            raise
        loop = asyncio.get_running_loop()
        w = _Waiter(rid, kind, loop.create_future(), request, slots is not None)
        self._waiters.append(w)
        if self._reader is None:
            self._reader = loop.create_task(self._read_loop())
        self._write(sock, data)
        return w

    async def _answer(self, w: _Waiter) -> _Waiter:
        """Wait for ``w``'s answer.  Given up on (cancelled), the socket it
        brings is closed and its grant released: by the reader if it has not
        arrived yet, here if it has arrived but we had not resumed yet."""
        try:
            return await w.future
        except BaseException:
            if not w.future.done():
                w.future.cancel()  # _dispatch closes and releases what comes
            elif w.sock is not None and not w.future.cancelled():
                sock, w.sock = w.sock, None
                sock.close()
                answer = w.answers[0]
                assert isinstance(answer, Granted)
                self._release_later(answer.grant)
            raise

    def _write(self, sock: socket.socket, data: bytes) -> None:
        """Write a frame, holding the lock: at once if the socket takes it
        all (releasing the lock), else by a writer task that finishes it."""
        try:
            n = sock.send(data, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._lock.release()
            self._fail(f"cannot write to the broker: {e!r}")  # every waiter's error
            return
        if n < len(data):
            self._writer = asyncio.get_running_loop().create_task(self._write_rest(sock, data[n:]))
        else:
            self._lock.release()

    async def _write_rest(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[sock.send(view, SEND_FLAGS) :]
                except (BlockingIOError, InterruptedError):
                    try:
                        await self._wait_io(sock, write=True)
                    except asyncio.TimeoutError:
                        raise BrokerProtocolError(
                            f"the broker took nothing within {self._timeout}s"
                        ) from None
        except _Gone:
            pass  # closed meanwhile: whoever closed it answered the waiters
        except Exception as e:  # OSError, BrokerProtocolError
            self._fail(f"cannot write to the broker: {e!r}")
        except BaseException as e:  # cancelled (the loop is closing): out of step now
            self._fail(f"writer stopped mid-frame: {e!r}")
            raise
        finally:
            self._writer = None
            self._lock.release()

    async def _wait_io(self, sock: socket.socket, *, write: bool) -> None:
        """Until ``sock`` is ready; TimeoutError, or _Gone if closed meanwhile."""
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()
        (loop.add_writer if write else loop.add_reader)(fd, _wake, ready)
        self._io_waits.add(ready)
        try:
            await asyncio.wait_for(ready, self._timeout)
        finally:
            self._io_waits.discard(ready)
            if sock.fileno() == fd:  # else _close_sock removed it before closing
                (loop.remove_writer if write else loop.remove_reader)(fd)

    def _close_sock(self) -> None:
        """Close the connection, first waking (with _Gone) and unregistering
        every task waiting on it, so that no selector entry outlives the fd."""
        sock = self._sock
        if sock is None or sock.fileno() == -1:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (not in a loop: nothing can be registered)
            pass
        else:
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
        for ready in self._io_waits:
            if not ready.done():
                ready.set_exception(_Gone())
        sock.close()

    def _retire(self, w: _Waiter) -> None:
        """``w`` left the queue (answered or failed): its slot is free."""
        if w.slot and self._slots is not None:
            w.slot = False
            self._slots.release()

    def _release_later(self, grant: int) -> None:
        """Release a grant nobody took, in the background (nothing to do once
        the connection is gone: that ended every grant)."""
        if self._dead is not None:
            return
        task = asyncio.get_running_loop().create_task(self._release_quietly(grant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _usable(self) -> socket.socket:
        if self._dead is not None:
            raise BrokerFatalError(f"broker connection unusable: {self._dead}")
        if self._sock is None:
            raise RuntimeError("not connected: use 'async with' or await connect()")
        return self._sock

    async def _recv(self, sock: socket.socket) -> tuple[bytes, list[int]]:
        while True:
            try:
                data, anc, flags, _ = sock.recvmsg(
                    self._decoder.bytes_wanted(), _ANCBUF, RECV_FLAGS
                )
                return data, _fds(anc, flags)
            except (BlockingIOError, InterruptedError):
                pass
            except ConnectionResetError:
                return b"", []
            try:
                await self._wait_io(sock, write=False)
            except asyncio.TimeoutError:
                raise BrokerProtocolError(
                    f"no answer from the broker within {self._timeout}s"
                ) from None

    async def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while self._waiters and self._dead is None:  # (a failed write: nothing to read)
                data, fds = await self._recv(sock)
                if not data:
                    close_fds(fds)
                    raise BrokerProtocolError("the broker closed the connection")
                try:
                    messages = self._decoder.feed(data, fds)
                except BrokerProtocolError as e:
                    close_fds(e.fds)
                    raise
                for msg in messages:
                    self._dispatch(msg)
        except BrokerProtocolError as e:
            self._fail(str(e), e.code if isinstance(e, _Closed) else None)
        except _Gone:
            pass  # closed meanwhile: whoever closed it answered the waiters
        except BaseException as e:
            self._fail(f"reader stopped: {e!r}")
            raise
        finally:
            self._reader = None

    def _dispatch(self, msg: BrokerMessage) -> None:
        if isinstance(msg, Fatal):
            raise _Closed(f"the broker closed the connection: {msg.text}", msg.code)
        w = self._waiters[0]
        if w.kind == "hello":
            ok = isinstance(msg, HelloReply)
        else:
            ok = _expected(w.kind, msg) and getattr(msg, "id", -1) == w.id
        if not ok:
            if isinstance(msg, Granted):
                os.close(msg.fd)
            raise BrokerProtocolError(f"unexpected answer {msg!r} to {w.kind} {w.id}")
        w.answers.append(msg)
        if isinstance(msg, (StatusEntry, BindCounts)):
            return
        # _adopt may raise: w is still queued then, and _fail hands it the error.
        sock = _adopt(msg, w.request) if isinstance(msg, Granted) else None
        self._waiters.popleft()
        self._retire(w)
        if isinstance(msg, Granted) and sock is not None:
            if w.future.done():  # its waiter was cancelled: give the grant back
                sock.close()
                self._release_later(msg.grant)
                return
            w.sock = sock
        if not w.future.done():
            w.future.set_result(w)

    async def _release_quietly(self, grant: int) -> None:
        try:
            await self._release(grant)
        except (BrokerFatalError, OSError):
            pass

    def _fail(self, reason: str, code: FatalCode | None = None) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._close_sock()
        self._drop_waiters(BrokerFatalError(reason, code=code))

    def _drop_waiters(self, err: BrokerFatalError) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            self._retire(w)
            if not w.future.done():
                w.future.set_exception(err)

    async def close(self) -> None:
        """Close the connection (the broker releases every grant).  Idempotent."""
        self._held.clear()
        if self._dead is None:
            self._dead = "closed"
            self._close_sock()  # the reader and any writer end (on _Gone)
            self._drop_waiters(BrokerFatalError("connection closed"))
            reader = self._reader
            if reader is not None:
                await asyncio.wait([reader])

    async def __aenter__(self) -> AsyncBroker:
        if self._sock is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncBroker {self._dead or 'ready'}, {len(self._held)} held>"
