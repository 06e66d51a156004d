"""Issue #10: a cancelled AsyncSocketCreator call loses no socket, wherever
the cancellation lands (see cancel_chaos for the windows and how each is
recognised).  A real creator; no timing assertions: rounds go on until every
window has been hit, and the test then checks that each was.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from typing import Any

import pytest
from cancel_chaos import REQUIRED, Chaos, Recorder, open_fds
from conftest import requires_linux

from sockcreator import AsyncSocketCreator
from sockcreator.client._channel import RequestSpec
from sockcreator.client._protocol import Request

pytestmark = requires_linux

CALLS = 200  # concurrent calls per round
MIN_ROUNDS = 3
MAX_ROUNDS = 40  # a guard: far more than the few rounds needed


class Observed(AsyncSocketCreator):
    """Records each call's futures as _submit hands them back; nothing else."""

    rec: Recorder

    async def _submit(self, reqs: list[Request]) -> list[asyncio.Future[socket.socket]]:
        futs = await super()._submit(reqs)
        self.rec.record(list(futs))
        return futs


def batch(i: int) -> list[RequestSpec]:
    if i % 5 == 4:  # some batches, mixed
        return [("udp", "127.0.0.1", 0), ("tcp", "127.0.0.1", 0), ("udp", "::1", 0)][: 1 + i % 3]
    return [("udp", "127.0.0.1", 0) if i % 2 else ("tcp", "127.0.0.1", 0)]


@pytest.mark.parametrize("seed", range(5))
def test_cancelled_calls_lose_no_socket(seed: int) -> None:
    report: dict[str, Any] = {}

    async def main() -> None:
        async with Observed() as c:
            c.rec = Recorder()
            assert c._sock is not None
            # A small send buffer: concurrent calls fill it, so writes are
            # finished by the writer task and calls queue up behind it.
            c._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            (await c.get_socket("udp", "127.0.0.1", 0)).close()  # the reader is up
            baseline = open_fds()
            chaos = Chaos(seed, c.rec, c._write_lock)
            kept: list[asyncio.Task[Any]] = []  # every task stays referenced to the end
            errors: list[BaseException] = []
            rounds = 0
            while (chaos.missing() or rounds < MIN_ROUNDS) and rounds < MAX_ROUNDS:
                rounds += 1
                tasks = await chaos.round(
                    CALLS,
                    lambda i: c.get_sockets(batch(i)) if i % 5 == 4 else c.get_socket(*batch(i)[0]),
                )
                kept += tasks
                for t in tasks:
                    if t.cancelled():
                        continue
                    if t.exception() is not None:
                        errors.append(t.exception())  # type: ignore[arg-type]
                        continue
                    got = t.result()
                    for s in got if isinstance(got, list) else [got]:
                        s.close()
                # Answers come in order: once this one is here, every earlier
                # one has been dispatched (and a cancelled waiter's closed).
                (await c.get_socket("udp", "127.0.0.1", 0)).close()
                assert not c._waiters
            report.update(
                rounds=rounds,
                hits=dict(chaos.hits),
                leaked={fd: what for fd, what in open_fds().items() if baseline.get(fd) != what},
                errors=errors[:3],
                missing=chaos.missing(),
            )
        report["dead"] = c._dead  # terminated cleanly: never failed on the way

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(main())
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not report["leaked"], f"{len(report['leaked'])} descriptors leaked: {report}"
    assert not unclosed, f"{len(unclosed)} unclosed: {unclosed[:3]} {report}"
    assert not report["errors"], report
    assert report["dead"] == "terminated", report
    assert not report["missing"], report
    assert all(report["hits"][w] for w in REQUIRED), report
