#!/usr/bin/env python3
"""Soak: N sockets through ONE creator, sampling memory and descriptors.

One :class:`sockcreator.SocketCreator` (hardened unless --no-harden) hands
out ``--n`` sockets in ``get_sockets`` batches of ``--batch`` (TCP and UDP,
IPv4 and IPv6 when available, port 0 on loopback); every batch is closed at
once.  After each batch one request that must fail (bind to a TEST-NET
address: EADDRNOTAVAIL) exercises the 'E' path on the same creator.

Every ``--every`` sockets it samples, while the creator is idle between
batches: the creator's RSS and descriptor count (/proc/PID/status, fd) and
this process's.  It prints a table and, at the end, checks flatness:

- descriptor counts: every sample equal to the first (exactly);
- RSS: no sample more than --rss-slack KiB above the first sample after
  warm-up (the creator's and the client's, each).

Exit status 0 if flat, 1 if not, 2 on any other failure.  Example::

    python soak/soak_creator.py --n 1000000          # the full run
    python soak/soak_creator.py --n 20000 --json out.json
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sockcreator import SocketCreationError, SocketCreator


@dataclass
class Sample:
    sockets: int
    errors: int
    seconds: float
    creator_rss_kib: int
    creator_fds: int
    client_rss_kib: int
    client_fds: int


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def mix(batch: int) -> list[tuple[str, str, int]]:
    hosts = ["127.0.0.1", "::1"] if have_ipv6() else ["127.0.0.1"]
    kinds = [(p, h) for h in hosts for p in ("tcp", "udp")]
    return [(*kinds[i % len(kinds)], 0) for i in range(batch)]


def check_flat(samples: list[Sample], rss_slack: int) -> list[str]:
    """Why the run is not flat (empty if it is).  samples[0] is the warm-up."""
    problems = []
    first = samples[0]
    for s in samples:
        if s.creator_fds != first.creator_fds:
            problems.append(f"creator fds {s.creator_fds} != {first.creator_fds} at {s.sockets}")
        if s.client_fds != first.client_fds:
            problems.append(f"client fds {s.client_fds} != {first.client_fds} at {s.sockets}")
    for field in ("creator_rss_kib", "client_rss_kib"):
        base = getattr(first, field)
        worst = max(getattr(s, field) for s in samples)
        if worst - base > rss_slack:
            problems.append(f"{field} grew {worst - base} KiB (> {rss_slack}) from {base} KiB")
    return problems


def run(n: int, batch: int, every: int, harden: bool, rss_slack: int) -> tuple[list[Sample], int]:
    requests = mix(batch)
    done = errors = 0
    samples: list[Sample] = []
    me = os.getpid()
    with SocketCreator(harden=harden, timeout=30.0) as creator:
        assert creator.pid is not None
        pid = creator.pid
        start = time.monotonic()
        next_sample = 0
        while done < n:
            want = requests[: min(batch, n - done)]
            for s in creator.get_sockets(want):
                s.close()
            done += len(want)
            try:
                creator.get_socket("udp", "192.0.2.1", 0)  # TEST-NET-1: not ours
            except SocketCreationError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
                errors += 1
            else:
                raise AssertionError("bind to 192.0.2.1 succeeded")
            if done >= next_sample or done >= n:
                samples.append(
                    Sample(
                        done,
                        errors,
                        round(time.monotonic() - start, 3),
                        rss_kib(pid),
                        fd_count(pid),
                        rss_kib(me),
                        fd_count(me),
                    )
                )
                next_sample = done + every
    return samples, rss_slack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="sockets in all (default 20000)")
    ap.add_argument("--batch", type=int, default=1000, help="requests per get_sockets")
    ap.add_argument("--every", type=int, default=0, help="sample every K sockets (default n/20)")
    ap.add_argument("--no-harden", action="store_true", help="run the creator unhardened")
    ap.add_argument("--rss-slack", type=int, default=512, help="allowed RSS growth, KiB")
    ap.add_argument("--json", help="also write the samples here")
    args = ap.parse_args(argv)
    if args.n <= 0 or args.batch <= 0:
        ap.error("--n and --batch must be positive")
    every = args.every or max(args.batch, args.n // 20)
    samples, slack = run(args.n, args.batch, every, not args.no_harden, args.rss_slack)
    head = ("sockets", "errors", "seconds", "creator RSS KiB", "creator fds", "client RSS KiB")
    print(" ".join(f"{h:>15}" for h in (*head, "client fds")))
    for s in samples:
        print(" ".join(f"{v:>15}" for v in asdict(s).values()))
    last = samples[-1]
    rate = last.sockets / last.seconds if last.seconds else float("inf")
    print(f"{last.sockets} sockets, {last.errors} 'E' answers, {last.seconds:.1f} s, {rate:.0f}/s")
    return report(samples, check_flat(samples, slack), args.json)


def report(samples: Sequence[Any], problems: list[str], json_path: str | None) -> int:
    """Print the verdict (and write every sample to ``json_path``); the exit status."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"samples": [asdict(s) for s in samples], "problems": problems}, f, indent=1)
    for p in problems:
        print("NOT FLAT:", p)
    print("flat" if not problems else "NOT flat")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a crash is not "not flat": a distinct status
        print(f"soak failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
