"""The sans-I/O protocol module, byte by byte: no sockets, no processes.

Descriptors here are plain ints that are never opened or closed: the parser
only hands them around, and these tests check that it hands every one of them
out exactly once or raises.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockcreator.client._protocol import (
    INT,
    AnswerParser,
    CreationFailed,
    DescriptorLost,
    ProtocolViolation,
    Request,
    SocketReceived,
    make_request,
)

V4 = make_request("udp", "127.0.0.1", 53)
V6 = make_request("tcp", "::1", 80)


# --- make_request: validation -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("tcp", socket.SOCK_STREAM),
        ("TCP", socket.SOCK_STREAM),
        ("Tcp", socket.SOCK_STREAM),
        ("udp", socket.SOCK_DGRAM),
        ("UDP", socket.SOCK_DGRAM),
        ("uDp", socket.SOCK_DGRAM),
        (socket.SOCK_STREAM, socket.SOCK_STREAM),
        (socket.SOCK_DGRAM, socket.SOCK_DGRAM),
        (int(socket.SOCK_STREAM), socket.SOCK_STREAM),
        (int(socket.SOCK_DGRAM), socket.SOCK_DGRAM),
    ],
)
def test_protocol_forms(spec: str | int, kind: socket.SocketKind) -> None:
    req = make_request(spec, "127.0.0.1", 1)
    assert req.type == kind
    assert isinstance(req.type, socket.SocketKind)
    assert req.protocol == ("tcp" if kind == socket.SOCK_STREAM else "udp")


@pytest.mark.parametrize("spec", ["", "sctp", "tcp6", " tcp", "tcp ", "stream", "t"])
def test_protocol_bad_strings(spec: str) -> None:
    with pytest.raises(ValueError):
        make_request(spec, "127.0.0.1", 1)


@pytest.mark.parametrize("spec", [socket.SOCK_RAW, socket.SOCK_SEQPACKET, 0, -1, 99])
def test_protocol_bad_ints(spec: int) -> None:
    with pytest.raises(ValueError):
        make_request(spec, "127.0.0.1", 1)


@pytest.mark.parametrize("spec", [True, False, None, b"tcp", 1.0, ["tcp"]])
def test_protocol_bad_types(spec: object) -> None:
    # bool is an int subclass, and True == SOCK_STREAM == 1: still refused.
    with pytest.raises(TypeError):
        make_request(spec, "127.0.0.1", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "fe80::1", "2001:db8::1:2"],
)
def test_address_forms(address: str) -> None:
    want = ipaddress.ip_address(address)
    from_str = make_request("tcp", address, 1)
    from_obj = make_request("tcp", want, 1)
    assert from_str.address == from_obj.address == want
    assert from_str == from_obj
    assert from_str.family == (socket.AF_INET if want.version == 4 else socket.AF_INET6)


def test_ipv4_mapped_ipv6_stays_ipv6() -> None:
    req = make_request("udp", "::ffff:127.0.0.1", 1)
    assert req.family == socket.AF_INET6
    assert req.encode()[2:3] == b"6"


@pytest.mark.parametrize(
    "address", ["", "localhost", "1.2.3", "1.2.3.4.5", "256.0.0.1", ":::", "1.2.3.4/32", "::1/128"]
)
def test_address_bad_strings(address: str) -> None:
    with pytest.raises(ValueError):
        make_request("tcp", address, 1)


@pytest.mark.parametrize(
    "address",
    [
        None,
        b"\x7f\0\0\1",
        0x7F000001,
        ipaddress.ip_network("127.0.0.0/8"),
        ("127.0.0.1", 1),
    ],
)
def test_address_bad_types(address: object) -> None:
    with pytest.raises(TypeError):
        make_request("tcp", address, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%1"])
def test_scope_id_rejected(address: str) -> None:
    with pytest.raises(ValueError, match="scope"):
        make_request("udp", address, 1)
    with pytest.raises(ValueError, match="scope"):
        make_request("udp", ipaddress.IPv6Address(address), 1)


@pytest.mark.parametrize("port", [0, 1, 53, 1023, 1024, 65535])
def test_port_bounds_ok(port: int) -> None:
    assert make_request("tcp", "::", port).port == port


@pytest.mark.parametrize("port", [-1, 65536, 2**31, -(2**31)])
def test_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError):
        make_request("tcp", "::", port)


@pytest.mark.parametrize("port", [True, False, 53.0, "53", None, b"\0\x35"])
def test_port_bad_types(port: object) -> None:
    with pytest.raises(TypeError):
        make_request("tcp", "::", port)  # type: ignore[arg-type]


# --- make_request: encoding ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        (("tcp", "127.0.0.1", 80), b"ST4\x00\x50\x7f\x00\x00\x01"),
        (("udp", "127.0.0.1", 53), b"SU4\x00\x35\x7f\x00\x00\x01"),
        (("udp", "10.20.30.40", 0x1234), b"SU4\x12\x34\x0a\x14\x1e\x28"),
        (("tcp", "0.0.0.0", 65535), b"ST4\xff\xff\x00\x00\x00\x00"),
        (("tcp", "::1", 80), b"ST6\x00\x50" + b"\x00" * 15 + b"\x01"),
        (("udp", "::", 53), b"SU6\x00\x35" + b"\x00" * 16),
        (
            ("udp", "2001:db8::ff", 0xABCD),
            b"SU6\xab\xcd\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\xff",
        ),
        ((socket.SOCK_STREAM, "fe80::1", 1), b"ST6\x00\x01\xfe\x80" + b"\x00" * 13 + b"\x01"),
    ],
)
def test_encoding_exact(args: tuple[str | int, str, int], wire: bytes) -> None:
    req = make_request(*args)
    assert req.encode() == wire
    assert len(wire) == (9 if req.address.version == 4 else 21)


def test_str() -> None:
    assert str(make_request("TCP", "127.0.0.1", 80)) == "tcp:127.0.0.1:80"
    assert str(make_request("udp", "::1", 53)) == "udp:[::1]:53"


# --- AnswerParser: each kind ----------------------------------------------------


def E(stage: bytes, err: int) -> bytes:
    return b"E" + stage + INT.pack(err)


def test_initial_state() -> None:
    p = AnswerParser()
    assert p.pending == 0
    assert p.idle
    assert p.bytes_wanted() == 1
    assert p.feed(b"") == []


def test_socket_answer() -> None:
    p = AnswerParser()
    p.expect(V4)
    assert p.pending == 1
    assert p.feed(b"S") == []
    assert not p.idle
    assert p.bytes_wanted() == 1
    assert p.feed(b"\0", [7]) == [SocketReceived(V4, 7)]
    assert p.idle
    assert p.pending == 0


@pytest.mark.parametrize("data_byte", [b"\0", b"x", b"\xff"])
def test_socket_answer_any_data_byte(data_byte: bytes) -> None:
    p = AnswerParser()
    p.expect(V6)
    p.feed(b"S")
    assert p.feed(data_byte, [9]) == [SocketReceived(V6, 9)]


@pytest.mark.parametrize(
    ("stage", "name"), [(b"S", "socket"), (b"B", "bind")], ids=["socket", "bind"]
)
@pytest.mark.parametrize("err", [errno.EACCES, errno.EADDRINUSE, errno.EAFNOSUPPORT, 0, 2**31 - 1])
def test_error_answer(stage: bytes, name: str, err: int) -> None:
    p = AnswerParser()
    p.expect(V4)
    assert p.feed(E(stage, err)) == [CreationFailed(V4, name, err)]
    assert p.idle
    assert p.pending == 0


def test_error_answer_native_int() -> None:
    # The errno is a native C int: native size and byte order.
    p = AnswerParser()
    p.expect(V4)
    raw = errno.EACCES.to_bytes(INT.size, "little" if INT.pack(1)[0] == 1 else "big")
    assert p.bytes_wanted() == 1
    p.feed(b"E")
    assert p.bytes_wanted() == 1 + INT.size
    assert p.feed(b"B" + raw) == [CreationFailed(V4, "bind", errno.EACCES)]


def test_negative_errno_is_passed_through() -> None:
    p = AnswerParser()
    p.expect(V4)
    assert p.feed(E(b"B", -5)) == [CreationFailed(V4, "bind", -5)]


@pytest.mark.parametrize("cond", [b"I", b"Z", b"\0", b"\xff"])
def test_fatal_answer(cond: bytes) -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation) as info:
        p.feed(b"F" + cond)
    assert info.value.condition == cond.decode("ascii", "backslashreplace")
    assert not p.idle


def test_fatal_condition_I_byte_by_byte() -> None:
    p = AnswerParser()
    assert p.feed(b"F") == []  # 'F' needs no pending request
    assert p.bytes_wanted() == 1
    with pytest.raises(ProtocolViolation) as info:
        p.feed(b"I")
    assert info.value.condition == "I"


def test_fatal_while_idle_with_nothing_pending() -> None:
    p = AnswerParser()
    with pytest.raises(ProtocolViolation) as info:
        p.feed(b"FI")
    assert info.value.condition == "I"


def test_other_violations_have_no_condition() -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation) as info:
        p.feed(b"X")
    assert info.value.condition is None


# --- AnswerParser: violations ---------------------------------------------------


@pytest.mark.parametrize("byte", sorted(set(range(256)) - set(b"SEF")))
def test_unknown_answer_byte(byte: int) -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation, match="unknown answer"):
        p.feed(bytes([byte]))


@pytest.mark.parametrize("byte", sorted(set(range(256)) - set(b"SB")))
def test_unknown_cause_byte(byte: int) -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation, match="stage"):
        p.feed(b"E" + bytes([byte]) + INT.pack(1))


@pytest.mark.parametrize("answer", [b"S", b"E", b"ES" + INT.pack(1), b"X"])
def test_unsolicited_answer(answer: bytes) -> None:
    p = AnswerParser()
    with pytest.raises(ProtocolViolation, match="unsolicited"):
        p.feed(answer)


def test_unsolicited_after_answers_ran_out() -> None:
    p = AnswerParser()
    p.expect(V4)
    assert p.feed(E(b"B", 1)) == [CreationFailed(V4, "bind", 1)]
    with pytest.raises(ProtocolViolation, match="unsolicited"):
        p.feed(b"S")


def test_descriptor_on_status_byte() -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation, match="outside"):
        p.feed(b"S", [5])


def test_descriptor_on_error_answer() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.feed(b"E")
    with pytest.raises(ProtocolViolation, match="outside"):
        p.feed(b"B" + INT.pack(1), [5])


def test_descriptor_without_data() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.feed(b"S")
    with pytest.raises(ProtocolViolation):
        p.feed(b"", [5])


def test_descriptor_not_on_first_byte() -> None:
    # The fd belongs to the first byte given; here the first byte is 'S'.
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation):
        p.feed(b"S\0", [5])


@pytest.mark.parametrize("fds", [[], [5, 6], [5, 6, 7]])
def test_socket_answer_needs_exactly_one_fd(fds: list[int]) -> None:
    p = AnswerParser()
    p.expect(V4)
    p.feed(b"S")
    with pytest.raises(ProtocolViolation, match=f"{len(fds)} descriptors"):
        p.feed(b"\0", fds)


def test_fd_byte_not_first_in_chunk() -> None:
    # 'S' and its data byte in one chunk: the fd byte is not the first byte,
    # so it cannot have carried the descriptor.
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation, match="0 descriptors"):
        p.feed(b"S\0")


@pytest.mark.parametrize(
    "bad",
    [
        (b"X", ()),
        (b"FI", ()),
        (b"S", (4,)),
        (b"E?" + INT.pack(1), ()),
    ],
)
@pytest.mark.parametrize("after", [(b"S", ()), (b"\0", (3,)), (b"E", ()), (b"x", ())])
def test_data_after_violation(
    bad: tuple[bytes, tuple[int, ...]], after: tuple[bytes, tuple[int, ...]]
) -> None:
    p = AnswerParser()
    p.expect(V4)
    p.expect(V4)
    with pytest.raises(ProtocolViolation):
        p.feed(*bad)
    with pytest.raises(ProtocolViolation, match="after a protocol violation"):
        p.feed(*after)
    with pytest.raises(ProtocolViolation, match="after a protocol violation"):
        p.feed(*after)
    assert p.feed(b"") == []  # nothing given, nothing to complain about


def test_dead_parser_wants_nothing() -> None:
    # A violation in the middle of an answer leaves no (negative) read size.
    p = AnswerParser()
    p.expect(V4)
    p.feed(b"EB")
    with pytest.raises(ProtocolViolation):
        p.feed(b"", [7])  # a descriptor with no data byte
    assert p.bytes_wanted() == 0
    assert not p.idle


# --- AnswerParser: a descriptor lost on our side (EMFILE, MSG_CTRUNC) -------------


def test_lost_descriptor_fails_that_answer_and_stays_in_step() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.expect(V6)
    p.expect(V4)
    assert p.feed(b"S") == []
    assert p.feed_lost_descriptor(b"\0") == [DescriptorLost(V4)]
    assert p.idle and p.pending == 2 and p.bytes_wanted() == 1
    assert p.feed(b"S") == []
    assert p.feed(b"\0", [7]) == [SocketReceived(V6, 7)]  # the next answer as usual
    assert p.feed(E(b"S", errno.EMFILE)) == [CreationFailed(V4, "socket", errno.EMFILE)]
    assert p.idle and p.pending == 0


def test_lost_descriptor_then_more_data_in_the_same_chunk() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.expect(V6)
    p.feed(b"S")
    assert p.feed_lost_descriptor(b"\0" + E(b"B", errno.EACCES)) == [
        DescriptorLost(V4),
        CreationFailed(V6, "bind", errno.EACCES),
    ]
    assert p.idle


@pytest.mark.parametrize(
    ("before", "lost"),
    [
        (b"", b"S"),  # on a status byte
        (b"", b"E"),
        (b"E", b"S"),  # inside an 'E' answer
        (b"S", b""),  # with no data byte at all
    ],
    ids=["status-S", "status-E", "in-error", "no-data"],
)
def test_lost_descriptor_anywhere_else_is_fatal(before: bytes, lost: bytes) -> None:
    p = AnswerParser()
    p.expect(V4)
    p.feed(before)
    with pytest.raises(ProtocolViolation, match="descriptor was lost"):
        p.feed_lost_descriptor(lost)
    assert p.bytes_wanted() == 0
    with pytest.raises(ProtocolViolation, match="after a protocol violation"):
        p.feed(b"S")


def test_lost_descriptor_unsolicited_is_fatal() -> None:
    p = AnswerParser()  # nothing expected: no 'S' can be under way
    with pytest.raises(ProtocolViolation, match="descriptor was lost"):
        p.feed_lost_descriptor(b"\0")


def test_lost_descriptor_after_a_violation_is_fatal() -> None:
    p = AnswerParser()
    p.expect(V4)
    with pytest.raises(ProtocolViolation):
        p.feed(b"X")
    with pytest.raises(ProtocolViolation):
        p.feed_lost_descriptor(b"\0")


# --- AnswerParser: pipelining and feeding patterns -------------------------------


def test_pipelined_in_order() -> None:
    reqs = [make_request("udp", "127.0.0.1", i) for i in range(1, 6)]
    p = AnswerParser()
    for r in reqs:
        p.expect(r)
    assert p.pending == 5
    events = []
    events += p.feed(E(b"S", errno.EMFILE) + b"S")
    events += p.feed(b"\0", [10])
    events += p.feed(E(b"B", errno.EADDRINUSE) + E(b"B", errno.EACCES) + b"S")
    events += p.feed(b"!", [11])
    assert events == [
        CreationFailed(reqs[0], "socket", errno.EMFILE),
        SocketReceived(reqs[1], 10),
        CreationFailed(reqs[2], "bind", errno.EADDRINUSE),
        CreationFailed(reqs[3], "bind", errno.EACCES),
        SocketReceived(reqs[4], 11),
    ]
    assert p.pending == 0
    assert p.idle


def test_expect_while_mid_answer() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.feed(b"E")
    p.expect(V6)  # another request sent while an answer is half in
    assert p.feed(b"B" + INT.pack(1) + b"S") == [CreationFailed(V4, "bind", 1)]
    assert p.feed(b"\0", [3]) == [SocketReceived(V6, 3)]


def test_partial_error_answer_not_idle() -> None:
    p = AnswerParser()
    p.expect(V4)
    data = E(b"B", 98)
    for i, b in enumerate(data[:-1]):
        assert p.feed(bytes([b])) == []
        assert not p.idle
        assert p.bytes_wanted() == len(data) - i - 1
    assert p.feed(data[-1:]) == [CreationFailed(V4, "bind", 98)]
    assert p.idle


# An answer stream is a list of answers; each answer is a list of (bytes, fds)
# pieces, where fds ride on the first byte of their piece (as from recvmsg).
Piece = tuple[bytes, tuple[int, ...]]

answers = st.one_of(
    st.tuples(st.just("S"), st.binary(min_size=1, max_size=1)),
    st.tuples(
        st.sampled_from(["ES", "EB"]),
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
    ),
)


def build(spec: list[tuple[str, object]]) -> tuple[list[Request], list[list[Piece]], list[object]]:
    """Requests, the wire answer pieces, and the events a correct parser gives."""
    reqs, pieces, want = [], [], []
    fd = 100
    for i, (kind, arg) in enumerate(spec):
        req = make_request("udp" if i % 2 else "tcp", "127.0.0.1", i)
        reqs.append(req)
        if kind == "S":
            assert isinstance(arg, bytes)
            pieces.append([(b"S", ()), (arg, (fd,))])
            want.append(SocketReceived(req, fd))
            fd += 1
        else:
            assert isinstance(arg, int)
            pieces.append([(kind.encode() + INT.pack(arg), ())])
            want.append(CreationFailed(req, "socket" if kind == "ES" else "bind", arg))
    return reqs, pieces, want


def feed_stream(p: AnswerParser, stream: list[Piece], cuts: set[int]) -> list[object]:
    """Feed ``stream`` split at the byte offsets ``cuts`` (and where fds force a cut)."""
    flat = b"".join(d for d, _ in stream)
    fd_at: dict[int, tuple[int, ...]] = {}
    pos = 0
    for d, fds in stream:
        if fds:
            fd_at[pos] = fds
            cuts.add(pos)  # an fd's byte is the first byte of its chunk
        pos += len(d)
    bounds = sorted({0, len(flat)} | {c for c in cuts if 0 < c < len(flat)})
    events: list[object] = []
    for a, b in itertools.pairwise(bounds):
        events += p.feed(flat[a:b], fd_at.get(a, ()))
    return events


@given(st.lists(answers, max_size=20), st.data())
def test_split_points_do_not_matter(spec: list[tuple[str, object]], data: st.DataObject) -> None:
    reqs, pieces, want = build(spec)
    stream = [piece for answer in pieces for piece in answer]
    total = sum(len(d) for d, _ in stream)
    cuts = data.draw(st.sets(st.integers(min_value=0, max_value=total)))

    whole, one_by_one, random_cuts = AnswerParser(), AnswerParser(), AnswerParser()
    for p in (whole, one_by_one, random_cuts):
        for r in reqs:
            p.expect(r)
    assert feed_stream(whole, stream, set()) == want
    assert feed_stream(one_by_one, stream, set(range(total + 1))) == want
    assert feed_stream(random_cuts, stream, set(cuts)) == want
    for p in (whole, one_by_one, random_cuts):
        assert p.idle
        assert p.pending == 0


@given(st.lists(answers, min_size=1, max_size=20))
def test_bytes_wanted_never_crosses_an_answer(spec: list[tuple[str, object]]) -> None:
    reqs, pieces, want = build(spec)
    p = AnswerParser()
    for r in reqs:
        p.expect(r)
    events: list[object] = []
    for answer in pieces:
        flat = b"".join(d for d, _ in answer)
        fd_at = {}
        off = 0
        for d, fds in answer:
            if fds:
                fd_at[off] = fds
            off += len(d)
        pos = 0
        while pos < len(flat):
            n = p.bytes_wanted()
            assert 1 <= n <= len(flat) - pos, "a read of bytes_wanted() would cross an answer"
            events += p.feed(flat[pos : pos + n], fd_at.get(pos, ()))
            pos += n
        assert p.idle
        assert p.bytes_wanted() == 1
    assert events == want


def test_bytes_wanted_per_state() -> None:
    p = AnswerParser()
    p.expect(V4)
    p.expect(V4)
    p.expect(V4)
    assert p.bytes_wanted() == 1
    p.feed(b"S")
    assert p.bytes_wanted() == 1  # just the byte carrying the fd, never the next answer
    p.feed(b"\0", [3])
    assert p.bytes_wanted() == 1
    p.feed(b"E")
    assert p.bytes_wanted() == 1 + INT.size
    p.feed(b"B")
    assert p.bytes_wanted() == INT.size
    p.feed(INT.pack(1))
    assert p.bytes_wanted() == 1
    p.feed(b"F")
    assert p.bytes_wanted() == 1


# --- fuzz: never anything but events or ProtocolViolation; fds accounted --------

chunks = st.lists(
    st.tuples(
        st.one_of(
            st.binary(max_size=12),
            st.lists(st.sampled_from([b"S", b"E", b"F", b"B", b"I", b"\0", INT.pack(13)])).map(
                b"".join
            ),
        ),
        st.lists(st.integers(min_value=0, max_value=1000), max_size=3),
    ),
    max_size=12,
)


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=8), chunks)
def test_fuzz_feed(n_pending: int, feeds: list[tuple[bytes, list[int]]]) -> None:
    p = AnswerParser()
    for i in range(n_pending):
        p.expect(make_request("tcp", "127.0.0.1", i))
    next_fd = 1000
    handed: list[int] = []
    dead = False
    for data, fd_marks in feeds:
        fds = [next_fd + k for k in range(len(fd_marks))]  # unique fake descriptors
        next_fd += len(fds)
        before_pending = p.pending
        try:
            events = p.feed(data, fds)
        except ProtocolViolation:
            dead = True  # the caller closes every fd of this call
            continue
        except Exception as e:  # pragma: no cover - the failure being hunted
            raise AssertionError(f"feed raised {type(e).__name__}: {e}") from e
        assert not (dead and (data or fds)), "the parser accepted input after a violation"
        assert isinstance(events, list)
        got = [ev.fd for ev in events if isinstance(ev, SocketReceived)]
        assert sorted(got) == fds, "every fd is handed out exactly once, or the call raises"
        handed += got
        assert all(isinstance(ev, (SocketReceived, CreationFailed)) for ev in events)
        assert p.pending == before_pending - len(events)
        assert p.pending >= 0
        assert (p.bytes_wanted() == 0) if dead else (p.bytes_wanted() >= 1)
    assert len(handed) == len(set(handed))


@settings(max_examples=300)
@given(st.lists(answers, min_size=1, max_size=8), st.data())
def test_fuzz_corrupted_stream(spec: list[tuple[str, object]], data: st.DataObject) -> None:
    """A valid stream with one byte changed parses correctly up to the change,
    then either still gives events or raises ProtocolViolation."""
    reqs, pieces, _ = build(spec)
    stream = [piece for answer in pieces for piece in answer]
    flat = bytearray(b"".join(d for d, _ in stream))
    i = data.draw(st.integers(min_value=0, max_value=len(flat) - 1))
    flat[i] = data.draw(st.integers(min_value=0, max_value=255))
    p = AnswerParser()
    for r in reqs:
        p.expect(r)
    try:
        events = p.feed(bytes(flat))  # no fds: any 'S' answer must fail
    except ProtocolViolation:
        return
    assert all(isinstance(ev, CreationFailed) for ev in events)


def test_request_is_hashable_and_frozen() -> None:
    r = make_request("tcp", "::1", 1)
    assert {r: 1}[make_request("TCP", ipaddress.ip_address("::1"), 1)] == 1
    with pytest.raises(AttributeError):
        r.port = 2  # type: ignore[misc]
    assert isinstance(r, Request)
