"""Policy specs on the unprivileged side (``sockcreator.policy``), checked
against the creator's own parser and matcher, which enforce them."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockcreator import creator, make_request
from sockcreator.client.specs import Rule, allowed, parse_listen, parse_rule

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("tcp:0.0.0.0:80", Rule("tcp", V4("0.0.0.0"), 80, 80)),
        ("udp:[::]:53", Rule("udp", V6("::"), 53, 53)),
        ("tcp:*:8000-8080", Rule("tcp", None, 8000, 8080)),
        ("*:*:0-65535", Rule(None, None, 0, 65535)),
        ("*:127.0.0.1:0", Rule(None, V4("127.0.0.1"), 0, 0)),
        ("udp:[::ffff:1.2.3.4]:53", Rule("udp", V6("::ffff:1.2.3.4"), 53, 53)),
        ("tcp:[fe80::1]:0080", Rule("tcp", V6("fe80::1"), 80, 80)),  # leading zeros: a number
    ],
)
def test_parse_rule(spec: str, rule: Rule) -> None:
    assert parse_rule(spec) == rule
    assert parse_rule(str(rule)) == rule  # the canonical form round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "PROTO:ADDR:PORTS"),
        ("tcp", "PROTO:ADDR:PORTS"),
        ("tcp:80", "PROTO:ADDR:PORTS"),
        ("TCP:*:80", "protocol"),
        ("sctp:*:80", "protocol"),
        ("tcp:localhost:80", "address"),
        ("tcp:::1:80", "address"),  # IPv6 needs brackets
        ("tcp:[1.2.3.4]:80", "address"),
        ("tcp:[fe80::1%lo]:80", "address"),  # no scope id on the wire
        ("tcp:01.2.3.4:80", "address"),  # inet_pton: no leading zeros
        ("tcp:1.2.3:80", "address"),
        ("tcp:256.0.0.1:80", "address"),
        ("tcp: 1.2.3.4:80", "address"),
        ("tcp:*:", "port"),
        ("tcp:*:65536", "port"),
        ("tcp:*:-80", "port"),
        ("tcp:*:+80", "port"),
        ("tcp:*:80-", "port"),  # the creator reads this as 80; we refuse it
        ("tcp:*:80-90-100", "port"),
        ("tcp:*:\u0668\u0660", "PROTO:ADDR:PORTS"),  # non-ASCII digits
        ("tcp:*:90-80", "empty"),
        ("tcp:*:80\n", "PROTO:ADDR:PORTS"),
        ("tcp:*:" + "0" * 200 + "80", "PROTO:ADDR:PORTS"),
    ],
)
def test_parse_rule_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="spec") as info:
        parse_rule(spec)
    assert message in str(info.value)


def test_parse_rule_type() -> None:
    with pytest.raises(TypeError):
        parse_rule(80)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "request_args"),
    [
        ("tcp:127.0.0.1:80", ("tcp", "127.0.0.1", 80)),
        ("udp:[::1]:53", ("udp", "::1", 53)),
        ("udp:[::ffff:1.2.3.4]:53", ("udp", "::ffff:1.2.3.4", 53)),
    ],
)
def test_parse_listen(spec: str, request_args: tuple[str, str, int]) -> None:
    assert parse_listen(spec) == make_request(*request_args)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("*:127.0.0.1:80", "tcp or udp"),
        ("tcp:*:80", "one address"),
        ("tcp:127.0.0.1:80-81", "port"),
        ("tcp:127.0.0.1:0", "1..65535"),
        ("tcp:127.0.0.1:65536", "port"),
        ("tcp:[::1]", "address"),
        ("bogus", "PROTO:ADDR:PORTS"),
    ],
)
def test_parse_listen_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="listen spec") as info:
        parse_listen(spec)
    assert message in str(info.value)


def test_rule_checks_its_fields() -> None:
    with pytest.raises(ValueError):
        Rule("sctp", None, 1, 1)
    with pytest.raises(ValueError):
        Rule(None, None, 2, 1)
    with pytest.raises(ValueError):
        Rule(None, None, 0, 65536)


def test_matches() -> None:
    rule = parse_rule("tcp:127.0.0.1:8000-8080")
    assert rule.matches(make_request("tcp", "127.0.0.1", 8000))
    assert rule.matches(make_request("tcp", "127.0.0.1", 8080))
    assert not rule.matches(make_request("tcp", "127.0.0.1", 8081))
    assert not rule.matches(make_request("udp", "127.0.0.1", 8000))
    assert not rule.matches(make_request("tcp", "127.0.0.2", 8000))
    assert not rule.matches(make_request("tcp", "::ffff:127.0.0.1", 8000))
    anyv6 = parse_rule("*:[::]:53")
    assert anyv6.matches(make_request("udp", "::", 53))
    assert not anyv6.matches(make_request("udp", "::1", 53))  # [::] is an address, not "any"
    assert not anyv6.matches(make_request("udp", "0.0.0.0", 53))
    wildcard = parse_rule("*:*:53")
    assert wildcard.matches(make_request("udp", "::1", 53))
    assert wildcard.matches(make_request("tcp", "10.1.2.3", 53))


def test_allowed() -> None:
    request = make_request("tcp", "127.0.0.1", 80)
    assert allowed(None, request)
    assert not allowed([], request)
    assert allowed([parse_rule("udp:*:80"), parse_rule("tcp:*:80")], request)


# --- The same decisions as the creator, which enforces them --------------------------------

PROTOS = st.sampled_from(["tcp", "udp", "*", "TCP", "", "sctp", "tcp "])
HOSTS = st.one_of(
    st.sampled_from(
        [
            "*",
            "127.0.0.1",
            "0.0.0.0",
            "[::]",
            "[::1]",
            "::1",
            "1.2.3",
            "01.2.3.4",
            "[fe80::1%lo]",
            "[::ffff:1.2.3.4]",
            "256.1.1.1",
            "",
            "[]",
            "[1.2.3.4]",
            "[::1",
        ]
    ),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.text(max_size=12),
)
PORT_TEXT = st.one_of(
    st.integers(0, 70000).map(str),
    st.sampled_from(["", "-", "80-", "-80", "+80", " 80", "80 ", "0x50", "\u0668", "00080"]),
    st.tuples(st.integers(0, 70000), st.integers(0, 70000)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.text(max_size=8),
)
SPECS = st.one_of(
    st.tuples(PROTOS, HOSTS, PORT_TEXT).map(":".join),
    st.text(max_size=40),
)


def creator_rule(spec: str) -> creator.Rule | None:
    """The creator's own parse (its errors are what parse_args catches)."""
    try:
        return creator.parse_rule(spec)
    except (ValueError, KeyError, OSError):
        return None


def as_creator_rule(rule: Rule) -> creator.Rule:
    kind = {"tcp": b"T", "udp": b"U", None: b""}[rule.protocol]
    if rule.address is None:
        family, packed = b"", b""
    else:
        family, packed = str(rule.address.version).encode(), rule.address.packed
    return kind, family, packed, rule.low, rule.high


@given(SPECS)
def test_parse_rule_agrees_with_the_creator(spec: str) -> None:
    theirs = creator_rule(spec)
    try:
        ours: Rule | None = parse_rule(spec)
    except ValueError:
        ours = None
    if ours is not None:
        assert theirs == as_creator_rule(ours)  # everything we accept, it accepts the same
    elif theirs is not None:
        # our only refusals of what it accepts: "80-" and zero-padding past 128 characters
        assert spec.endswith("-") or len(spec) > 128, spec


@given(
    st.tuples(PROTOS.filter(lambda p: p in ("tcp", "udp", "*")), HOSTS, PORT_TEXT).map(":".join),
    st.sampled_from(["tcp", "udp"]),
    st.one_of(st.ip_addresses(), st.sampled_from([V4("127.0.0.1"), V6("::1"), V6("::")])),
    st.integers(0, 65535),
)
def test_matches_agrees_with_the_creator(
    spec: str, proto: str, address: V4 | V6, port: int
) -> None:
    try:
        rule = parse_rule(spec)
    except ValueError:
        return
    request = make_request(proto, address, port)
    kind = b"T" if request.type == socket.SOCK_STREAM else b"U"
    family = str(address.version).encode()
    theirs = creator.allowed([as_creator_rule(rule)], kind, family, address.packed, port)
    assert rule.matches(request) == theirs
