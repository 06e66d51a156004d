"""The broker's policy file: which users and groups may have which sockets.

A TOML file of ``[[allow]]`` tables; a request is allowed if any one table
allows it, and refused (EPERM) otherwise::

    version = 1                        # optional; only 1 exists

    [[allow]]
    users = ["alice", 1001]            # names or uids; "*" is everyone
    groups = ["www-data"]              # names or gids (the peer's primary or
                                       # supplementary groups, from the kernel)
    protocols = ["tcp"]                # default: ["tcp", "udp"]
    addresses = ["0.0.0.0", "::/0"]    # addresses or prefixes; default: any
    ports = [80, 443, "8000-8080"]     # required; 0 allows an ephemeral port

A table needs ``users`` or ``groups`` (or both: either matches) and
``ports``; unknown keys, unknown users and groups, and malformed values are
errors when the file is loaded, never later.  Names are resolved when the
file is loaded.

An IPv6 socket with IPV6_V6ONLY off (``DUALSTACK``) on ``::`` also takes
IPv4's ``0.0.0.0``, and one on ``::ffff:a.b.c.d`` takes ``a.b.c.d``: such a
request must be allowed for the IPv4 address too.

:meth:`Policy.creator_allow` turns the union of all tables into the
creator's ``--allow`` list (prefixes that are not single addresses become
``*``): the creator fences in what the broker can ever ask for, the broker
checks each user against the exact tables.
"""

from __future__ import annotations

import collections
import grp
import ipaddress
import pwd
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..client._protocol import IPAddress, Request, SocketOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "PeerPolicy",
    "Policy",
    "PolicyError",
    "Rule",
    "changes",
    "load_policy",
    "outside",
    "parse_policy",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_KEYS = {"users", "groups", "protocols", "addresses", "ports"}
_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
_ANY_V4 = ipaddress.IPv4Address(0)


class PolicyError(ValueError):
    """The policy file is malformed (the message says where)."""


@dataclass(frozen=True)
class Rule:
    """One ``[[allow]]`` table, resolved."""

    everyone: bool
    uids: frozenset[int]
    gids: frozenset[int]
    types: frozenset[socket.SocketKind]
    networks: tuple[Network, ...] | None  # None: any address
    ports: tuple[tuple[int, int], ...]

    def applies_to(self, uid: int, gids: Iterable[int]) -> bool:
        return self.everyone or uid in self.uids or not self.gids.isdisjoint(gids)

    def allows(self, kind: socket.SocketKind, address: IPAddress, port: int) -> bool:
        return (
            kind in self.types
            and any(lo <= port <= hi for lo, hi in self.ports)
            and (self.networks is None or any(address in n for n in self.networks))
        )


def _addresses(request: Request) -> list[IPAddress]:
    """Every address the socket would take (see the module doc)."""
    addr = request.address
    out: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and request.options & SocketOptions.DUALSTACK:
        if addr.is_unspecified:
            out.append(_ANY_V4)
        elif addr.ipv4_mapped is not None:
            out.append(addr.ipv4_mapped)
    return out


@dataclass(frozen=True)
class PeerPolicy:
    """The rules that apply to one peer (computed once per connection)."""

    rules: tuple[Rule, ...]

    def allows(self, request: Request) -> bool:
        return all(
            any(r.allows(request.type, a, request.port) for r in self.rules)
            for a in _addresses(request)
        )


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]

    def for_peer(self, uid: int, gids: Iterable[int]) -> PeerPolicy:
        gid_set = frozenset(gids)
        return PeerPolicy(tuple(r for r in self.rules if r.applies_to(uid, gid_set)))

    def allows(self, uid: int, gids: Iterable[int], request: Request) -> bool:
        return self.for_peer(uid, gids).allows(request)

    def creator_allow(self) -> list[str] | None:
        """The creator's ``--allow`` specs for the union of all rules; None
        if that union is everything (the creator then needs --allow-all)."""
        specs: dict[str, None] = {}
        for r in self.rules:
            protos = (
                ["*"]
                if len(r.types) == 2
                else ["tcp" if t == socket.SOCK_STREAM else "udp" for t in r.types]
            )
            hosts: list[str] = []
            for n in r.networks if r.networks is not None else [None]:
                if n is None or n.prefixlen != n.max_prefixlen:
                    hosts.append("*")
                else:
                    a = n.network_address
                    hosts.append(f"[{a}]" if a.version == 6 else str(a))
            for proto in protos:
                for host in dict.fromkeys(hosts):
                    for lo, hi in r.ports:
                        specs[f"{proto}:{host}:{lo}-{hi}"] = None
        if "*:*:0-65535" in specs:
            return None
        return [spec for spec in specs if not _subsumed(spec, specs)]


def _subsumed(spec: str, specs: Mapping[str, None]) -> bool:
    """Whether a wider spec with the same ports is in ``specs`` too."""
    proto, rest = spec.split(":", 1)
    host, ports = rest.rsplit(":", 1)
    wider = {f"*:{host}:{ports}", f"{proto}:*:{ports}", f"*:*:{ports}"} - {spec}
    return not wider.isdisjoint(specs)


def _split(spec: str) -> tuple[str, str, int, int]:
    proto, rest = spec.split(":", 1)
    host, ports = rest.rsplit(":", 1)
    lo, _, hi = ports.partition("-")
    return proto, host, int(lo), int(hi or lo)


def outside(fence: list[str] | None, wanted: list[str] | None) -> list[str]:
    """The specs of ``wanted`` (a :meth:`Policy.creator_allow` list; None is
    everything) that the creator started with ``fence`` would refuse: empty
    if every request ``wanted`` allows is within ``fence``.  Conservative: a
    spec is within the fence only if, for each of its protocols, the fence's
    specs for that protocol (or ``*``) and its host (or ``*``) together cover
    its whole port range."""
    if fence is None:
        return []
    if wanted is None:
        return ["*:*:0-65535"]
    have = [_split(s) for s in fence]
    out = []
    for spec in wanted:
        proto, host, lo, hi = _split(spec)
        for p in ("tcp", "udp") if proto == "*" else (proto,):
            ranges = sorted((a, b) for fp, fh, a, b in have if fp in ("*", p) and fh in ("*", host))
            need = lo
            for a, b in ranges:
                if a > need:
                    break
                need = max(need, b + 1)
            if need <= hi:
                out.append(spec)
                break
    return out


def changes(old: Policy, new: Policy) -> tuple[int, int]:
    """(tables added, tables removed) from ``old`` to ``new``, as resolved
    rules: a table only reordered, or whose names resolve to the same ids,
    is unchanged."""
    added = collections.Counter(new.rules)
    added.subtract(old.rules)
    return sum(n for n in added.values() if n > 0), -sum(n for n in added.values() if n < 0)


def _where(index: int, key: str) -> str:
    return f"[[allow]] #{index + 1}, {key}"


def _list(table: Mapping[str, Any], key: str, index: int) -> list[Any] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{_where(index, key)}: must be a non-empty list")
    return value


def _id(value: Any, where: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A uid or gid: a number, or a name ``lookup`` resolves (KeyError: unknown)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return value
    if isinstance(value, str) and value:
        try:
            return lookup(value)
        except KeyError:
            raise PolicyError(f"{where}: unknown {kind} {value!r}") from None
    raise PolicyError(f"{where}: {value!r} is not a {kind} name or {kind[0]}id")


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _port_range(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str):
        lo_s, dash, hi_s = value.partition("-")
        if not all(s.isascii() and s.isdigit() for s in (lo_s, hi_s if dash else lo_s)):
            raise PolicyError(f"{where}: {value!r} is not a port or LOW-HIGH range")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
    else:
        raise PolicyError(f"{where}: {value!r} is not a port or LOW-HIGH range")
    if not 0 <= lo <= hi <= 65535:
        raise PolicyError(f"{where}: {value!r} is not within 0..65535 (low <= high)")
    return lo, hi


def _network(value: Any, where: str) -> Network:
    if not isinstance(value, str):
        raise PolicyError(f"{where}: {value!r} is not an address or prefix string")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise PolicyError(f"{where}: {e}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id:
        raise PolicyError(f"{where}: scope ids are not supported")
    return net


def _rule(table: Any, index: int) -> Rule:
    if not isinstance(table, dict):
        raise PolicyError(f"[[allow]] #{index + 1}: must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise PolicyError(f"[[allow]] #{index + 1}: unknown keys {sorted(unknown)}")
    users = _list(table, "users", index) or []
    groups = _list(table, "groups", index) or []
    if not users and not groups:
        raise PolicyError(f"[[allow]] #{index + 1}: needs users or groups")
    everyone = "*" in users
    uids = frozenset(_id(u, _where(index, "users"), "user", _uid) for u in users if u != "*")
    gids = frozenset(_id(g, _where(index, "groups"), "group", _gid) for g in groups)
    protos = _list(table, "protocols", index) or ["tcp", "udp"]
    if any(p not in _TYPES for p in protos):
        raise PolicyError(f"{_where(index, 'protocols')}: each must be 'tcp' or 'udp'")
    addresses = _list(table, "addresses", index)
    networks = (
        None
        if addresses is None
        else tuple(_network(a, _where(index, "addresses")) for a in addresses)
    )
    ports = _list(table, "ports", index)
    if ports is None:
        raise PolicyError(f"[[allow]] #{index + 1}: needs ports")
    return Rule(
        everyone=everyone,
        uids=uids,
        gids=gids,
        types=frozenset(_TYPES[p] for p in protos),
        networks=networks,
        ports=tuple(_port_range(p, _where(index, "ports")) for p in ports),
    )


def parse_policy(text: str) -> Policy:
    """A policy from TOML text; PolicyError if anything is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"not valid TOML: {e}") from None
    unknown = set(data) - {"version", "allow"}
    if unknown:
        raise PolicyError(f"unknown top-level keys {sorted(unknown)}")
    if data.get("version", 1) != 1:
        raise PolicyError(f"unsupported policy version {data.get('version')!r} (only 1)")
    tables = data.get("allow", [])
    if not isinstance(tables, list):
        raise PolicyError("'allow' must be an array of tables ([[allow]])")
    return Policy(tuple(_rule(t, i) for i, t in enumerate(tables)))


def load_policy(path: str | Path) -> Policy:
    """A policy from a file; PolicyError (or OSError) if it cannot be used."""
    return parse_policy(Path(path).read_text(encoding="utf-8"))
