"""The creator with real privileges: ports 53 and 80, bound for real.

Root only (CI runs as root).  Binding ports below 1024 happens in a fresh
network namespace, where they are free; traffic proves the sockets work: a
client socket from the same creator (so in the same namespace) connects or
sends to them.  A creator without CAP_NET_BIND_SERVICE must answer 'E' 'B'
EACCES instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import socket
from collections.abc import Iterator

import pytest
from conftest import (
    RawCreator,
    creator_argv,
    ensure_user,
    netns_argv,
    public_creator_path,
    read_answer,
    requires_linux,
    requires_root,
    unprivileged_port_start,
    wire_request,
)

pytestmark = [requires_linux, requires_root, pytest.mark.root]

SETPRIV = "/usr/bin/setpriv"
SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable, unlike the venv's interpreter
CAP_NET_BIND_SERVICE = 10
SIOCGSKNS = 0x894C  # a socket's network namespace, as a descriptor
HOSTS = ["127.0.0.1", "::1"]


def cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff in /proc/PID/status")


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid in /proc/PID/status")


def netns_inode_of_socket(sock: socket.socket) -> int:
    nsfd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


def get(c: RawCreator, proto: str, host: str, port: int) -> socket.socket:
    kind, sock = c.request(proto, host, port)
    assert kind == b"S", (proto, host, port, kind, sock)
    assert isinstance(sock, socket.socket)
    return sock


@pytest.fixture
def netns_creator() -> Iterator[RawCreator]:
    with RawCreator(netns_argv(creator_argv("--allow-all"))) as c:
        yield c


def _prove_ports_work(c: RawCreator, host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with get(c, "tcp", host, 80) as tcp80, get(c, "udp", host, 53) as udp53:
        for sock, kind in ((tcp80, socket.SOCK_STREAM), (udp53, socket.SOCK_DGRAM)):
            assert (sock.family, sock.type) == (family, kind)
        assert tcp80.getsockname()[:2] == (host, 80)
        assert udp53.getsockname()[:2] == (host, 53)
        # In the creator's fresh namespace, not ours.
        creator_ns = os.stat(f"/proc/{c.pid}/ns/net").st_ino
        assert creator_ns != os.stat("/proc/self/ns/net").st_ino
        assert netns_inode_of_socket(tcp80) == creator_ns
        assert netns_inode_of_socket(udp53) == creator_ns

        tcp80.listen()  # the creator does not listen: we do
        with get(c, "tcp", host, 0) as client:
            client.settimeout(10)
            client.connect((host, 80))
            tcp80.settimeout(10)
            conn, peer = tcp80.accept()
            with conn:
                assert peer[:2] == client.getsockname()[:2]
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert conn.recv(64) == b"GET / HTTP/1.0\r\n\r\n"
                conn.sendall(b"HTTP/1.0 204 No Content\r\n\r\n")
                assert client.recv(64) == b"HTTP/1.0 204 No Content\r\n\r\n"

        with get(c, "udp", host, 0) as client:
            client.settimeout(10)
            udp53.settimeout(10)
            client.sendto(b"query", (host, 53))
            data, source = udp53.recvfrom(64)
            assert (data, source[:2]) == (b"query", client.getsockname()[:2])
            udp53.sendto(b"answer", source)
            data, source = client.recvfrom(64)
            assert (data, source[:2]) == (b"answer", (host, 53))


@pytest.mark.parametrize("host", HOSTS)
def test_binds_80_and_53_for_real_in_a_fresh_netns(netns_creator: RawCreator, host: str) -> None:
    _prove_ports_work(netns_creator, host)
    # Hardened: the one capability it kept is the one that did this.
    assert cap_eff(netns_creator.pid) == 1 << CAP_NET_BIND_SERVICE
    netns_creator.sock.sendall(b"T")
    assert netns_creator.wait() == 0


def test_binds_80_and_53_after_dropping_to_another_user() -> None:
    user = ensure_user("sockc-alice")
    argv = creator_argv("--allow-all", "--uid", str(user.pw_uid), "--gid", str(user.pw_gid))
    with RawCreator(netns_argv(argv)) as c:
        for host in HOSTS:
            _prove_ports_work(c, host)
        assert uid_of(c.pid) == user.pw_uid
        assert cap_eff(c.pid) == 1 << CAP_NET_BIND_SERVICE
        c.sock.sendall(b"T")
        assert c.wait() == 0


def _argv_without_cap() -> list[str]:
    """Root, but CAP_NET_BIND_SERVICE gone from the bounding and inheritable
    sets, so the exec'd interpreter cannot have it."""
    return [
        SETPRIV,
        "--inh-caps=-all",
        "--bounding-set=-net_bind_service",
        "--",
        *creator_argv("--allow-all"),
    ]


def _argv_as_user() -> list[str]:
    """A real unprivileged user from the start (so the system interpreter)."""
    user: pwd.struct_passwd = ensure_user("sockc-bob")
    return [
        SETPRIV,
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--",
        SYSTEM_PYTHON,
        "-I",
        "-S",
        "-B",
        public_creator_path(),
        "--allow-all",
    ]


@pytest.mark.parametrize(
    "make_argv", [_argv_without_cap, _argv_as_user], ids=["root-no-cap", "user"]
)
def test_without_cap_net_bind_service_port_80_is_EACCES(make_argv: object) -> None:
    start = unprivileged_port_start()
    if start <= 80:
        pytest.skip(f"ip_unprivileged_port_start is {start}: port 80 needs no privilege here")
    for tool in (SETPRIV,) + ((SYSTEM_PYTHON,) if make_argv is _argv_as_user else ()):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} not available")
    assert callable(make_argv)
    with RawCreator(make_argv()) as c:
        answers = []
        for proto in ("tcp", "udp"):
            for host in HOSTS:
                c.sock.sendall(wire_request(proto, host, 80))
                answers.append(read_answer(c.sock))
        assert answers == [(b"EB", errno.EACCES)] * 4
        assert cap_eff(c.pid) & (1 << CAP_NET_BIND_SERVICE) == 0
        # Still serving, and unprivileged ports still work.
        with get(c, "udp", "127.0.0.1", 0) as sock:
            assert sock.getsockname()[1] >= 1
        c.sock.sendall(b"T")
        assert c.wait() == 0
