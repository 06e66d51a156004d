"""The creator's 'B' command (for ``sockcreator run --intercept``): bind the
peer's own socket, passed with the command byte.

Driven byte by byte against the real creator, hardened where we can (as
root: seccomp, one uid; otherwise what an unprivileged start allows), with
real sockets made here and passed over SCM_RIGHTS.  Port 0 stands for a
privileged port where the rule is the same: it needs no privilege here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

import pytest
from conftest import IS_ROOT, RawCreator, creator_argv, read_to_end, requires_linux

pytestmark = requires_linux
EXIT_PROTOCOL = 12
INT = struct.Struct("@i")


def b_request(host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (
        b"B"
        + (b"6" if family == socket.AF_INET6 else b"4")
        + struct.pack("!H", port)
        + socket.inet_pton(family, host)
    )


def send_b(c: RawCreator, fds: list[int], host: str, port: int) -> None:
    wire = b_request(host, port)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    c.sock.sendmsg([wire], rights if fds else [])


def answer(c: RawCreator) -> tuple[bytes, int | None]:
    first = c.sock.recv(1)
    if first == b"O":
        return b"O", None
    rest = b""
    while len(rest) < 1 + INT.size:
        chunk = c.sock.recv(1 + INT.size - len(rest))
        assert chunk, f"cut short after {first + rest!r}"
        rest += chunk
    assert first == b"E" and rest[:1] in (b"S", b"B"), first + rest
    return b"E" + rest[:1], INT.unpack(rest[1:])[0]


def ask(c: RawCreator, sock: socket.socket | int, host: str, port: int) -> tuple[bytes, int | None]:
    send_b(c, [sock if isinstance(sock, int) else sock.fileno()], host, port)
    return answer(c)


@pytest.fixture
def creator() -> RawCreator:
    rules = ["--allow", "tcp:127.0.0.1:0", "--allow", "udp:127.0.0.1:0", "--allow",
             "tcp:[::1]:0", "--allow", "tcp:[::]:0"]  # fmt: skip
    with RawCreator(creator_argv(*rules)) as c:
        yield c


def test_binds_the_peers_socket_and_keeps_what_the_peer_set(creator: RawCreator) -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setblocking(False)
            assert ask(creator, s, "127.0.0.1", 0) == (b"O", None)
            host, port = s.getsockname()
            assert host == "127.0.0.1" and port > 0
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_kernel_errors_come_back_as_the_kernel_gave_them(creator: RawCreator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # already bound: EINVAL, from bind() in the creator
        assert ask(creator, s, "127.0.0.1", 0) == (b"EB", errno.EINVAL)
        s.listen(1)
        with socket.socket() as t:  # the port is taken: EADDRINUSE
            want = ("127.0.0.1", s.getsockname()[1])
            send_b(creator, [t.fileno()], *want)
            # (port is not 0: allowed only by the wildcard-port rules below)
            assert answer(creator) == (b"EB", errno.EPERM)
    r, w = os.pipe()
    try:
        assert ask(creator, r, "127.0.0.1", 0) == (b"ES", errno.ENOTSOCK)
    finally:
        os.close(r)
        os.close(w)


def test_address_in_use_and_policy() -> None:
    with RawCreator(creator_argv("--allow", "tcp:127.0.0.1:1-65535")) as c:
        with socket.socket() as held, socket.socket() as s:
            held.bind(("127.0.0.1", 0))
            held.listen(1)
            assert ask(c, s, "127.0.0.1", held.getsockname()[1]) == (b"EB", errno.EADDRINUSE)
        with socket.socket() as s:  # another address than the rule's: EPERM, not bound
            assert ask(c, s, "127.0.0.2", 8080) == (b"EB", errno.EPERM)
            assert s.getsockname() == ("0.0.0.0", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # udp: not allowed
            assert ask(c, s, "127.0.0.1", 8080) == (b"EB", errno.EPERM)
        assert "denied" in c.stderr_text()


def test_only_an_ip_socket_of_the_named_family_and_default_protocol(creator: RawCreator) -> None:
    with socket.socket(socket.AF_INET6) as s:  # the request says IPv4
        assert ask(creator, s, "127.0.0.1", 0) == (b"ES", errno.EPERM)
    with socket.socket(socket.AF_UNIX) as s:
        assert ask(creator, s, "127.0.0.1", 0) == (b"ES", errno.EPERM)
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)  # IPPROTO_MPTCP
    except OSError:
        raw = None
    if raw is not None:
        with raw:
            assert ask(creator, raw, "127.0.0.1", 0) == (b"ES", errno.EPERM)


def test_ipv6_wildcard_needs_the_ipv4_wildcard_rule() -> None:
    """The peer shares the socket and may turn IPV6_V6ONLY off up to bind():
    '::' is checked as if it were off."""
    with (
        RawCreator(creator_argv("--allow", "tcp:[::]:0")) as c,
        socket.socket(socket.AF_INET6) as s,
    ):
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        assert ask(c, s, "::", 0) == (b"EB", errno.EPERM)
    rules = ["--allow", "tcp:[::]:0", "--allow", "tcp:0.0.0.0:0"]
    with RawCreator(creator_argv(*rules)) as c, socket.socket(socket.AF_INET6) as s:
        assert ask(c, s, "::", 0) == (b"O", None)


@pytest.mark.parametrize("count", [0, 2])
def test_b_without_exactly_one_descriptor_is_invalid(count: int) -> None:
    with RawCreator(creator_argv("--allow-all")) as c:
        socks = [socket.socket() for _ in range(count)]
        send_b(c, [s.fileno() for s in socks], "127.0.0.1", 0)
        for s in socks:
            s.close()
        data, nfds, _ = read_to_end(c.sock)
        assert (data, nfds) == (b"FI", 0)
        assert c.wait() == EXIT_PROTOCOL


def test_descriptors_with_other_commands_are_closed_not_used() -> None:
    with RawCreator(creator_argv("--allow-all")) as c, socket.socket() as s:
        wire = b"ST4" + struct.pack("!H", 0) + socket.inet_aton("127.0.0.1")
        c.sock.sendmsg([wire], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, INT.pack(s.fileno()))])
        status, _ = c.sock.recvmsg(1, 64)[:2]
        assert status == b"S"
        _, anc, _, _ = c.sock.recvmsg(1, 64)  # the new socket's descriptor
        os.close(INT.unpack(anc[0][2][:4])[0])
        assert s.getsockname() == ("0.0.0.0", 0)  # ours untouched
        r, w = os.pipe()  # one more request: answered after the last one was done with
        assert ask(c, r, "127.0.0.1", 0) == (b"ES", errno.ENOTSOCK)
        os.close(r)
        os.close(w)
        fds = os.listdir(f"/proc/{c.pid}/fd")
        assert sorted(fds) == ["0", "1", "2"], fds  # nothing kept


@pytest.mark.skipif(not IS_ROOT, reason="needs root for a network namespace")
def test_a_socket_of_another_network_namespace_is_refused(creator: RawCreator) -> None:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            assert libc.unshare(0x40000000) == 0  # CLONE_NEWNET
            s = socket.socket()
            b.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, INT.pack(s.fileno()))])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    _, anc, _, _ = a.recvmsg(1, 64)
    fd = INT.unpack(anc[0][2][:4])[0]
    a.close()
    b.close()
    try:
        assert ask(creator, fd, "127.0.0.1", 0) == (b"ES", errno.EPERM)
    finally:
        os.close(fd)
