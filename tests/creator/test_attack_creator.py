"""Attacks on the creator's fence (issue 15, findings 4 and 5), kept as tests.

The creator's allow-list must hold even against a compromised broker, so it
must see every address a socket takes traffic for.  Finding 5: with
``--allow tcp:[::]:81``, a ``P`` request for ``::`` with IPV6_V6ONLY off got
a socket that accepted IPv4 connections, although a plain ``S`` for
``0.0.0.0`` was refused.  These tests make exactly those requests to the real
creator and then try the IPv4 connection.  Port 0 stands for port 81: the
rule is the same, and it needs no privilege.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from conftest import RawCreator, creator_argv, read_answer, requires_linux

pytestmark = requires_linux

DUALSTACK, NOREUSEADDR = 2, 8


def p_request(proto: str, host: str, port: int, flags: int) -> bytes:
    """A 'P' request built by hand from the creator's docstring."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (
        b"P"
        + {"tcp": b"T", "udp": b"U"}[proto]
        + (b"6" if family == socket.AF_INET6 else b"4")
        + struct.pack("!H", port)
        + socket.inet_pton(family, host)
        + bytes([flags])
    )


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 here")


def _ask(c: RawCreator, wire: bytes) -> tuple[bytes, socket.socket | int]:
    c.sock.sendall(wire)
    return read_answer(c.sock)


@requires_ipv6
@pytest.mark.parametrize("harden", [True, False], ids=["hardened", "no-harden"])
def test_dual_stack_wildcard_needs_the_ipv4_wildcard_too(harden: bool) -> None:
    extra = [] if harden else ["--no-harden"]
    with RawCreator(creator_argv("--allow", "tcp:[::]:0", *extra)) as c:
        # The attack: IPv6 '::' with V6ONLY off would take IPv4 traffic.
        assert _ask(c, p_request("tcp", "::", 0, DUALSTACK)) == (b"EB", errno.EPERM)
        assert _ask(c, p_request("tcp", "0.0.0.0", 0, 0)) == (b"EB", errno.EPERM)
        # V6ONLY on (the default) is what the rule grants.
        status, sock = _ask(c, p_request("tcp", "::", 0, 0))
        assert status == b"S" and isinstance(sock, socket.socket)
        sock.close()
        assert "denied tcp :: port 0" in c.stderr_text()
    rules = ["--allow", "tcp:[::]:0", "--allow", "tcp:0.0.0.0:0", *extra]
    with RawCreator(creator_argv(*rules)) as c:
        status, sock = _ask(c, p_request("tcp", "::", 0, DUALSTACK))
        assert status == b"S" and isinstance(sock, socket.socket)
        with sock:  # allowed for both: and it does take IPv4
            sock.listen(1)
            port = sock.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = sock.accept()
                conn.close()


@requires_ipv6
def test_mapped_address_needs_the_ipv4_address() -> None:
    mapped = "::ffff:127.0.0.1"
    with RawCreator(creator_argv("--allow", f"udp:[{mapped}]:0")) as c:
        for flags in (0, DUALSTACK):
            assert _ask(c, p_request("udp", mapped, 0, flags)) == (b"EB", errno.EPERM)
    with RawCreator(creator_argv("--allow", "udp:127.0.0.1:0")) as c:  # IPv4 alone: no
        assert _ask(c, p_request("udp", mapped, 0, DUALSTACK)) == (b"EB", errno.EPERM)
    rules = ["--allow", f"udp:[{mapped}]:0", "--allow", "udp:127.0.0.1:0"]
    with RawCreator(creator_argv(*rules)) as c:
        status, sock = _ask(c, p_request("udp", mapped, 0, DUALSTACK))
        assert status == b"S" and isinstance(sock, socket.socket)
        with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            sock.settimeout(5)
            client.sendto(b"x", ("127.0.0.1", sock.getsockname()[1]))
            assert sock.recv(1) == b"x"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_noreuseaddr_flag_leaves_so_reuseaddr_off(proto: str) -> None:
    with RawCreator(creator_argv("--allow-all")) as c:
        for flags, want in ((0, 1), (NOREUSEADDR, 0)):
            status, sock = _ask(c, p_request(proto, "127.0.0.1", 0, flags))
            assert status == b"S" and isinstance(sock, socket.socket)
            with sock:
                got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
                assert bool(got) == bool(want)


def test_exclusive_udp_socket_refuses_a_co_bind() -> None:
    """What the broker builds NO on: a UDP socket made without SO_REUSEADDR
    cannot be co-bound, by a wildcard or a specific address, whatever the
    other socket sets; with SO_REUSEADDR on both it can (the attack)."""
    with RawCreator(creator_argv("--allow-all")) as c:
        status, held = _ask(c, p_request("udp", "0.0.0.0", 0, 0))
        assert status == b"S" and isinstance(held, socket.socket)
        with held:  # both with SO_REUSEADDR: the co-bind that finding 4 used
            port = held.getsockname()[1]
            status, other = _ask(c, p_request("udp", "127.0.0.1", port, 0))
            assert status == b"S" and isinstance(other, socket.socket)
            other.close()
            assert _ask(c, p_request("udp", "127.0.0.1", port, NOREUSEADDR)) == (
                b"EB",
                errno.EADDRINUSE,
            )
        status, held = _ask(c, p_request("udp", "127.0.0.1", 0, NOREUSEADDR))
        assert status == b"S" and isinstance(held, socket.socket)
        with held:
            port = held.getsockname()[1]
            for host in ("0.0.0.0", "127.0.0.1"):
                assert _ask(c, p_request("udp", host, port, 0)) == (b"EB", errno.EADDRINUSE)
