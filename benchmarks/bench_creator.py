"""Benchmark: the socket creator and its client library, against two baselines.

    python benchmarks/bench_creator.py [--n N] [--reps R] [--batch B] [--json FILE]

Measures the cost per socket (sequential and pipelined) through
:class:`sockcreator.SocketCreator` and :class:`sockcreator.AsyncSocketCreator`,
the time from starting a creator to holding its first socket, and the
creator's resident memory, each next to its target.  The two baselines:

- the in-process floor: socket() + setsockopt(SO_REUSEADDR) + bind() + close()
  in a loop, with no creator at all;
- a bare client loop against the same creator (hardened, as the library
  starts it): sendall() the 'S' request, recv() the 'S', recvmsg() the
  descriptor with MSG_CMSG_CLOEXEC, close(); no library, no checks.

And, for the creator itself (issue 14, section 3), the same bare loop
against two other creators, side by side with ours: BIND 10's kind of C
creator (``tests/creator/compat/b10_like_creator.c``, built with ``cc -O2``;
skipped without a compiler), the peer our creator is held to, and
``benchmarks/floor_creator.py``, the same system calls as ours in a Python
loop with no checks at all: the floor under any creator in Python.  For
each of the three it also prints the creator's own CPU time per request in
the batched loop (/proc/PID/schedstat), apart from the client's.

Every request is TCP 127.0.0.1 port 0, and every socket received is closed.
Timings use time.perf_counter after a warm-up.  Each run times every case
once, one after the other (starting with a different case each run), so
that drift, other load and CPU placement hit them alike; a time is the
median over the runs, and a ratio the median of the per-run ratios.
``--creator FILE`` runs another creator file the same way (to compare a
change to creator.py).  This is not a test: nothing here fails.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sockcreator import AsyncSocketCreator, SocketCreator
from sockcreator.client._channel import CREATOR_PATH, creator_argv, reap, spawn

HOST = "127.0.0.1"
REQUEST = b"ST4" + (0).to_bytes(2, "big") + socket.inet_aton(HOST)  # 'S' TCP v4 port 0
INT = struct.Struct("@i")
ANCBUF = socket.CMSG_SPACE(INT.size)
CLOEXEC = socket.MSG_CMSG_CLOEXEC

# Targets (issue 2, section 5).
TARGET_START_MS = 20.0
TARGET_RSS_MIB = 10.0
TARGET_PIPELINED_VS_FLOOR = 2.0
TARGET_LIBRARY_VS_BARE = 1.25
TARGET_CREATOR_VS_C = 1.1  # issue 14, section 3

HERE = os.path.dirname(os.path.abspath(__file__))
C_SOURCE = os.path.join(HERE, "..", "tests", "creator", "compat", "b10_like_creator.c")
FLOOR_CREATOR = os.path.join(HERE, "floor_creator.py")


# -- the measured loops: each makes n sockets and closes them ------------------


def floor_loop(n: int) -> None:
    """No creator: what making the socket costs in this process."""
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, 0))
        s.close()


def _bare_receive(sock: socket.socket) -> None:
    if sock.recv(1) != b"S":
        raise RuntimeError("bare loop: the creator did not answer 'S'")
    _, anc, _, _ = sock.recvmsg(1, ANCBUF, CLOEXEC)
    os.close(INT.unpack(anc[0][2])[0])


def bare_sequential(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.sendall(REQUEST)
        _bare_receive(sock)


def bare_batched(sock: socket.socket, n: int, batch: int) -> None:
    for done in range(0, n, batch):
        k = min(batch, n - done)
        sock.sendall(REQUEST * k)
        for _ in range(k):
            _bare_receive(sock)


def library_sequential(c: SocketCreator, n: int) -> None:
    for _ in range(n):
        c.get_socket("tcp", HOST, 0).close()


def library_batched(c: SocketCreator, n: int, batch: int) -> None:
    for done in range(0, n, batch):
        for s in c.get_sockets([("tcp", HOST, 0)] * min(batch, n - done)):
            s.close()


async def async_gathered(c: AsyncSocketCreator, n: int, batch: int) -> None:
    for done in range(0, n, batch):
        k = min(batch, n - done)
        for s in await asyncio.gather(*(c.get_socket("tcp", HOST, 0) for _ in range(k))):
            s.close()


# -- helpers -------------------------------------------------------------------


def on_one_cpu(pids: list[int], fn: Callable[[int], object]) -> Callable[[int], object]:
    """``fn``, run with the client and its creators pinned to one CPU."""

    def pinned(n: int) -> object:
        cpus = os.sched_getaffinity(0)
        for pid in pids:
            os.sched_setaffinity(pid, {min(cpus)})
        try:
            return fn(n)
        finally:
            for pid in pids:
                os.sched_setaffinity(pid, cpus)

    return pinned


def per_socket(fn: Callable[[int], object], n: int) -> float:
    """Seconds per socket for one run of ``fn(n)``."""
    gc.collect()
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has run so far (Linux: /proc/PID/schedstat, in ns); 0 elsewhere."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        return 0.0


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, and Pss and private pages (what the creator adds to the machine:
    most of its RSS is the interpreter's shared library, shared with us)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def build_c_creator(directory: str) -> str | None:
    """The C creator, built with ``cc -O2``; None without a compiler."""
    cc = shutil.which("cc")
    if cc is None:
        return None
    exe = os.path.join(directory, "b10-like-creator")
    flags = ["-std=c99", "-D_DEFAULT_SOURCE", "-O2"]
    subprocess.run([cc, *flags, "-o", exe, C_SOURCE], check=True)
    return exe


def creator_command(creator: str | None, harden: bool = True) -> list[str] | None:
    """argv for another creator file, or None: the package's own."""
    if creator is None:
        return None
    return [creator if a == CREATOR_PATH else a for a in creator_argv(harden=harden)]


def start_to_first_socket(creator: str | None, harden: bool) -> float:
    """Seconds from SocketCreator() to holding its first socket."""
    command = creator_command(creator, harden)
    t0 = time.perf_counter()
    c = SocketCreator(harden=harden) if command is None else SocketCreator(command)
    s = c.get_socket("tcp", HOST, 0)
    elapsed = time.perf_counter() - t0
    s.close()
    c.terminate()
    return elapsed


def interpreter_start() -> float:
    """Seconds to run ``python -I -S -B -c pass``: the floor under any start."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-B", "-c", "pass"], env={}, check=True)
    return time.perf_counter() - t0


# -- the run -------------------------------------------------------------------


def run(n: int, reps: int, batch: int, starts: int, creator: str | None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    command = creator_command(creator)
    lib = SocketCreator(command)
    bare_sock, bare_proc = spawn(command or creator_argv())  # the same creator, hardened
    build_dir = tempfile.mkdtemp(prefix="bench-creator-")
    c_exe = build_c_creator(build_dir)
    peers = {"floor_creator": [sys.executable, "-I", "-S", "-B", FLOOR_CREATOR]}
    if c_exe is not None:
        peers["c"] = [c_exe]
    peer = {name: spawn(argv) for name, argv in peers.items()}
    loop = asyncio.new_event_loop()
    aio = AsyncSocketCreator(command)
    loop.run_until_complete(aio.start())
    try:
        # A sequential round trip costs two wakeups.  Where the scheduler puts
        # the client and the creator decides their price (one CPU: a context
        # switch; two, in a VM: an IPI each), and it changes from run to run;
        # with both on one CPU the cost is the work done, which is what the
        # library adds.  The free runs are shown too.
        pids = [0, lib.pid or 0, bare_proc.pid] + [p.pid for _, p in peer.values()]
        cases: dict[str, Callable[[int], object]] = {
            "floor": floor_loop,
            "bare_seq_1cpu": on_one_cpu(pids, lambda k: bare_sequential(bare_sock, k)),
            "lib_seq_1cpu": on_one_cpu(pids, lambda k: library_sequential(lib, k)),
            "bare_seq": lambda k: bare_sequential(bare_sock, k),
            "bare_batch": lambda k: bare_batched(bare_sock, k, batch),
            "lib_seq": lambda k: library_sequential(lib, k),
            "lib_batch": lambda k: library_batched(lib, k, batch),
            "async_gather": lambda k: loop.run_until_complete(async_gathered(aio, k, batch)),
        }
        for name, (psock, _) in peer.items():
            cases[f"{name}_seq_1cpu"] = on_one_cpu(pids, lambda k, s=psock: bare_sequential(s, k))
            cases[f"{name}_seq"] = lambda k, s=psock: bare_sequential(s, k)
            cases[f"{name}_batch"] = lambda k, s=psock: bare_batched(s, k, batch)
        for fn in cases.values():  # warm-up
            fn(max(batch, n // 10))
        samples: dict[str, list[float]] = {name: [] for name in cases}
        # The creators' own CPU time per request in the batched bare loops:
        # what each creator costs, apart from the client and the wakeups.
        creator_of = {"bare_batch": bare_proc.pid} | {
            f"{name}_batch": p.pid for name, (_, p) in peer.items()
        }
        creator_cpu: dict[str, list[float]] = {name: [] for name in creator_of}
        names = list(cases)
        for i in range(reps):
            # Each run starts with another case: what ran just before a case
            # (one busy CPU, or two) sways where the scheduler puts the client
            # and its creator, and so the cost of a round trip.
            for name in names[i % len(names) :] + names[: i % len(names)]:
                pid = creator_of.get(name)
                before = cpu_seconds(pid) if pid else 0.0
                samples[name].append(per_socket(cases[name], n))
                if pid:
                    creator_cpu[name].append((cpu_seconds(pid) - before) / n)
        memory = memory_kib(lib.pid or 0)  # after warm-up and reps x n x 2 requests
    finally:
        lib.terminate()
        loop.run_until_complete(aio.terminate())
        loop.close()
        for psock, pproc in [(bare_sock, bare_proc), *peer.values()]:
            psock.sendall(b"T")
            psock.close()
            reap(pproc, 5.0)
        shutil.rmtree(build_dir)

    start_to_first_socket(creator, True)  # warm the page cache
    start_h, start_nh, interp = [], [], []
    for _ in range(starts):  # interleaved, for the same reason as above
        start_h.append(start_to_first_socket(creator, True))
        start_nh.append(start_to_first_socket(creator, False))
        interp.append(interpreter_start())

    return {
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [load_before, os.getloadavg()[0]],
        "creator": creator or CREATOR_PATH,
        "c_peer": c_exe is not None,
        "n": n,
        "reps": reps,
        "batch": batch,
        "starts": starts,
        "per_socket_us": {k: statistics.median(v) * 1e6 for k, v in samples.items()},
        "per_socket_us_all": {k: [x * 1e6 for x in v] for k, v in samples.items()},
        "creator_cpu_us_all": {k: [x * 1e6 for x in v] for k, v in creator_cpu.items()},
        "start_ms": statistics.median(start_h) * 1e3,
        "start_no_harden_ms": statistics.median(start_nh) * 1e3,
        "interpreter_start_ms": statistics.median(interp) * 1e3,
        "creator_memory_kib": memory,
        "creator_rss_mib": memory["VmRSS"] / 1024,
    }


def report(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the table; return the target checks."""
    us = r["per_socket_us"]
    b = r["batch"]
    checks: list[dict[str, Any]] = []
    rows: list[tuple[str, ...]] = []

    def row(label: str, figure: str, target: str = "", got: str = "", verdict: str = "") -> None:
        rows.append((label, figure, target, got, verdict))

    def checked(label: str, figure: str, what: str, value: float, limit: float, unit: str) -> None:
        ok = value <= limit
        checks.append({"what": what, "value": value, "target": limit, "unit": unit, "ok": ok})
        base = what.split(" vs ")[-1].split(",")[0]  # "bare", "floor", "C"
        target = f"<= {limit:g}{unit}" if unit != "x" else f"<= {limit:g}x {base}"
        row(label, figure, target, f"{value:.2f}{unit}", "ok" if ok else "MISSED")

    def ratio(name: str, base: str) -> float:
        """Median of the per-run ratios: the cases of one run ran side by side,
        under the same load and CPU placement, so pairs compare fairly."""
        runs = r["per_socket_us_all"]
        return float(statistics.median(a / b for a, b in zip(runs[name], runs[base], strict=True)))

    row("in-process floor (socket+setsockopt+bind+close)", f"{us['floor']:.1f} us")
    row("bare client loop, sequential, on one CPU", f"{us['bare_seq_1cpu']:.1f} us")
    checked(
        "SocketCreator.get_socket, sequential, on one CPU",
        f"{us['lib_seq_1cpu']:.1f} us",
        "library vs bare, sequential",
        ratio("lib_seq_1cpu", "bare_seq_1cpu"),
        TARGET_LIBRARY_VS_BARE,
        "x",
    )
    row("bare client loop, sequential, any CPU", f"{us['bare_seq']:.1f} us")
    row(
        "SocketCreator.get_socket, sequential, any CPU",
        f"{us['lib_seq']:.1f} us",
        "(placement varies)",
        f"{ratio('lib_seq', 'bare_seq'):.2f}x bare",
    )
    row(f"bare client loop, batched ({b})", f"{us['bare_batch']:.1f} us")
    checked(
        f"SocketCreator.get_sockets, batched ({b})",
        f"{us['lib_batch']:.1f} us",
        "library vs bare, batched",
        ratio("lib_batch", "bare_batch"),
        TARGET_LIBRARY_VS_BARE,
        "x",
    )
    checked(
        "  the same, against the in-process floor",
        "",
        "pipelined vs floor",
        ratio("lib_batch", "floor"),
        TARGET_PIPELINED_VS_FLOOR,
        "x",
    )
    row(
        f"AsyncSocketCreator, {b} gathered get_socket",
        f"{us['async_gather']:.1f} us",
        "(no target)",
        f"{ratio('async_gather', 'bare_batch'):.2f}x bare batched",
    )
    # Our creator and floor_creator.py against the C creator, each through
    # the same bare loop.  Sequential is checked with all on one CPU (as the
    # library is, for the reason given in run()); the free run is shown.
    ways = [
        ("sequential, on one CPU", "seq_1cpu", True),
        ("sequential, any CPU", "seq", False),
        (f"batched ({b})", "batch", True),
    ]
    for way, case, check in ways if r["c_peer"] else []:
        row(f"bare loop against the C creator (cc -O2), {way}", f"{us[f'c_{case}']:.1f} us")
        label, figure = f"  against our creator (Python), {way}", f"{us[f'bare_{case}']:.1f} us"
        value = ratio(f"bare_{case}", f"c_{case}")
        if check:
            what = f"creator vs C, {way.split(',')[0]}"
            checked(label, figure, what, value, TARGET_CREATOR_VS_C, "x")
        else:
            row(label, figure, "(placement varies)", f"{value:.2f}x C")
        row(
            f"  against floor_creator.py (same syscalls), {way}",
            f"{us[f'floor_creator_{case}']:.1f} us",
            "(the floor)",
            f"{ratio(f'floor_creator_{case}', f'c_{case}'):.2f}x C",
        )
    if not r["c_peer"]:
        row("the creator against the C creator", "skipped (no cc)")
    cpu = r["creator_cpu_us_all"]
    if r["c_peer"] and all(cpu[k] and min(cpu[k]) > 0 for k in cpu):

        def cpu_ratio(name: str) -> float:
            pairs = zip(cpu[name], cpu["c_batch"], strict=True)
            return float(statistics.median(a / b for a, b in pairs))

        row(
            f"creator's own CPU per request, batched ({b}): C",
            f"{statistics.median(cpu['c_batch']):.1f} us",
        )
        for label, name in (("ours", "bare_batch"), ("floor_creator.py", "floor_creator_batch")):
            row(
                f"  {label}",
                f"{statistics.median(cpu[name]):.1f} us",
                "(the floor)" if name.startswith("floor") else "(no target)",
                f"{cpu_ratio(name):.2f}x C",
            )
    checked(
        "creator start to first socket (hardened)",
        f"{r['start_ms']:.1f} ms",
        "start to first socket",
        r["start_ms"],
        TARGET_START_MS,
        " ms",
    )
    row("creator start to first socket (--no-harden)", f"{r['start_no_harden_ms']:.1f} ms")
    row("  python -I -S -B -c pass, for reference", f"{r['interpreter_start_ms']:.1f} ms")
    checked(
        "creator RSS (hardened, VmRSS)",
        f"{r['creator_rss_mib']:.2f} MiB",
        "creator RSS",
        r["creator_rss_mib"],
        TARGET_RSS_MIB,
        " MiB",
    )
    mem = r["creator_memory_kib"]
    if "Pss" in mem:
        private = (mem["Private_Clean"] + mem["Private_Dirty"]) / 1024
        row(
            "  its Pss / private memory, for reference",
            f"{mem['Pss'] / 1024:.2f} / {private:.2f} MiB",
        )

    load = r["load_average"]
    print(
        f"sockcreator benchmark: Python {r['python']}, {r['machine']}, "
        f"load average {load[0]:.2f} -> {load[1]:.2f}\n"
        f"per socket: median of {r['reps']} runs of {r['n']} sockets (TCP {HOST} port 0), "
        "ratios: median of per-run ratios; "
        f"start: median of {r['starts']} starts"
    )
    head = ("measurement", "per socket / value", "target", "measured", "")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(5)]
    line = "  ".join("-" * w for w in widths).rstrip()
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    print(line)
    for cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    print(line)
    missed = [c["what"] for c in checks if not c["ok"]]
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")
    if max(load) > 0.5 * (os.cpu_count() or 1):
        print("note: the machine was busy; the figures are noisy (ratios are fairer than times)")
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="sockets per run (default 1000)")
    ap.add_argument("--reps", type=int, default=21, help="runs of each case (default 21)")
    ap.add_argument("--batch", type=int, default=100, help="pipelined batch size (default 100)")
    ap.add_argument("--starts", type=int, default=30, help="creator starts (default 30)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--creator", metavar="FILE", help="benchmark this creator file instead")
    args = ap.parse_args()
    if min(args.n, args.reps, args.batch, args.starts) < 1:
        ap.error("--n, --reps, --batch and --starts must be positive")
    result = run(args.n, args.reps, args.batch, args.starts, args.creator)
    result["checks"] = report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
