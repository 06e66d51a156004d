"""Start-up, side by side (issue 14), as root, in a fresh network namespace:

- ``sockcreator run --user nobody --listen tcp:127.0.0.1:80 -- /bin/true``
  against ``benchmarks/floor_launcher.py`` (the least a launcher can do);
- ``sockcreator run --broker PATH --user nobody --listen tcp:127.0.0.1:80 --
  /bin/true`` against ``benchmarks/floor_broker_client.py`` (the least a
  broker client can do), against the same broker in the same namespace;
- ``python -m sockcreator creator`` against ``python -I -S -B creator.py``,
  both until the answer to one 'S' request has arrived.

Rounds alternate; medians.  ``python benchmarks/bench_startup.py [--rounds N]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CREATOR = HERE.parent / "src" / "sockcreator" / "creator.py"
NETNS = ["unshare", "-n", "/bin/sh", "-c", 'ip link set lo up && exec "$0" "$@"']
REQUEST = b"ST4" + struct.pack("!H", 0) + socket.inet_aton("127.0.0.1")


def whole(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_socket(argv: list[str]) -> float:
    """From spawning ``argv`` (a creator on our socketpair) to its answer."""
    ours, theirs = socket.socketpair()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, env={})
    theirs.close()
    ours.sendall(REQUEST)
    assert ours.recv(1) == b"S"
    _, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
    elapsed = time.perf_counter() - t0
    os.close(struct.unpack("@i", anc[0][2][:4])[0])
    ours.sendall(b"T")
    proc.wait()
    ours.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    from bench_intercept import BrokerInNetns  # (the same broker the intercept bench uses)

    runs: dict[str, list[float]] = {}
    true = ["--", "/bin/true"]
    work = Path(tempfile.mkdtemp(prefix="sockc-bench-startup-"))
    broker = BrokerInNetns(work)
    inside = ["nsenter", f"--net=/proc/{broker.proc.pid}/ns/net"]
    for _ in range(args.rounds):
        for name, argv in (
            ("run --broker", [*inside, sys.executable, "-m", "sockcreator", "run", "--broker",
                              broker.path, "--user", "nobody", "--listen", "tcp:127.0.0.1:80",
                              *true]),
            ("floor broker client", [*inside, sys.executable, str(HERE / "floor_broker_client.py"),
                                     "65534", "65534", broker.path, "80", "/bin/true"]),
        ):  # fmt: skip
            runs.setdefault(name, []).append(whole(argv))
        for name, argv in (
            ("run", [*NETNS, sys.executable, "-m", "sockcreator", "run", "--user", "nobody",
                     "--listen", "tcp:127.0.0.1:80", *true]),
            ("floor launcher", [*NETNS, sys.executable, str(HERE / "floor_launcher.py"),
                                "65534", "65534", "80", "/bin/true"]),
        ):  # fmt: skip
            runs.setdefault(name, []).append(whole(argv))
        for name, argv in (
            ("sockcreator creator", [sys.executable, "-m", "sockcreator", "creator", "--",
                                     "--allow-all", "--no-harden"]),
            ("creator.py", [sys.executable, "-I", "-S", "-B", str(CREATOR), "--allow-all",
                            "--no-harden"]),
        ):  # fmt: skip
            runs.setdefault(name, []).append(first_socket(argv))
    broker.stop()
    shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:<24} {v:8.1f} ms")
    r1 = med["run"] / med["floor launcher"]
    r2 = med["sockcreator creator"] / med["creator.py"]
    r3 = med["run --broker"] / med["floor broker client"]
    print(f"run / floor launcher: {r1:.2f}x (target <= 1.5x) {'met' if r1 <= 1.5 else 'MISSED'}")
    print(f"run --broker / floor broker client: {r3:.2f}x (target <= 1.5x)"
          f" {'met' if r3 <= 1.5 else 'MISSED'}")  # fmt: skip
    print(f"sockcreator creator / creator.py: {r2:.2f}x (target <= 1.15x)"
          f" {'met' if r2 <= 1.15 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
