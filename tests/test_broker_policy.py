"""The broker's policy file and its sharing rules (no processes needed)."""

from __future__ import annotations

import grp
import os
import pwd
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockcreator._broker_protocol import ShareMode
from sockcreator._protocol import SocketOptions, make_request
from sockcreator.broker import _Holders, shareable
from sockcreator.broker_policy import PolicyError, parse_policy

ROOT = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name


def test_rules_by_user_group_protocol_address_port() -> None:
    p = parse_policy(f"""
version = 1
[[allow]]
users = ["{ROOT}", 1234]
protocols = ["tcp"]
addresses = ["10.0.0.0/8", "::1"]
ports = [80, "8000-8080"]

[[allow]]
groups = [4321]
ports = ["53"]
""")
    tcp = make_request("tcp", "10.1.2.3", 80)
    assert p.allows(0, [], tcp)
    assert p.allows(1234, [], make_request("tcp", "::1", 8080))
    assert not p.allows(1234, [], make_request("tcp", "::1", 8081))
    assert not p.allows(1234, [], make_request("udp", "10.1.2.3", 80))
    assert not p.allows(1234, [], make_request("tcp", "11.0.0.1", 80))
    assert not p.allows(1235, [], tcp)
    assert p.allows(99, [7, 4321], make_request("udp", "192.0.2.1", 53))  # by group, any address
    assert not p.allows(99, [7], make_request("udp", "192.0.2.1", 53))


def test_everyone_and_dual_stack() -> None:
    p = parse_policy("""
[[allow]]
users = ["*"]
addresses = ["::"]
ports = [80]
""")
    v6 = make_request("tcp", "::", 80)
    dual = make_request("tcp", "::", 80, options=SocketOptions.DUALSTACK)
    assert p.allows(12345, [], v6)
    assert not p.allows(12345, [], dual)  # would take 0.0.0.0:80 as well
    p2 = parse_policy("""
[[allow]]
users = ["*"]
addresses = ["::", "0.0.0.0"]
ports = [80]
""")
    assert p2.allows(12345, [], dual)
    mapped = make_request("udp", "::ffff:127.0.0.1", 80, options=SocketOptions.DUALSTACK)
    assert not p2.allows(1, [], mapped)


def test_creator_allow_is_the_union() -> None:
    p = parse_policy("""
[[allow]]
users = ["*"]
protocols = ["udp"]
addresses = ["127.0.0.1", "10.0.0.0/8"]
ports = [53]

[[allow]]
users = [1]
protocols = ["tcp", "udp"]
addresses = ["::1"]
ports = ["80-81"]
""")
    assert p.creator_allow() == ["udp:*:53-53", "*:[::1]:80-81"]
    broad = parse_policy('[[allow]]\nusers = ["*"]\nports = ["0-65535"]\n')
    assert broad.creator_allow() is None  # --allow-all


@pytest.mark.parametrize(
    "text",
    [
        "allow = 5",
        "[[allow]]\nports = [80]",  # nobody
        '[[allow]]\nusers = ["*"]',  # no ports
        '[[allow]]\nusers = ["no-such-user-xyz"]\nports = [80]',
        '[[allow]]\ngroups = ["no-such-group-xyz"]\nports = [80]',
        '[[allow]]\nusers = ["*"]\nports = [70000]',
        '[[allow]]\nusers = ["*"]\nports = ["90-80"]',
        '[[allow]]\nusers = ["*"]\nports = ["8o"]',
        '[[allow]]\nusers = ["*"]\nports = [true]',
        '[[allow]]\nusers = ["*"]\nports = []',
        '[[allow]]\nusers = ["*"]\nports = [80]\nprotocols = ["sctp"]',
        '[[allow]]\nusers = ["*"]\nports = [80]\naddresses = ["10.0.0.1/8"]',  # host bits
        '[[allow]]\nusers = ["*"]\nports = [80]\naddresses = ["fe80::1%eth0"]',
        '[[allow]]\nusers = ["*"]\nports = [80]\ncolour = "red"',
        'version = 2\n[[allow]]\nusers = ["*"]\nports = [80]',
        'mystery = 1\n[[allow]]\nusers = ["*"]\nports = [80]',
        "[[allow",
        "[[allow]]\nusers = [-1]\nports = [80]",
    ],
)
def test_bad_policies_are_refused_at_load(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_names_resolve_at_load() -> None:
    p = parse_policy(f'[[allow]]\ngroups = ["{ROOT_GROUP}"]\nports = [80]\n')
    assert p.rules[0].gids == frozenset({0})
    assert p.allows(os.getuid() + 1, [0], make_request("tcp", "0.0.0.0", 80))


# --- sharing --------------------------------------------------------------------------

MODES = list(ShareMode)


def test_share_rules_spelled_out() -> None:
    no, same, any_ = ShareMode.NO, ShareMode.SAMEAPP, ShareMode.ANY
    assert shareable([], no, "", 1)
    assert not shareable([(no, "", 1)], any_, "", 1)
    assert not shareable([(any_, "", 1)], no, "", 1)
    assert shareable([(any_, "a", 1)], any_, "b", 2)
    assert shareable([(same, "a", 1)], same, "a", 1)
    assert not shareable([(same, "a", 1)], same, "a", 2)  # names are per uid
    assert not shareable([(same, "a", 1)], same, "b", 1)
    assert shareable([(same, "a", 1)], any_, "a", 1)
    assert not shareable([(same, "a", 1)], any_, "b", 1)
    assert shareable([(any_, "a", 1)], same, "a", 1)
    assert not shareable([(any_, "a", 1), (any_, "b", 1)], same, "a", 1)


holders_st = st.lists(
    st.tuples(st.sampled_from(MODES), st.sampled_from(["a", "b"]), st.sampled_from([1, 2])),
    max_size=6,
)


@given(holders_st, st.sampled_from(MODES), st.sampled_from(["a", "b"]), st.sampled_from([1, 2]),
       st.data())  # fmt: skip
def test_incremental_summary_agrees_with_the_rule(
    holders: list[tuple[ShareMode, str, int]],
    mode: ShareMode,
    name: str,
    uid: int,
    data: st.DataObject,
) -> None:
    h = _Holders()
    for m, n, u in holders:
        h.change(m, (n, u), 1)
    # and some come and go again
    gone = data.draw(st.lists(st.sampled_from(holders), unique=True) if holders else st.just([]))
    kept = list(holders)
    for g in gone:
        h.change(g[0], (g[1], g[2]), -1)
        kept.remove(g)
    assert h.admit(mode, (name, uid)) == shareable(kept, mode, name, uid)


def test_socket_kinds() -> None:
    p = parse_policy('[[allow]]\nusers = ["*"]\nprotocols = ["udp"]\nports = [53]\n')
    assert p.rules[0].types == frozenset({socket.SOCK_DGRAM})
