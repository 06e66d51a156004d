"""The asyncio client, AsyncSocketCreator: real creators, and scripted fake
creators (real processes that misbehave on purpose) for the error paths.

No pytest-asyncio: each test is a plain function that runs a coroutine with
asyncio.run.  No timing assertions: delays in fake creators only make sure
that something is still pending while the test does something else.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import json
import os
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import fd_count, requires_linux

from sockcreator import (
    AsyncSocketCreator,
    CreatorFatalError,
    SocketCreationError,
    make_request,
)

pytestmark = requires_linux

HANG = 30.0  # seconds: a guard against hanging forever, not a timing assertion

# A scripted fake creator, run as [python, -c, FAKE, PLAN-as-JSON].  The plan is
# a list of steps, run in order:
#   ["read"]                 read one whole request (a 'T' here exits 0)
#   ["sock"]                 answer the oldest unanswered request with a real socket
#   ["wrong"]                answer the oldest one with a socket of the other type
#   ["err", stage, errno]    answer 'E' stage errno
#   ["fds", n]               answer 'S', then one data byte carrying n descriptors
#   ["raw", text]            write these bytes (latin-1) as they are
#   ["sleep", seconds]
#   ["shut_rd"]              shutdown(SHUT_RD): the client's next write fails
#   ["exit", status]
#   ["serve", opts]          answer every request with a real socket until 'T';
#                            then write opts["after_t"], sleep opts["sleep"] and
#                            exit opts["exit"] (defaults "", 0, 0)
# At the end of the plan it waits for EOF and exits 0.
FAKE = r"""
import json, os, socket, struct, sys, time
ch = socket.socket(fileno=0)
ch.setblocking(True)
pending = []

def read(n):
    buf = b""
    while len(buf) < n:
        chunk = ch.recv(n - len(buf))
        if not chunk:
            os._exit(10)
        buf += chunk
    return buf

def read_request():
    if read(1) == b"T":
        return None
    kind, fam = read(1), read(1)
    port = int.from_bytes(read(2), "big")
    family = socket.AF_INET if fam == b"4" else socket.AF_INET6
    addr = socket.inet_ntop(family, read(4 if fam == b"4" else 16))
    typ = socket.SOCK_STREAM if kind == b"T" else socket.SOCK_DGRAM
    return family, typ, addr, port

def send_socket(req):
    family, typ, addr, port = req
    with socket.socket(family, typ) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        ch.sendall(b"S")
        ch.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", s.fileno()))])

for step in json.loads(sys.argv[1]):
    op, args = step[0], step[1:]
    if op == "read":
        req = read_request()
        if req is None:
            os._exit(0)
        pending.append(req)
    elif op == "sock":
        send_socket(pending.pop(0))
    elif op == "wrong":
        family, typ, addr, port = pending.pop(0)
        other = socket.SOCK_DGRAM if typ == socket.SOCK_STREAM else socket.SOCK_STREAM
        send_socket((family, other, addr, port))
    elif op == "err":
        ch.sendall(b"E" + args[0].encode() + struct.pack("@i", args[1]))
    elif op == "fds":
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(args[0])]
        ch.sendall(b"S")
        rights = struct.pack(f"@{len(fds)}i", *fds)
        ch.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    elif op == "raw":
        ch.sendall(args[0].encode("latin-1"))
    elif op == "sleep":
        time.sleep(args[0])
    elif op == "shut_rd":
        ch.shutdown(socket.SHUT_RD)
    elif op == "exit":
        os._exit(args[0])
    elif op == "serve":
        opts = args[0] if args else {}
        while (req := read_request()) is not None:
            send_socket(req)
        ch.sendall(opts.get("after_t", "").encode("latin-1"))
        time.sleep(opts.get("sleep", 0))
        os._exit(opts.get("exit", 0))
while ch.recv(4096):
    pass
os._exit(0)
"""


def fake(*plan: list[Any]) -> list[str]:
    return [sys.executable, "-c", FAKE, json.dumps(list(plan))]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, failing on any ResourceWarning (a socket or process left to
    the garbage collector is a leak even when the fd count looks flat), and on
    a hang (a waiter never woken) rather than waiting forever."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = asyncio.run(asyncio.wait_for(coro, HANG))
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
    return result


def assert_reaped(pid: int | None) -> None:
    """``pid`` is neither running nor a zombie: someone waited for it."""
    assert pid is not None
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)


async def settled_fd_count(pid: int) -> int:
    """The creator's descriptor count once it is idle.  It closes its copy of a
    socket just after sending it, so right after an answer it may still hold
    one more for a moment: wait until two looks in a row agree."""
    last = fd_count(pid)
    for _ in range(int(HANG / 0.02)):
        await asyncio.sleep(0.02)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def check_socket(sock: socket.socket, protocol: str, address: str, port: int) -> None:
    """``sock`` is exactly what was asked for, bound, not listening, not inheritable."""
    addr = ipaddress.ip_address(address)
    assert sock.family == (socket.AF_INET if addr.version == 4 else socket.AF_INET6)
    assert sock.type == (socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM)
    host, got_port = sock.getsockname()[:2]
    assert ipaddress.ip_address(host) == addr
    assert got_port == port if port else got_port != 0
    assert not sock.get_inheritable()
    assert not os.get_inheritable(sock.fileno())
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if addr.version == 6:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def free_port(family: socket.AddressFamily, kind: socket.SocketKind, host: str) -> int:
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- the real creator ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_get_socket_real_creator(protocol: str, address: str) -> None:
    before = fd_count()

    async def main() -> None:
        async with AsyncSocketCreator() as c:
            assert isinstance(c.pid, int) and c.pid > 0
            assert c.pid != os.getpid()
            pid = c.pid
            # port 0, the name in other cases, the socket constant, an ipaddress object
            kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
            family = socket.AF_INET if ":" not in address else socket.AF_INET6
            port = free_port(family, kind, address)
            specs: list[tuple[Any, Any, int]] = [
                (protocol, address, 0),
                (protocol.upper(), address, port),
                (kind, ipaddress.ip_address(address), 0),
            ]
            for spec in specs:
                with await c.get_socket(*spec) as s:
                    check_socket(s, protocol, address, spec[2])
            # and a batch, pipelined
            socks = await c.get_sockets([(protocol, address, 0), make_request(kind, address, 0)])
            assert len(socks) == 2
            for s in socks:
                check_socket(s, protocol, address, 0)
                s.close()
        assert_reaped(pid)
        with pytest.raises(CreatorFatalError):
            await c.get_socket(protocol, address, 0)

    run(main())
    assert fd_count() == before


def test_from_socket_has_no_pid_and_talks_the_protocol() -> None:
    """from_socket: pid None; the peer (this test) sees the exact request bytes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        c = AsyncSocketCreator.from_socket(ours)
        assert c.pid is None
        task = asyncio.create_task(c.get_socket("udp", "127.0.0.1", 0))
        assert await loop.sock_recv(peer, 64) == b"SU4\x00\x00\x7f\x00\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            name = s.getsockname()
            peer.send(b"S")
            peer.sendmsg(
                [b"\0"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, s.fileno().to_bytes(4, sys.byteorder))],
            )
        with await task as got:
            assert got.getsockname() == name
            assert not got.get_inheritable()
        term = asyncio.create_task(c.terminate())
        assert await loop.sock_recv(peer, 64) == b"T"
        peer.close()
        await term
        await c.terminate()  # idempotent

    before = fd_count()
    run(main())
    assert fd_count() == before


def test_many_concurrent_awaits_are_matched_to_their_requests() -> None:
    requests: list[tuple[str, str, int]] = []
    for i in range(200):
        protocol = "tcp" if i % 2 else "udp"
        address = "::1" if i % 5 == 0 else f"127.0.0.{i + 1}"
        requests.append((protocol, address, 0))
    before = fd_count()

    async def main() -> None:
        async with AsyncSocketCreator() as c:
            assert c.pid is not None
            with await c.get_socket("tcp", "127.0.0.1", 0):
                pass  # the creator now serves: its start-up descriptors are gone
            mine, theirs = fd_count(), await settled_fd_count(c.pid)
            for _ in range(2):
                socks = await asyncio.gather(*(c.get_socket(*r) for r in requests))
                assert len(socks) == len(requests)
                assert len({s.fileno() for s in socks}) == len(requests)
                for s, (protocol, address, port) in zip(socks, requests, strict=True):
                    check_socket(s, protocol, address, port)
                assert fd_count() == mine + len(requests)
                for s in socks:
                    s.close()
                assert fd_count() == mine
                assert await settled_fd_count(c.pid) <= theirs

    run(main())
    assert fd_count() == before


# --- all or nothing ------------------------------------------------------------------


def test_get_sockets_policy_denial_in_the_middle_is_all_or_nothing() -> None:
    before = fd_count()

    async def main() -> None:
        async with AsyncSocketCreator(allow=["tcp:127.0.0.1:0-65535"]) as c:
            base = fd_count()
            batch = [
                ("tcp", "127.0.0.1", 0),
                ("tcp", "127.0.0.1", 0),
                ("udp", "127.0.0.1", 0),  # denied by policy: the first failure
                ("tcp", "127.0.0.1", 0),
                ("tcp", "127.0.0.2", 0),  # denied too, but not the first
            ]
            with pytest.raises(PermissionError) as info:
                await c.get_sockets(batch)
            err = info.value
            assert isinstance(err, SocketCreationError)
            assert err.errno == errno.EPERM
            assert err.stage == "bind"
            assert err.request == make_request("udp", "127.0.0.1", 0)
            assert fd_count() == base  # the three sockets received were closed
            with await c.get_socket("tcp", "127.0.0.1", 0) as s:  # still usable
                check_socket(s, "tcp", "127.0.0.1", 0)
            with pytest.raises(PermissionError):
                await c.get_socket("udp", "127.0.0.1", 0)
            socks = await c.get_sockets([("tcp", "127.0.0.1", 0)] * 3)
            assert len(socks) == 3
            for s in socks:
                s.close()
            assert fd_count() == base

    run(main())
    assert fd_count() == before


def test_get_sockets_kernel_error_in_the_middle() -> None:
    async def main() -> None:
        async with AsyncSocketCreator() as c:
            base = fd_count()
            with socket.socket() as held:
                held.bind(("127.0.0.1", 0))
                held.listen()
                busy = held.getsockname()[1]
                batch = [
                    ("udp", "127.0.0.1", 0),
                    ("tcp", "127.0.0.1", busy),  # EADDRINUSE: a listener holds it
                    ("udp", "::1", 0),
                    ("tcp", "192.0.2.1", 0),  # EADDRNOTAVAIL, but not the first
                ]
                with pytest.raises(SocketCreationError) as info:
                    await c.get_sockets(batch)
            err = info.value
            assert isinstance(err, OSError)
            assert err.errno == errno.EADDRINUSE
            assert err.strerror == os.strerror(errno.EADDRINUSE)
            assert err.stage == "bind"
            assert err.request == make_request("tcp", "127.0.0.1", busy)
            assert fd_count() == base
            with await c.get_socket("udp", "::1", 0) as s:
                check_socket(s, "udp", "::1", 0)

    run(main())


# --- the event loop ------------------------------------------------------------------


def test_never_blocks_the_event_loop() -> None:
    """While the creator takes its time, other tasks keep running."""

    async def main() -> None:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        async with AsyncSocketCreator(fake(["read"], ["sleep", 0.5], ["sock"], ["serve"])) as c:
            t = asyncio.create_task(ticker())
            with await c.get_socket("udp", "127.0.0.1", 0) as s:
                check_socket(s, "udp", "127.0.0.1", 0)
            done.set()
            await t
        assert ticks > 5

    run(main())


def test_cancelled_waiter_loses_no_socket() -> None:
    async def main() -> None:
        plan = fake(["read"], ["read"], ["sleep", 0.5], ["sock"], ["sock"], ["serve"])
        async with AsyncSocketCreator(plan) as c:
            base = fd_count()
            one = asyncio.create_task(c.get_socket("udp", "127.0.0.1", 0))
            batch = asyncio.create_task(c.get_sockets([("tcp", "127.0.0.1", 0)]))
            await asyncio.sleep(0.1)  # both requests sent, no answer yet
            assert not one.done() and not batch.done()
            one.cancel()
            batch.cancel()
            for t in (one, batch):
                with pytest.raises(asyncio.CancelledError):
                    await t
            # The answers to the cancelled requests come first, so once this
            # one is here the reader has dealt with them.
            with await c.get_socket("udp", "::1", 0) as s:
                check_socket(s, "udp", "::1", 0)
                assert fd_count() == base + 1
            assert fd_count() == base
            socks = await asyncio.gather(*(c.get_socket("tcp", "127.0.0.1", 0) for _ in range(5)))
            for s in socks:
                s.close()
            assert fd_count() == base

    before = fd_count()
    run(main())
    assert fd_count() == before


# --- fatal paths ---------------------------------------------------------------------


# name: (fake creator's plan, its exit status, 'F' condition, words in the message)
FATAL_CASES: dict[str, tuple[list[list[Any]], int, str | None, str]] = {
    "eof": ([["read"], ["exit", 3]], 3, None, "closed the connection"),
    "unknown answer": ([["read"], ["raw", "X"], ["exit", 4]], 4, None, "unknown answer"),
    "unknown stage": ([["read"], ["raw", "EZ\0\0\0\0"], ["exit", 4]], 4, None, "stage"),
    "F I": ([["read"], ["raw", "FI"], ["exit", 12]], 12, "I", "fatal error 'I'"),
    "S without fd": ([["read"], ["raw", "S\0"], ["exit", 5]], 5, None, "0 descriptors"),
    "wrong socket": ([["read"], ["wrong"], ["exit", 6]], 6, None, "received AF_INET/SOCK_STREAM"),
    "not a socket": ([["read"], ["fds", 1], ["exit", 6]], 6, None, "not a socket"),
    "S with 2 fds": ([["read"], ["fds", 2], ["exit", 6]], 6, None, "2 descriptors"),
    "S with too many fds": ([["read"], ["fds", 40], ["exit", 6]], 6, None, "MSG_CTRUNC"),
    "silent": ([["read"], ["sleep", 30]], -signal.SIGKILL, None, "within 0.3s"),
}


@pytest.mark.parametrize("case", FATAL_CASES)
def test_fatal_answers(case: str) -> None:
    plan, status, condition, words = FATAL_CASES[case]
    before = fd_count()

    async def main() -> None:
        # A short timeout only where silence is the point: a slow start must not
        # turn the other cases into timeouts.
        c = AsyncSocketCreator(fake(*plan), timeout=0.3 if case == "silent" else 10)
        async with c:
            pid = c.pid
            # several waiters at once: each one gets the error
            results = await asyncio.gather(
                *(c.get_socket("udp", "127.0.0.1", 0) for _ in range(3)),
                return_exceptions=True,
            )
            assert all(isinstance(r, CreatorFatalError) for r in results), results
            err = results[0]
            assert isinstance(err, CreatorFatalError)
            assert words in str(err)
            assert err.condition == condition
            assert err.exit_status == status
            assert f"exit status {status}" in str(err)
            assert_reaped(pid)
            # later calls fail at once, without another process or descriptor
            n = fd_count()
            with pytest.raises(CreatorFatalError):
                await c.get_socket("tcp", "127.0.0.1", 0)
            with pytest.raises(CreatorFatalError):
                await c.get_sockets([("tcp", "127.0.0.1", 0)])
            assert fd_count() == n
        # __aexit__ (terminate) after a fatal error is quiet

    run(main())
    assert fd_count() == before  # channel and every received descriptor closed


def test_fatal_error_reaches_every_pending_waiter_after_good_answers() -> None:
    """One answer arrives, then the creator dies: the others all get the error."""

    async def main() -> None:
        before = fd_count()
        c = AsyncSocketCreator(fake(*[["read"]] * 5, ["sock"], ["exit", 3]))
        async with c:
            pid = c.pid
            results = await asyncio.gather(
                *(c.get_socket("udp", "127.0.0.1", 0) for _ in range(5)),
                return_exceptions=True,
            )
            first, rest = results[0], results[1:]
            assert isinstance(first, socket.socket)
            first.close()
            assert all(isinstance(r, CreatorFatalError) for r in rest), rest
            assert all("exit status 3" in str(r) for r in rest)
            assert_reaped(pid)
        assert fd_count() == before

    run(main())


def test_fatal_in_a_batch_closes_what_was_received() -> None:
    async def main() -> None:
        before = fd_count()
        c = AsyncSocketCreator(fake(*[["read"]] * 3, ["sock"], ["sock"], ["raw", "?"], ["exit", 8]))
        async with c:
            with pytest.raises(CreatorFatalError, match="exit status 8"):
                await c.get_sockets([("tcp", "127.0.0.1", 0)] * 3)
        assert fd_count() == before

    run(main())


def test_write_failure_is_fatal_for_everyone() -> None:
    """The creator stops reading: the next write fails, and that is the creator's
    fault (CreatorFatalError), for the writer and for the request already pending."""

    async def main() -> None:
        before = fd_count()
        c = AsyncSocketCreator(fake(["read"], ["shut_rd"], ["sleep", 30]), timeout=5)
        async with c:
            pid = c.pid
            pending = asyncio.create_task(c.get_socket("udp", "127.0.0.1", 0))
            await asyncio.sleep(0.2)  # read and shut down
            with pytest.raises(CreatorFatalError):
                await c.get_socket("udp", "127.0.0.1", 0)
            with pytest.raises(CreatorFatalError):
                await pending
            assert_reaped(pid)
            with pytest.raises(CreatorFatalError):
                await c.get_socket("udp", "127.0.0.1", 0)
        assert fd_count() == before

    run(main())


def test_fatal_answer_while_a_batch_is_still_being_written() -> None:
    """The creator breaks the protocol while another task is blocked writing a
    big batch: both get CreatorFatalError, and the event loop is left clean
    (no selector entry for the closed channel's descriptor number)."""
    n = 3000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        c = AsyncSocketCreator.from_socket(ours, timeout=5)
        small = asyncio.create_task(c.get_socket("tcp", "127.0.0.1", 0))
        await asyncio.sleep(0)
        batch = asyncio.create_task(c.get_sockets([("udp", "127.0.0.1", 0)] * n))
        await asyncio.sleep(0.05)
        assert not small.done() and not batch.done()  # the batch is stuck writing
        await loop.sock_sendall(peer, b"X")  # not an answer
        for t in (small, batch):
            with pytest.raises(CreatorFatalError, match="unknown answer"):
                await t
        with pytest.raises(CreatorFatalError):
            await c.get_socket("tcp", "127.0.0.1", 0)
        peer.close()
        # The descriptor numbers are free again; a new socket pair probably
        # reuses them, and the loop must be able to wait on them.
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            b.setblocking(False)
            reading = asyncio.create_task(loop.sock_recv(a, 1))
            await asyncio.sleep(0)
            await loop.sock_sendall(b, b"!")
            assert await reading == b"!"

    before = fd_count()
    run(main())
    assert fd_count() == before


# --- terminate -----------------------------------------------------------------------


def test_terminate_is_idempotent_and_concurrent_safe() -> None:
    async def main() -> None:
        before = fd_count()
        c = await AsyncSocketCreator().start()
        pid = c.pid
        with await c.get_socket("tcp", "127.0.0.1", 0):
            pass
        assert list(await asyncio.gather(c.terminate(), c.terminate())) == [None, None]
        assert_reaped(pid)
        await c.terminate()
        await c.close()
        with pytest.raises(CreatorFatalError):
            await c.get_socket("tcp", "127.0.0.1", 0)
        assert fd_count() == before

    run(main())


def test_each_concurrent_terminate_returns_only_once_the_creator_is_reaped() -> None:
    async def main() -> None:
        c = await AsyncSocketCreator().start()
        pid = c.pid
        first = asyncio.create_task(c.terminate())
        await asyncio.sleep(0)
        await c.terminate()  # the second one
        assert_reaped(pid)
        await first

    run(main())


def test_pending_requests_are_answered_before_terminate_takes_effect() -> None:
    async def main() -> None:
        before = fd_count()
        c = AsyncSocketCreator(fake(["sleep", 0.3], ["serve"]))
        async with c:
            pid = c.pid
            tasks = [
                asyncio.create_task(c.get_socket("udp", f"127.0.0.{i + 1}", 0)) for i in range(10)
            ]
            await asyncio.sleep(0)  # all sent; the creator has not read them yet
            term = asyncio.create_task(c.terminate())
            await asyncio.sleep(0)
            with pytest.raises(CreatorFatalError, match="terminating"):
                await c.get_socket("udp", "127.0.0.1", 0)  # too late for new ones
            socks = await asyncio.gather(*tasks)
            for i, s in enumerate(socks):
                check_socket(s, "udp", f"127.0.0.{i + 1}", 0)
                s.close()
            await term
            assert_reaped(pid)
        assert fd_count() == before

    run(main())


def test_terminate_while_a_big_batch_is_still_being_written() -> None:
    """Two terminate() calls arrive while a batch holds the channel: the batch is
    written and answered in full, then 'T', and both calls wait for that."""
    n = 3000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        c = AsyncSocketCreator.from_socket(ours)
        batch = asyncio.create_task(c.get_sockets([("udp", "127.0.0.1", 0)] * n))
        await asyncio.sleep(0.05)
        assert not batch.done()  # stuck writing: the peer reads nothing yet
        terms = [asyncio.create_task(c.terminate()) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in terms)
        # now play the creator: read the whole batch, refuse every request
        wanted = len(make_request("udp", "127.0.0.1", 0).encode()) * n
        got = b""
        while len(got) < wanted:
            chunk = await loop.sock_recv(peer, wanted - len(got))
            assert chunk, "the client closed the channel before the batch was written"
            got += chunk
        assert got == make_request("udp", "127.0.0.1", 0).encode() * n
        refusal = b"EB" + errno.EADDRINUSE.to_bytes(4, sys.byteorder, signed=True)
        await loop.sock_sendall(peer, refusal * n)
        assert await loop.sock_recv(peer, 64) == b"T"
        peer.close()
        with pytest.raises(SocketCreationError) as info:
            await batch
        assert info.value.errno == errno.EADDRINUSE
        assert await asyncio.gather(*terms) == [None, None]

    before = fd_count()
    run(main())
    assert fd_count() == before


def test_data_after_terminate_is_fatal() -> None:
    async def main() -> None:
        c = await AsyncSocketCreator(fake(["serve", {"after_t": "X", "exit": 9}])).start()
        pid = c.pid
        with await c.get_socket("tcp", "127.0.0.1", 0):
            pass
        with pytest.raises(CreatorFatalError, match="instead of closing") as info:
            await c.terminate()
        assert info.value.exit_status == 9
        assert "exit status 9" in str(info.value)
        assert_reaped(pid)
        await c.terminate()  # idempotent, quiet now
        with pytest.raises(CreatorFatalError):
            await c.get_socket("tcp", "127.0.0.1", 0)

    before = fd_count()
    run(main())
    assert fd_count() == before


def test_silence_after_terminate_times_out_and_kills() -> None:
    async def main() -> None:
        c = await AsyncSocketCreator(fake(["serve", {"sleep": 30}]), timeout=0.3).start()
        pid = c.pid
        with pytest.raises(CreatorFatalError) as info:
            await c.terminate()
        assert info.value.exit_status == -signal.SIGKILL
        assert_reaped(pid)

    before = fd_count()
    run(main())
    assert fd_count() == before


# --- bad arguments -------------------------------------------------------------------

BAD_REQUESTS: list[tuple[Any, type[Exception]]] = [
    (("sctp", "127.0.0.1", 0), ValueError),
    ((socket.SOCK_RAW, "127.0.0.1", 0), ValueError),
    ((1.5, "127.0.0.1", 0), TypeError),
    ((True, "127.0.0.1", 0), TypeError),
    (("tcp", "localhost", 0), ValueError),
    (("tcp", "127.0.0.256", 0), ValueError),
    (("tcp", b"127.0.0.1", 0), TypeError),
    (("tcp", 2130706433, 0), TypeError),
    (("tcp", "fe80::1%lo", 0), ValueError),
    (("tcp", "127.0.0.1", 65536), ValueError),
    (("tcp", "127.0.0.1", -1), ValueError),
    (("tcp", "127.0.0.1", "80"), TypeError),
    (("tcp", "127.0.0.1", 80.0), TypeError),
    (("tcp", "127.0.0.1", True), TypeError),
]


def test_bad_arguments_send_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        c = AsyncSocketCreator.from_socket(ours)
        for args, exc in BAD_REQUESTS:
            with pytest.raises(exc):
                await c.get_socket(*args)
            with pytest.raises(exc):  # one bad request spoils the whole batch
                await c.get_sockets([("udp", "127.0.0.1", 0), args])
        with pytest.raises(TypeError):
            await c.get_sockets([("tcp", "127.0.0.1")])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            await c.get_sockets(["tcp:127.0.0.1:0"])  # type: ignore[list-item]
        assert await c.get_sockets([]) == []
        with pytest.raises(BlockingIOError):
            peer.recv(64)  # nothing was sent
        # and the channel is still in step
        task = asyncio.create_task(c.get_socket("tcp", "::1", 0))
        assert await loop.sock_recv(peer, 64) == make_request("tcp", "::1", 0).encode()
        await loop.sock_sendall(peer, b"EB" + errno.EADDRNOTAVAIL.to_bytes(4, sys.byteorder))
        with pytest.raises(SocketCreationError) as info:
            await task
        assert info.value.errno == errno.EADDRNOTAVAIL
        term = asyncio.create_task(c.terminate())
        assert await loop.sock_recv(peer, 64) == b"T"
        peer.close()
        await term

    run(main())


def test_bad_arguments_keep_a_real_creator_usable() -> None:
    async def main() -> None:
        async with AsyncSocketCreator() as c:
            for args, exc in BAD_REQUESTS:
                with pytest.raises(exc):
                    await c.get_socket(*args)
            with await c.get_socket("udp", "127.0.0.1", 0) as s:
                check_socket(s, "udp", "127.0.0.1", 0)

    run(main())


@pytest.mark.parametrize(
    "make, exc",
    [
        (lambda: AsyncSocketCreator(timeout=0), ValueError),
        (lambda: AsyncSocketCreator(timeout=-1), ValueError),
        (lambda: AsyncSocketCreator(["/bin/true"], allow=["tcp:*:80"]), ValueError),
        (lambda: AsyncSocketCreator(["/bin/true"], harden=False), ValueError),
        (lambda: AsyncSocketCreator(allow=[]), ValueError),
        (lambda: AsyncSocketCreator(allow="tcp:*:80"), TypeError),
        (
            lambda: AsyncSocketCreator.from_socket(
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ),
            ValueError,
        ),
        (lambda: AsyncSocketCreator.from_socket(socket.socket()), ValueError),
    ],
)
def test_bad_constructor_arguments(make: Callable[[], object], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        make()


def test_not_started() -> None:
    async def main() -> None:
        c = AsyncSocketCreator()
        with pytest.raises(RuntimeError):
            await c.get_socket("tcp", "127.0.0.1", 0)
        await c.terminate()  # nothing to do
        assert c.pid is None

    run(main())
