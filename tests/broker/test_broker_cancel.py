"""Issue #10, the broker side: a cancelled AsyncBroker.request_socket leaves
no socket open in this process and no grant held at the broker, wherever the
cancellation lands (see tests/cancel_chaos.py for the windows).  A real
broker (the fixtures of test_broker.py); no timing assertions.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from cancel_chaos import REQUIRED, Chaos, Recorder, open_fds
from conftest import requires_linux, requires_root
from test_broker import BrokerProc, start_broker, users, workdir  # noqa: F401 (fixtures)

from sockcreator.broker.aio import AsyncBroker, _Waiter
from sockcreator.broker.client import BrokerFatalError
from sockcreator.client._protocol import Request

pytestmark = [requires_root, requires_linux, pytest.mark.root]

CALLS = 200
MIN_ROUNDS = 3
MAX_ROUNDS = 40


class Observed(AsyncBroker):
    """Records each request's future as _queue hands it back; nothing else."""

    rec: Recorder

    async def _queue(
        self, rid: int, data: bytes, kind: str, request: Request | None = None
    ) -> _Waiter:
        w = await super()._queue(rid, data, kind, request)
        if kind == "request":
            self.rec.record([w.future])
        return w


@pytest.mark.parametrize("seed", range(5))
def test_cancelled_requests_lose_no_socket_and_keep_no_grant(
    seed: int,
    start_broker: Callable[..., BrokerProc],  # noqa: F811
) -> None:
    b = start_broker()
    report: dict[str, Any] = {}

    async def main() -> None:
        async with Observed(b.path) as ab:
            ab.rec = Recorder()
            assert ab._sock is not None
            ab._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            baseline = open_fds()
            chaos = Chaos(seed, ab.rec, ab._lock)
            kept: list[asyncio.Task[Any]] = []
            errors: list[BaseException] = []
            left: list[Any] = []
            rounds = 0
            while (chaos.missing() or rounds < MIN_ROUNDS) and rounds < MAX_ROUNDS:
                rounds += 1
                tasks = await chaos.round(
                    CALLS,
                    lambda i: ab.request_socket(
                        "udp" if i % 2 else "tcp", "127.0.0.1", 0, backlog=None
                    ),
                )
                kept += tasks
                for t in tasks:
                    if t.cancelled():
                        continue
                    if t.exception() is not None:
                        errors.append(t.exception())  # type: ignore[arg-type]
                        continue
                    sock = t.result()
                    if ab._dead is None:
                        await ab.release_socket(sock)
                    else:
                        sock.close()
                if ab._dead is not None:
                    break  # (reported below)
                # The releases of the cancelled ones' grants are in flight
                # (background tasks); once they are answered the broker
                # holds nothing for us.
                while ab._background:
                    await asyncio.wait(set(ab._background))
                left += await ab.status()
                assert not ab._waiters
            report.update(
                rounds=rounds,
                hits=dict(chaos.hits),
                leaked={fd: what for fd, what in open_fds().items() if baseline.get(fd) != what},
                grants_left=len(left),
                errors=errors[:3],
                missing=chaos.missing(),
                dead=ab._dead,
            )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(main())
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not report["leaked"], f"{len(report['leaked'])} descriptors leaked: {report}"
    assert not report["grants_left"], report
    assert not unclosed, f"{len(unclosed)} unclosed: {unclosed[:3]} {report}"
    assert not report["errors"], report
    assert report["dead"] is None, report  # never failed on the way
    assert not report["missing"], report
    assert all(report["hits"][w] for w in REQUIRED), report


def test_close_with_requests_pending_leaves_the_loop_clean(
    start_broker: Callable[..., BrokerProc],  # noqa: F811
) -> None:
    """close() while requests are pending (the reader waiting on the
    connection): every pending call gets BrokerFatalError, close() itself
    raises nothing, and the closed descriptor's number is usable again."""
    b = start_broker()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = open_fds()
        ab = await AsyncBroker(b.path).connect()
        tasks = [loop.create_task(ab.request_socket("udp", "127.0.0.1", 0)) for _ in range(20)]
        await asyncio.sleep(0)  # queued and sent, answers due
        await ab.close()
        for r in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(r, socket.socket):
                r.close()  # answered before close(): the caller's
            else:
                assert isinstance(r, BrokerFatalError), r
        assert open_fds() == before
        x, y = socket.socketpair()  # probably the connection's old number
        with x, y:
            x.setblocking(False)
            reading = loop.create_task(loop.sock_recv(x, 1))
            await asyncio.sleep(0)
            y.send(b"!")
            assert await reading == b"!"

    asyncio.run(main())
