"""The broker's policy file and its sharing rules (no processes needed)."""

from __future__ import annotations

import grp
import os
import pwd
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockcreator.broker._protocol import Reason, ShareMode
from sockcreator.broker._table import Entry, Grant, Holders, ShareTable, shareable
from sockcreator.broker.policy import PolicyError, parse_policy
from sockcreator.client._protocol import SocketOptions, make_request

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
    h = Holders()
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


# --- the table of cached sockets: a model-based test ------------------------------------

_PORTS = [0, 80, 1024]  # 1024: also where a port-0 entry may end up
_OPTION_SETS = [SocketOptions(0), SocketOptions.REUSEPORT]


class _Model:
    """The table's job, spelled out the slow way: a list of entries, each
    with its grants as (id, owner, mode, name, uid) in order."""

    def __init__(self, max_sockets: int, max_held: int) -> None:
        self.max_sockets, self.max_held = max_sockets, max_held
        self.entries: list[dict[str, Any]] = []  # every live entry, keyed or not

    def held(self, owner: int) -> list[tuple[int, dict[str, Any]]]:
        return [(g[0], e) for e in self.entries for g in e["grants"] if g[1] == owner]

    def keyed(self, port: int, addr: str) -> dict[str, Any] | None:
        for e in self.entries:
            if e["keyed"] and (e["port"], e["addr"]) == (port, addr):
                return e
        return None

    def near(self, port: int, addr: str) -> list[dict[str, Any]]:
        """Keyed entries on the same port whose addresses overlap (a wildcard
        overlaps every address), other than the one of the same key."""
        return [
            e for e in self.entries
            if e["keyed"] and e["port"] == port and e["addr"] != addr
            and "0.0.0.0" in (e["addr"], addr)
        ]  # fmt: skip


_ADDRS = ["127.0.0.1", "0.0.0.0", "127.0.0.2"]


_op = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, 3), st.sampled_from(_PORTS),
              st.sampled_from(_OPTION_SETS), st.sampled_from([None, 5]),
              st.sampled_from(MODES), st.sampled_from(["a", "b"]), st.sampled_from([1, 2]),
              st.sampled_from(_ADDRS)),
    st.tuples(st.just("created"), st.integers(0, 9), st.sampled_from([1024, 1025])),
    st.tuples(st.just("failed"), st.integers(0, 9)),
    st.tuples(st.just("release"), st.integers(0, 3), st.integers(0, 9)),
    st.tuples(st.just("release_all"), st.integers(0, 3)),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60), st.integers(1, 4), st.integers(1, 5))
def test_share_table_agrees_with_a_model(ops: list[tuple[Any, ...]], max_sockets: int,
                                         max_held: int) -> None:  # fmt: skip
    """Every decision of :class:`ShareTable` (refusals and their reasons,
    waiting for a creation under way, the socket handed back with the last
    release) is what the model says, and the table stays consistent."""
    table = ShareTable(max_sockets, max_held)
    model = _Model(max_sockets, max_held)
    entries: list[tuple[Entry, dict[str, Any]]] = []  # being created: table's and model's
    closed: list[object] = []
    for op in ops:
        if op[0] == "claim":
            _, owner, port, options, backlog, mode, name, uid, addr = op
            if mode is ShareMode.SAMEAPP and not name:
                continue
            request = make_request("tcp", addr, port, options=options)
            got = table.claim(owner, uid, request, backlog, mode, name)
            e = model.keyed(port, addr) if port else None
            near = model.near(port, addr) if port else []
            if len(model.held(owner)) >= max_held:
                assert got is Reason.LIMIT
            elif e is not None and (e["options"], e["backlog"]) != (options, backlog):
                assert got is Reason.OPTIONS
            elif e is not None and not shareable([g[2:] for g in e["grants"]], mode, name, uid):
                assert got is Reason.SHARE
            elif any(not shareable([g[2:] for g in n["grants"]], mode, name, uid) for n in near):
                assert got is Reason.SHARE  # another address overlaps (finding 4)
            elif e is None and len(model.entries) >= max_sockets:
                assert got is Reason.LIMIT
            else:
                assert isinstance(got, Grant)
                if e is None:
                    assert got.creates and got.entry.sock is None
                    e = {"port": port, "addr": addr, "keyed": bool(port), "options": options,
                         "backlog": backlog, "grants": [], "sock": None,
                         "entry": got.entry}  # fmt: skip
                    model.entries.append(e)
                    entries.append((got.entry, e))
                else:
                    assert not got.creates and (got.entry.sock is None) == (e["sock"] is None)
                e["grants"].append((got.id, owner, mode, name, uid))
        elif op[0] in ("created", "failed") and entries:
            entry, e = entries.pop(op[1] % len(entries))
            if op[0] == "created":
                sock = object()
                waiting = table.created(entry, sock, op[2])
                if not e["grants"]:
                    assert waiting is None
                    model.entries.remove(e)
                    continue
                assert waiting is not None
                assert [g.id for g in waiting] == [g[0] for g in e["grants"]]
                e["sock"] = sock
                if not e["port"]:  # cached under the port it got, unless that is taken
                    e["port"], e["keyed"] = op[2], model.keyed(op[2], e["addr"]) is None
            else:
                dropped = table.failed(entry)
                assert [g.id for g in dropped] == [g[0] for g in e["grants"]]
                model.entries.remove(e)
        elif op[0] == "release":
            _, owner, index = op
            mine = model.held(owner)
            ready = [(gid, e) for gid, e in mine if e["sock"] is not None]
            if not ready:
                assert all(table.grant(owner, gid) is None for gid, _ in mine)
                continue
            gid, e = ready[index % len(ready)]
            g = table.grant(owner, gid)
            assert g is not None
            sock = table.release(g)
            e["grants"] = [x for x in e["grants"] if x[0] != gid]
            assert (sock is not None) == (not e["grants"])
            if sock is not None:
                assert sock is e["sock"]
                closed.append(sock)
                model.entries.remove(e)
        elif op[0] == "release_all":
            owner = op[1]
            released = table.release_all(owner)
            assert sorted(g.id for g, _ in released) == sorted(gid for gid, _ in model.held(owner))
            for e in list(model.entries):
                e["grants"] = [x for x in e["grants"] if x[1] != owner]
                if not e["grants"] and e["sock"] is not None:
                    model.entries.remove(e)
                    assert any(s is e["sock"] for _, s in released)
                    closed.append(e["sock"])
        table.check()
        assert table.live == len(model.entries)
        keyed = {id(e["entry"]) for e in model.entries if e["keyed"]}
        assert {id(x) for x in table.entries.values()} == keyed
    assert len(closed) == len(set(map(id, closed)))  # each socket handed back once


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (("0.0.0.0", 0), ("127.0.0.1", 0), True),
        (("127.0.0.1", 0), ("127.0.0.2", 0), False),
        (("127.0.0.1", 0), ("127.0.0.1", 0), True),
        (("::", 0), ("0.0.0.0", 0), False),  # V6ONLY on: IPv6 only
        (("::", 2), ("0.0.0.0", 0), True),  # V6ONLY off: IPv4 too
        (("::", 2), ("127.0.0.1", 0), True),
        (("::", 0), ("::1", 0), True),
        (("::1", 2), ("127.0.0.1", 0), False),  # V6ONLY off changes nothing on ::1
        (("::ffff:127.0.0.1", 2), ("127.0.0.1", 0), True),
        (("::ffff:127.0.0.1", 2), ("0.0.0.0", 0), True),
        (("::ffff:127.0.0.1", 2), ("127.0.0.2", 0), False),
        (("::ffff:127.0.0.1", 2), ("::", 0), False),
        (("::ffff:0.0.0.0", 2), ("127.0.0.9", 0), True),
    ],
)
def test_coverage_overlaps(a: tuple[str, int], b: tuple[str, int], overlap: bool) -> None:
    """Which sockets on one port share traffic (what share mode NO guards)."""
    from sockcreator.broker._table import coverage, overlaps

    ca, cb = (coverage(make_request("udp", h, 53, options=o)) for h, o in (a, b))
    assert overlaps(ca, cb) is overlap
    assert overlaps(cb, ca) is overlap


def test_a_lingering_socket_goes_to_its_last_holders_successor_only() -> None:
    """Linger (``serve --linger``): the last release keeps the socket open,
    counted against the limits and still held, for sharing, by its last
    holder; its successor (same share mode, name and uid) gets the very same
    socket; anyone the last holder would not share with is refused, also on
    an overlapping address; expiry hands it back once, and a timer of an
    older lingering is void."""
    table = ShareTable(8, 8, linger=True)
    web = make_request("tcp", "127.0.0.1", 80)
    g = table.claim("a", 1, web, 5, ShareMode.SAMEAPP, "web")
    assert isinstance(g, Grant) and g.creates
    sock = object()
    table.created(g.entry, sock, 80)
    assert table.release(g) is None  # lingers
    entry = g.entry
    assert entry.phantom == (ShareMode.SAMEAPP, "web", 1) and entry.sock is sock
    table.check()
    assert table.claim("b", 2, web, 5, ShareMode.SAMEAPP, "web") is Reason.SHARE  # other uid
    wild = make_request("tcp", "0.0.0.0", 80)
    assert table.claim("b", 2, wild, 5, ShareMode.NO, "") is Reason.SHARE  # overlaps
    assert table.live == 1
    gen = entry.gen
    again = table.claim("c", 1, web, 5, ShareMode.SAMEAPP, "web")  # the successor
    assert isinstance(again, Grant) and again.entry is entry and entry.sock is sock
    assert entry.phantom is None
    table.check()
    assert table.expire(entry, gen) is None  # taken again: the old timer is void
    assert table.release(again) is None and entry.gen == gen + 1  # lingers anew
    assert table.expire(entry, gen) is None
    assert table.expire(entry, gen + 1) is sock  # now it is over
    assert table.live == 0 and not table.entries
    table.check()
    # ANY lingering: anyone asking ANY may take it over
    g = table.claim("a", 1, web, None, ShareMode.ANY, "")
    assert isinstance(g, Grant)
    table.created(g.entry, sock, 80)
    table.release(g)
    other = table.claim("b", 2, web, None, ShareMode.ANY, "")
    assert isinstance(other, Grant) and other.entry is g.entry and g.entry.phantom is None
    table.check()
