"""Wire compatibility with a C creator written from the seed's text.

BIND 10's C++ ``b10-sockcreator`` cannot be installed here, so
``tests/creator/compat/b10_like_creator.c`` is a small C creator written only from
the seed's protocol description (fd 0 in, fd 1 out, 'S' then the descriptor
by sendmsg on one data byte, 'E' + stage + native int errno, 'F' 'I' on
anything unknown, exit on 'T').  The tests compile it with ``cc`` and then:

- drive this package's clients (blocking and asyncio) against it, and
- feed the same bytes to it and to our creator and compare what comes back,
  byte for byte, descriptor for descriptor.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    WIRE_INT,
    RawCreator,
    creator_argv,
    fd_count,
    recv_with_fds,
    requires_linux,
    wire_request,
)

from sockcreator import (
    AsyncSocketCreator,
    CreatorFatalError,
    SocketCreationError,
    SocketCreator,
)

pytestmark = requires_linux

SOURCE = Path(__file__).with_name("compat") / "b10_like_creator.c"
IPV6_MTU_DISCOVER = 23
NOT_HERE_V4, NOT_HERE_V6 = "192.0.2.1", "2001:db8::1"


@pytest.fixture(scope="module")
def c_creator(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C creator, compiled for this test run."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the C creator")
    exe = tmp_path_factory.mktemp("compat") / "b10-like-creator"
    flags = ["-std=c99", "-D_DEFAULT_SOURCE", "-O2", "-Wall", "-Wextra"]
    result = subprocess.run([cc, *flags, "-o", str(exe), str(SOURCE)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    return str(exe)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_V6 = _has_ipv6_loopback()
requires_ipv6 = pytest.mark.skipif(not HAS_V6, reason="no IPv6 loopback (::1)")


def gone(pid: int) -> bool:
    """True once ``pid`` has exited and been reaped (no zombie left)."""
    return not os.path.exists(f"/proc/{pid}")


# --- Our clients against the C creator ---------------------------------------------


def test_blocking_client_against_c_creator(c_creator: str, no_leaks: None) -> None:
    with SocketCreator(command=[c_creator], timeout=10) as c:
        pid = c.pid
        assert pid is not None
        with c.get_socket("tcp", "127.0.0.1", 0) as s:
            assert (s.family, s.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert s.getsockname()[0] == "127.0.0.1"
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert not s.get_inheritable()
        if HAS_V6:
            with c.get_socket("UDP", "::1", 0) as s:
                assert (s.family, s.type) == (socket.AF_INET6, socket.SOCK_DGRAM)
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
                assert s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) == 0

        requests = [("udp", f"127.0.0.{i}", 0) for i in range(1, 6)]
        requests += [(socket.SOCK_STREAM, f"127.0.0.{i}", 0) for i in range(1, 6)]
        socks = c.get_sockets(requests)
        try:
            got = [(s.type, s.getsockname()[0]) for s in socks]
            assert got == [
                (socket.SOCK_DGRAM if r[0] == "udp" else socket.SOCK_STREAM, r[1]) for r in requests
            ]
        finally:
            for s in socks:
                s.close()

        with pytest.raises(SocketCreationError) as e:
            c.get_socket("tcp", NOT_HERE_V4, 0)
        assert e.value.errno == errno.EADDRNOTAVAIL and e.value.stage == "bind"
        assert isinstance(e.value, OSError)

        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            with pytest.raises(SocketCreationError) as e:
                # All or nothing: the socket before the failure is closed too.
                c.get_sockets(
                    [("udp", "127.0.0.1", 0), ("tcp", "127.0.0.1", held.getsockname()[1])]
                )
            assert e.value.errno == errno.EADDRINUSE

        # Still usable after the errors.
        with c.get_socket("udp", "127.0.0.1", 0) as s:
            assert s.type == socket.SOCK_DGRAM
        assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
        c.terminate()
        c.terminate()  # idempotent
        assert gone(pid)
        with pytest.raises(CreatorFatalError):
            c.get_socket("udp", "127.0.0.1", 0)


def test_async_client_against_c_creator(c_creator: str, no_leaks: None) -> None:
    async def main() -> int | None:
        async with AsyncSocketCreator(command=[c_creator], timeout=10) as c:
            pid = c.pid
            assert pid is not None
            one = await c.get_socket("tcp", "127.0.0.1", 0)
            with one:
                assert one.type == socket.SOCK_STREAM
            # Many concurrent awaits, answers matched in order.
            hosts = [f"127.0.0.{i}" for i in range(1, 21)]
            socks = await asyncio.gather(*(c.get_socket("udp", h, 0) for h in hosts))
            try:
                assert [s.getsockname()[0] for s in socks] == hosts
            finally:
                for s in socks:
                    s.close()
            many = await c.get_sockets([("tcp", "127.0.0.1", 0), ("udp", "127.0.0.2", 0)])
            for s in many:
                s.close()
            assert [s.type for s in many] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
            with pytest.raises(SocketCreationError) as e:
                await c.get_socket("udp", NOT_HERE_V4, 0)
            assert e.value.errno == errno.EADDRNOTAVAIL and e.value.stage == "bind"
            last = await c.get_socket("udp", "127.0.0.1", 0)
            last.close()
        await c.terminate()  # idempotent
        with pytest.raises(CreatorFatalError):
            await c.get_socket("udp", "127.0.0.1", 0)
        return pid

    pid = asyncio.run(main())
    assert pid is not None and gone(pid)


# --- The same bytes to both creators -----------------------------------------------


@dataclass(frozen=True)
class Transcript:
    """What a creator did with a script: every byte it wrote with the
    descriptors that came on it (described), how the channel ended, and
    whether it exited 0."""

    answer: tuple[tuple[bytes, tuple[object, ...]], ...]
    end: str
    exit_ok: bool


def describe(fd: int) -> tuple[object, ...]:
    with socket.socket(fileno=fd) as s:
        opts: tuple[object, ...] = (
            s.family,
            s.type,
            s.getsockname()[0],
            s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
            s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        )
        if s.family == socket.AF_INET6:
            opts += (
                s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
                s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER),
            )
        return opts


def transcript(c: RawCreator, script: bytes, *, shut_wr: bool) -> Transcript:
    c.sock.sendall(script)
    if shut_wr:
        c.sock.shutdown(socket.SHUT_WR)
    out = []
    while True:
        try:
            data, fds = recv_with_fds(c.sock, 1)  # byte by byte: where each fd came
        except ConnectionResetError:
            end = "RESET"
            break
        if not data:
            assert not fds
            end = "EOF"
            break
        out.append((data, tuple(describe(fd) for fd in fds)))
    return Transcript(tuple(out), end, c.wait() == 0)


def both(c_creator: str, script: bytes, *, shut_wr: bool = False) -> tuple[Transcript, Transcript]:
    with RawCreator(creator_argv("--allow-all")) as ours:
        mine = transcript(ours, script, shut_wr=shut_wr)
    with RawCreator([c_creator]) as theirs:
        other = transcript(theirs, script, shut_wr=shut_wr)
    return mine, other


def req(proto: str, host: str, port: int = 0) -> bytes:
    return wire_request(proto, host, port)


SCRIPTS = {
    "T": b"T",
    "successes": req("tcp", "127.0.0.1") + req("udp", "127.0.0.2") + b"T",
    "wildcard": req("tcp", "0.0.0.0") + req("udp", "0.0.0.0") + b"T",
    "bind-errors": req("tcp", NOT_HERE_V4) + req("udp", NOT_HERE_V4, 53) + b"T",
    "mixed": req("udp", NOT_HERE_V4) + req("tcp", "127.0.0.3") + req("udp", NOT_HERE_V4) + b"T",
    "unknown-command": b"X",
    "unknown-command-nul": b"\x00",
    "unknown-command-lowercase": b"s",
    # Invalid requests at least as long as the shortest 'S' (9 bytes): ours
    # reads 8 bytes after the 'S' before it judges them (BIND 10's reads the
    # type and family together, this C one byte by byte); shorter, ours waits.
    # Each ends with a byte that neither reads (both exit leaving it: RESET).
    "unknown-type": b"SX" + bytes(7) + b"T",
    "unknown-type-then-more": b"Su4" + req("tcp", "127.0.0.1"),
    "unknown-family": b"ST5" + bytes(6) + b"T",
    "unknown-family-then-more": b"SU\x04" + bytes(6) + req("udp", "127.0.0.1"),
    "FI-after-answer": req("udp", "127.0.0.1") + b"Q" + req("udp", "127.0.0.1"),
    "T-then-more": req("udp", "127.0.0.1") + b"T" + req("udp", "127.0.0.1"),
}
if HAS_V6:
    SCRIPTS |= {
        "v6": req("tcp", "::1") + req("udp", "::1") + req("udp", NOT_HERE_V6) + b"T",
        "v6-wildcard": req("tcp", "::") + req("udp", "::") + b"T",
        "v6-errors": req("tcp", NOT_HERE_V6, 80) + req("udp", NOT_HERE_V6) + b"T",
    }
EOF_SCRIPTS = {
    "idle": b"",
    "after-answer": req("udp", "127.0.0.1"),
    "inside-port": req("tcp", "127.0.0.1")[:4],
    "inside-address": req("udp", "127.0.0.1")[:7],
    "after-error-inside-request": req("udp", NOT_HERE_V4) + b"ST4",
}


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_same_answers_as_c_creator(c_creator: str, script: bytes) -> None:
    mine, other = both(c_creator, script)
    assert mine == other


@pytest.mark.parametrize("script", EOF_SCRIPTS.values(), ids=EOF_SCRIPTS.keys())
def test_same_behaviour_on_eof_as_c_creator(c_creator: str, script: bytes) -> None:
    mine, other = both(c_creator, script, shut_wr=True)
    assert mine == other
    assert (mine.end, mine.exit_ok) == ("EOF", False)


def test_same_eaddrinuse_as_c_creator(c_creator: str) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held_tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held_udp,
    ):
        held_tcp.bind(("127.0.0.1", 0))
        held_tcp.listen()
        held_udp.bind(("127.0.0.1", 0))
        script = (
            req("tcp", "127.0.0.1", held_tcp.getsockname()[1])
            + req("udp", "127.0.0.1", held_udp.getsockname()[1])
            + b"T"
        )
        mine, other = both(c_creator, script)
    assert mine == other
    assert b"".join(byte for byte, _ in mine.answer).count(b"EB") == 2


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs resource.prlimit")
def test_same_socket_failure_as_c_creator(c_creator: str) -> None:
    """'E' 'S': socket() fails (no descriptor free) in both."""
    answers = []
    for argv in (creator_argv("--allow-all"), [c_creator]):
        with RawCreator(argv) as c:
            kind, sock = c.request("udp", NOT_HERE_V4, 0)  # a round trip: it is serving
            assert kind == b"EB"
            old = resource.prlimit(c.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(c.pid, resource.RLIMIT_NOFILE, (3, old[1]))
            c.sock.sendall(req("tcp", "127.0.0.1"))
            raw = c.sock.recv(64)
            while len(raw) < 6:
                raw += c.sock.recv(64)
            answers.append(raw)
            resource.prlimit(c.pid, resource.RLIMIT_NOFILE, old)
            kind, sock = c.request("udp", "127.0.0.1", 0)  # and serving again
            assert kind == b"S" and isinstance(sock, socket.socket)
            sock.close()
    assert answers[0] == answers[1] == b"ES" + WIRE_INT.pack(errno.EMFILE)


def test_c_creator_descriptor_count_flat(c_creator: str) -> None:
    """Sanity check of the stand-in itself: it keeps no descriptor."""
    with RawCreator([c_creator]) as c:
        for _ in range(200):
            kind, sock = c.request("udp", "127.0.0.1", 0)
            assert kind == b"S" and isinstance(sock, socket.socket)
            sock.close()
        assert c.request("udp", NOT_HERE_V4, 0) == (b"EB", errno.EADDRNOTAVAIL)
        assert sorted(os.listdir(f"/proc/{c.pid}/fd")) == ["0", "1", "2"]
        before = fd_count()
        c.sock.sendall(b"T")
        assert c.wait() == 0
        assert fd_count() == before
