"""Fault injection: real processes, real signals, real descriptor limits.

The matrix (docs/reliability.md gives the figures):

==========================  ==================================================
fault                       what must hold
==========================  ==================================================
kill -9 of the creator      mid-request, between 'S' and its descriptor,
                            mid-'E', mid-batch, at random points of a real
                            batch: CreatorFatalError (exit status -9), the
                            child reaped, no descriptor leaked, every later
                            call fatal at once
kill -9 of the client       idle, mid-request, mid-batch (random points),
                            hardened or not: the creator ends (EOF: 10, write
                            error: 11, PDEATHSIG: -9), never survives
EMFILE in the client        a clean error, nothing leaked, no child started;
                            the kernel's MSG_CTRUNC behaviour pinned down
EMFILE in the creator       'E' 'S' EMFILE (SocketCreationError, an OSError),
                            and it keeps serving (root, hardened, nobody)
a client that never reads   the creator blocks on write holding <= 4
                            descriptors; once the client goes, it exits
SIGINT to the client group  does not reach the creator (own process group)
SIGTERM / SIGHUP            to the creator: CreatorFatalError with -15 / -1
broken pipes                client->creator (EPIPE: fatal, not a crash),
                            creator->client (exit 11 or 10, no traceback)
parent dies before          tests/creator/test_hardening.py::
PDEATHSIG                   test_creator_whose_parent_died_before_pdeathsig_never_serves
the broker (root)           a client killed -9 (its grants released, its ports
                            free for others), the broker killed -9 (its
                            creator goes too), its creator killed -9 (exit
                            1), SIGTERM/SIGINT (exit 0), SIGHUP (a reload), a client that
                            never reads (cut off, nobody delayed), clients
                            gone with answers due, EMFILE; handed-out sockets
                            keep working through all of it
==========================  ==================================================

Every test also has a *survivor*: a creator started before the fault that
must still hand out sockets after it.  Nothing is mocked; the fake creators
(tests/fakepeer.py) are real processes speaking real bytes.  Tests marked
``xfail(strict=True)`` pin down a bug found here; each says the fix.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    RawCreator,
    creator_argv,
    fd_count,
    requires_linux,
    requires_root,
    wire_request,
)
from fakepeer import fake_creator_command

from sockcreator import (
    AsyncSocketCreator,
    CreatorFatalError,
    SocketCreationError,
    SocketCreator,
)

pytestmark = requires_linux

SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable (the venv's lives under /root)
PRLIMIT = "/usr/bin/prlimit"
BOUND = 10.0  # seconds: every wait in this file is bounded by this
NOBODY = 65534
UDP4 = ("udp", "127.0.0.1", 0)


# --- helpers -------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T, Z, ...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {BOUND}s: {what}")
        time.sleep(0.002)


def assert_reaped(pid: int | None) -> None:
    """Neither running nor a zombie: the client reaped its child."""
    assert pid is not None
    assert proc_state(pid) is None, f"creator {pid} is {proc_state(pid)}, not reaped"


def kill_when_stopped(pid: int, sig: int = signal.SIGKILL) -> threading.Thread:
    """In the background: once ``pid`` has stopped itself (SIGSTOP), send ``sig``."""

    def run() -> None:
        wait_for(lambda: proc_state(pid) == "T", f"{pid} stopped")
        os.kill(pid, sig)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stop_then(code: str) -> list[str]:
    """A fake creator that runs ``code``, then stops itself until killed."""
    return fake_creator_command(
        code + "\nimport signal\nos.kill(os.getpid(), signal.SIGSTOP)\ntime.sleep(60)"
    )


_SYSCALL = {  # x86_64, aarch64
    "recvfrom": {"x86_64": "45", "aarch64": "207"},
    "sendto": {"x86_64": "44", "aarch64": "206"},
    "sendmsg": {"x86_64": "46", "aarch64": "211"},
    "recvmsg": {"x86_64": "47", "aarch64": "212"},
}


def blocked_in(pid: int, *calls: str) -> bool:
    """True if task ``pid`` (a process, or a thread of ours) is in one of these
    system calls, per /proc/PID/syscall."""
    machine = os.uname().machine
    nrs = {_SYSCALL[c].get(machine) for c in calls}
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] in nrs
    except OSError:
        return False


@pytest.fixture
def survivor() -> Iterator[SocketCreator]:
    """A creator that lives through the fault and must keep serving after it."""
    c = SocketCreator()
    c.get_socket(*UDP4).close()
    yield c
    c.get_socket("tcp", "127.0.0.1", 0).close()
    for s in c.get_sockets([UDP4, ("tcp", "::1", 0)]):
        s.close()
    c.terminate()


def run_async(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 3 * BOUND))  # a hang fails the test


# --- kill -9 of the creator ----------------------------------------------------------

# (fake creator, what the client must say)
CREATOR_DEATHS = {
    "mid-request": (stop_then("read(4)"), "closed the connection"),
    "between-S-and-descriptor": (stop_then("read(9); send(b'S')"), "closed the connection"),
    "S-then-dies-by-itself": (
        fake_creator_command("read(9); send(b'S'); os.kill(os.getpid(), 9)"),
        "closed the connection",
    ),
    "mid-E-answer": (stop_then("read(9); send(b'EB\\0\\0')"), "closed the connection"),
    "mid-batch": (
        stop_then("serve_one(); serve_one(); serve_one(); read(9); send(b'S')"),
        "closed the connection",
    ),
}


@pytest.mark.parametrize("case", list(CREATOR_DEATHS))
def test_creator_killed_blocking(case: str, survivor: SocketCreator) -> None:
    command, words = CREATOR_DEATHS[case]
    before = fd_count()
    c = SocketCreator(command=command, timeout=3 * BOUND)  # the kill, not the timeout
    killer = kill_when_stopped(c.pid or 0) if "by-itself" not in case else None
    with pytest.raises(CreatorFatalError) as info:
        c.get_sockets([UDP4] * (5 if case == "mid-batch" else 1))
    if killer:
        killer.join(BOUND)
    assert words in str(info.value)
    assert info.value.exit_status == -signal.SIGKILL
    assert_reaped(c.pid)
    with pytest.raises(CreatorFatalError):
        c.get_socket(*UDP4)  # dead for good, at once
    c.terminate()
    assert fd_count() == before, "the sockets received before the kill must be closed"


@pytest.mark.parametrize("case", list(CREATOR_DEATHS))
def test_creator_killed_asyncio(case: str, survivor: SocketCreator) -> None:
    command, words = CREATOR_DEATHS[case]
    before = fd_count()

    async def main() -> None:
        async with AsyncSocketCreator(command, timeout=3 * BOUND) as c:
            killer = kill_when_stopped(c.pid or 0) if "by-itself" not in case else None
            with pytest.raises(CreatorFatalError) as info:
                await c.get_sockets([UDP4] * (5 if case == "mid-batch" else 1))
            if killer:
                killer.join(BOUND)
            assert words in str(info.value)
            assert info.value.exit_status == -signal.SIGKILL
            assert_reaped(c.pid)
            with pytest.raises(CreatorFatalError):
                await c.get_socket(*UDP4)

    run_async(main())
    assert fd_count() == before


def _random_kill(pid: int, rng: random.Random) -> threading.Thread:
    delay = rng.uniform(0, 0.03)

    def run() -> None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("seed", range(6))
def test_real_creator_killed_at_a_random_point_of_a_batch(
    seed: int, survivor: SocketCreator
) -> None:
    """A real (hardened) creator killed while it works through 2000 requests."""
    rng = random.Random(seed)
    before = fd_count()
    c = SocketCreator()
    killer = _random_kill(c.pid or 0, rng)
    try:
        socks = c.get_sockets([UDP4, ("tcp", "127.0.0.1", 0)] * 1000)
    except CreatorFatalError as e:
        assert e.exit_status == -signal.SIGKILL, e
    else:  # the kill came after the batch: the next request finds out
        assert len(socks) == 2000
        for s in socks:
            s.close()
        killer.join(BOUND)
        with pytest.raises(CreatorFatalError):
            c.get_socket(*UDP4)
    killer.join(BOUND)
    assert_reaped(c.pid)
    c.terminate()
    assert fd_count() == before


@pytest.mark.parametrize("seed", range(4))
def test_real_creator_killed_at_a_random_point_asyncio(seed: int, survivor: SocketCreator) -> None:
    rng = random.Random(seed)
    before = fd_count()

    async def main() -> None:
        async with AsyncSocketCreator() as c:
            killer = _random_kill(c.pid or 0, rng)
            # concurrent batches: every waiter must get an answer or the error
            results = await asyncio.gather(
                *(c.get_sockets([UDP4] * 300) for _ in range(4)), return_exceptions=True
            )
            killer.join(BOUND)
            for r in results:
                if isinstance(r, list):
                    for s in r:
                        s.close()
                else:
                    assert isinstance(r, CreatorFatalError), r
            with pytest.raises(CreatorFatalError):
                await c.get_socket(*UDP4)
            assert_reaped(c.pid)

    run_async(main())
    assert fd_count() == before


# --- kill -9 of the client -----------------------------------------------------------

_CLIENT = """
import os, sys, time
from sockcreator import SocketCreator
mode, harden = sys.argv[1], sys.argv[2] == "hardened"
c = SocketCreator(harden=harden)
print(c.pid, flush=True)
c.get_socket("udp", "127.0.0.1", 0).close()
if mode == "mid-request":
    c._sock.sendall(b"ST4\\x00")  # half a request, then the client dies
print("ready", flush=True)
if mode == "mid-batch":
    while True:
        for s in c.get_sockets([("udp", "127.0.0.1", 0)] * 500):
            s.close()
time.sleep(60)
"""

# Runs the client as its child, as a subreaper, so that the orphaned creator
# is reparented to it and its end can be read.  Prints JSON.
_SUPERVISOR = """
import ctypes, json, os, random, signal, subprocess, sys, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
mode, harden, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = subprocess.Popen([sys.executable, "-c", sys.argv[4], mode, harden],
                          stdout=subprocess.PIPE)
creator = int(client.stdout.readline())
assert client.stdout.readline() == b"ready\\n"
time.sleep(random.Random(seed).uniform(0, 0.05) if mode == "mid-batch" else 0)
os.kill(client.pid, signal.SIGKILL)
client.wait()
deadline = time.monotonic() + 10
while True:
    try:
        pid, status = os.waitpid(creator, os.WNOHANG)
    except ChildProcessError:  # not reparented to us yet
        pid = 0
    if pid:
        print(json.dumps({"survived": False, "status": os.waitstatus_to_exitcode(status)}))
        break
    if time.monotonic() > deadline:
        os.kill(creator, signal.SIGKILL)
        print(json.dumps({"survived": True}))
        break
    time.sleep(0.002)
"""


@pytest.mark.parametrize("harden", ["hardened", "no-harden"])
@pytest.mark.parametrize(
    ("mode", "seed"),
    [("idle", 0), ("mid-request", 0), ("mid-batch", 1), ("mid-batch", 2), ("mid-batch", 3)],
)
def test_client_killed_creator_does_not_survive(
    mode: str, seed: int, harden: str, survivor: SocketCreator
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR, mode, harden, str(seed), _CLIENT],
        capture_output=True,
        timeout=3 * BOUND,
        check=True,
    )
    result = json.loads(out.stdout)
    assert not result["survived"], "the creator outlived its client"
    # EOF (10) or a write error (11) when the channel went; PDEATHSIG (SIGKILL)
    # only where hardening set it.
    allowed = {10, 11} | ({-signal.SIGKILL} if harden == "hardened" else set())
    assert result["status"] in allowed, result
    assert b"Traceback" not in out.stderr, out.stderr


# --- descriptor exhaustion (EMFILE) in the client ------------------------------------

_EMFILE_CLIENT = """
import array, asyncio, errno, json, os, resource, socket, sys
from sockcreator import AsyncSocketCreator, CreatorFatalError, SocketCreator

def fds():
    return {int(n) for n in os.listdir("/proc/self/fd")} - {max_fd_seen()}

def max_fd_seen():  # the descriptor os.listdir itself used: it is closed again
    r = os.open("/dev/null", os.O_RDONLY); os.close(r); return r

def children():
    out = set()
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/children") as f:
            out |= {int(x) for x in f.read().split()}
    return out

SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)

def limit_to(free):
    # the soft limit below which exactly `free` descriptor numbers are unused
    used = fds()
    holes = [n for n in range(max(used) + free + 2) if n not in used]
    resource.setrlimit(resource.RLIMIT_NOFILE, (holes[free], HARD))

def unlimit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))

out = {}
# 1. The kernel: a descriptor that cannot be installed is dropped, MSG_CTRUNC set.
a, b = socket.socketpair()
passenger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rights = array.array("i", [passenger.fileno()]).tobytes()
b.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
limit_to(0)
data, anc, flags, _ = a.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
unlimit()
ctrunc = bool(flags & socket.MSG_CTRUNC)
out["kernel"] = {"data": data.decode(), "ancdata": len(anc), "ctrunc": ctrunc}
for s in (a, b, passenger):
    s.close()

# 2. SocketCreator() with no room for its socketpair: OSError, no child started.
base, kids = fds(), children()
limit_to(1)
try:
    SocketCreator()
    out["start"] = "started"
except OSError as e:
    out["start"] = errno.errorcode.get(e.errno, str(e.errno))
unlimit()
out["start_leaks"] = sorted(fds() ^ base)
out["start_children"] = sorted(children() - kids)

# 3. Sockets arrive into a full table (blocking, then asyncio).
for free, n in ((0, 1), (2, 10)):
    c = SocketCreator()
    base = fds()  # the channel stays open: the handle lives on
    limit_to(free)
    try:
        c.get_sockets([("udp", "127.0.0.1", 0)] * n)
        res = "returned"
    except CreatorFatalError as e:
        res = f"CreatorFatalError: {e}"
    except OSError as e:
        res = f"OSError {e.errno}: {e}"
    unlimit()
    leaks = sorted(fds() ^ base)
    try:
        c.get_socket("udp", "127.0.0.1", 0).close()
        again = "served"
    except Exception as e:
        again = repr(e)
    out[f"blocking_free{free}_n{n}"] = {"result": res, "leaks": leaks, "again": again}
    c.terminate()

async def aio(free, n):
    async with AsyncSocketCreator() as c:
        base = fds()  # the channel stays open: the handle lives on
        limit_to(free)
        try:
            await c.get_sockets([("udp", "127.0.0.1", 0)] * n)
            res = "returned"
        except CreatorFatalError as e:
            res = f"CreatorFatalError: {e}"
        except OSError as e:
            res = f"OSError {e.errno}: {e}"
        unlimit()
        leaks = sorted(fds() ^ base)
        try:
            (await c.get_socket("udp", "127.0.0.1", 0)).close()
            again = "served"
        except Exception as e:
            again = repr(e)
        return {"result": res, "leaks": leaks, "again": again}

out["asyncio_free2_n10"] = asyncio.run(aio(2, 10))

# 4. With room again, this process keeps serving.
with SocketCreator() as c:
    c.get_socket("udp", "127.0.0.1", 0).close()
    out["after"] = "served"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def emfile_client() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_CLIENT], capture_output=True, timeout=6 * BOUND
    )
    assert out.returncode == 0, out.stderr.decode()
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_emfile_kernel_drops_the_descriptor_and_sets_ctrunc(emfile_client: dict[str, Any]) -> None:
    """What the client relies on: at EMFILE recvmsg still returns the data byte,
    installs no descriptor (the kernel closes it) and sets MSG_CTRUNC."""
    assert emfile_client["kernel"] == {"data": "x", "ancdata": 0, "ctrunc": True}


def test_emfile_at_start_starts_nothing(emfile_client: dict[str, Any]) -> None:
    assert emfile_client["start"] == "EMFILE"
    assert emfile_client["start_leaks"] == []
    assert emfile_client["start_children"] == []


@pytest.mark.parametrize("case", ["blocking_free0_n1", "blocking_free2_n10", "asyncio_free2_n10"])
def test_emfile_while_receiving_is_clean(emfile_client: dict[str, Any], case: str) -> None:
    """The socket the kernel could not install is gone (MSG_CTRUNC, none
    received): our own table is full, so the client raises OSError(EMFILE),
    not a fault of the creator; it closes what it had received (all or
    nothing), leaks nothing, and the same handle serves again with room."""
    got = emfile_client[case]
    assert got["result"].startswith("OSError 24:"), got
    assert "no room to receive the socket" in got["result"]
    assert got["leaks"] == [], got
    assert got["again"] == "served", got


def test_emfile_then_the_client_process_keeps_serving(emfile_client: dict[str, Any]) -> None:
    assert emfile_client["after"] == "served"


# --- descriptor exhaustion (EMFILE) in the creator -----------------------------------


def set_nofile(pid: int, soft: int | None, as_nobody: bool) -> None:
    """prlimit(2) on ``pid``'s RLIMIT_NOFILE soft limit (None: back to the hard
    limit).  Without CAP_SYS_RESOURCE only the target's own uid may do it."""
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1] if not as_nobody else None
    if not as_nobody:
        assert hard is not None
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft if soft else hard, hard))
        return
    spec = f"--nofile={soft}:" if soft else "--nofile=unlimited:"
    if not soft:  # "unlimited" would exceed the hard limit: read it first
        with open(f"/proc/{pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        spec = f"--nofile={line.split()[4]}:"
    subprocess.run(
        [PRLIMIT, f"--pid={pid}", spec],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        check=True,
        capture_output=True,
    )


CREATOR_KINDS = {
    "no-harden": ({"harden": False}, False),
    "hardened-root": ({}, False),
    "hardened-nobody": ({"user": NOBODY}, True),
}


@requires_root
@pytest.mark.parametrize("kind", list(CREATOR_KINDS))
def test_creator_out_of_descriptors_answers_ES_and_keeps_serving(
    kind: str, survivor: SocketCreator
) -> None:
    kwargs, as_nobody = CREATOR_KINDS[kind]
    before = fd_count()
    with SocketCreator(**kwargs) as c:
        assert c.pid is not None
        c.get_socket(*UDP4).close()  # serving: started up, hardened, dropped to its user
        set_nofile(c.pid, 3, as_nobody)  # 0, 1 and 2 are open: socket() gets EMFILE
        with pytest.raises(SocketCreationError) as info:
            c.get_socket(*UDP4)
        assert info.value.errno == errno.EMFILE and info.value.stage == "socket"
        assert isinstance(info.value, OSError)
        with pytest.raises(SocketCreationError):  # all or nothing, still in step
            c.get_sockets([UDP4, ("tcp", "::1", 0), UDP4])
        set_nofile(c.pid, None, as_nobody)
        c.get_socket(*UDP4).close()  # serving again
        assert len(c.get_sockets([UDP4] * 50)) == 50
    assert fd_count() == before


@requires_root
def test_creator_out_of_descriptors_asyncio(survivor: SocketCreator) -> None:
    async def main() -> None:
        async with AsyncSocketCreator() as c:
            assert c.pid is not None
            (await c.get_socket(*UDP4)).close()  # serving
            set_nofile(c.pid, 3, False)
            results = await asyncio.gather(
                *(c.get_socket(*UDP4) for _ in range(5)), return_exceptions=True
            )
            assert all(
                isinstance(r, SocketCreationError) and r.errno == errno.EMFILE for r in results
            ), results
            set_nofile(c.pid, None, False)
            (await c.get_socket(*UDP4)).close()

    before = fd_count()
    run_async(main())
    assert fd_count() == before


# --- a client that never reads its answers -------------------------------------------


def _unread_bytes(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


@pytest.mark.parametrize(
    "args", [["--allow-all", "--no-harden"], ["--allow-all"]], ids=["no-harden", "hardened"]
)
def test_client_that_never_reads(args: list[str], survivor: SocketCreator) -> None:
    """The creator blocks writing answers nobody reads, holding no more than
    one socket; when the client goes, the creator exits: nothing hangs for
    ever, nothing leaks.  (The client process being killed instead: below.)"""
    before = fd_count()
    creator = RawCreator(creator_argv(*args))
    pid = creator.pid
    flood = wire_request("udp", "127.0.0.1", 0) * 20000  # 180 KB of requests
    writer_error: list[BaseException] = []

    def write() -> None:
        try:
            creator.sock.sendall(flood)
        except OSError as e:
            writer_error.append(e)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        wait_for(lambda: blocked_in(pid, "sendto", "sendmsg"), "creator blocked on write")
        assert fd_count(pid) <= 4, "0, 1, 2 and at most the socket being sent"
        queued = _unread_bytes(creator.sock)
        assert queued > 0
        # The client goes away.  (shutdown, not close: our writer thread is
        # still blocked in sendall on this socket, and close() would not end
        # that call nor, while it lasts, the connection.)
        creator.sock.shutdown(socket.SHUT_RDWR)
        status = creator.wait(BOUND)
        assert status in (10, 11), creator.stderr_text()
        assert "Traceback" not in creator.stderr_text()
        writer.join(BOUND)
        assert not writer.is_alive(), "the client's write must not hang either"
    finally:
        creator.close()
    assert fd_count() == before


def test_client_process_that_never_reads_is_killed(survivor: SocketCreator) -> None:
    """The same, with the client a process that is killed -9 while the
    hardened creator is blocked writing to it."""
    code = textwrap.dedent(
        """
        import sys, socket
        from sockcreator import SocketCreator
        c = SocketCreator()
        c.get_socket("udp", "127.0.0.1", 0).close()  # serving
        print(c.pid, flush=True)
        c._sock.sendall(b"SU4\\0\\0\\x7f\\0\\0\\1" * 200000)  # more than buffers hold
        """
    )
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        pid = int(client.stdout.readline())
        wait_for(lambda: blocked_in(pid, "sendto", "sendmsg"), "creator blocked on write")
        client.kill()
        client.wait(BOUND)
        wait_for(lambda: proc_state(pid) in (None, "Z"), "the creator exits with its client")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


# The client writes a whole batch before reading any answer.  Past roughly
# 400 KB of requests (~10,000 IPv6 requests) both socket buffers fill: the
# creator blocks writing answers the client does not read yet, the client
# blocks writing requests the creator cannot read, and after ``timeout`` the
# client gives up with a CreatorFatalError that blames the creator.
_DEADLOCK = "a batch larger than the socket buffers deadlocks until the timeout"
_BIG_BATCH = [("udp", "2001:db8::1", 0)] * 30000  # not ours: EB EADDRNOTAVAIL each


def test_huge_batch_gets_its_answers_blocking(survivor: SocketCreator) -> None:
    with SocketCreator(timeout=1) as c:
        with pytest.raises(SocketCreationError) as info:
            c.get_sockets(_BIG_BATCH)
        assert info.value.errno == errno.EADDRNOTAVAIL


def test_huge_batch_gets_its_answers_asyncio(survivor: SocketCreator) -> None:
    async def main() -> None:
        async with AsyncSocketCreator(timeout=1) as c:
            with pytest.raises(SocketCreationError) as info:
                await c.get_sockets(_BIG_BATCH)
            assert info.value.errno == errno.EADDRNOTAVAIL

    run_async(main())


# --- signals -------------------------------------------------------------------------

_SIGINT_CLIENT = """
import asyncio, os, signal, sys, time
from sockcreator import AsyncSocketCreator, SocketCreator
hits = []
signal.signal(signal.SIGINT, lambda *a: hits.append(1))
async def main():
    async with AsyncSocketCreator() as c:
        print(c.pid, os.getpgid(c.pid), flush=True)
        sys.stdin.readline()              # the test sends SIGINT to our group now
        while not hits:
            await asyncio.sleep(0.001)
        (await c.get_socket("udp", "127.0.0.1", 0)).close()
        print("served", flush=True)
if sys.argv[1] == "asyncio":
    asyncio.run(main())
else:
    with SocketCreator() as c:
        print(c.pid, os.getpgid(c.pid), flush=True)
        sys.stdin.readline()
        while not hits:
            time.sleep(0.001)
        c.get_socket("udp", "127.0.0.1", 0).close()
        print("served", flush=True)
"""


@pytest.mark.parametrize("client", ["blocking", "asyncio"])
def test_sigint_to_the_client_group_does_not_reach_the_creator(
    client: str, survivor: SocketCreator
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_CLIENT, client],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # a process group of its own, like a shell job
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        pid, pgid = map(int, child.stdout.readline().split())
        assert pgid != os.getpgid(child.pid), "the creator must have its own group"
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"served\n"  # the creator survived it
        assert child.wait(BOUND) == 0
        assert_reaped(pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


_KEYBOARD_INTERRUPT = """
import os, signal, sys, threading
sys.path.insert(0, sys.argv[2])
from fakepeer import fake_creator_command
from sockcreator import CreatorFatalError, SocketCreator
c = SocketCreator(command=fake_creator_command("read(9); time.sleep(30)"), timeout=20)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    c.get_socket("udp", "127.0.0.1", 0)
except BaseException as e:
    print(type(e).__name__, "alive" if c._dead is None else "dead")
"""


def test_ctrl_c_during_a_request_stays_a_keyboard_interrupt() -> None:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", _KEYBOARD_INTERRUPT, "", tests_dir],
        capture_output=True,
        timeout=3 * BOUND,
    )
    # The handle is dead either way (the channel is out of step): that part holds.
    assert out.stdout.split()[1:] == [b"dead"], out
    assert out.stdout.split()[0] == b"KeyboardInterrupt", out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("when", ["idle", "mid-request"])
def test_signal_to_the_creator_is_fatal_with_its_status(
    sig: signal.Signals, when: str, survivor: SocketCreator
) -> None:
    before = fd_count()
    c = SocketCreator(timeout=3 * BOUND)
    pid = c.pid
    assert pid is not None
    c.get_socket(*UDP4).close()
    if when == "idle":
        os.kill(pid, sig)
        wait_for(lambda: proc_state(pid) == "Z", "the creator died")
    else:  # stopped, so the request is in flight when the signal lands
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: proc_state(pid) == "T", "creator stopped")

        main = threading.main_thread().native_id

        def later() -> None:
            wait_for(lambda: blocked_in(main, "recvmsg"), "the client waits for its answer")
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)

        threading.Thread(target=later, daemon=True).start()
    with pytest.raises(CreatorFatalError) as info:
        c.get_socket(*UDP4)
    assert info.value.exit_status == -sig
    assert f"exit status {-sig}" in str(info.value)
    assert_reaped(pid)
    assert fd_count() == before


def test_signal_to_the_creator_asyncio(survivor: SocketCreator) -> None:
    async def main() -> None:
        async with AsyncSocketCreator(timeout=3 * BOUND) as c:
            pid = c.pid
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: proc_state(pid) == "Z", "the creator died")
            results = await asyncio.gather(
                *(c.get_socket(*UDP4) for _ in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, CreatorFatalError) for r in results), results
            # The first carries the status; the others only say "unusable".
            assert results[0].exit_status == -signal.SIGTERM, results
            assert_reaped(pid)

    before = fd_count()
    run_async(main())
    assert fd_count() == before


# --- broken pipes --------------------------------------------------------------------


@pytest.mark.parametrize("client", ["blocking", "asyncio"])
def test_write_to_a_dead_creator_is_fatal_not_a_crash(client: str, survivor: SocketCreator) -> None:
    """Client -> creator: EPIPE (Python ignores SIGPIPE) becomes CreatorFatalError."""
    before = fd_count()
    batch = [UDP4] * 5000  # several writes' worth, so some write hits the dead end

    if client == "blocking":
        c = SocketCreator(timeout=3 * BOUND)
        os.kill(c.pid or 0, signal.SIGKILL)
        wait_for(lambda: proc_state(c.pid or 0) == "Z", "the creator died")
        with pytest.raises(CreatorFatalError) as info:
            c.get_sockets(batch)
        assert info.value.exit_status == -signal.SIGKILL
        assert_reaped(c.pid)
    else:

        async def main() -> None:
            async with AsyncSocketCreator(timeout=3 * BOUND) as c:
                os.kill(c.pid or 0, signal.SIGKILL)
                wait_for(lambda: proc_state(c.pid or 0) == "Z", "the creator died")
                with pytest.raises(CreatorFatalError) as info:
                    await c.get_sockets(batch)
                assert info.value.exit_status == -signal.SIGKILL
                assert_reaped(c.pid)

        run_async(main())
    assert fd_count() == before


_SIGPIPE_DEFAULT = """
import os, signal, time
from sockcreator import CreatorFatalError, SocketCreator
signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as many command-line tools do
c = SocketCreator(timeout=5)
os.kill(c.pid, signal.SIGKILL)
while open(f"/proc/{c.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
    time.sleep(0.001)
try:
    c.get_sockets([("udp", "127.0.0.1", 0)] * 100)
except CreatorFatalError:
    print("fatal")
"""


def test_client_with_default_sigpipe_survives_a_dead_creator() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_DEFAULT], capture_output=True, timeout=3 * BOUND
    )
    assert out.returncode == 0, f"client died with {out.returncode}"
    assert out.stdout == b"fatal\n"


@pytest.mark.parametrize(
    "args", [["--allow-all", "--no-harden"], ["--allow-all"]], ids=["no-harden", "hardened"]
)
@pytest.mark.parametrize("answer", ["S", "E"])
def test_creator_writing_to_a_gone_client_exits_cleanly(
    args: list[str], answer: str, survivor: SocketCreator
) -> None:
    """Creator -> client: the client vanishes with answers due; the creator
    exits 11 (write error) or 10 (it saw the EOF first), with no traceback."""
    before = fd_count()
    creator = RawCreator(creator_argv(*args))
    host = "127.0.0.1" if answer == "S" else "192.0.2.1"  # 'E' 'B' EADDRNOTAVAIL
    try:
        creator.sock.sendall(wire_request("udp", host, 0) * 2000)
        creator.sock.close()  # gone before reading a single answer
        status = creator.wait(BOUND)
        assert status in (10, 11)
        stderr = creator.stderr_text()
        assert "Traceback" not in stderr
        assert all(ln.startswith("sockcreator-creator: ") for ln in stderr.splitlines())
    finally:
        with contextlib.suppress(OSError):
            creator.close()
    assert fd_count() == before


def test_parent_death_before_pdeathsig_is_covered_elsewhere() -> None:
    """Pointer, so the matrix is complete in one file: the deterministic case
    lives in tests/creator/test_hardening.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "creator", "test_hardening.py")) as f:
        text = f.read()
    assert "def test_creator_whose_parent_died_before_pdeathsig_never_serves" in text


# =====================================================================================
# The broker (``sockcreator serve``): the same faults, one level up.
# Each test starts its own broker as root in a fresh network namespace, dropping
# to the user sockc-broker; its clients here are root, which the policy allows.
# =====================================================================================

from sockcreator.broker._protocol import (  # noqa: E402 (the broker section)
    AnswerDecoder,
    Fatal,
    FatalCode,
    Granted,
    Hello,
    SocketRequest,
)
from sockcreator.broker.client import Broker, BrokerFatalError  # noqa: E402
from sockcreator.client._protocol import make_request  # noqa: E402

BROKER_USER = "sockc-broker"
CREATOR_USER = "sockc-creator"  # the creator's own user (docs/security.md)
BROKER_POLICY = """
[[allow]]
users = ["root"]
protocols = ["tcp", "udp"]
addresses = ["127.0.0.1", "::1"]
ports = [0, "8000-8999"]
"""


class BrokerUnderTest:
    """``sockcreator serve`` in its own network namespace; audit log in a file."""

    def __init__(self, directory: str, *extra: str) -> None:
        from conftest import ensure_user, netns_argv

        ensure_user(BROKER_USER)
        ensure_user(CREATOR_USER)
        self.dir = directory
        self.path = os.path.join(directory, "broker.sock")
        policy = os.path.join(directory, "policy.toml")
        with open(policy, "w") as f:
            f.write(BROKER_POLICY)
        self.log = os.path.join(directory, "broker.log")
        argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", self.path]
        argv += ["--policy", policy, "--user", BROKER_USER, "--creator-user", CREATOR_USER, *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_argv(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        wait_for(lambda: bool(self.audit("start")) or self.proc.poll() is not None, "start")
        assert self.proc.poll() is None, self.log_text()
        self.pid = self.proc.pid
        self.creator_pid = int(self.audit("start")[0]["creator_pid"])

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        text = self.log_text()
        # Only whole lines: the broker may be writing the last one right now.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record["event"] == event:
                    out.append(record)
        return out

    def nofile(self, soft: int | None) -> None:
        """prlimit the broker's soft RLIMIT_NOFILE (None: back to its hard limit),
        as its own user: we lack CAP_SYS_RESOURCE."""
        import pwd

        pw = pwd.getpwnam(BROKER_USER)
        if soft is None:
            with open(f"/proc/{self.pid}/limits") as f:
                soft = int(next(ln for ln in f if ln.startswith("Max open files")).split()[4])
        subprocess.run(
            [PRLIMIT, f"--pid={self.pid}", f"--nofile={soft}:"],
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=[],
            check=True,
            capture_output=True,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[BrokerUnderTest]:
    if os.geteuid() != 0:
        pytest.skip("needs root (the broker drops to its own user)")
    tmp_path.chmod(0o755)
    b = BrokerUnderTest(str(tmp_path), "--client-timeout", "1")
    yield b
    b.stop()
    wait_for(lambda: proc_state(b.creator_pid) in (None, "Z"), "the creator ends with the broker")


def assert_udp_works(s: socket.socket) -> None:
    """A socket handed out keeps working: it talks to itself."""
    s.sendto(b"ping", s.getsockname())
    s.settimeout(BOUND)
    assert s.recv(16) == b"ping"


def _broker_fds_settle(b: BrokerUnderTest, want: int) -> None:
    wait_for(lambda: fd_count(b.pid) == want, f"broker back to {want} descriptors")


_BROKER_CLIENT = """
import os, sys, time
from sockcreator.broker.client import Broker
from sockcreator.broker._protocol import SocketRequest
from sockcreator.client._protocol import make_request
b = Broker(sys.argv[1])
held = [b.request_socket("udp", "127.0.0.1", 8001), b.request_socket("tcp", "::1", 8002, backlog=4)]
if sys.argv[2] == "mid-request":
    frame = SocketRequest(99, make_request("udp", "127.0.0.1", 8003)).encode()
    b._sock.sendall(frame[:9])     # half a request, then the client dies
print("ready", flush=True)
time.sleep(60)
"""


@requires_root
@pytest.mark.parametrize("when", ["holding", "mid-request"])
def test_broker_client_killed_its_grants_are_released(broker: BrokerUnderTest, when: str) -> None:
    baseline = fd_count(broker.pid)
    child = subprocess.Popen(
        [sys.executable, "-c", _BROKER_CLIENT, broker.path, when], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        child.kill()
        child.wait(BOUND)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_for(lambda: len(broker.audit("release")) == 2, "both grants released")
    assert {r["cause"] for r in broker.audit("release")} == {"disconnect"}
    _broker_fds_settle(broker, baseline)  # its connection and both cached sockets gone
    with Broker(broker.path) as other:  # share NO: free again only if really released
        s = other.request_socket("udp", "127.0.0.1", 8001)
        assert_udp_works(s)
        other.request_socket("tcp", "::1", 8002, backlog=4).close()
        s.close()


@requires_root
def test_broker_killed_its_creator_follows_and_sockets_keep_working(
    broker: BrokerUnderTest,
) -> None:
    before = fd_count()
    c = Broker(broker.path, timeout=BOUND)
    s = c.request_socket("udp", "127.0.0.1", 8004)
    broker.proc.kill()
    assert broker.proc.wait(BOUND) == -signal.SIGKILL
    wait_for(lambda: proc_state(broker.creator_pid) in (None, "Z"), "creator gone")
    with pytest.raises(BrokerFatalError):
        c.request_socket("udp", "127.0.0.1", 8005)
    assert_udp_works(s)  # what was handed out outlives the broker
    s.close()
    c.close()
    assert fd_count() == before


@requires_root
def test_broker_creator_killed_broker_exits_1_and_sockets_keep_working(
    broker: BrokerUnderTest,
) -> None:
    before = fd_count()
    c = Broker(broker.path, timeout=BOUND)
    s = c.request_socket("udp", "127.0.0.1", 8006)
    os.kill(broker.creator_pid, signal.SIGKILL)
    assert broker.proc.wait(BOUND) == 1, broker.log_text()  # documented: the creator died
    with pytest.raises(BrokerFatalError):
        c.request_socket("udp", "127.0.0.1", 8007)
    assert_udp_works(s)
    s.close()
    c.close()
    assert fd_count() == before


@requires_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_stopped_by_signal_tells_its_clients(
    broker: BrokerUnderTest, sig: signal.Signals
) -> None:
    c = Broker(broker.path, timeout=BOUND)
    s = c.request_socket("udp", "127.0.0.1", 8008)
    broker.proc.send_signal(sig)
    assert broker.proc.wait(BOUND) == 0
    with pytest.raises(BrokerFatalError) as info:
        c.request_socket("udp", "127.0.0.1", 8009)
    assert info.value.code in (FatalCode.SHUTDOWN, None), info.value  # X S, or just EOF
    assert_udp_works(s)
    s.close()
    c.close()


@requires_root
def test_broker_sighup_reloads_and_keeps_serving(broker: BrokerUnderTest) -> None:
    """SIGHUP reloads the policy (docs/broker.md, "Reloading the policy"):
    the broker, its creator and a live connection all go on; one audit line
    says how the reload went (the file is unchanged: nothing added or removed)."""
    c = Broker(broker.path, timeout=BOUND)
    s = c.request_socket("udp", "127.0.0.1", 8010)
    broker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(broker.audit("reload")), "the reload's audit line")
    record = broker.audit("reload")[0]
    assert (record["result"], record["added"], record["removed"]) == ("ok", 0, 0), record
    assert broker.proc.poll() is None and proc_state(broker.creator_pid) not in (None, "Z")
    assert_udp_works(s)
    s2 = c.request_socket("udp", "127.0.0.1", 8011)
    c.release_socket(s2)
    c.release_socket(s)
    c.close()


def _raw_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(BOUND)
    s.connect(path)
    s.sendall(Hello().encode())
    return s


def _read_frames(s: socket.socket) -> list[Any]:
    """Every frame until EOF, exactly as a client must read them (descriptors
    closed); a protocol violation fails the test."""
    dec, out = AnswerDecoder(), []
    while True:
        try:
            data, anc, flags, _ = s.recvmsg(
                dec.bytes_wanted(), socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError:
            data, anc, flags = b"", [], 0
        fds = array.array("i")
        for _level, _kind, blob in anc:
            fds.frombytes(blob[: len(blob) - len(blob) % 4])
        assert not flags & socket.MSG_CTRUNC
        if not data:
            assert dec.idle, "EOF inside a frame"
            assert not fds
            return out
        for m in dec.feed(data, list(fds)):
            if isinstance(m, Granted):
                os.close(m.fd)
            out.append(m)


@pytest.fixture
def roomy_broker(tmp_path: Any) -> Iterator[BrokerUnderTest]:
    """As ``broker``, with a per-user in-flight cap well above what a socket
    buffer holds (about 270 grants here), so that the buffer is what stops
    the answers: at the default cap (256) the client's own uid would be held
    back first (``INFLIGHT``), by design, and with it every other client of
    that uid (tests/broker/test_attack_broker.py tests that cap)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the broker drops to its own user)")
    tmp_path.chmod(0o755)
    b = BrokerUnderTest(str(tmp_path), "--client-timeout", "1", "--max-inflight-per-user", "4096")
    yield b
    b.stop()


@requires_root
def test_broker_client_that_never_reads_is_cut_off_and_delays_nobody(
    roomy_broker: BrokerUnderTest,
) -> None:
    """A client sends requests (never more than max_pending unanswered) and
    never reads: once the broker's answers fill the socket buffer it cannot
    write, and after --client-timeout it cuts the client off, releasing its
    grants.  Another client is served meanwhile."""
    broker = roomy_broker
    baseline = fd_count(broker.pid)
    bad = _raw_client(broker.path)
    udp0 = make_request("udp", "127.0.0.1", 0)

    def mine(event: str) -> list[dict[str, Any]]:
        return [r for r in broker.audit(event) if r["conn"] == 1]  # the first connection

    sent, served_meanwhile = 0, 0
    while not mine("release"):
        window = b"".join(SocketRequest(sent + i + 1, udp0).encode() for i in range(16))
        try:
            bad.sendall(window)
            sent += 16
        except OSError:
            pass  # cut off already
        wait_for(
            lambda n=sent: len(mine("grant")) >= n or bool(mine("release")), "progress or cut-off"
        )
        if not mine("release"):
            with Broker(broker.path, timeout=BOUND) as good:
                good.request_socket("udp", "127.0.0.1", 8011).close()
            served_meanwhile += 1
    granted = len(mine("grant"))
    frames = _read_frames(bad)  # what was queued, then EOF: no room was left for an X
    bad.close()
    assert served_meanwhile >= 1
    assert 0 < len([f for f in frames if isinstance(f, Granted)]) <= granted
    assert not any(isinstance(f, Fatal) and f is not frames[-1] for f in frames)
    assert len(mine("release")) == granted, "every grant of the cut-off client released"
    assert {r["cause"] for r in mine("release")} == {"disconnect"}
    _broker_fds_settle(broker, baseline)


@requires_root
def test_broker_client_gone_with_answers_due(broker: BrokerUnderTest) -> None:
    """Broken pipe, broker -> client: only that connection goes."""
    baseline = fd_count(broker.pid)
    for _ in range(5):
        s = _raw_client(broker.path)
        s.sendall(
            b"".join(
                SocketRequest(i + 1, make_request("udp", "127.0.0.1", 0)).encode()
                for i in range(20)
            )
        )
        s.close()
    _broker_fds_settle(broker, baseline)
    assert broker.proc.poll() is None
    with Broker(broker.path, timeout=BOUND) as good:
        good.request_socket("udp", "127.0.0.1", 8012).close()


@requires_root
def test_broker_out_of_descriptors_refuses_and_keeps_serving(broker: BrokerUnderTest) -> None:
    c = Broker(broker.path, timeout=BOUND)
    c.request_socket("udp", "127.0.0.1", 8013).close()
    broker.nofile(fd_count(broker.pid))  # not one descriptor more
    try:
        with pytest.raises(OSError) as info:
            c.request_socket("udp", "127.0.0.1", 8014)
        assert info.value.errno == errno.EMFILE
    finally:
        if broker.proc.poll() is None:
            broker.nofile(None)
    c.request_socket("udp", "127.0.0.1", 8015).close()  # still serving
    assert broker.proc.poll() is None
    c.close()
