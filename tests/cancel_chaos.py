"""Cancelling many concurrent asyncio client calls at every moment of their
life, and recording which moment each cancellation hit.

Shared by tests/test_aio_cancel.py (AsyncSocketCreator) and
tests/broker/test_broker_cancel.py (AsyncBroker).  A client subclass
records, per task, the futures its call queued (by overriding the method
that queues them and hands them back: ``_submit`` or ``_queue``); the state
of a call when it is cancelled is read from real state:

- ``created``: the task has not started (its coroutine was never entered);
- ``unsent``: started, nothing queued yet (waiting for a slot or the lock);
- ``writing``: queued, its bytes not all taken by the kernel yet (the write
  lock is held, which outside the queueing code means a writer task is
  finishing the last batch queued, and this is that batch);
- ``awaiting``: written, no answer yet;
- ``partial``: some answers of a batch arrived (recorded, not required);
- ``arrived``: every answer arrived, the call has not resumed yet.

Cancellation moments: at once (before start), after a random number of
loop turns, when the write lock is found held (the writing call), and from
a done callback added to the call's future before the call awaits it (so it
runs before the task's own wakeup: answered, not delivered).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

REQUIRED = ("created", "unsent", "writing", "awaiting", "arrived")


def open_fds() -> dict[int, str]:
    """This process's descriptors and what they are (not the one listing them)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the directory listing itself, closed by now
            pass
    return out


class Recorder:
    """What the client subclass fills in as calls queue their futures."""

    def __init__(self) -> None:
        self.queued: dict[asyncio.Task[Any], list[asyncio.Future[Any]]] = {}
        self.last: list[asyncio.Future[Any]] | None = None
        self.last_task: asyncio.Task[Any] | None = None
        self.on_queued: Callable[[asyncio.Task[Any], list[asyncio.Future[Any]]], None] | None = None

    def record(self, futs: list[asyncio.Future[Any]]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.queued[task] = futs
        self.last = futs
        self.last_task = task
        if self.on_queued is not None:
            self.on_queued(task, futs)


class Chaos:
    """One seed's worth of rounds; ``hits`` counts the windows hit so far."""

    def __init__(self, seed: int, recorder: Recorder, lock: asyncio.Lock) -> None:
        self.rng = random.Random(seed)
        self.rec = recorder
        self.lock = lock
        self.hits: Counter[str] = Counter()
        self.cancelled: dict[asyncio.Task[Any], str] = {}

    def state(self, task: asyncio.Task[Any]) -> str:
        if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
            return "created"
        futs = self.rec.queued.get(task)
        if futs is None:
            return "unsent"
        if futs is self.rec.last and self.lock.locked():
            return "writing"
        done = sum(f.done() for f in futs)
        if done == len(futs):
            return "arrived"
        return "partial" if done else "awaiting"

    def cancel(self, task: asyncio.Task[Any]) -> None:
        if task.done() or task in self.cancelled:
            return
        state = self.state(task)
        self.cancelled[task] = state
        self.hits[state] += 1
        task.cancel()

    def missing(self) -> list[str]:
        return [w for w in REQUIRED if not self.hits[w]]

    async def round(
        self, n: int, call: Callable[[int], Coroutine[Any, Any, Any]]
    ) -> list[asyncio.Task[Any]]:
        """Start ``n`` calls, cancel about a third of them at random moments,
        and return the tasks once all are done."""
        rng = self.rng
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(call(i)) for i in range(n)]
        at_tick: dict[int, list[asyncio.Task[Any]]] = {}
        on_arrival: set[asyncio.Task[Any]] = set()
        for t in tasks:
            if rng.random() >= 0.35:
                continue
            how = rng.random()
            if how < 0.15:
                self.cancel(t)  # before it starts
            elif how < 0.35:
                on_arrival.add(t)
            else:
                at_tick.setdefault(rng.randrange(40), []).append(t)

        def queued(task: asyncio.Task[Any], futs: list[asyncio.Future[Any]]) -> None:
            if task in on_arrival and len(futs) == 1:
                futs[0].add_done_callback(lambda _: self.cancel(task))

        self.rec.on_queued = queued
        tick = 0
        try:
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0)
                for t in at_tick.pop(tick, []):
                    self.cancel(t)
                last = self.rec.last_task
                if last is not None and self.lock.locked() and rng.random() < 0.3:
                    self.cancel(last)  # the call being written
                tick += 1
        finally:
            self.rec.on_queued = None
        return tasks
