"""The broker's own cost per grant+release cycle, in-process (no event loop).

    python benchmarks/inproc_broker.py [--cycles 20000] [--rounds 5] [--profile]

Builds a :class:`BrokerServer` with a stand-in loop (callbacks run at once,
at the end of each step, as the real loop's turn would) and a stand-in
creator (``fresh``: it makes the UDP socket itself), connects one client
over a socketpair, and times only the broker's side of each cycle: the
``Q`` frame's read, its checks, its audit line (to /dev/null), the ``G``
frame's ``sendmsg``; then the same for ``R`` and ``K``.  The client's reads
and sends are outside the timed part.  The clock is the thread's CPU time
(steal excluded; each reading is a system call, about the same in every
version measured).  Figures are microseconds per cycle
(median of ``--rounds``); ``--profile`` prints a cProfile of the shared
cycle instead.  What the end-to-end ``bench_broker.py --floor`` ratio moves
with is this figure (and the floor's, which this does not measure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from sockcreator.broker._connection import _Connection
from sockcreator.broker._protocol import Hello, ShareMode, SocketRequest
from sockcreator.broker._server import BrokerServer
from sockcreator.broker._shared import BrokerConfig, peer_credentials
from sockcreator.broker.policy import parse_policy
from sockcreator.client import make_request

POLICY = '[[allow]]\nusers = ["*"]\naddresses = ["127.0.0.0/8"]\nports = ["1024-65535"]\n'
_RELEASE = struct.Struct("!cHIQ")


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    """What the server and its connection ask of a loop, run by hand."""

    def __init__(self) -> None:
        self.ready: list[tuple[Any, tuple[Any, ...]]] = []

    def call_soon(self, fn: Any, *args: Any) -> _Handle:
        self.ready.append((fn, args))
        return _Handle()

    def call_later(self, delay: float, fn: Any, *args: Any) -> _Handle:
        return _Handle()

    def add_reader(self, *a: Any) -> None:
        pass

    remove_reader = add_writer = remove_writer = add_reader

    def run(self) -> None:
        while self.ready:
            ready, self.ready = self.ready, []
            for fn, args in ready:
                fn(*args)


class _Creator:
    auto_push = False
    unsent = False

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop

    def request(self, req: Any, callback: Any) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((str(req.address), req.port))
        self.loop.call_soon(callback, s)

    def push(self) -> None:
        pass


async def _server(loop: _Loop, audit_fd: int) -> BrokerServer:
    cfg = BrokerConfig(parse_policy(POLICY), max_held=100000)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server = BrokerServer(cfg, _Creator(loop), listener, audit_fd)  # type: ignore[arg-type]
    server.loop = loop  # type: ignore[assignment]
    return server


def setup(scenario: str) -> tuple[Any, ...]:
    loop = _Loop()
    audit_fd = os.open(os.devnull, os.O_WRONLY)
    server = asyncio.run(_server(loop, audit_fd))
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = _Connection(server, mine, 1)
    conn.start()
    loop.run()
    peer_credentials(theirs)
    theirs.send(Hello().encode())
    conn._readable()
    loop.run()
    theirs.recv(64)
    share = ShareMode.ANY if scenario == "shared" else ShareMode.NO
    frame = SocketRequest(0, make_request("udp", "127.0.0.1", 39999), share).encode()
    if scenario == "shared":  # the cached socket, held by another grant meanwhile
        holder_mine, holder = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hc = _Connection(server, holder_mine, 2)
        hc.start()
        holder.send(Hello().encode() + frame)
        hc._readable()
        loop.run()
        _, anc, _, _ = holder.recvmsg(4096, 64)
        for _, _, raw in anc:
            os.close(struct.unpack("i", raw[:4])[0])
    return loop, conn, theirs, frame


def cycles(state: tuple[Any, ...], n: int) -> float:
    loop, conn, client, frame = state
    head, tail = frame[:3], frame[7:]
    clock = time.thread_time_ns  # CPU time: what the hypervisor steals is not counted
    spent = 0
    rid = 0
    for _ in range(n):
        rid += 1
        client.send(head + rid.to_bytes(4, "big") + tail)
        t0 = clock()
        conn._readable()
        loop.run()
        spent += clock() - t0
        data, anc, _, _ = client.recvmsg(4096, 64)
        for _, _, raw in anc:
            os.close(struct.unpack("i", raw[:4])[0])
        rid += 1
        client.send(_RELEASE.pack(b"R", 12, rid, int.from_bytes(data[7:15], "big")))
        t0 = clock()
        conn._readable()
        loop.run()
        spent += clock() - t0
        client.recv(4096)
    return spent / n / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--scenario", default="shared", help="the one to --profile")
    args = ap.parse_args()
    if args.profile:
        import cProfile
        import pstats

        state = setup(args.scenario)
        cycles(state, 2000)
        prof = cProfile.Profile()
        prof.runcall(cycles, state, args.cycles)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    for scenario in ("fresh", "shared"):
        state = setup(scenario)
        cycles(state, 2000)  # warm up
        us = [cycles(state, args.cycles) for _ in range(args.rounds)]
        print(f"{scenario}: {statistics.median(us):.2f} us/cycle (median; least {min(us):.2f})")


if __name__ == "__main__":
    main()
