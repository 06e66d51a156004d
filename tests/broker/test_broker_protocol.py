"""The broker's wire codec (sans-I/O) and the 'P' creator request, byte for byte."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockcreator.broker import client as broker_client
from sockcreator.broker._protocol import (
    MAX_BODY,
    VERSION,
    AnswerDecoder,
    BrokerProtocolError,
    Denied,
    Fatal,
    FatalCode,
    Granted,
    Hello,
    HelloReply,
    Reason,
    Release,
    Released,
    RequestDecoder,
    ShareMode,
    SocketRequest,
    StatusEnd,
    StatusEntry,
    StatusQuery,
    check_name,
)
from sockcreator.broker.client import build_request
from sockcreator.client._protocol import SocketOptions, make_request

HELLO = b"H\x00\x01\x01"


def decode_all(data: bytes) -> list[object]:
    d = RequestDecoder()
    return list(d.feed(data))


# --- the creator's 'P' request -------------------------------------------------------


def test_request_without_options_is_byte_identical_to_s() -> None:
    r = make_request("tcp", "192.0.2.1", 80)
    assert r.encode() == b"ST4\x00\x50\xc0\x00\x02\x01"
    assert make_request("udp", "::1", 53, options=0).encode() == (
        b"SU6\x00\x35" + socket.inet_pton(socket.AF_INET6, "::1")
    )


def test_p_request_layout() -> None:
    opts = SocketOptions.REUSEPORT | SocketOptions.DUALSTACK | SocketOptions.FREEBIND
    r = make_request("tcp", "::", 443, options=opts)
    assert r.encode() == b"PT6\x01\xbb" + bytes(16) + b"\x07"
    assert make_request("udp", "127.0.0.1", 53, options=SocketOptions.REUSEPORT).encode() == (
        b"PU4\x00\x35\x7f\x00\x00\x01\x01"
    )
    assert str(r) == "tcp:[::]:443 (reuseport,dualstack,freebind)"


@pytest.mark.parametrize(
    ("address", "options", "error"),
    [
        ("1.2.3.4", SocketOptions.DUALSTACK, ValueError),  # V6ONLY is IPv6's
        ("1.2.3.4", 16, ValueError),  # unknown bit
        ("::", 256, ValueError),
        ("::", True, TypeError),
        ("::", "reuseport", TypeError),
    ],
)
def test_bad_options(address: str, options: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        make_request("tcp", address, 80, options=options)  # type: ignore[arg-type]


# --- requests: round trips ------------------------------------------------------------


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)
names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=64)


@st.composite
def socket_requests(draw: st.DrawFn) -> SocketRequest:
    addr = draw(addresses)
    proto = draw(st.sampled_from(["tcp", "udp"]))
    bits = draw(st.integers(0, 7))
    if addr.version == 4:
        bits &= ~int(SocketOptions.DUALSTACK)
    req = make_request(proto, addr, draw(st.integers(0, 65535)), options=SocketOptions(bits))
    share = draw(st.sampled_from(list(ShareMode)))
    name = draw(names)
    if share is ShareMode.SAMEAPP and not name:
        name = "app"
    backlog = draw(st.none() | st.integers(0, 65535)) if proto == "tcp" else None
    return SocketRequest(draw(st.integers(0, 2**32 - 1)), req, share, name, backlog)


@given(socket_requests(), st.integers(1, 64))
def test_request_round_trip_in_any_pieces(m: SocketRequest, piece: int) -> None:
    data = HELLO + m.encode() + Release(7, 2**64 - 1).encode() + StatusQuery(9).encode()
    d = RequestDecoder()
    out: list[object] = []
    for i in range(0, len(data), piece):
        out += d.feed(data[i : i + piece])
    assert out == [Hello(1), m, Release(7, 2**64 - 1), StatusQuery(9)]
    assert not d.partial
    assert len(m.encode()) <= 3 + MAX_BODY


def test_request_layout() -> None:
    m = SocketRequest(
        5,
        make_request("tcp", "10.0.0.1", 8080, options=SocketOptions.REUSEPORT),
        ShareMode.SAMEAPP,
        "web",
        128,
    )
    body = struct.pack("!I1s1sH1sBIB", 5, b"T", b"4", 8080, b"S", 1, 128, 3) + bytes(
        [10, 0, 0, 1]
    ) + b"web"  # fmt: skip
    assert m.encode() == b"Q" + len(body).to_bytes(2, "big") + body


MALFORMED = {
    "no hello": b"L\x00\x04\x00\x00\x00\x01",
    "hello with a bad length": b"H\x00\x02\x01\x01",
    "version 3": b"H\x00\x01\x03",
    "oversized": HELLO + b"Q\x01\x00",
    "unknown kind": HELLO + b"Z\x00\x00",
    "short request": HELLO + b"Q\x00\x05" + bytes(5),
    "release too long": HELLO + b"R\x00\x0d" + bytes(13),
    "status too short": HELLO + b"L\x00\x03" + bytes(3),
}


def _q(**fields: object) -> bytes:
    f = {"id": 1, "proto": b"T", "family": b"4", "port": 80, "share": b"A", "flags": 0,
         "backlog": 0xFFFFFFFF, "addr": bytes(4), "name": b""}  # fmt: skip
    f.update(fields)
    name = f["name"]
    assert isinstance(name, bytes)
    nlen = f.get("nlen", len(name))
    body = struct.pack(
        "!I1s1sH1sBIB", f["id"], f["proto"], f["family"], f["port"], f["share"], f["flags"],
        f["backlog"], nlen,
    ) + f["addr"] + name  # type: ignore[operator]  # fmt: skip
    return HELLO + b"Q" + len(body).to_bytes(2, "big") + body


MALFORMED.update(
    {
        "protocol X": _q(proto=b"X"),
        "family 5": _q(family=b"5"),
        "address too long": _q(addr=bytes(16)),
        "share mode Q": _q(share=b"Q"),
        "flag bit 8": _q(flags=8),
        "dual stack on IPv4": _q(flags=2),
        "backlog on UDP": _q(proto=b"U", backlog=5),
        "backlog 65536": _q(backlog=65536),
        "name too long": _q(name=b"a" * 65),
        "name with a space": _q(name=b"a b"),
        "name with a control": _q(name=b"a\n"),
        "name not ASCII": _q(name="é".encode()),
        "SAMEAPP without a name": _q(share=b"S"),
        "name length past the end": _q(name=b"ab", nlen=3),
    }
)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests(case: str) -> None:
    with pytest.raises(BrokerProtocolError) as info:
        decode_all(MALFORMED[case])
    expected = FatalCode.VERSION if case == "version 3" else FatalCode.MALFORMED
    assert info.value.code is expected


def test_valid_edge_requests() -> None:
    assert decode_all(_q(name=b"a" * 64))[1].name == "a" * 64  # type: ignore[attr-defined]
    assert decode_all(_q(backlog=0))[1].backlog == 0  # type: ignore[attr-defined]
    got = decode_all(_q(family=b"6", addr=bytes(16), flags=7))[1]
    assert got.request.options == 7  # type: ignore[attr-defined]


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_decoder_raises_only_protocol_errors(data: bytes) -> None:
    d = RequestDecoder()
    try:
        d.feed(HELLO + data)
    except BrokerProtocolError:
        pass


@given(st.binary(max_size=300))
def test_decoder_buffers_no_more_than_one_frame(data: bytes) -> None:
    d = RequestDecoder()
    try:
        d.feed(HELLO + data)
    except BrokerProtocolError:
        return
    assert len(d._buf) < 3 + MAX_BODY
    assert d.partial == bool(d._buf)


# --- answers --------------------------------------------------------------------------


def _feed_exact(d: AnswerDecoder, data: bytes, fd: int = -1) -> list[object]:
    """Feed as a client reads: never past bytes_wanted(); the descriptor comes
    with the first byte of its frame."""
    out: list[object] = []
    first = True
    while data:
        n = d.bytes_wanted()
        chunk, data = data[:n], data[n:]
        out += d.feed(chunk, [fd] if fd >= 0 and first else [])
        first = False
    return out


ANSWERS = [
    HelloReply(VERSION, 4096, 32),
    Denied(3, 1, Reason.POLICY),
    Released(4),
    StatusEntry(
        5,
        99,
        make_request("udp", "::1", 53, options=SocketOptions.FREEBIND),
        ShareMode.SAMEAPP,
        "dns",
        None,
        1000,
        1000,
        4242,
    ),
    StatusEnd(5, 1),
    Fatal(FatalCode.PENDING, "more than 32 requests pending"),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: type(a).__name__)
def test_answer_round_trip(answer: object) -> None:
    d = AnswerDecoder()
    assert _feed_exact(d, answer.encode()) == [answer]  # type: ignore[attr-defined]
    assert d.idle


def test_grant_carries_its_descriptor() -> None:
    r, w = os.pipe()
    try:
        g = Granted(1, 2, socket.AF_INET6, socket.SOCK_STREAM, True,
                    ipaddress.IPv6Address("::"), 80)  # fmt: skip
        d = AnswerDecoder()
        (got,) = _feed_exact(d, g.encode(), r)
        assert isinstance(got, Granted) and got.fd == r
        assert (got.id, got.grant, got.family, got.type, got.listening, got.port) == (
            1, 2, socket.AF_INET6, socket.SOCK_STREAM, True, 80
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "case", ["grant without fd", "fd on a denial", "two fds", "fd mid-frame", "read across"]
)
def test_answer_descriptor_violations_hand_back_every_fd(case: str) -> None:
    g = Granted(1, 2, socket.AF_INET, socket.SOCK_DGRAM, False,
                ipaddress.IPv4Address("127.0.0.1"), 53).encode()  # fmt: skip
    deny = Denied(1, 16, Reason.SHARE).encode()
    d = AnswerDecoder()
    with pytest.raises(BrokerProtocolError) as info:
        if case == "grant without fd":
            _feed_exact(d, g)
        elif case == "fd on a denial":
            _feed_exact(d, deny, 7)
        elif case == "two fds":
            d.feed(g[:3], [7, 8])
        elif case == "fd mid-frame":
            d.feed(g[:3], [7])
            d.feed(g[3:5], [8])
        else:
            d.feed(deny + deny, [])
    expected = {
        "grant without fd": [],
        "fd on a denial": [7],
        "two fds": [7, 8],
        "fd mid-frame": [8, 7],
        "read across": [],
    }[case]
    assert sorted(info.value.fds) == sorted(expected)
    with pytest.raises(BrokerProtocolError):
        d.feed(b"K")  # dead after a violation


@pytest.mark.parametrize(
    "data",
    [
        b"?\x00\x00",
        b"D\x00\x08" + bytes(8),
        b"D\x00\x09" + bytes(8) + b"?",
        b"K\x00\x05" + bytes(5),
        b"X\x00\x03M\x05a",
        b"S\x00\x02ab",
        b"H\x00\x00",
    ],
)
def test_malformed_answers(data: bytes) -> None:
    with pytest.raises(BrokerProtocolError):
        _feed_exact(AnswerDecoder(), data)


# --- client-side validation (before anything is sent) ----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"share": "SOMETIMES"}, ValueError),
        ({"share": 3}, TypeError),
        ({"share": "SAMEAPP"}, ValueError),  # no name
        ({"name": "a b"}, ValueError),
        ({"name": "x" * 65}, ValueError),
        ({"name": 5}, TypeError),
        ({"backlog": -1}, ValueError),
        ({"backlog": 65536}, ValueError),
        ({"backlog": True}, TypeError),
        ({"backlog": 5, "protocol": "udp"}, ValueError),
        ({"v6only": False}, ValueError),  # on an IPv4 address
        ({"port": 70000}, ValueError),
    ],
)
def test_build_request_rejects(kwargs: dict[str, object], error: type[Exception]) -> None:
    args: dict[str, object] = {"protocol": "tcp", "address": "127.0.0.1", "port": 80}
    for key in ("protocol", "address", "port"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises(error):
        build_request(1, args["protocol"], args["address"], args["port"], **kwargs)  # type: ignore[arg-type]


def test_build_request_options() -> None:
    m = build_request(3, "tcp", "::", 80, share="samEApp", name="w", reuseport=True,
                      v6only=False, freebind=True, backlog=0)  # fmt: skip
    assert m.share is ShareMode.SAMEAPP and m.backlog == 0
    assert m.request.options == SocketOptions.REUSEPORT | SocketOptions.DUALSTACK | (
        SocketOptions.FREEBIND
    )


def test_check_name() -> None:
    assert check_name("a-b.c_d:1") == b"a-b.c_d:1"
    assert check_name("") == b""
    for bad in ("é", "a\tb", " ", "x" * 65):
        with pytest.raises(ValueError):
            check_name(bad)


# --- reads of any size (a client with one request outstanding) -------------------------


def _grant(rid: int = 1) -> Granted:
    return Granted(rid, 7, socket.AF_INET, socket.SOCK_DGRAM, False,
                   ipaddress.IPv4Address("127.0.0.1"), 53)  # fmt: skip


@given(st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=8), st.data())
def test_feed_any_in_any_pieces_equals_exact_reads(
    answers: list[object], data: st.DataObject
) -> None:
    stream = b"".join(a.encode() for a in answers)  # type: ignore[attr-defined]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    d, got = AnswerDecoder(), []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += d.feed_any(stream[a:b])
    assert got == _feed_exact(AnswerDecoder(), stream) == answers
    assert d.idle


def test_feed_any_gives_the_descriptor_to_the_first_frame() -> None:
    r, w = os.pipe()
    try:
        tail = Released(2).encode() + Fatal(FatalCode.SHUTDOWN, "bye").encode()
        for chunks in (
            [(_grant().encode(), [r])],  # one whole frame: the usual read
            [(_grant().encode() + tail, [r])],  # and what followed it
            [(_grant().encode()[:5], [r]), (_grant().encode()[5:] + tail, [])],  # in two
        ):
            d, got = AnswerDecoder(), []
            for data, fds in chunks:
                got += d.feed_any(data, fds)
            assert got[0] == dataclasses.replace(_grant(), fd=r)
            assert got[1:] in ([], [Released(2), Fatal(FatalCode.SHUTDOWN, "bye")])
            assert d.idle
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "case",
    ["grant after a denial", "grant without fd", "fd on a denial", "fd mid-frame",
     "bad grant, fast path", "bad frame after a grant", "two fds"],
)  # fmt: skip
def test_feed_any_violations_hand_back_every_fd(case: str) -> None:
    g = _grant().encode()
    deny = Denied(1, 16, Reason.SHARE).encode()
    bad_grant = g[:3] + g[3:15] + b"?" + g[16:]  # family byte '?'
    d = AnswerDecoder()
    with pytest.raises(BrokerProtocolError) as info:
        if case == "grant after a denial":  # (as a read may glue them: the fd is the G's)
            d.feed_any(deny + g, [7])
        elif case == "grant without fd":
            d.feed_any(deny + g, [])
        elif case == "fd on a denial":
            d.feed_any(deny, [7])
        elif case == "fd mid-frame":
            d.feed_any(g[:4], [7])
            d.feed_any(g[4:], [8])
        elif case == "bad grant, fast path":
            d.feed_any(bad_grant, [7])
        elif case == "bad frame after a grant":
            d.feed_any(g + b"?\x00\x00", [7])
        else:
            d.feed_any(g, [7, 8])
    expected = {"grant after a denial": [7], "grant without fd": [], "fd on a denial": [7],
                "fd mid-frame": [7, 8], "bad grant, fast path": [7],
                "bad frame after a grant": [7], "two fds": [7, 8]}[case]  # fmt: skip
    assert sorted(info.value.fds) == expected
    with pytest.raises(BrokerProtocolError):
        d.feed_any(Released(1).encode())  # dead after a violation


# --- caches: the same bytes, the same objects; errors never cached -----------------------


def test_identical_requests_decode_to_identical_objects() -> None:
    frame = SocketRequest(9, make_request("udp", "127.0.0.1", 5353), ShareMode.ANY).encode()
    other = SocketRequest(10, make_request("udp", "127.0.0.1", 5353), ShareMode.ANY).encode()
    (a,), (b,) = RequestDecoder().feed(HELLO + frame)[1:], RequestDecoder().feed(HELLO + other)[1:]
    assert isinstance(a, SocketRequest) and isinstance(b, SocketRequest)
    assert (a.id, b.id) == (9, 10) and a.request is b.request
    bad = frame[:7] + b"X" + frame[8:]  # protocol 'X'
    for _ in range(2):
        with pytest.raises(BrokerProtocolError):
            RequestDecoder().feed(HELLO + bad)


def test_client_request_cache_keeps_checking_types() -> None:
    t = broker_client._template("udp", "127.0.0.1", 1, "NO", "", False, True, False, None)
    assert t is broker_client._template("udp", "127.0.0.1", 1, "NO", "", 0, 1, 0, None)
    assert t.frame(5) == build_request(5, "udp", "127.0.0.1", 1).encode()
    with pytest.raises(TypeError):  # True == 1, but a bool is no port
        broker_client._template("udp", "127.0.0.1", True, "NO", "", False, True, False, None)
    tcp = ("tcp", "127.0.0.1", 80, "NO", "", False, True, False)
    broker_client._template(*tcp, 1)
    with pytest.raises(TypeError):
        broker_client._template(*tcp, True)  # type: ignore[arg-type]

    class Addr(str):
        pass

    with pytest.raises(ValueError):  # a str subclass is checked every time
        broker_client._template("udp", Addr("127.0.0.1x"), 1, "NO", "", False, True, False,
                                None)  # fmt: skip
