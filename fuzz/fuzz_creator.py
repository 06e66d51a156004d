#!/usr/bin/env python3
"""atheris harness 1: the REAL creator process, fed fuzzed byte streams.

Input layout: byte 0 picks the configuration (bits 0-1: one of
``creator_oracle.CONFIGS``: allow-all or a policy, hardened or not, root or
nobody; bit 2: two descriptors of ours ride on the first byte, which the
creator must drop); the rest is written to the creator's stdin, then EOF.
``creator_oracle.run_input`` checks every invariant (answers exactly as the
reference model says, documented exit status, no traceback, no hang, three
descriptors while idle) and this harness checks that its own descriptor
count stays flat (every received socket closed, every process reaped).

The creator is a separate process, so atheris cannot see its coverage
directly.  It runs under ``_traced_creator.py``, which reports the
line-to-line transitions taken in creator.py on exit; each distinct
transition calls one of 4096 instrumented stub functions here, so libFuzzer
sees the creator's coverage as its own.  Processes are started ahead of
need (a small pool per configuration) to hide interpreter start-up.

As root, the harness re-executes itself in a fresh network namespace (its
loopback up), so the sockets it makes touch nothing else on the machine.

Run (see fuzz/README.md)::

    python fuzz/fuzz_creator.py -max_total_time=300 -dict=fuzz/creator.dict \\
        fuzz/corpus/creator
    python fuzz/fuzz_creator.py --coverage fuzz/corpus/creator   # lines reached
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NETNS_ENV = "SOCKCREATOR_FUZZ_NETNS"
UNSHARE, IP = "/usr/bin/unshare", "/usr/sbin/ip"


def _enter_netns() -> None:
    if os.geteuid() != 0 or os.environ.get(NETNS_ENV) == "1":
        return
    os.environ[NETNS_ENV] = "1"
    script = f'{IP} link set lo up && exec "$0" "$@"'
    os.execv(UNSHARE, [UNSHARE, "-n", "/bin/sh", "-c", script, sys.executable, *sys.argv])


if __name__ == "__main__":
    _enter_netns()

import atheris  # noqa: E402

sys.path.insert(0, HERE)
with atheris.instrument_imports(include=["creator_oracle"]):
    import creator_oracle as oracle

# --- the coverage bridge: one instrumented stub per bucket of creator edges ---
BUCKETS = 4096
_ns: dict[str, object] = {}
exec(
    compile(
        "\n".join(
            f"def e{i}(x):\n    if x:\n        return {i}\n    return -1" for i in range(BUCKETS)
        ),
        "<creator-edges>",
        "exec",
    ),
    _ns,
)
STUBS = [atheris.instrument_func(_ns[f"e{i}"]) for i in range(BUCKETS)]


def bucket(edge: int) -> int:
    a, b = edge >> 16, edge & 0xFFFF
    return (a * 7919 + b * 104729) % BUCKETS


class Pool:
    """A few creators started ahead of need, per configuration."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.spare: dict[int, collections.deque[oracle.Spawned]] = {
            i: collections.deque() for i in range(len(oracle.CONFIGS))
        }

    def fill(self) -> None:
        for i, q in self.spare.items():
            while len(q) < self.depth:
                q.append(oracle.spawn(oracle.CONFIGS[i], traced=True))

    def take(self, i: int) -> oracle.Spawned:
        q = self.spare[i]
        return q.popleft() if q else oracle.spawn(oracle.CONFIGS[i], traced=True)


class Stats:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.execs = 0
        self.start = time.monotonic()
        self.status: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[str] = collections.Counter()
        self.configs: collections.Counter[str] = collections.Counter()
        self.edges: set[int] = set()

    def add(self, config: str, outcome: oracle.Outcome) -> None:
        self.execs += 1
        self.configs[config] += 1
        self.status[str(outcome.status)] += 1
        self.answers.update(outcome.answers)
        self.edges |= outcome.edges
        if self.path and self.execs % 100 == 0:
            self.write()

    def summary(self) -> dict[str, object]:
        reached, total = line_coverage(self.edges)
        secs = time.monotonic() - self.start
        return {
            "execs": self.execs,
            "seconds": round(secs, 1),
            "execs_per_second": round(self.execs / secs, 1) if secs else None,
            "creator_edges": len(self.edges),
            "creator_lines_reached": len(reached),
            "creator_lines_total": total,
            "creator_lines_missed": sorted(executable_lines() - reached),
            "input_handling_lines_reached": len(reached & executable_lines(INPUT_FUNCTIONS)),
            "input_handling_lines_total": len(executable_lines(INPUT_FUNCTIONS)),
            "input_handling_lines_missed": sorted(executable_lines(INPUT_FUNCTIONS) - reached),
            "exit_status": dict(self.status),
            "answers": dict(self.answers.most_common(20)),
            "configs": dict(self.configs),
        }

    def write(self) -> None:
        assert self.path
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f, indent=1)
        os.replace(tmp, self.path)


# The functions that handle the peer's input (the rest is start-up).
INPUT_FUNCTIONS = ("serve", "read_exact", "create", "invalid", "allowed")


def executable_lines(functions: tuple[str, ...] = ()) -> set[int]:
    """Lines of creator.py with code (only in ``functions``, if given)."""
    with open(oracle.CREATOR_PATH) as f:
        code = compile(f.read(), oracle.CREATOR_PATH, "exec")
    lines: set[int] = set()
    todo = [(code, not functions)]
    while todo:
        c, counted = todo.pop()
        if counted:
            lines.update(ln for _, _, ln in c.co_lines() if ln)
        todo.extend(
            (k, counted or k.co_name in functions) for k in c.co_consts if hasattr(k, "co_lines")
        )
    return lines


def line_coverage(edges: set[int]) -> tuple[set[int], int]:
    total = executable_lines()
    return {e & 0xFFFF for e in edges} & total, len(total)


POOL = Pool(depth=2)
STATS = Stats(os.environ.get("SOCKCREATOR_FUZZ_STATS"))
_EXTRA: list[socket.socket] = []  # descriptors of ours that ride along (bit 2)
_BASELINE: list[int] = []


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if not _EXTRA:
        _EXTRA.extend(socket.socketpair())
    POOL.fill()
    if not _BASELINE:
        _BASELINE.append(oracle.fd_count(os.getpid()))
    cfg = data[0] & 3
    fds = [s.fileno() for s in _EXTRA] if data[0] & 4 else []
    outcome = oracle.run_input(POOL.take(cfg), data[1:], fds)
    for edge in outcome.edges:
        STUBS[bucket(edge)](True)
    STATS.add(oracle.CONFIGS[cfg].name, outcome)
    POOL.fill()
    now = oracle.fd_count(os.getpid())
    if now != _BASELINE[0]:
        raise oracle.InvariantViolation(f"harness holds {now} descriptors, not {_BASELINE[0]}")


def replay_coverage(paths: list[str]) -> None:
    """Run every input in ``paths`` (files or directories); print the summary."""
    files = []
    for p in paths:
        files += [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    for name in files:
        with open(name, "rb") as f:
            TestOneInput(f.read())
    print(json.dumps(STATS.summary(), indent=1))


def main() -> None:
    if sys.argv[1:2] == ["--coverage"]:
        replay_coverage(sys.argv[2:])
        return
    argv = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=512")
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
