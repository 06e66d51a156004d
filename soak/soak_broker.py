#!/usr/bin/env python3
"""Soak: N grant/release cycles through ONE broker from many client connections.

Run as root.  Starts ``sockcreator serve`` (dropping to the user
``sockc-broker``, created if missing) in a fresh network namespace, with a
policy that lets root have UDP/TCP on loopback ports 0 and 8000-8999.  Then
``--clients`` AsyncBroker connections (one asyncio process) run cycles until
``--cycles`` are done; each cycle is one of, in turn:

- a shared UDP socket (share ANY, 32 ports shared by every client: mostly
  cache hits), released;
- a fresh TCP socket on port 0 (a creator round trip every time), released;
- a listening TCP socket of the client's own (share NO, backlog 16), released;
- a request the policy refuses (port 9999: EPERM), no release.

Every ``--every`` cycles all clients pause between cycles and it samples the
broker's and the creator's RSS and descriptor counts, and this process's.
At the end the broker is stopped with SIGTERM (exit 0 expected, creator gone)
and flatness is checked as in soak_creator.py: descriptor counts exactly equal
to the first sample, RSS no more than --rss-slack KiB above it.

Exit status 0 flat, 1 not flat, 2 any other failure.  Example::

    python soak/soak_broker.py --cycles 200000 --clients 64     # the full run
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from soak_creator import (  # the same sampling and verdict (soak/ is on sys.path)
    fd_count,
    report,
    rss_kib,
)

from sockcreator.broker.aio import AsyncBroker
from sockcreator.broker.client import SocketRefusedError

BROKER_USER = "sockc-broker"
CREATOR_USER = "sockc-creator"  # the creator's own user (docs/security.md)
UNSHARE, IP = "/usr/bin/unshare", "/usr/sbin/ip"
POLICY = """
[[allow]]
users = ["root"]
protocols = ["tcp", "udp"]
addresses = ["127.0.0.1", "::1"]
ports = [0, "8000-8999"]
"""


@dataclass
class Sample:
    cycles: int
    denials: int
    seconds: float
    broker_rss_kib: int
    broker_fds: int
    creator_rss_kib: int
    creator_fds: int
    client_rss_kib: int
    client_fds: int


def ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


class BrokerProcess:
    def __init__(self, directory: Path, clients: int) -> None:
        self.path = str(directory / "broker.sock")
        (directory / "policy.toml").write_text(POLICY)
        self.log = directory / "broker.log"
        argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", self.path]
        argv += [
            "--policy",
            str(directory / "policy.toml"),
            "--user",
            BROKER_USER,
            "--creator-user",
            CREATOR_USER,
        ]
        argv += ["--max-connections-per-user", str(max(64, clients + 1))]
        script = f'{IP} link set lo up && exec "$0" "$@"'
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [UNSHARE, "-n", "/bin/sh", "-c", script, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while True:
            start = self._first_line_with('"event":"start"')
            if start is not None:
                self.creator_pid = int(json.loads(start)["creator_pid"])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"broker did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def _first_line_with(self, text: str) -> str | None:
        with open(self.log) as f:
            for line in f:
                if text in line:
                    return line
        return None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("broker did not stop on SIGTERM") from None


class Driver:
    """The clients, a pause gate, and the counters.  Samples are taken only
    while every client is connected and between cycles (nothing held)."""

    def __init__(self, broker: BrokerProcess, total: int, clients: int, every: int) -> None:
        self.broker = broker
        self.total, self.clients, self.every = total, clients, every
        self.done = self.denials = self.parked = self.finished = 0
        self.next_sample = min(every, total)
        self.gate = asyncio.Event()
        self.gate.set()
        self.final = asyncio.Event()
        self.samples: list[Sample] = []
        self.start = time.monotonic()

    async def cycle(self, b: AsyncBroker, worker: int, n: int) -> None:
        kind = n % 4
        if kind == 0:
            s = await b.request_socket("udp", "127.0.0.1", 8000 + (n // 4) % 32, share="ANY")
        elif kind == 1:
            s = await b.request_socket("tcp", "127.0.0.1", 0)
        elif kind == 2:
            s = await b.request_socket("tcp", "::1", 8100 + worker, backlog=16)
        else:
            try:
                await b.request_socket("udp", "127.0.0.1", 9999)
            except SocketRefusedError as e:
                if e.errno != errno.EPERM:
                    raise
                self.denials += 1
                return
            raise AssertionError("port 9999 was granted")
        await b.release_socket(s)

    def _all_still(self) -> bool:
        return self.parked + self.finished == self.clients

    async def park(self) -> None:
        self.parked += 1
        if self._all_still():
            self.take_sample()
            self.next_sample = self.done + self.every
            self.gate.set()
        else:
            await self.gate.wait()
        self.parked -= 1

    async def finish(self) -> None:
        self.finished += 1
        if self.finished == self.clients:
            self.take_sample()
            self.final.set()
            return
        if not self.gate.is_set() and self._all_still():
            self.take_sample()
            self.next_sample = self.done + self.every
            self.gate.set()
        await self.final.wait()

    async def worker(self, index: int) -> None:
        async with AsyncBroker(self.broker.path, timeout=30) as b:
            n = index
            while self.done < self.total:
                if not self.gate.is_set():
                    await self.park()
                    continue
                self.done += 1
                await self.cycle(b, index, n)
                n += 1
                if self.done >= self.next_sample:
                    self.gate.clear()
            await self.finish()

    def take_sample(self) -> None:
        me, bpid, cpid = os.getpid(), self.broker.proc.pid, self.broker.creator_pid
        self.samples.append(
            Sample(
                self.done,
                self.denials,
                round(time.monotonic() - self.start, 2),
                rss_kib(bpid),
                fd_count(bpid),
                rss_kib(cpid),
                fd_count(cpid),
                rss_kib(me),
                fd_count(me),
            )
        )

    async def run(self) -> list[Sample]:
        await asyncio.gather(*(self.worker(i) for i in range(self.clients)))
        return self.samples


def check_flat(samples: list[Sample], rss_slack: int) -> list[str]:
    problems = []
    first = samples[0]
    for field in ("broker_fds", "creator_fds", "client_fds"):
        for s in samples:
            if getattr(s, field) != getattr(first, field):
                problems.append(
                    f"{field} {getattr(s, field)} != {getattr(first, field)} at {s.cycles}"
                )
    for field in ("broker_rss_kib", "creator_rss_kib", "client_rss_kib"):
        base = getattr(first, field)
        worst = max(getattr(s, field) for s in samples)
        if worst - base > rss_slack:
            problems.append(f"{field} grew {worst - base} KiB (> {rss_slack}) from {base} KiB")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20000, help="cycles in all (default 20000)")
    ap.add_argument("--clients", type=int, default=64, help="client connections (default 64)")
    ap.add_argument("--every", type=int, default=0, help="sample every K cycles (default n/20)")
    ap.add_argument("--rss-slack", type=int, default=1024, help="allowed RSS growth, KiB")
    ap.add_argument("--json", help="also write the samples here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (it starts a broker in its own network namespace)")
    if args.cycles <= 0 or not 0 < args.clients <= 1000:
        ap.error("--cycles must be positive and --clients 1..1000")
    ensure_user(BROKER_USER)
    ensure_user(CREATOR_USER)
    every = args.every or max(args.clients, args.cycles // 20)
    directory = Path(tempfile.mkdtemp(prefix="sockc-soak-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        broker = BrokerProcess(directory, args.clients)
        try:
            samples = asyncio.run(Driver(broker, args.cycles, args.clients, every).run())
        finally:
            status = broker.stop()
        creator_gone = not os.path.exists(f"/proc/{broker.creator_pid}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    head = ["cycles", "denials", "seconds", "brk RSS KiB", "brk fds", "crt RSS KiB", "crt fds"]
    print(" ".join(f"{h:>12}" for h in (*head, "cli RSS KiB", "cli fds")))
    for s in samples:
        print(" ".join(f"{v:>12}" for v in asdict(s).values()))
    last = samples[-1]
    rate = last.cycles / last.seconds if last.seconds else float("inf")
    print(
        f"{last.cycles} cycles from {args.clients} clients, {last.denials} denials, "
        f"{last.seconds:.1f} s, {rate:.0f} cycles/s; broker exit {status}, "
        f"creator {'gone' if creator_gone else 'STILL RUNNING'}"
    )
    problems = check_flat(samples, args.rss_slack)
    if status != 0:
        problems.append(f"broker exited {status} on SIGTERM, not 0")
    if not creator_gone:
        problems.append("the creator outlived the broker")
    return report(samples, problems, args.json)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        print(f"soak failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
