"""Benchmark: the broker (``sockcreator serve``) under 32 concurrent clients.

    python benchmarks/bench_broker.py [--clients 32] [--seconds 3] [--held 10000]
                                      [--json FILE]

Starts a broker (as root: in a fresh network namespace, dropping to
``nobody``; otherwise as ourselves), then measures, for each scenario, with
no other sockets held and then with ``--held`` sockets held at once by
another connection:

- ``fresh``: each client asks for its own UDP socket and releases it again,
  so every grant is a new socket from the creator (socket(), bind(),
  SCM_RIGHTS twice: creator to broker to client);
- ``shared``: every client asks for the same cached socket (share ANY) and
  releases it, so no grant needs the creator.

Each client is its own process, in a closed loop (request, release, repeat)
for ``--seconds``; the figures are grants per second over all clients and
the p50/p99 latency of a grant (request sent to socket in hand).  With C
clients always waiting, latency is about C / throughput (Little's law):
p99 <= 2 ms at 32 clients needs well over 16,000 grants/s.

Targets (issue 4): >= 10,000 grants/s, p99 <= 2 ms, no slowdown with 10,000
sockets held.  This is not a test: nothing here fails a build.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sockcreator.broker_client import Broker

UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
IP = shutil.which("ip") or "/usr/sbin/ip"
HELD_BASE = 10000  # held sockets: 127.0.0.2, ports 10000 and up
FRESH_BASE = 40000  # client i: 127.0.0.1 port 40000 + i
SHARED_PORT = 39999

POLICY = """
[[allow]]
users = ["*"]
addresses = ["127.0.0.0/8"]
ports = ["1024-65535"]
"""


def start_broker(directory: Path, max_held: int) -> subprocess.Popen[bytes]:
    (directory / "policy.toml").write_text(POLICY)
    argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket",
            str(directory / "broker.sock"), "--policy", str(directory / "policy.toml"),
            "--max-held", str(max_held)]  # fmt: skip
    if os.geteuid() == 0:
        argv += ["--user", "nobody"]
        script = f'{IP} link set lo up && exec "$0" "$@"'
        argv = [UNSHARE, "-n", "/bin/sh", "-c", script, *argv]
    log = open(directory / "audit.log", "wb")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while b'"event":"start"' not in (directory / "audit.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"broker did not start:\n{(directory / 'audit.log').read_text()}")
        time.sleep(0.02)
    return proc


def client(path: str, index: int, scenario: str, seconds: float, barrier: Any, out: Any) -> None:
    port = SHARED_PORT if scenario == "shared" else FRESH_BASE + index
    share = "ANY" if scenario == "shared" else "NO"
    lat = array.array("d")
    with Broker(path) as b:
        for _ in range(20):  # warm up
            b.release_socket(b.request_socket("udp", "127.0.0.1", port, share=share))
        barrier.wait()
        perf = time.perf_counter
        end = perf() + seconds
        while True:
            t0 = perf()
            if t0 > end:
                break
            s = b.request_socket("udp", "127.0.0.1", port, share=share)
            lat.append(perf() - t0)
            b.release_socket(s)
    out.put((index, lat.tobytes()))


def run_scenario(path: str, scenario: str, clients: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(path, i, scenario, seconds, barrier, out))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    lats = array.array("d")
    for _ in procs:
        _, blob = out.get(timeout=seconds + 60)
        lats.frombytes(blob)
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    ordered = sorted(lats)
    return {
        "scenario": scenario,
        "clients": clients,
        "grants": len(ordered),
        "grants_per_s": len(ordered) / wall,
        "p50_ms": ordered[len(ordered) // 2] * 1e3,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


def hold(path: str, n: int) -> Broker:
    b = Broker(path, timeout=60)
    for i in range(n):
        b.request_socket("tcp", "127.0.0.2", HELD_BASE + i, backlog=1)
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--held", type=int, default=10_000)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument(
        "--socket", metavar="PATH", help="use a broker already running there (e.g. profiled)"
    )
    args = ap.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="sockc-bench-", dir="/tmp"))
    directory.chmod(0o755)
    broker = start_broker(directory, max(4096, args.held + 16)) if not args.socket else None
    path = args.socket or str(directory / "broker.sock")
    results = []
    try:
        with Broker(path) as keeper:  # keeps the shared socket cached throughout
            shared = keeper.request_socket("udp", "127.0.0.1", SHARED_PORT, share="ANY")
            for held in (0, args.held):
                holder = hold(path, held) if held else None
                for scenario in ("fresh", "shared"):
                    r = run_scenario(path, scenario, args.clients, args.seconds)
                    r["held"] = held + 1
                    results.append(r)
                    print(
                        f"{scenario:6}  held {held + 1:6}  {r['grants_per_s']:9,.0f} grants/s  "
                        f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                        f"({r['grants']} grants, {args.clients} clients)",
                        flush=True,
                    )
                if holder is not None:
                    holder.close()
            keeper.release_socket(shared)
    finally:
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            broker.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    by = {(r["scenario"], r["held"] > 1): r for r in results}
    for scenario in ("fresh", "shared"):
        a, b = by[scenario, False], by[scenario, True]
        print(f"{scenario}: with {args.held} held, {b['grants_per_s'] / a['grants_per_s']:.2f}x "
              f"the throughput, p99 {b['p99_ms'] / a['p99_ms']:.2f}x")  # fmt: skip
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "results": results}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
