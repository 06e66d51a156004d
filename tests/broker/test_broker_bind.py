"""The broker's ``B`` frame (protocol version 2): a client's own socket,
bound by the broker's creator if the client's policy allows.

The decoder's descriptor rules, pure; then a real broker: the options the
client set stay, the kernel's errno comes back, the policy refuses, and
every malformed use (no descriptor, two, a pipe, a Unix socket, version 1)
is answered as documented with the broker's descriptor count flat.
``sockcreator run --broker --intercept`` with real servers is in
tests/run/test_intercept_broker.py.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import fd_count, socket_in_netns
from test_broker import (  # the fixtures and the broker under test
    HELLO,
    BrokerProc,
    _raw,
    _read_fatal,
    start_broker,
    users,
    wait_for,
    workdir,
)

from sockcreator.broker._protocol import (
    AnswerDecoder,
    BindCounts,
    BindFrame,
    BoundReply,
    BrokerProtocolError,
    Hello,
    Reason,
    RequestDecoder,
    SocketRequest,
)
from sockcreator.broker.client import Broker, SocketRefusedError
from sockcreator.client._protocol import make_request

__all__ = ["start_broker", "users", "workdir"]  # fixtures, used here by name

LOCAL = ipaddress.ip_address("127.0.0.1")


# --- the decoder, pure --------------------------------------------------------------


def _greeted(version: int = 2) -> RequestDecoder:
    d = RequestDecoder()
    assert d.feed(Hello(version).encode()) == [Hello(version)]
    return d


def test_each_b_frame_takes_the_descriptor_that_came_with_it() -> None:
    d = _greeted()
    frame = BindFrame(7, LOCAL, 80).encode()
    q = SocketRequest(8, make_request("tcp", "127.0.0.1", 80)).encode()
    # glued after a frame that carried none, as recvmsg returns them
    request = SocketRequest(8, make_request("tcp", "127.0.0.1", 80))
    assert d.feed(q + frame, [41]) == [request, BindFrame(7, LOCAL, 80, 41)]
    # split: the descriptor comes with the first piece
    assert d.feed(frame[:5], [42]) == []
    assert d.feed(frame[5:]) == [BindFrame(7, LOCAL, 80, 42)]
    assert d.take_fds() == []


@pytest.mark.parametrize(
    "case",
    ["no descriptor", "descriptor on a Q", "two descriptors", "version 1", "bad family"],
)
def test_descriptor_rules_are_violations(case: str) -> None:
    frame = BindFrame(1, LOCAL, 80).encode()
    d = _greeted(1 if case == "version 1" else 2)
    data, fds = frame, [50]
    if case == "no descriptor":
        fds = []
    elif case == "descriptor on a Q":
        data = SocketRequest(2, make_request("tcp", "127.0.0.1", 80)).encode()
    elif case == "two descriptors":
        fds = [50, 51]
    elif case == "bad family":
        data = frame[:7] + b"5" + frame[8:]
    with pytest.raises(BrokerProtocolError) as info:
        d.feed(data, fds)
    assert sorted(info.value.fds) == fds  # every one handed back, to be closed
    assert d.take_fds() == []


# --- a real broker ------------------------------------------------------------------


def _in_netns(pid: int, make: Callable[[], socket.socket] = socket.socket) -> socket.socket:
    return socket_in_netns(f"/proc/{pid}/ns/net")


def test_bind_socket_keeps_options_and_passes_kernel_errors(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()
    before = fd_count(b.pid)
    with Broker(b.path) as broker:
        assert broker.version == 2
        mine = _in_netns(b.pid, socket.socket)
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 12345)
        rcvbuf = mine.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        mine.setblocking(False)
        broker.bind_socket(mine, "127.0.0.1", 80)
        assert mine.getsockname() == ("127.0.0.1", 80)
        assert mine.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == rcvbuf
        assert not mine.getblocking()  # the very same socket: nothing replaced
        # Bound already: bind()'s own EINVAL; the port taken: EADDRINUSE.
        with pytest.raises(SocketRefusedError) as info:
            broker.bind_socket(mine, "127.0.0.1", 80)
        assert (info.value.errno, info.value.reason) == (errno.EINVAL, Reason.BIND)
        mine.listen()
        other = _in_netns(b.pid, socket.socket)
        with pytest.raises(SocketRefusedError) as info:
            broker.bind_socket(other, "127.0.0.1", 80)
        assert (info.value.errno, info.value.reason) == (errno.EADDRINUSE, Reason.BIND)
        # Not in the policy: EPERM, the policy's.
        with pytest.raises(SocketRefusedError) as info:
            broker.bind_socket(other, "127.0.0.1", 25)
        assert (info.value.errno, info.value.reason) == (errno.EPERM, Reason.POLICY)
        # A socket of another network namespace: the creator refuses it.
        foreign = socket.socket()
        with pytest.raises(SocketRefusedError) as info:
            broker.bind_socket(foreign, "127.0.0.1", 80)
        assert info.value.reason is Reason.SOCKET
        for s in (mine, other, foreign):
            s.close()
        broker.release_socket(broker.request_socket("tcp", "127.0.0.1", 8000))  # it lives on
        # status says what 'B' did (the broker holds none of those sockets)
        assert broker.status() == [] and broker.binds == (1, 4)
    shown = subprocess.run([sys.executable, "-m", "sockcreator.cli", "status", "--socket",
                            b.path], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "0 sockets held, 0 grants; 1 client sockets bound, 4 refused" in shown.stdout
    binds = b.audit("bind")
    assert [(r["address"], r["port"], r["result"]) for r in binds] == [("127.0.0.1", 80, "ok")]
    wait_for(lambda: fd_count(b.pid) == before, "the broker back to its descriptor count")


def _bind_frame(s: socket.socket, fds: list[int], frame: bytes | None = None) -> None:
    data = frame or BindFrame(9, LOCAL, 80).encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"@{len(fds)}i", *fds))]
    s.sendmsg([data], rights if fds else [])


def _answer(s: socket.socket) -> bytes:
    head = s.recv(3)
    return head + s.recv(struct.unpack("!H", head[1:])[0]) if len(head) == 3 else head


def test_binds_in_a_burst_and_clients_that_vanish_mid_bind(
    start_broker: Callable[..., BrokerProc],
) -> None:
    """Attacks on the 'B' path.  20 'B' frames sent at once, each with its
    own socket: answered in order, each socket bound (the broker reads one
    at a time, pausing in between).  Then 30 clients that send a 'B' and
    close at once, before the answer: the broker lives on, and its
    descriptors are back where they were."""
    b = start_broker()
    before = fd_count(b.pid)
    socks = [_in_netns(b.pid) for _ in range(20)]
    with _raw(b.path) as s:
        s.sendall(HELLO)
        assert _answer(s)[:1] == b"H"
        for i, sock in enumerate(socks):
            _bind_frame(s, [sock.fileno()], BindFrame(100 + i, LOCAL, 8100 + i).encode())
        answers = [_answer(s) for _ in socks]
    assert [a[:1] for a in answers] == [b"O"] * 20, answers
    assert [struct.unpack("!I", a[3:7])[0] for a in answers] == list(range(100, 120))
    assert [sock.getsockname()[1] for sock in socks] == list(range(8100, 8120))
    for sock in socks:
        sock.close()
    for _ in range(30):
        sock = _in_netns(b.pid)
        with _raw(b.path) as s:
            s.sendall(HELLO)
            assert _answer(s)[:1] == b"H"
            _bind_frame(s, [sock.fileno()], BindFrame(1, LOCAL, 8200).encode())
        sock.close()  # (bound or not: the broker's copy is what counts)
    with Broker(b.path) as good:
        good.release_socket(good.request_socket("tcp", "127.0.0.1", 8000))
    assert b.proc.poll() is None
    wait_for(lambda: fd_count(b.pid) == before, "the broker back to its descriptor count")


def test_what_is_not_a_socket_to_bind_is_refused(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()
    before = fd_count(b.pid)
    r, w = os.pipe()
    unix_a, unix_b = socket.socketpair()
    with _raw(b.path) as s:
        s.sendall(HELLO)
        assert _answer(s)[:1] == b"H"
        for fd, err in ((r, errno.ENOTSOCK), (unix_a.fileno(), errno.EAFNOSUPPORT)):
            _bind_frame(s, [fd])
            body = _answer(s)
            assert body[:1] == b"D", body
            assert struct.unpack("!IIc", body[3:]) == (9, err, Reason.SOCKET.value)
    for fd in (r, w):
        os.close(fd)
    unix_a.close()
    unix_b.close()
    assert not b.audit("bind")
    wait_for(lambda: fd_count(b.pid) == before, "the broker back to its descriptor count")


@pytest.mark.parametrize("case", ["no descriptor", "two descriptors", "version 1"])
def test_malformed_binds_close_only_that_connection(
    start_broker: Callable[..., BrokerProc], case: str
) -> None:
    b = start_broker()
    before = fd_count(b.pid)
    with _raw(b.path) as s, open("/dev/null", "rb") as f:
        s.sendall(Hello(1).encode() if case == "version 1" else HELLO)
        assert _answer(s)[:1] == b"H"
        fds = {"no descriptor": [], "two descriptors": [f.fileno()] * 2}.get(case, [f.fileno()])
        _bind_frame(s, fds)
        assert _read_fatal(s) == b"M"
    with Broker(b.path) as good:
        good.request_socket("tcp", "127.0.0.1", 8000).close()
    wait_for(lambda: fd_count(b.pid) == before, "the broker back to its descriptor count")


def test_bound_reply_and_bind_counts_round_trip() -> None:
    assert BoundReply(5).encode() == b"O\x00\x04\x00\x00\x00\x05"
    frame = BindCounts(5, 7, 2).encode()
    assert frame[:3] == b"Y\x00\x0c"
    decoder = AnswerDecoder()
    assert decoder.feed_any(frame) == [BindCounts(5, 7, 2)]


def test_q_frame_carries_a_linger_of_its_own() -> None:
    m = SocketRequest(3, make_request("tcp", "127.0.0.1", 80), linger=2.5)
    frame = m.encode()
    assert frame[:1] == b"q" and frame[-4:] == (2500).to_bytes(4, "big")
    assert _greeted().feed(frame) == [m]
    with pytest.raises(BrokerProtocolError):
        _greeted(1).feed(frame)  # version 2 only
    with pytest.raises(ValueError):
        SocketRequest(3, make_request("tcp", "127.0.0.1", 80), linger=3601).encode()
