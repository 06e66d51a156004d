"""The privileged creator program itself, driven byte by byte.

Every test runs the real ``creator.py`` (``python -I -S -B``, empty
environment) on one end of a real socketpair and speaks the seed's protocol
to it by hand: requests are built from the seed's text (``wire_request``),
answers are read exactly (``read_answer``: the descriptor must come alone on
the one data byte after 'S').  Nothing here goes through the client library.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import resource
import select
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from conftest import (
    WIRE_INT,
    RawCreator,
    creator_argv,
    fd_count,
    read_answer,
    read_to_end,
    requires_linux,
    wire_request,
)

pytestmark = requires_linux

ALLOW_ALL = creator_argv("--allow-all")
# Exit statuses documented in creator.py.
EXIT_OK, EXIT_READ, EXIT_WRITE, EXIT_PROTOCOL, EXIT_START = 0, 10, 11, 12, 14
# Python lacks the Linux IPv6 MTU constants.
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT = 23, 0
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
NOT_HERE_V4, NOT_HERE_V6 = "192.0.2.1", "2001:db8::1"  # documentation prefixes


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


@pytest.fixture
def creator() -> Iterator[RawCreator]:
    with RawCreator(ALLOW_ALL) as c:
        yield c


@dataclass
class Outcome:
    data: bytes  # everything the creator wrote
    nfds: int  # descriptors that came with it
    end: str  # "EOF", or "RESET" if it exited leaving input unread
    status: int
    stderr: str


def run_scripts(
    scripts: list[bytes], argv: list[str] = ALLOW_ALL, *, shut_wr: bool = False, batch: int = 24
) -> list[Outcome]:
    """Give each script to a fresh creator (many at once), read until it is
    gone.  With ``shut_wr`` the script is followed by EOF; without it, the
    creator must end on its own (a creator waiting for more bytes fails the
    test by timeout)."""
    outcomes = []
    for start in range(0, len(scripts), batch):
        group = scripts[start : start + batch]
        with ExitStack() as stack:
            creators = [stack.enter_context(RawCreator(argv)) for _ in group]
            for c, script in zip(creators, group, strict=True):
                c.sock.sendall(script)
                if shut_wr:
                    c.sock.shutdown(socket.SHUT_WR)
            for c in creators:
                data, nfds, end = read_to_end(c.sock)
                outcomes.append(Outcome(data, nfds, end, c.wait(), c.stderr_text()))
    return outcomes


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def type_of(proto: str) -> socket.SocketKind:
    return socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM


def error(stage: bytes, code: int) -> tuple[bytes, int]:
    return b"E" + stage, code


def assert_socket(answer: object, proto: str, host: str, port: int = 0) -> None:
    """``answer`` is an 'S' answer with a socket bound as requested (closed here)."""
    assert isinstance(answer, tuple), answer
    assert answer[0] == b"S", answer
    sock = answer[1]
    assert isinstance(sock, socket.socket)
    with sock:
        assert (sock.family, sock.type) == (family_of(host), type_of(proto))
        bound_host, bound_port = sock.getsockname()[:2]
        assert bound_host == host
        assert bound_port == port if port else bound_port > 0


def close_answer(answer: object) -> None:
    if isinstance(answer, tuple) and isinstance(answer[1], socket.socket):
        answer[1].close()


def free_port(proto: str, host: str) -> int:
    with socket.socket(family_of(host), type_of(proto)) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def wait_queued(sock: socket.socket, n: int) -> None:
    """Wait until at least ``n`` bytes wait unread in ``sock`` (FIONREAD)."""
    deadline = time.monotonic() + 10
    buf = array.array("i", [0])
    while True:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        if buf[0] >= n:
            return
        assert time.monotonic() < deadline, f"only {buf[0]} of {n} bytes arrived"
        time.sleep(0.002)


def creator_fds(c: RawCreator) -> list[int]:
    """The creator's open descriptors once it is idle.  It closes its copy of
    a socket only after sending it, so first a round trip that sends none."""
    c.sock.sendall(wire_request("udp", NOT_HERE_V4, 0))
    assert read_answer(c.sock) == error(b"B", errno.EADDRNOTAVAIL)
    return sorted(int(name) for name in os.listdir(f"/proc/{c.pid}/fd"))


def one_line(text: str) -> bool:
    return text.endswith("\n") and text.count("\n") == 1


# --- 'T' and EOF ---------------------------------------------------------------


def test_T_exits_0_writing_nothing() -> None:
    [out] = run_scripts([b"T"])
    assert out == Outcome(b"", 0, "EOF", EXIT_OK, "")


def test_T_after_answers_exits_0_and_reads_nothing_after_it() -> None:
    script = wire_request("udp", "127.0.0.1", 0) + b"T" + wire_request("tcp", "127.0.0.1", 0)
    [out] = run_scripts([script])
    # One answer ('S' + data byte + one descriptor), then exit 0 leaving the
    # request after 'T' unread (so the kernel reports a reset, not EOF).
    assert (out.data[:1], len(out.data), out.nfds) == (b"S", 2, 1)
    assert (out.end, out.status) == ("RESET", EXIT_OK)


def test_eof_while_idle_exits_10_writing_nothing() -> None:
    [out] = run_scripts([b""], shut_wr=True)
    assert out == Outcome(b"", 0, "EOF", EXIT_READ, "")


V4_REQUEST = wire_request("tcp", "127.0.0.1", 0x1234)
V6_REQUEST = wire_request("udp", "::1", 0x1234)


def test_eof_inside_every_field_exits_10_writing_nothing() -> None:
    # After 'S', after the type, after the family, inside the port, inside
    # (and just before the end of) the address: both families.
    prefixes = [V4_REQUEST[:n] for n in range(1, len(V4_REQUEST))]
    prefixes += [V6_REQUEST[:n] for n in range(1, len(V6_REQUEST))]
    assert len(prefixes) == 8 + 20
    for prefix, out in zip(prefixes, run_scripts(prefixes, shut_wr=True), strict=True):
        assert (out.data, out.nfds, out.end, out.status) == (b"", 0, "EOF", EXIT_READ), prefix
        assert out.stderr.count("\n") <= 1, out.stderr


@requires_ipv6
def test_eof_after_answers_exits_10_after_answering() -> None:
    ok = wire_request("udp", "::1", 0)
    bad = wire_request("tcp", NOT_HERE_V4, 0)
    outs = run_scripts([ok + ok[:5], bad + bad[:3], ok + bad], shut_wr=True)
    err = b"EB" + WIRE_INT.pack(errno.EADDRNOTAVAIL)
    assert [(o.data[:1], len(o.data), o.nfds) for o in outs] == [
        (b"S", 2, 1),
        (b"E", len(err), 0),
        (b"S", 2 + len(err), 1),
    ]
    assert outs[1].data == err and outs[2].data[2:] == err
    assert all((o.end, o.status) == ("EOF", EXIT_READ) for o in outs)


@pytest.mark.parametrize("partial", [b"", b"ST4\x00"], ids=["idle", "mid-request"])
def test_peer_reset_exits_10(creator: RawCreator, partial: bytes) -> None:
    # Leave the answer unread and close: the creator's next read gets
    # ECONNRESET.  10, not 11: it did not try to write.
    creator.sock.sendall(wire_request("tcp", "127.0.0.1", 0) + partial)
    wait_queued(creator.sock, 2)  # 'S' and the descriptor's byte
    creator.sock.close()
    assert creator.wait() == EXIT_READ


# --- Invalid input: 'F' 'I' ----------------------------------------------------


# 'S' and 'T' are the seed's; 'P' is this package's extension (its own tests
# cover it).  Every other byte is invalid.
KNOWN_COMMANDS = b"STP"


def test_every_unknown_command_byte_gets_FI_and_exit_12() -> None:
    unknown = [bytes([b]) for b in range(256) if b not in KNOWN_COMMANDS]
    assert len(unknown) == 256 - len(KNOWN_COMMANDS)
    for script, out in zip(unknown, run_scripts(unknown), strict=True):
        # No EOF is sent: the creator must answer and exit on the byte alone.
        assert (out.data, out.nfds, out.end, out.status) == (b"FI", 0, "EOF", EXIT_PROTOCOL), script
        assert one_line(out.stderr), out.stderr


BAD_TYPES = [b"\x00", b"t", b"u", b"S", b"4", b"6", b"E", b"\xff"]
BAD_FAMILIES = [b"\x00", b"\x04", b"\x06", b"T", b"U", b"2", b"i", b"\xff"]
INVALID = [b"S" + t for t in BAD_TYPES]
INVALID += [b"ST" + f for f in BAD_FAMILIES] + [b"SU" + f for f in BAD_FAMILIES]
INVALID += [b"P" + t for t in BAD_TYPES] + [b"PT" + f for f in BAD_FAMILIES]
#: Every 'S' request is at least 9 bytes and every 'P' 10; the creator reads
#: the 8 (9) after the command in one read and only then judges type and family.
SHORTEST = {b"S": 9, b"P": 10}


def padded(script: bytes) -> bytes:
    """``script`` filled with NULs to the shortest request of its command."""
    return script + bytes(SHORTEST[script[:1]] - len(script))


@pytest.mark.parametrize("trailing", [b"", b"4"], ids=["alone", "with-a-byte-after"])
def test_unknown_type_or_family_gets_FI_and_reads_no_further(trailing: bytes) -> None:
    scripts = [padded(s) + trailing for s in INVALID]
    for script, out in zip(scripts, run_scripts(scripts), strict=True):
        assert (out.data, out.nfds, out.status) == (b"FI", 0, EXIT_PROTOCOL), script
        # A byte sent after the shortest request is never read: the creator
        # exits with it unread, which the kernel reports to us as a reset.
        assert out.end == ("RESET" if trailing else "EOF"), script


def test_bad_type_is_judged_only_once_the_shortest_request_is_in() -> None:
    # One byte short of the shortest request: no answer, and at EOF the end
    # of input inside a request (exit 10, nothing written), as for a good one.
    scripts = [padded(s)[:-1] for s in INVALID]
    for script, out in zip(scripts, run_scripts(scripts, shut_wr=True), strict=True):
        assert (out.data, out.nfds, out.end, out.status) == (b"", 0, "EOF", EXIT_READ), script


def test_no_answer_before_the_shortest_request_is_in(creator: RawCreator) -> None:
    creator.sock.sendall(padded(b"SX")[:-1])
    time.sleep(0.02)
    assert not _readable(creator.sock)
    creator.sock.sendall(b"\0")
    assert read_to_end(creator.sock) == (b"FI", 0, "EOF")
    assert creator.wait() == EXIT_PROTOCOL


def test_unknown_command_after_answers_and_nothing_after_it_is_read() -> None:
    script = wire_request("udp", "127.0.0.1", 0) + b"X" + wire_request("udp", "127.0.0.1", 0)
    [out] = run_scripts([script])
    assert (out.data[:1], out.data[2:], out.nfds) == (b"S", b"FI", 1)
    assert (out.end, out.status) == ("RESET", EXIT_PROTOCOL)


# --- Write errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "script", [wire_request("tcp", "127.0.0.1", 0), b"X"], ids=["answer", "FI"]
)
def test_write_error_exits_11(creator: RawCreator, script: bytes) -> None:
    creator.sock.shutdown(socket.SHUT_RD)  # the creator's writes now fail (EPIPE)
    creator.sock.sendall(script)
    assert creator.wait() == EXIT_WRITE


# --- Answers -------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "0.0.0.0",
        pytest.param("::1", marks=requires_ipv6),
        pytest.param("::", marks=requires_ipv6),
    ],
)
def test_received_socket_is_exactly_what_was_asked(
    creator: RawCreator, proto: str, host: str
) -> None:
    port = free_port(proto, host)
    # The 'S' byte comes alone and without a descriptor; the descriptor
    # comes, alone, on the next (single) data byte.  read_answer checks this;
    # here it is spelled out once.
    creator.sock.sendall(wire_request(proto, host, port))
    data, anc, flags, _ = creator.sock.recvmsg(1, socket.CMSG_SPACE(64))
    assert (data, anc, flags & socket.MSG_CTRUNC) == (b"S", [], 0)
    data, anc, flags, _ = creator.sock.recvmsg(16, socket.CMSG_SPACE(64))
    assert len(data) == 1 and not flags & socket.MSG_CTRUNC
    assert [(level, kind, len(blob)) for level, kind, blob in anc] == [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, WIRE_INT.size)
    ]
    with socket.socket(fileno=WIRE_INT.unpack(anc[0][2])[0]) as sock:
        assert (sock.family, sock.type) == (family_of(host), type_of(proto))
        assert sock.getsockname()[:2] == (host, port)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0  # not listening
        with pytest.raises(OSError) as e:
            sock.getpeername()
        assert e.value.errno == errno.ENOTCONN
        if host == "::":
            # (Binding a specific IPv6 address sets IPV6_V6ONLY by itself, so
            # only the wildcard shows whether the creator set it.)
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            # IPv6 only: the same port is still free for IPv4.
            with socket.socket(socket.AF_INET, type_of(proto)) as v4:
                v4.bind(("127.0.0.1", port))
        if family_of(host) == socket.AF_INET6 and proto == "udp":
            level = socket.IPPROTO_IPV6
            assert sock.getsockopt(level, IPV6_MTU_DISCOVER) == IPV6_PMTUDISC_DONT
            # IPV6_MTU 1280 cannot be read back on an unconnected socket, but
            # it shows: with fragmentation forbidden, 1280 - 40 - 8 bytes of
            # payload go out over loopback (MTU 65536) and one more does not.
            sock.setsockopt(level, IPV6_DONTFRAG, 1)
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
                peer.bind(("::1", 0))
                if host == "::":
                    sock.connect(peer.getsockname())  # for a source address
                sock.sendto(b"x" * 1232, peer.getsockname())
                assert len(peer.recv(4096)) == 1232
                with pytest.raises(OSError) as e:
                    sock.sendto(b"x" * 1233, peer.getsockname())
                assert e.value.errno == errno.EMSGSIZE
    # The creator kept no copy.
    assert creator_fds(creator) == [0, 1, 2]


@requires_ipv6
def test_plain_ipv6_udp_socket_differs() -> None:
    """Control for the MTU checks above: they fail on a socket without the options."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as plain:
        assert plain.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) != IPV6_PMTUDISC_DONT
        plain.bind(("::1", 0))
        plain.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        plain.sendto(b"x" * 1233, plain.getsockname())
        assert len(plain.recv(4096)) == 1233


def test_bind_failures_answer_EB_with_native_errno(creator: RawCreator) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held_tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held_udp,
    ):
        held_tcp.bind(("127.0.0.1", 0))
        held_tcp.listen()  # SO_REUSEADDR does not get past a listener
        held_udp.bind(("127.0.0.1", 0))  # nor past a UDP socket without it
        cases = [
            (("tcp", NOT_HERE_V4, 0), errno.EADDRNOTAVAIL),
            (("udp", NOT_HERE_V4, 0), errno.EADDRNOTAVAIL),
            (("tcp", "127.0.0.1", held_tcp.getsockname()[1]), errno.EADDRINUSE),
            (("udp", "127.0.0.1", held_udp.getsockname()[1]), errno.EADDRINUSE),
        ]
        if _has_ipv6_loopback():
            cases += [
                (("tcp", NOT_HERE_V6, 0), errno.EADDRNOTAVAIL),
                (("udp", NOT_HERE_V6, 0), errno.EADDRNOTAVAIL),
            ]
        for request, code in cases:
            creator.sock.sendall(wire_request(*request))
            raw = creator.sock.recv(64)
            while len(raw) < 2 + WIRE_INT.size:
                raw += creator.sock.recv(64)
            assert raw == b"EB" + struct.pack("@i", code), request
        # Still serving.
        assert_socket(creator.request("udp", "127.0.0.1", 0), "udp", "127.0.0.1")
    assert creator_fds(creator) == [0, 1, 2]


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs resource.prlimit")
def test_socket_failure_answers_ES(creator: RawCreator) -> None:
    # Serving: then no descriptor is free for socket() in the creator.
    assert_socket(creator.request("tcp", "127.0.0.1", 0), "tcp", "127.0.0.1")
    old = resource.prlimit(creator.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(creator.pid, resource.RLIMIT_NOFILE, (3, old[1]))  # soft limit only
    try:
        assert creator.request("tcp", "127.0.0.1", 0) == error(b"S", errno.EMFILE)
        assert creator.request("udp", "127.0.0.1", 0) == error(b"S", errno.EMFILE)
    finally:
        resource.prlimit(creator.pid, resource.RLIMIT_NOFILE, old)
    assert_socket(creator.request("udp", "127.0.0.1", 0), "udp", "127.0.0.1")
    creator.sock.sendall(b"T")
    assert creator.wait() == EXIT_OK


# --- Short reads and pipelining ------------------------------------------------


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0.005)[0])


def test_short_reads_one_byte_at_a_time(creator: RawCreator) -> None:
    for proto, host, expected in [
        ("tcp", "127.0.0.1", "S"),
        ("udp", NOT_HERE_V4, error(b"B", errno.EADDRNOTAVAIL)),
        ("udp", "127.0.0.1", "S"),
    ]:
        request = wire_request(proto, host, 0)
        for i in range(len(request)):
            creator.sock.send(request[i : i + 1])
            if i < len(request) - 1:
                time.sleep(0.002)
                assert not _readable(creator.sock), f"answered after {i + 1} bytes"
        answer = read_answer(creator.sock)
        if expected == "S":
            assert_socket(answer, proto, host)
        else:
            assert answer == expected
    creator.sock.sendall(b"T")
    assert creator.wait() == EXIT_OK


def test_answers_a_complete_request_without_waiting_for_the_next(creator: RawCreator) -> None:
    creator.sock.sendall(wire_request("udp", "127.0.0.1", 0) + b"SU4\x00")
    assert_socket(read_answer(creator.sock), "udp", "127.0.0.1")
    creator.sock.sendall(b"\x00" + socket.inet_aton("127.0.0.9"))
    assert_socket(read_answer(creator.sock), "udp", "127.0.0.9")


def test_pipelined_requests_answered_in_order(creator: RawCreator) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held_tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held_udp,
    ):
        held_tcp.bind(("127.0.0.1", 0))
        held_tcp.listen()
        held_udp.bind(("127.0.0.1", 0))
        # Distinct addresses make the order visible.
        plan: list[tuple[tuple[str, str, int], object]] = [
            (("tcp", "127.0.0.2", 0), "S"),
            (("udp", NOT_HERE_V4, 0), error(b"B", errno.EADDRNOTAVAIL)),
            (("udp", "127.0.0.3", 0), "S"),
            (("tcp", "127.0.0.1", held_tcp.getsockname()[1]), error(b"B", errno.EADDRINUSE)),
            (("tcp", "127.0.0.4", 0), "S"),
            (("udp", "127.0.0.1", held_udp.getsockname()[1]), error(b"B", errno.EADDRINUSE)),
            (("udp", "127.0.0.5", 0), "S"),
        ]
        if _has_ipv6_loopback():
            plan += [
                (("tcp", "::1", 0), "S"),
                (("udp", NOT_HERE_V6, 0), error(b"B", errno.EADDRNOTAVAIL)),
                (("udp", "::1", 0), "S"),
            ]
        plan *= 5
        creator.sock.sendall(b"".join(wire_request(*r) for r, _ in plan) + b"T")
        for request, expected in plan:
            answer = read_answer(creator.sock)
            if expected == "S":
                assert_socket(answer, *request)
            else:
                close_answer(answer)
                assert answer == expected, request
    assert read_to_end(creator.sock) == (b"", 0, "EOF")
    assert creator.wait() == EXIT_OK


# --- Descriptors -----------------------------------------------------------------


def test_descriptors_sent_to_the_creator_are_dropped(creator: RawCreator) -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as extra:
            fds = array.array("i", [w, extra.fileno(), w])
            creator.sock.sendmsg(
                [wire_request("udp", "127.0.0.1", 0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
            )
        os.close(w)
        assert_socket(read_answer(creator.sock), "udp", "127.0.0.1")
        assert creator_fds(creator) == [0, 1, 2]
        assert os.read(r, 1) == b""  # no process holds the write end any more
        # Descriptors on a request split over two writes, too.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as extra:
            request = wire_request("tcp", "127.0.0.1", 0)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, WIRE_INT.pack(extra.fileno()))]
            creator.sock.sendmsg([request[:2]], rights)
            creator.sock.sendmsg([request[2:]], rights)
        assert_socket(read_answer(creator.sock), "tcp", "127.0.0.1")
        assert creator_fds(creator) == [0, 1, 2]
    finally:
        os.close(r)
    creator.sock.sendall(b"T")
    assert creator.wait() == EXIT_OK


def test_inherited_descriptors_are_closed() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    with ExitStack() as stack:
        stack.callback(os.close, r)
        devnull = stack.enter_context(open(os.devnull, "rb"))
        sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            c = stack.enter_context(
                RawCreator(ALLOW_ALL, pass_fds=(w, devnull.fileno(), sock.fileno()))
            )
        finally:
            os.close(w)
        assert_socket(c.request("tcp", "127.0.0.1", 0), "tcp", "127.0.0.1")
        assert creator_fds(c) == [0, 1, 2]
        assert os.read(r, 1) == b""  # the inherited write end is closed


def test_descriptor_counts_stay_flat_over_thousands_of_requests(creator: RawCreator) -> None:
    batch = [("tcp", "127.0.0.1", 0), ("udp", "127.0.0.1", 0), ("tcp", NOT_HERE_V4, 0)]
    if _has_ipv6_loopback():
        batch += [("tcp", "::1", 0), ("udp", "::1", 0), ("udp", NOT_HERE_V6, 0)]
    batch *= 100 // len(batch) + 1
    data = b"".join(wire_request(*r) for r in batch)
    first: tuple[list[int], int] | None = None
    total = 0
    while total < 3000:
        creator.sock.sendall(data)
        for request in batch:
            answer = read_answer(creator.sock)
            if request[1] in (NOT_HERE_V4, NOT_HERE_V6):
                assert answer == error(b"B", errno.EADDRNOTAVAIL)
            else:
                assert_socket(answer, *request)
        total += len(batch)
        counts = creator_fds(creator), fd_count()
        if first is None:
            first = counts
            assert first[0] == [0, 1, 2]
        assert counts == first
    creator.sock.sendall(b"T")
    assert creator.wait() == EXIT_OK


# --- Start: stdio and options ------------------------------------------------------


def _stdio_pipes(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    for fd in (r, w, out_r, out_w):
        stack.callback(os.close, fd)
    os.write(w, b"T")

    def nothing_read_or_written() -> None:
        os.set_blocking(out_r, False)
        with pytest.raises(BlockingIOError):
            os.read(out_r, 64)  # nothing in it (and we still hold the write end)
        assert os.read(r, 64) == b"T"  # the 'T' we queued was never read

    return r, out_w, nothing_read_or_written


def _stdio_two_sockets(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
    a_ours, a_theirs = socket.socketpair()
    b_ours, b_theirs = socket.socketpair()
    for s in (a_ours, a_theirs, b_ours, b_theirs):
        stack.enter_context(s)
    a_ours.sendall(b"T")

    def nothing_read_or_written() -> None:
        a_theirs.close()
        b_theirs.close()
        assert read_to_end(a_ours) == (b"", 0, "RESET")  # the 'T' was left unread
        assert read_to_end(b_ours) == (b"", 0, "EOF")

    return a_theirs.fileno(), b_theirs.fileno(), nothing_read_or_written


def _stdio_one_socket(
    kind: socket.SocketKind,
) -> Callable[[ExitStack], tuple[int, int, Callable[[], None]]]:
    def make(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        stack.enter_context(ours)
        stack.enter_context(theirs)
        ours.send(b"T")
        ours.settimeout(10)

        def nothing_read_or_written() -> None:
            theirs.close()
            if kind == socket.SOCK_DGRAM:  # no EOF here: just nothing queued
                ours.setblocking(False)
                with pytest.raises(BlockingIOError):
                    ours.recv(64)
            else:  # nothing written, and the 'T' left unread
                assert read_to_end(ours) == (b"", 0, "RESET")

        return theirs.fileno(), theirs.fileno(), nothing_read_or_written

    return make


def _stdio_inet(
    kind: socket.SocketKind,
) -> Callable[[ExitStack], tuple[int, int, Callable[[], None]]]:
    def make(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
        if kind == socket.SOCK_DGRAM:
            theirs = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            theirs.bind(("127.0.0.1", 0))
            ours = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            ours.connect(theirs.getsockname())
            theirs.connect(ours.getsockname())
        else:
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            ours = stack.enter_context(socket.create_connection(listener.getsockname()))
            theirs = stack.enter_context(listener.accept()[0])
        ours.settimeout(10)

        def nothing_read_or_written() -> None:
            theirs.close()
            if kind == socket.SOCK_DGRAM:
                ours.setblocking(False)
                with pytest.raises(BlockingIOError):
                    ours.recv(64)
            else:
                assert ours.recv(64) == b""

        return theirs.fileno(), theirs.fileno(), nothing_read_or_written

    return make


def _stdio_socket_and_pipe(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
    ours, theirs = socket.socketpair()
    stack.enter_context(ours)
    stack.enter_context(theirs)
    out_r, out_w = os.pipe()
    stack.callback(os.close, out_r)
    stack.callback(os.close, out_w)
    ours.sendall(b"T")

    def nothing_read_or_written() -> None:
        theirs.close()
        os.set_blocking(out_r, False)
        with pytest.raises(BlockingIOError):
            os.read(out_r, 64)
        assert read_to_end(ours) == (b"", 0, "RESET")  # the 'T' was left unread

    return theirs.fileno(), out_w, nothing_read_or_written


def _stdio_devnull(stack: ExitStack) -> tuple[int, int, Callable[[], None]]:
    f = stack.enter_context(open(os.devnull, "r+b"))  # noqa: SIM115
    return f.fileno(), f.fileno(), lambda: None


@pytest.mark.parametrize(
    "make",
    [
        _stdio_pipes,
        _stdio_two_sockets,
        _stdio_one_socket(socket.SOCK_DGRAM),
        _stdio_one_socket(socket.SOCK_SEQPACKET),
        _stdio_inet(socket.SOCK_DGRAM),
        _stdio_inet(socket.SOCK_STREAM),
        _stdio_socket_and_pipe,
        _stdio_devnull,
    ],
    ids=[
        "pipes",
        "two-unix-sockets",
        "unix-datagram",
        "unix-seqpacket",
        "udp-socket",
        "tcp-socket",
        "socket-and-pipe",
        "devnull",
    ],
)
def test_stdio_not_one_unix_stream_socket_exits_14(
    make: Callable[[ExitStack], tuple[int, int, Callable[[], None]]],
) -> None:
    with ExitStack() as stack:
        stdin, stdout, nothing_read_or_written = make(stack)
        proc = subprocess.run(
            ALLOW_ALL, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env={}, timeout=30
        )
        assert proc.returncode == EXIT_START
        assert one_line(proc.stderr.decode()), proc.stderr
        nothing_read_or_written()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--allow", "garbage"],
        ["--allow"],
        ["--allow", "tcp:127.0.0.1"],
        ["--allow", "tcp:127.0.0.1:"],
        ["--allow", "sctp:127.0.0.1:80"],
        ["--allow", "tcp:localhost:80"],
        ["--allow", "tcp:[::1:80"],
        ["--allow", "tcp:::1:80"],
        ["--allow", "tcp:127.0.0.1:80-70"],
        ["--allow", "tcp:127.0.0.1:65536"],
        ["--allow", "tcp:127.0.0.1:+80"],
        ["--allow", "tcp:127.0.0.1:\uff18\uff10"],
        ["--allow-all", "--allow", "tcp:*:80"],
        ["--allow-all", "--bogus"],
        ["--allow-all", "extra"],
        ["--allow-all", "--uid", "0"],
        ["--allow-all", "--gid", "0"],
        ["--allow-all", "--uid", "x", "--gid", "0"],
        ["--allow-all", "--uid", "-1", "--gid", "-1"],
        ["--allow-all", "--no-harden", "--uid", "65534", "--gid", "65534"],
        ["--allow-all", "--parent", "0"],
        ["--allow-all", "--parent", "x"],
    ],
)
def test_bad_options_exit_14(args: list[str]) -> None:
    with RawCreator(creator_argv(*args)) as c:
        try:
            c.sock.sendall(wire_request("tcp", "127.0.0.1", 0))
            unread = "RESET"  # queued: exiting without reading it resets the channel
        except BrokenPipeError:  # it was quicker than us
            unread = "EOF"
        assert c.wait() == EXIT_START
        assert one_line(c.stderr_text()), c.stderr_text()
        assert read_to_end(c.sock) == (b"", 0, unread)  # nothing written, nothing read


def test_exit_14_on_bad_stdio_comes_before_option_errors() -> None:
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            creator_argv("--allow", "garbage"), stdin=r, stdout=w, stderr=subprocess.PIPE, env={}
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == EXIT_START
    assert one_line(proc.stderr.decode()) and b"socket" in proc.stderr


# --- Policy ------------------------------------------------------------------------

RULES = [
    "tcp:127.0.0.1:0",
    "udp:*:0",
    f"*:{NOT_HERE_V4}:7000-7010",
    f"tcp:[{NOT_HERE_V6}]:5353",
    "*:*:65535",
]
OK, NOT_HERE, DENIED = "S", errno.EADDRNOTAVAIL, errno.EPERM
# An allowed request the kernel refuses (EADDRNOTAVAIL) proves it passed the
# policy just as well as a socket does, on ports that need not be free.
POLICY_CASES: list[tuple[tuple[str, str, int], object]] = [
    (("tcp", "127.0.0.1", 0), OK),
    (("udp", "127.0.0.1", 0), OK),
    (("udp", "127.0.0.7", 0), OK),
    (("tcp", "127.0.0.2", 0), DENIED),
    (("tcp", "127.0.0.1", 1), DENIED),
    (("tcp", NOT_HERE_V4, 7000), NOT_HERE),
    (("udp", NOT_HERE_V4, 7005), NOT_HERE),
    (("tcp", NOT_HERE_V4, 7010), NOT_HERE),
    (("udp", NOT_HERE_V4, 6999), DENIED),
    (("tcp", NOT_HERE_V4, 7011), DENIED),
    (("tcp", "192.0.2.2", 7005), DENIED),
    (("udp", "192.0.2.9", 65535), NOT_HERE),
    (("udp", "192.0.2.9", 65534), DENIED),
]
POLICY_CASES_V6: list[tuple[tuple[str, str, int], object]] = [
    (("udp", "::1", 0), OK),
    (("tcp", "::1", 0), DENIED),
    (("tcp", "::ffff:127.0.0.1", 0), DENIED),  # not the IPv4 rule's address
    (("tcp", NOT_HERE_V6, 5353), NOT_HERE),
    (("udp", NOT_HERE_V6, 5353), DENIED),
    (("tcp", "2001:db8::2", 5353), DENIED),
    (("tcp", NOT_HERE_V6, 5354), DENIED),
    (("tcp", "2001:db8::9", 65535), NOT_HERE),
]


@pytest.mark.parametrize("harden", [True, False], ids=["hardened", "no-harden"])
def test_policy(harden: bool) -> None:
    args = [a for rule in RULES for a in ("--allow", rule)]
    cases = POLICY_CASES + (POLICY_CASES_V6 if _has_ipv6_loopback() else [])
    with RawCreator(creator_argv(*args, *([] if harden else ["--no-harden"]))) as c:
        for request, expected in cases:
            if expected == OK:
                assert_socket(c.request(*request), *request)
            else:
                c.sock.sendall(wire_request(*request))
                raw = c.sock.recv(64)
                while len(raw) < 2 + WIRE_INT.size:
                    raw += c.sock.recv(64)
                assert raw == b"EB" + struct.pack("@i", expected), request
        # Pipelined, too: a denial does not disturb the answers around it.
        c.sock.sendall(b"".join(wire_request(*r) for r, _ in cases))
        for request, expected in cases:
            answer = read_answer(c.sock)
            if expected == OK:
                assert_socket(answer, *request)
            else:
                assert answer == error(b"B", expected), request
        c.sock.sendall(b"T")
        assert c.wait() == EXIT_OK
        denied = [r for r, expected in cases if expected == DENIED] * 2
        lines = c.stderr_text().splitlines()
        assert len(lines) == len(denied), lines
        for (proto, host, port), line in zip(denied, lines, strict=True):
            assert "denied" in line and proto in line and host in line and str(port) in line


def test_policy_denial_does_not_create_a_socket() -> None:
    """A denied request never reaches socket(): with no descriptor free it
    would otherwise answer 'E' 'S' EMFILE, not EPERM."""
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs resource.prlimit")
    with RawCreator(creator_argv("--allow", "udp:127.0.0.1:0")) as c:
        assert_socket(c.request("udp", "127.0.0.1", 0), "udp", "127.0.0.1")
        old = resource.prlimit(c.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(c.pid, resource.RLIMIT_NOFILE, (3, old[1]))  # soft limit only
        try:
            assert c.request("tcp", "127.0.0.1", 0) == error(b"B", errno.EPERM)
            assert c.request("udp", "127.0.0.1", 0) == error(b"S", errno.EMFILE)
        finally:
            resource.prlimit(c.pid, resource.RLIMIT_NOFILE, old)
