"""The blocking client, SocketCreator: against the real creator where it can
be, and against a scripted fake creator (tests/fakepeer.py) for the paths a
correct creator never takes.  Real processes, real sockets, real descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import creator_argv, fd_count, requires_linux
from fakepeer import FakePeer, PeerIO, fake_creator_command

from sockcreator import (
    CreatorError,
    CreatorFatalError,
    Request,
    SocketCreationError,
    SocketCreator,
    make_request,
)
from sockcreator.client._protocol import INT

pytestmark = requires_linux


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback()
requires_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def assert_reaped(pid: int) -> None:
    """Our child ``pid`` has been waited for: no zombie left behind."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not os.path.exists(f"/proc/{pid}")


def wait_gone(pid: int, bound: float = 20.0) -> None:
    """Poll until ``pid`` has exited (generous bound, not a timing assertion)."""
    deadline = time.monotonic() + bound
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running after {bound}s"
        time.sleep(0.02)


def free_port(kind: socket.SocketKind, host: str) -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def settle(c: SocketCreator) -> None:
    """Return once the creator has closed its copy of every socket it sent.

    The creator closes its copy just after sending it, so right after a
    get_socket() its descriptor count may still include it.  It reads the
    next request only after closing; so once a request that fails (no
    descriptor) is answered, the count is exact."""
    with pytest.raises(SocketCreationError):
        c.get_socket("udp", "192.0.2.1", 0)  # TEST-NET-1: not ours, cannot bind


def creator_fds(c: SocketCreator) -> int:
    assert c.pid is not None
    settle(c)
    return fd_count(c.pid)


def check_socket(sock: socket.socket, req: Request) -> None:
    """``sock`` is exactly what ``req`` asked for: bound, not listening, cloexec."""
    assert sock.family == req.family
    assert sock.type == req.type
    host, port = sock.getsockname()[:2]
    assert ipaddress.ip_address(host) == req.address
    if req.port:
        assert port == req.port
    else:
        assert port != 0  # bound to an ephemeral port
    assert not sock.get_inheritable()
    assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    if req.family == socket.AF_INET6:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    if req.type == socket.SOCK_STREAM:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    assert sock.gettimeout() is None  # blocking, as sockets are made


@pytest.fixture
def creator() -> Iterator[SocketCreator]:
    with SocketCreator(timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def shared() -> Iterator[SocketCreator]:
    with SocketCreator(timeout=10) as c:
        yield c


@contextlib.contextmanager
def fake(
    script: Callable[[PeerIO], None] | None = None, timeout: float = 5.0
) -> Iterator[tuple[SocketCreator, FakePeer]]:
    """A client on a FakePeer; the channel is closed and the peer joined after."""
    with FakePeer(script) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=timeout)
        try:
            yield c, peer
        finally:
            with contextlib.suppress(CreatorFatalError):
                c.terminate()


# --- get_socket: every accepted form, the socket exactly as asked ---------------


FORMS = [
    ("tcp", "127.0.0.1"),
    ("udp", "127.0.0.1"),
    ("TCP", "127.0.0.1"),
    ("Udp", "127.0.0.1"),
    (socket.SOCK_STREAM, "127.0.0.1"),
    (socket.SOCK_DGRAM, "127.0.0.1"),
    ("tcp", ipaddress.IPv4Address("127.0.0.1")),
    ("udp", ipaddress.IPv4Address("127.0.0.2")),
    ("tcp", "0.0.0.0"),
    pytest.param("tcp", "::1", marks=requires_ipv6),
    pytest.param("udp", "::1", marks=requires_ipv6),
    pytest.param(socket.SOCK_DGRAM, ipaddress.IPv6Address("::1"), marks=requires_ipv6),
    pytest.param("TCP", ipaddress.IPv6Address("::"), marks=requires_ipv6),
    pytest.param("udp", "::", marks=requires_ipv6),
]


@pytest.mark.parametrize(("proto", "address"), FORMS)
@pytest.mark.parametrize("specific_port", [False, True], ids=["port0", "port"])
def test_get_socket_forms(
    shared: SocketCreator,
    proto: str | int,
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    specific_port: bool,
) -> None:
    req0 = make_request(proto, address, 0)
    port = free_port(req0.type, str(req0.address)) if specific_port else 0
    with shared.get_socket(proto, address, port) as s:
        check_socket(s, make_request(proto, address, port))


def test_tcp_socket_is_usable(creator: SocketCreator) -> None:
    with creator.get_socket("tcp", "127.0.0.1", 0) as srv:
        srv.listen()
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def test_udp_socket_is_usable(creator: SocketCreator) -> None:
    with (
        creator.get_socket("udp", "127.0.0.1", 0) as srv,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli,
    ):
        cli.sendto(b"dns?", srv.getsockname())
        data, peer = srv.recvfrom(16)
        assert data == b"dns?"
        assert peer[1] == cli.getsockname()[1]


def test_returned_socket_not_inherited_by_children(creator: SocketCreator) -> None:
    code = textwrap.dedent(
        """
        import os, sys
        try:
            print(os.fstat(int(sys.argv[1])).st_ino == int(sys.argv[2]))
        except OSError:
            print(False)
        """
    )
    with creator.get_socket("udp", "127.0.0.1", 0) as s:
        ino = os.fstat(s.fileno()).st_ino
        argv = [sys.executable, "-c", code, str(s.fileno()), str(ino)]
        out = subprocess.run(argv, capture_output=True, close_fds=False, check=True)
        assert out.stdout == b"False\n"


def test_pid_and_repr(creator: SocketCreator) -> None:
    assert isinstance(creator.pid, int)
    assert alive(creator.pid)
    assert str(creator.pid) in repr(creator)


# --- bad arguments: raised before anything is sent -------------------------------

BAD_CALLS: list[tuple[tuple[object, ...], type[Exception]]] = [
    (("sctp", "127.0.0.1", 0), ValueError),
    (("", "127.0.0.1", 0), ValueError),
    ((socket.SOCK_RAW, "127.0.0.1", 0), ValueError),
    ((True, "127.0.0.1", 0), TypeError),
    ((None, "127.0.0.1", 0), TypeError),
    (("tcp", "localhost", 0), ValueError),
    (("tcp", "300.1.1.1", 0), ValueError),
    (("tcp", "fe80::1%lo", 0), ValueError),
    (("tcp", b"127.0.0.1", 0), TypeError),
    (("tcp", 0x7F000001, 0), TypeError),
    (("tcp", "127.0.0.1", -1), ValueError),
    (("tcp", "127.0.0.1", 65536), ValueError),
    (("tcp", "127.0.0.1", "53"), TypeError),
    (("tcp", "127.0.0.1", 53.0), TypeError),
    (("tcp", "127.0.0.1", True), TypeError),
]


def test_bad_arguments_send_nothing() -> None:
    good = make_request("udp", "127.0.0.1", 0)
    with fake() as (c, peer):
        for args, exc in BAD_CALLS:
            with pytest.raises(exc):
                c.get_socket(*args)  # type: ignore[arg-type]
            with pytest.raises(exc):
                c.get_sockets([("udp", "127.0.0.1", 0), args])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            c.get_sockets([("udp", "127.0.0.1")])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            c.get_sockets(["udp:127.0.0.1:0"])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            c.get_sockets([good, 5])  # type: ignore[list-item]
        assert c.get_sockets([]) == []
        with c.get_socket("udp", "127.0.0.1", 0) as s:  # still usable
            check_socket(s, good)
        c.terminate()
        peer.join()
    assert peer.received == good.encode() + b"T"  # nothing else ever went out


def test_bad_arguments_real_creator_stays_usable(creator: SocketCreator) -> None:
    for args, exc in BAD_CALLS:
        with pytest.raises(exc):
            creator.get_socket(*args)  # type: ignore[arg-type]
    with creator.get_socket("tcp", "127.0.0.1", 0) as s:
        check_socket(s, make_request("tcp", "127.0.0.1", 0))


def _children() -> set[int]:
    me = os.getpid()
    kids: set[int] = set()
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as f:
            kids |= {int(p) for p in f.read().split()}
    return kids


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.0}, ValueError),
        ({"command": []}, ValueError),
        ({"command": "/bin/cat"}, TypeError),
        ({"command": ["/bin/cat"], "allow": ["tcp:*:80"]}, ValueError),
        ({"allow": "tcp:*:80"}, TypeError),
        ({"allow": []}, ValueError),
        ({"command": ["/nonexistent/creator"]}, FileNotFoundError),
    ],
)
def test_bad_constructor_arguments_start_nothing(kwargs: dict[str, object], exc: type) -> None:
    fds, kids = fd_count(), _children()
    with pytest.raises(exc):
        SocketCreator(**kwargs)  # type: ignore[arg-type]
    assert fd_count() == fds
    assert _children() == kids


# --- SocketCreationError -----------------------------------------------------------


def test_bind_failure_real(creator: SocketCreator) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SocketCreationError) as info:
            creator.get_socket("tcp", "127.0.0.1", port)
    e = info.value
    assert e.errno == errno.EADDRINUSE
    assert e.strerror == os.strerror(errno.EADDRINUSE)
    assert e.stage == "bind"
    assert e.request == make_request("tcp", "127.0.0.1", port)
    assert isinstance(e, OSError)
    assert isinstance(e, CreatorError)
    assert not isinstance(e, CreatorFatalError)
    assert str(port) in str(e)
    with creator.get_socket("tcp", "127.0.0.1", port) as s:  # usable; port free now
        check_socket(s, make_request("tcp", "127.0.0.1", port))


def test_policy_denial_is_permission_error() -> None:
    with SocketCreator(allow=["tcp:127.0.0.1:0-65535"]) as c:
        with c.get_socket("tcp", "127.0.0.1", 0) as s:
            check_socket(s, make_request("tcp", "127.0.0.1", 0))
        with pytest.raises(PermissionError) as info:
            c.get_socket("udp", "127.0.0.1", 0)
        e = info.value
        assert isinstance(e, SocketCreationError)
        assert isinstance(e, CreatorError)
        assert e.errno == errno.EPERM
        assert e.stage == "bind"
        assert e.request == make_request("udp", "127.0.0.1", 0)
        with pytest.raises(PermissionError):
            c.get_socket("tcp", "127.0.0.2", 0)
        with c.get_socket("tcp", "127.0.0.1", 0) as s:
            check_socket(s, make_request("tcp", "127.0.0.1", 0))


@pytest.mark.parametrize(
    ("err", "builtin"),
    [
        (errno.EACCES, PermissionError),
        (errno.EPERM, PermissionError),
        (errno.EADDRINUSE, OSError),
        (errno.EADDRNOTAVAIL, OSError),
        (errno.EAFNOSUPPORT, OSError),
        (errno.ENOENT, FileNotFoundError),
        (errno.EINTR, InterruptedError),
        (errno.ECONNREFUSED, ConnectionRefusedError),
        (0, OSError),
        (99999, OSError),
    ],
)
@pytest.mark.parametrize("stage", ["S", "B"])
def test_error_answers_via_fake(err: int, builtin: type[OSError], stage: str) -> None:
    req = make_request("udp", "127.0.0.1", 5353)

    def script(p: PeerIO) -> None:
        assert p.read_request() == req
        p.send_error(stage, err)
        p.serve()

    with fake(script) as (c, _):
        with pytest.raises(SocketCreationError) as info:
            c.get_socket("udp", "127.0.0.1", 5353)
        e = info.value
        assert isinstance(e, builtin)
        assert isinstance(e, OSError)
        assert isinstance(e, CreatorError)
        assert type(OSError(err, "")) is OSError or isinstance(e, type(OSError(err, "")))
        assert e.errno == err
        assert e.strerror == os.strerror(err)
        assert e.stage == ("socket" if stage == "S" else "bind")
        assert e.request == req
        with c.get_socket("udp", "127.0.0.1", 0) as s:  # it goes on serving
            check_socket(s, make_request("udp", "127.0.0.1", 0))


def test_permission_error_catchable() -> None:
    def script(p: PeerIO) -> None:
        p.read_request()
        p.send_error("B", errno.EACCES)
        p.serve()

    with fake(script) as (c, _):
        try:
            c.get_socket("tcp", "127.0.0.1", 80)
        except PermissionError as e:
            assert e.errno == errno.EACCES
        else:
            pytest.fail("EACCES did not raise PermissionError")


# --- get_sockets: pipelined, all or nothing -------------------------------------------


def test_get_sockets_pipelined_real(creator: SocketCreator) -> None:
    reqs = [
        make_request("tcp" if i % 2 else "udp", f"127.0.0.{i % 250 + 1}", 0) for i in range(100)
    ]
    socks = creator.get_sockets(reqs)
    try:
        assert len(socks) == len(reqs)
        for s, r in zip(socks, reqs, strict=True):
            check_socket(s, r)
    finally:
        for s in socks:
            s.close()


def test_get_sockets_mixed_forms(creator: SocketCreator) -> None:
    specs = [
        ("tcp", "127.0.0.1", 0),
        make_request("udp", "127.0.0.1", 0),
        (socket.SOCK_DGRAM, ipaddress.ip_address("127.0.0.3"), 0),
    ]
    socks = creator.get_sockets(iter(specs))  # any iterable
    for s, spec in zip(socks, specs, strict=True):
        check_socket(s, spec if isinstance(spec, Request) else make_request(*spec))
        s.close()
    assert len(socks) == 3


def test_get_sockets_really_pipelines() -> None:
    """The fake answers nothing until it has read every request: a client
    that waited for each answer before sending the next would time out."""
    n = 20
    reqs = [make_request("udp", "127.0.0.1", 0) for _ in range(n)]

    def script(p: PeerIO) -> None:
        got = [p.read_request() for _ in range(n)]
        assert got == reqs
        for r in reqs:
            p.send_socket(r)
        p.serve()

    with fake(script, timeout=2) as (c, _):
        socks = c.get_sockets(reqs)
        assert len(socks) == n
        for s in socks:
            check_socket(s, reqs[0])
            s.close()


def test_get_sockets_all_or_nothing_real(creator: SocketCreator) -> None:
    assert creator.pid is not None
    with socket.socket() as busy1, socket.socket() as busy2:
        for b in (busy1, busy2):
            b.bind(("127.0.0.1", 0))
            b.listen()
        p1, p2 = busy1.getsockname()[1], busy2.getsockname()[1]
        reqs = [
            ("udp", "127.0.0.1", 0),
            ("tcp", "127.0.0.1", 0),
            ("tcp", "127.0.0.1", p1),  # the first failure
            ("udp", "127.0.0.2", 0),
            ("tcp", "127.0.0.1", p2),  # a second failure
            ("tcp", "127.0.0.3", 0),
        ]
        mine, theirs = fd_count(), creator_fds(creator)
        for _ in range(20):
            with pytest.raises(SocketCreationError) as info:
                creator.get_sockets(reqs)
            assert info.value.errno == errno.EADDRINUSE
            assert info.value.request == make_request("tcp", "127.0.0.1", p1)
            assert fd_count() == mine, "sockets already received were not closed"
            assert creator_fds(creator) == theirs
    socks = creator.get_sockets(reqs)  # usable afterwards (the ports are free now)
    assert len(socks) == len(reqs)
    for s in socks:
        s.close()


def test_get_sockets_all_or_nothing_fake() -> None:
    reqs = [make_request("udp", "127.0.0.1", 0) for _ in range(6)]
    answers = iter(["S", "S", "EACCES", "S", "EADDRINUSE", "S"])

    def handler(p: PeerIO, req: Request) -> None:
        a = next(answers, "S")
        if a == "S":
            p.send_socket(req)
        else:
            p.send_error("B", getattr(errno, a))

    before = fd_count()
    with fake(lambda p: p.serve(handler)) as (c, peer):
        with pytest.raises(PermissionError) as info:
            c.get_sockets(reqs)
        assert info.value.errno == errno.EACCES
        assert info.value.request is reqs[2]
        with c.get_socket("udp", "127.0.0.1", 0) as s:
            check_socket(s, reqs[0])
    assert fd_count() == before
    assert peer.received == b"".join(r.encode() for r in reqs) + reqs[0].encode() + b"T"


# --- CreatorFatalError via the fake peer ---------------------------------------------


def _other_kind_socket(p: PeerIO, req: Request) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # asked: tcp
        p.send(b"S")
        p.send(b"\0", [s.fileno()])


def _wrong_address_socket(p: PeerIO, req: Request) -> None:
    with p.make_socket(make_request(req.protocol, "127.0.0.2", 0)) as s:
        p.send(b"S")
        p.send(b"\0", [s.fileno()])


def _other_family_socket(p: PeerIO, req: Request) -> None:
    # asked: tcp 127.0.0.1; sent: TCP on ::ffff:127.0.0.1 (the same address as
    # text would differ; as an IPv6 socket it is another family)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::ffff:127.0.0.1", 0))
        p.send(b"S")
        p.send(b"\0", [s.fileno()])


def _unix_socket(p: PeerIO, req: Request) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        p.send(b"S")
        p.send(b"\0", [s.fileno()])


def _not_a_socket(p: PeerIO, req: Request) -> None:
    r, w = os.pipe()
    try:
        p.send(b"S")
        p.send(b"\0", [r])
    finally:
        os.close(r)
        os.close(w)


def _two_fds(p: PeerIO, req: Request) -> None:
    with p.make_socket(req) as a, p.make_socket(req) as b:
        p.send(b"S")
        p.send(b"\0", [a.fileno(), b.fileno()])


def _many_fds(p: PeerIO, req: Request) -> None:  # more than the client's buffer holds
    socks = [p.make_socket(req) for _ in range(12)]
    try:
        p.send(b"S")
        p.send(b"\0", [s.fileno() for s in socks])
    finally:
        for s in socks:
            s.close()


def _fd_on_status_byte(p: PeerIO, req: Request) -> None:
    with p.make_socket(req) as s:
        p.send(b"S", [s.fileno()])
        p.send(b"\0", [s.fileno()])


def _fd_on_error(p: PeerIO, req: Request) -> None:
    with p.make_socket(req) as s:
        p.send(b"E", [s.fileno()])
        p.send(b"B" + INT.pack(1))


def _send(data: bytes) -> Callable[[PeerIO, Request], None]:
    return lambda p, req: p.send(data)


def _silent(p: PeerIO, req: Request) -> None:
    p.read_until_eof()


FATAL_ANSWERS: dict[str, tuple[Callable[[PeerIO, Request], None], str | None]] = {
    "eof": (lambda p, req: None, None),  # the "eof-" cases hang up after answering
    "eof-mid-error": (_send(b"EB\0"), None),
    "eof-after-S": (_send(b"S"), None),
    "eof-after-S-and-byte": (_send(b"S\0"), None),
    "unknown-answer": (_send(b"X"), None),
    "lowercase-s": (_send(b"s"), None),
    "unknown-cause": (_send(b"EX" + INT.pack(1)), None),
    "S-no-fd": (_send(b"S\0"), None),
    "S-two-fds": (_two_fds, None),
    "S-many-fds": (_many_fds, None),
    "fd-on-status-byte": (_fd_on_status_byte, None),
    "fd-on-error": (_fd_on_error, None),
    "F-I": (_send(b"FI"), "I"),
    "F-other": (_send(b"FZ"), "Z"),
    "wrong-kind": (_other_kind_socket, None),
    "wrong-address": (_wrong_address_socket, None),
    "unix-socket": (_unix_socket, None),
    "not-a-socket": (_not_a_socket, None),
    "silence": (_silent, None),
}

if HAS_IPV6:
    FATAL_ANSWERS["wrong-family"] = (_other_family_socket, None)


@pytest.mark.parametrize("case", list(FATAL_ANSWERS))
def test_fatal_answers(case: str) -> None:
    answer, condition = FATAL_ANSWERS[case]

    def script(p: PeerIO) -> None:
        req = p.read_request()
        assert isinstance(req, Request)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            answer(p, req)  # the client may hang up before all of it is sent
        # Stay until the client hangs up: the client must detect the fault
        # itself, not by seeing EOF (except in the "eof" cases).
        if not case.startswith("eof"):
            p.read_until_eof()

    before = fd_count()
    with FakePeer(script) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=0.3)
        assert c.pid is None
        with pytest.raises(CreatorFatalError) as info:
            c.get_socket("tcp", "127.0.0.1", 0)
        e = info.value
        assert isinstance(e, CreatorError)
        assert not isinstance(e, OSError)
        assert e.condition == condition
        assert e.exit_status is None
        assert "exit status" not in str(e)
        if case == "silence":
            assert "0.3" in str(e)
        # Dead for good, at once; terminate is a no-op now.
        for _ in range(2):
            with pytest.raises(CreatorFatalError):
                c.get_socket("tcp", "127.0.0.1", 0)
            with pytest.raises(CreatorFatalError):
                c.get_sockets([("udp", "127.0.0.1", 0)])
            c.terminate()
        peer.join()  # the client hung up: the peer saw EOF
        assert peer.received == make_request("tcp", "127.0.0.1", 0).encode()
    assert fd_count() == before, "a received descriptor leaked"


def test_fatal_in_the_middle_of_a_batch_closes_everything() -> None:
    reqs = [make_request("udp", "127.0.0.1", 0) for _ in range(5)]
    answers = iter([PeerIO.send_socket, PeerIO.send_socket, _two_fds, PeerIO.send_socket])

    def script(p: PeerIO) -> None:
        for _ in range(4):
            req = p.read_request()
            assert isinstance(req, Request)
            next(answers)(p, req)
        p.read_until_eof()

    before = fd_count()
    with FakePeer(script) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=2)
        with pytest.raises(CreatorFatalError):
            c.get_sockets(reqs)
        peer.join()
    assert fd_count() == before


def test_data_instead_of_eof_after_T() -> None:
    def script(p: PeerIO) -> None:
        p.serve()  # returns on 'T'
        p.send(b"S")
        p.read_until_eof()

    before = fd_count()
    with FakePeer(script) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=2)
        c.get_socket("udp", "127.0.0.1", 0).close()
        with pytest.raises(CreatorFatalError, match="instead of closing"):
            c.terminate()
        c.terminate()  # idempotent even after that
        with pytest.raises(CreatorFatalError):
            c.get_socket("udp", "127.0.0.1", 0)
        peer.join()
    assert fd_count() == before


def test_terminate_fake_peer_already_gone() -> None:
    """A peer that is gone before 'T' is the end we wanted, not an error."""
    with FakePeer(lambda p: None) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=2)
        peer.join()
        c.terminate()
        c.terminate()
        with pytest.raises(CreatorFatalError):
            c.get_socket("udp", "127.0.0.1", 0)


def test_timeout_is_per_silence_not_per_call() -> None:
    """A slow but live creator within the timeout is fine."""

    def handler(p: PeerIO, req: Request) -> None:
        p.send(b"E")
        time.sleep(0.1)
        p.send(b"B")
        time.sleep(0.1)
        p.send(INT.pack(errno.EACCES))

    with fake(lambda p: p.serve(handler), timeout=2.0) as (c, _), pytest.raises(PermissionError):
        c.get_socket("udp", "127.0.0.1", 0)


# --- CreatorFatalError with a fake creator process we started ------------------------


def _started(code: str, timeout: float = 5.0) -> SocketCreator:
    return SocketCreator(command=fake_creator_command(code), timeout=timeout)


def test_fatal_message_has_exit_status() -> None:
    c = _started("read(9); sock.close(); os._exit(7)")
    pid = c.pid
    assert pid is not None
    with pytest.raises(CreatorFatalError) as info:
        c.get_socket("udp", "127.0.0.1", 0)
    assert info.value.exit_status == 7
    assert "exit status 7" in str(info.value)
    assert_reaped(pid)
    with pytest.raises(CreatorFatalError):
        c.get_socket("udp", "127.0.0.1", 0)
    c.terminate()


def test_exit_with_unread_input_is_a_fatal_error() -> None:
    # The peer exits without reading: ECONNRESET on our side, not EOF.
    c = _started("os._exit(3)")
    pid = c.pid
    assert pid is not None
    wait_gone(pid)
    with pytest.raises(CreatorFatalError) as info:
        c.get_sockets([("udp", "127.0.0.1", 0)] * 3)
    assert info.value.exit_status == 3
    assert_reaped(pid)


@pytest.mark.parametrize(
    ("code", "condition"),
    [
        ("read(9); send(b'X'); time.sleep(60)", None),
        ("read(9); send(b'FI'); time.sleep(60)", "I"),
        ("read(9); send(b'S\\0'); time.sleep(60)", None),
        ("read(9); time.sleep(60)", None),  # silence
    ],
    ids=["unknown-answer", "F", "S-no-fd", "silence"],
)
def test_misbehaving_creator_is_killed_and_reaped(code: str, condition: str | None) -> None:
    before = fd_count()
    c = _started(code, timeout=0.3)
    pid = c.pid
    assert pid is not None
    with pytest.raises(CreatorFatalError) as info:
        c.get_socket("udp", "127.0.0.1", 0)
    assert info.value.condition == condition
    assert info.value.exit_status == -signal.SIGKILL
    assert f"exit status {-signal.SIGKILL}" in str(info.value)
    assert_reaped(pid)
    with pytest.raises(CreatorFatalError):
        c.get_socket("udp", "127.0.0.1", 0)
    c.terminate()
    assert fd_count() == before


@pytest.mark.parametrize("bad", [b"X", b"SX", b"ST5", b"s"])
def test_real_creator_F_I_reaches_the_client(bad: bytes) -> None:
    """Our real creator, fed a bad command before the client takes over the
    channel, answers 'F' 'I'; the client raises it with .condition "I"."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        proc = subprocess.Popen(creator_argv("--allow-all"), stdin=theirs, stdout=theirs, env={})
    try:
        ours.sendall(bad)
        c = SocketCreator.from_socket(ours, timeout=5)
        with pytest.raises(CreatorFatalError) as info:
            c.get_socket("udp", "127.0.0.1", 0)
        assert info.value.condition == "I"
        assert info.value.exit_status is None  # we did not start it
        assert proc.wait(10) == 12  # EXIT_PROTOCOL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fatal_error_after_creator_died(creator: SocketCreator) -> None:
    pid = creator.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    with pytest.raises(CreatorFatalError) as info:
        creator.get_socket("udp", "127.0.0.1", 0)
    assert info.value.exit_status == -signal.SIGKILL
    assert_reaped(pid)
    creator.terminate()


# --- terminate ----------------------------------------------------------------------


def test_terminate_reaps_and_is_idempotent() -> None:
    before = fd_count()
    c = SocketCreator()
    pid = c.pid
    assert pid is not None
    c.get_socket("udp", "127.0.0.1", 0).close()
    c.terminate()
    assert_reaped(pid)
    c.terminate()
    c.close()
    with pytest.raises(CreatorFatalError):
        c.get_socket("udp", "127.0.0.1", 0)
    assert fd_count() == before
    assert "terminated" in repr(c)


def test_context_manager() -> None:
    before = fd_count()
    with SocketCreator() as c:
        pid = c.pid
        assert pid is not None
        assert alive(pid)
    assert_reaped(pid)
    with pytest.raises(CreatorFatalError):
        c.get_socket("udp", "127.0.0.1", 0)
    assert fd_count() == before


def test_context_manager_on_exception() -> None:
    with pytest.raises(RuntimeError), SocketCreator() as c:
        pid = c.pid
        raise RuntimeError("boom")
    assert pid is not None
    assert_reaped(pid)


def test_terminate_sends_T_and_closes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    c = _started(
        f"""
        serve_one()
        rest = read(1)
        with open({str(log)!r}, "wb") as f:
            f.write(rest)
        os._exit(0)
        """
    )
    pid = c.pid
    assert pid is not None
    c.get_socket("tcp", "127.0.0.1", 0).close()
    c.terminate()
    assert_reaped(pid)
    assert log.read_bytes() == b"T"


def test_terminate_kills_a_creator_that_ignores_T() -> None:
    before = fd_count()
    c = _started("time.sleep(60)", timeout=0.3)
    pid = c.pid
    assert pid is not None
    with pytest.raises(CreatorFatalError, match="did not exit") as info:
        c.terminate()
    assert info.value.exit_status == -signal.SIGKILL
    assert_reaped(pid)
    c.terminate()  # idempotent
    assert fd_count() == before


def test_terminate_kills_a_creator_that_reads_T_but_stays() -> None:
    c = _started("assert read(1) == b'T'; time.sleep(60)", timeout=0.3)
    pid = c.pid
    assert pid is not None
    with pytest.raises(CreatorFatalError) as info:
        c.terminate()
    assert info.value.exit_status == -signal.SIGKILL
    assert_reaped(pid)


# --- the creator process ---------------------------------------------------------------


def test_own_process_group_and_empty_environment(creator: SocketCreator) -> None:
    pid = creator.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert os.getpgid(pid) != os.getpgid(0)
    with open(f"/proc/{pid}/environ", "rb") as f:
        assert f.read() == b""


def test_command_creator_also_isolated() -> None:
    with _started("serve_one(); time.sleep(60)") as c:
        pid = c.pid
        assert pid is not None
        assert os.getpgid(pid) == pid
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f.read() == b""
        c.get_socket("udp", "127.0.0.1", 0).close()
        with pytest.raises(CreatorFatalError):
            c.terminate()  # the fake never reads 'T'


def test_ctrl_c_does_not_reach_the_creator() -> None:
    """SIGINT to the client's process group (what a terminal's Ctrl-C does)
    leaves the creator alive: the client, in a group of its own, asks for a
    socket after the signal was sent, which a killed creator could not give."""
    code = textwrap.dedent(
        """
        import signal, sys
        from sockcreator import SocketCreator
        signal.signal(signal.SIGINT, lambda *a: None)
        c = SocketCreator()
        c.get_socket("udp", "127.0.0.1", 0).close()
        print(c.pid, flush=True)
        sys.stdin.readline()
        c.get_socket("udp", "127.0.0.1", 0).close()
        print("ok", flush=True)
        c.terminate()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        pid = int(child.stdout.readline())
        assert os.getpgid(pid) != child.pid
        os.killpg(child.pid, signal.SIGINT)
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"ok\n"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- thread safety and descriptor accounting ---------------------------------------------


def test_threads_share_one_creator(creator: SocketCreator) -> None:
    assert creator.pid is not None
    n_threads, per_thread = 8, 200
    mine, theirs = fd_count(), creator_fds(creator)
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                proto = "tcp" if (i + t) % 2 else "udp"
                address = f"127.0.{t}.{i % 200 + 1}"
                req = make_request(proto, address, 0)
                if i % 10 == 0:
                    socks = creator.get_sockets([req, req])
                else:
                    socks = [creator.get_socket(proto, address, 0)]
                for s in socks:
                    check_socket(s, req)
                    s.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert fd_count() == mine
    assert creator_fds(creator) == theirs


def test_threads_with_failures_mixed_in(creator: SocketCreator) -> None:
    assert creator.pid is not None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mine, theirs = fd_count(), creator_fds(creator)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(100):
                    if (i + t) % 3 == 0:
                        try:
                            creator.get_socket("tcp", "127.0.0.1", port)
                        except SocketCreationError as e:
                            assert e.errno == errno.EADDRINUSE
                            assert e.request == make_request("tcp", "127.0.0.1", port)
                        else:
                            raise AssertionError("bind to a listening port succeeded")
                    else:
                        with creator.get_socket("udp", "127.0.0.1", 0) as s:
                            check_socket(s, make_request("udp", "127.0.0.1", 0))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert fd_count() == mine
        assert creator_fds(creator) == theirs


def test_descriptor_counts_flat_over_thousands(creator: SocketCreator) -> None:
    assert creator.pid is not None
    creator.get_socket("udp", "127.0.0.1", 0).close()  # warm up
    mine, theirs = fd_count(), creator_fds(creator)
    for i in range(2000):
        with creator.get_socket("udp" if i % 2 else "tcp", "127.0.0.1", 0):
            pass
    assert fd_count() == mine
    assert creator_fds(creator) == theirs
    batch = [("udp", "127.0.0.1", 0), ("tcp", "127.0.0.1", 0)] * 25
    for _ in range(40):
        for s in creator.get_sockets(batch):
            s.close()
    assert fd_count() == mine
    assert creator_fds(creator) == theirs


def test_creator_made_in_a_thread_outlives_the_thread() -> None:
    """A SocketCreator started in a worker thread that then exits keeps working.

    (PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.)"""
    box: list[SocketCreator] = []

    def make() -> None:
        c = SocketCreator()
        c.get_socket("udp", "127.0.0.1", 0).close()  # its start-up is complete
        box.append(c)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    with box[0] as c, c.get_socket("udp", "127.0.0.1", 0) as s:
        check_socket(s, make_request("udp", "127.0.0.1", 0))


def test_creator_made_in_a_thread_after_fork() -> None:
    """In a forked child, a worker thread can still start a creator (the
    parent's spawner thread does not exist there)."""
    code = textwrap.dedent(
        """
        import os, threading
        from sockcreator import SocketCreator

        def use(out):
            with SocketCreator() as c:
                c.get_socket("udp", "127.0.0.1", 0).close()
            out.append("ok")

        def in_thread():
            out = []
            t = threading.Thread(target=use, args=(out,))
            t.start()
            t.join(30)
            return out == ["ok"] and not t.is_alive()

        assert in_thread()  # the parent now has a spawner thread
        pid = os.fork()
        if pid == 0:
            os._exit(0 if in_thread() else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"0\n"


# --- the creator dies with its client ---------------------------------------------------

# A subreaper stands in for init: the creator, orphaned when the process
# holding its client exits, is re-parented to it, so it can wait for the
# creator's exit status (and no zombie is left to an init that may not reap).
_SUBREAPER = """
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl failed")
holder = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True)
if holder.returncode != 0:
    sys.exit(holder.stderr.decode())
pid = int(holder.stdout)
deadline = time.monotonic() + 30  # generous: a bound, not a timing assertion
while True:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print(os.waitstatus_to_exitcode(status))
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("still running")
        break
    time.sleep(0.01)
"""


@pytest.mark.parametrize("harden", [True, False], ids=["hardened", "unhardened"])
@pytest.mark.parametrize("use_it", [False, True], ids=["idle", "used"])
def test_creator_exits_when_client_process_exits(harden: bool, use_it: bool) -> None:
    holder = textwrap.dedent(
        f"""
        import os
        from sockcreator import SocketCreator
        c = SocketCreator(harden={harden})
        if {use_it}:
            c.get_socket("udp", "127.0.0.1", 0)
        print(c.pid, flush=True)
        os._exit(0)  # no terminate(), no finalizers
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", _SUBREAPER, holder], capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    status = out.stdout.decode().strip()
    assert status != "still running", "the creator outlived the process holding its client"
    # EOF on its channel: exit 10.  Hardened, it may be killed by its
    # parent-death signal first (-9), or, if the parent died while it was
    # still starting, fail the hardening's parent check (15).
    allowed = {"10", str(-signal.SIGKILL), "15"} if harden else {"10"}
    assert status in allowed


# --- from_socket / from_environment -----------------------------------------------------


def test_from_socket_pid_is_none_and_works() -> None:
    with fake() as (c, peer):
        assert c.pid is None
        assert "pid=None" in repr(c)
        with c.get_socket("tcp", "127.0.0.1", 0) as s:
            check_socket(s, make_request("tcp", "127.0.0.1", 0))
        c.terminate()
        peer.join()
    assert peer.received.endswith(b"T")


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        (socket.AF_UNIX, socket.SOCK_DGRAM),
        (socket.AF_UNIX, socket.SOCK_SEQPACKET),
        (socket.AF_INET, socket.SOCK_STREAM),
        (socket.AF_INET, socket.SOCK_DGRAM),
    ],
)
def test_from_socket_rejects_other_sockets(family: int, kind: int) -> None:
    with socket.socket(family, kind) as s:
        with pytest.raises(ValueError):
            SocketCreator.from_socket(s)
        assert s.fileno() != -1  # still the caller's


@pytest.mark.parametrize("timeout", [0, -1])
def test_from_socket_rejects_bad_timeout(timeout: float) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        SocketCreator.from_socket(a, timeout=timeout)


def test_from_environment_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOCKCREATOR_FD", raising=False)
    assert SocketCreator.from_environment() is None


def test_from_environment_reads_and_unsets(monkeypatch: pytest.MonkeyPatch) -> None:
    before = fd_count()
    with FakePeer() as peer:
        fd = peer.client_socket.detach()  # the fd now belongs to the environment
        os.set_inheritable(fd, True)  # as an inherited descriptor would be
        monkeypatch.setenv("SOCKCREATOR_FD", str(fd))
        c = SocketCreator.from_environment(timeout=5)
        assert c is not None
        assert "SOCKCREATOR_FD" not in os.environ
        assert not os.get_inheritable(fd)
        assert c.pid is None
        with c.get_socket("udp", "127.0.0.1", 0) as s:
            check_socket(s, make_request("udp", "127.0.0.1", 0))
        c.terminate()
        peer.join()
        assert SocketCreator.from_environment() is None  # unset: a second call finds nothing
    assert fd_count() == before  # the handle owned and closed the descriptor


@pytest.mark.parametrize(
    "value", ["", "abc", "-1", "+5", " 5", "5 ", "3.0", "0x10", "\u0665", "0", "1", "2", "9" * 30]
)
def test_from_environment_rejects_garbage(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOCKCREATOR_FD", value)
    with pytest.raises(ValueError):
        SocketCreator.from_environment()
    assert "SOCKCREATOR_FD" not in os.environ


def test_from_environment_rejects_a_closed_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setenv("SOCKCREATOR_FD", str(r))  # a number that is not open now
    with pytest.raises(ValueError):
        SocketCreator.from_environment()
    assert "SOCKCREATOR_FD" not in os.environ


def test_from_environment_rejects_a_non_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        monkeypatch.setenv("SOCKCREATOR_FD", str(r))
        with pytest.raises(ValueError):
            SocketCreator.from_environment()
    finally:
        os.close(r)
        os.close(w)


def test_from_environment_rejects_a_non_unix_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    before = fd_count()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    monkeypatch.setenv("SOCKCREATOR_FD", str(s.detach()))
    with pytest.raises(ValueError):
        SocketCreator.from_environment()
    assert fd_count() == before  # it took the descriptor, and closed it
