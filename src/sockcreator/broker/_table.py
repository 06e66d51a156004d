"""The broker's table of cached sockets and grants: pure state, no I/O.

BIND 10's sharing rules (see :mod:`sockcreator.broker`), kept as a plain
object so that they can be tested and fuzzed without processes or sockets:

- one :class:`Entry` per (protocol, address, port), with the options and
  backlog it was made with, and one :class:`Grant` per holder;
- :meth:`ShareTable.claim` decides a request: refused (a
  :class:`~sockcreator.broker._protocol.Reason`), granted at once, waiting
  for a creation already under way, or the first claim of a new entry, which
  the caller must create and then report with :meth:`ShareTable.created` or
  :meth:`ShareTable.failed`;
- sharing is decided across every socket whose addresses overlap, not only
  the socket of the same key: a wildcard overlaps every address of its
  family, and an IPv6 socket that takes IPv4 traffic (``::`` with V6ONLY off,
  or an IPv4-mapped address) overlaps the IPv4 ones (:func:`coverage`);
- :meth:`ShareTable.release` and :meth:`ShareTable.release_all` end grants,
  and hand back the cached socket to close with its last grant.

The table never touches a socket: ``Entry.sock`` is whatever the caller
stored, and the caller closes what the table hands back.  ``owner`` is any
hashable object (the broker's connection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, Union

from ..client._protocol import Request, SocketOptions
from ._protocol import Reason, ShareMode

__all__ = [
    "Coverage",
    "Entry",
    "Grant",
    "Holders",
    "Key",
    "ShareTable",
    "coverage",
    "entry_key",
    "overlaps",
    "shareable",
]

#: An entry's key: (socket type, packed address, port).  Cheap to hash.
Key = tuple[int, bytes, int]
#: The IPv4 and the IPv6 addresses a socket takes traffic for: None (no
#: traffic of that family), b"" (every address: a wildcard), or one packed
#: address.
Coverage = tuple[Union[bytes, None], Union[bytes, None]]
_MAPPED = bytes(10) + b"\xff\xff"

_NO, _SAMEAPP, _ANY = ShareMode.NO, ShareMode.SAMEAPP, ShareMode.ANY


def entry_key(request: Request) -> Key:
    return (int(request.type), request.address.packed, request.port)


def coverage(request: Request) -> Coverage:
    """Which addresses a socket bound as ``request`` asks takes traffic for
    (as Linux decides it: V6ONLY is on unless DUALSTACK is asked, and with
    it off only ``::`` and mapped addresses take IPv4)."""
    return _coverage(request.address.packed, request.options)


def _coverage(packed: bytes, options: int) -> Coverage:
    """:func:`coverage` from the packed address (an entry's key has it)."""
    if len(packed) == 4:
        return (packed if any(packed) else b"", None)
    if packed[:12] == _MAPPED:  # IPv4 traffic for a.b.c.d (or any, for ::ffff:0.0.0.0)
        v4 = packed[12:]
        return (v4 if any(v4) else b"", None)
    if not any(packed):
        dual = options & SocketOptions.DUALSTACK
        return (b"" if dual else None, b"")
    return (None, packed)


def _meet(a: bytes | None, b: bytes | None) -> bool:
    return a is not None and b is not None and (a == b or not a or not b)


def overlaps(a: Coverage, b: Coverage) -> bool:
    """Whether two sockets on the same port and type would share traffic."""
    return _meet(a[0], b[0]) or _meet(a[1], b[1])


def _lets(mode: ShareMode, name: str, uid: int, other_name: str, other_uid: int) -> bool:
    if mode is _ANY:
        return True
    if mode is _SAMEAPP:
        return name == other_name and uid == other_uid
    return False


def shareable(
    holders: Sequence[tuple[ShareMode, str, int]], mode: ShareMode, name: str, uid: int
) -> bool:
    """BIND 10's rule: every holder's mode must let the requester in, and the
    requester's mode must let every holder stay.  ``holders`` are
    (mode, name, uid).  The reference that :class:`Holders` must agree with."""
    return all(
        _lets(h_mode, h_name, h_uid, name, uid) and _lets(mode, name, uid, h_name, h_uid)
        for h_mode, h_name, h_uid in holders
    )


def _count(counts: dict[tuple[str, int], int], key: tuple[str, int], delta: int) -> None:
    n = counts.get(key, 0) + delta
    if n:
        counts[key] = n
    else:
        del counts[key]


class Holders:
    """What :func:`shareable` needs to know about an entry's grants, kept up
    to date as grants come and go, so that the check costs the same with one
    holder or thousands."""

    __slots__ = ("keys", "no", "sameapp")

    def __init__(self) -> None:
        self.no = 0  # holders in mode NO
        self.sameapp: dict[tuple[str, int], int] = {}  # SAMEAPP holders by (name, uid)
        self.keys: dict[tuple[str, int], int] = {}  # every holder by (name, uid)

    def change(self, mode: ShareMode, key: tuple[str, int], delta: int) -> None:
        if mode is _NO:
            self.no += delta
        elif mode is _SAMEAPP:
            _count(self.sameapp, key, delta)
        keys = self.keys  # (_count inlined: twice per grant and release)
        n = keys.get(key, 0) + delta
        if n:
            keys[key] = n
        else:
            del keys[key]

    def admit(self, mode: ShareMode, key: tuple[str, int]) -> bool:
        """The same answer as :func:`shareable` over the holders."""
        keys = self.keys
        if not keys:
            return True
        sameapp = self.sameapp
        if self.no or (sameapp and (len(sameapp) > 1 or key not in sameapp)):
            return False  # a holder's mode refuses the requester
        if mode is _ANY:
            return True
        return mode is _SAMEAPP and len(keys) == 1 and key in keys


class Entry:
    """One cached socket (``sock`` is None while it is being created) and
    its grants, in the order they were made.  ``extra`` is the caller's."""

    __slots__ = (
        "backlog", "cover", "extra", "gen", "grants", "holders", "key", "lingers", "phantom",
        "request", "sock",
    )  # fmt: skip

    def __init__(self, key: Key, request: Request, backlog: int | None) -> None:
        self.key = key
        self.request = request
        self.cover = _coverage(key[1], request.options)  # (the key has the packed address)
        self.backlog = backlog
        self.sock: Any = None
        self.grants: dict[int, Grant] = {}
        self.holders = Holders()
        self.extra: Any = None
        #: while the socket lingers (no grant, kept open): its last holder's
        #: (share, name, uid), still counted in ``holders``
        self.phantom: tuple[ShareMode, str, int] | None = None
        self.gen = 0  # which lingering this is (a timer for an older one is void)
        self.lingers = 0.0  # seconds of the current lingering


class Grant:
    """One holder of one entry.  ``creates``: this claim made the entry."""

    __slots__ = ("creates", "entry", "id", "linger", "name", "owner", "share", "uid")

    def __init__(
        self, gid: int, owner: Any, uid: int, entry: Entry, share: ShareMode, name: str
    ) -> None:
        self.id = gid
        self.owner: Any = owner
        self.uid = uid
        self.entry = entry
        self.share = share
        self.name = name
        self.creates = False
        self.linger = -1.0  # its own linger time if it ends last (<0: the table's)


class ShareTable:
    """Every cached socket and every grant.  ``max_held``: grants per owner;
    ``max_sockets``: entries alive at once (cached or being created)."""

    def __init__(self, max_sockets: int, max_held: int, *, linger: float = 0.0) -> None:
        self.max_sockets = max_sockets
        self.max_held = max_held
        #: seconds to keep a socket whose last grant ended, for its last
        #: holder's successor (a grant's own ``linger`` overrides it)
        self.linger = linger
        self.entries: dict[Key, Entry] = {}  # by key (port-0 entries once created)
        #: the same entries by (type, port): the ones whose addresses may overlap
        self.by_port: dict[tuple[int, int], list[Entry]] = {}
        self.held: dict[Hashable, dict[int, Grant]] = {}  # by owner, then grant id
        self.live = 0  # entries alive: the sockets we hold or are getting
        self._next = 1

    def claim(
        self,
        owner: Hashable,
        uid: int,
        request: Request,
        backlog: int | None,
        share: ShareMode,
        name: str,
        key: Key | None = None,
    ) -> Grant | Reason:
        """Decide one request (the caller has checked the policy).

        A :class:`Reason` if refused (LIMIT, OPTIONS or SHARE); otherwise the
        new grant: ready if ``grant.entry.sock`` is set; to be created by the
        caller if ``grant.creates``; else waiting for a creation under way
        (the caller that creates it reports to every waiting grant)."""
        mine = self.held.get(owner)
        if mine is not None and len(mine) >= self.max_held:
            return Reason.LIMIT
        port = request.port
        if key is None:
            key = entry_key(request)
        who = (name, uid)
        entry = self.entries.get(key) if port else None
        if entry is not None:
            if entry.request.options != request.options or entry.backlog != backlog:
                return Reason.OPTIONS
            phantom = entry.phantom
            if phantom is not None and phantom == (share, name, uid):  # its last holder's successor
                self._unghost(entry)
            if not entry.holders.admit(share, who):
                return Reason.SHARE
            if entry.phantom is not None:  # someone its last holder would share with
                self._unghost(entry)
        if port:
            near = self.by_port.get((key[0], port))
            if near is not None and (len(near) > 1 or near[0] is not entry):
                cover = coverage(request)
                for other in near:
                    if (
                        other is not entry
                        and overlaps(other.cover, cover)
                        and not other.holders.admit(share, who)
                    ):
                        return Reason.SHARE
        if entry is not None:
            return self._grant(owner, uid, entry, share, name, mine)
        if self.live >= self.max_sockets:
            return Reason.LIMIT
        entry = Entry(key, request, backlog)
        self.live += 1
        if port:
            self.entries[key] = entry  # later claims for it wait for this creation
            self.by_port.setdefault((key[0], port), []).append(entry)
        g = self._grant(owner, uid, entry, share, name, mine)
        g.creates = True
        return g

    def _grant(
        self,
        owner: Hashable,
        uid: int,
        entry: Entry,
        share: ShareMode,
        name: str,
        mine: dict[int, Grant] | None,
    ) -> Grant:
        g = Grant(self._next, owner, uid, entry, share, name)
        self._next += 1
        entry.grants[g.id] = g
        entry.holders.change(share, (name, uid), 1)
        if mine is None:
            mine = self.held[owner] = {}
        mine[g.id] = g
        return g

    def created(self, entry: Entry, sock: Any, port: int) -> list[Grant] | None:
        """The entry's socket exists (bound to ``port``).  The grants that
        were waiting for it, in order; None if nobody wants it any more: the
        entry is gone then, and the caller closes ``sock``."""
        if not entry.grants:
            self._forget(entry)
            return None
        if entry.request.port == 0:  # cached under the port it got
            entry.request = dataclasses.replace(entry.request, port=port)
            entry.key = (entry.key[0], entry.key[1], port)
            if self.entries.setdefault(entry.key, entry) is entry:
                self.by_port.setdefault((entry.key[0], port), []).append(entry)
        entry.sock = sock
        return list(entry.grants.values())

    def failed(self, entry: Entry) -> list[Grant]:
        """Creating the entry failed: it is gone, and so is every grant of
        it (returned in order, to be refused)."""
        dropped = list(entry.grants.values())
        for g in dropped:
            self._drop(g)
        self._forget(entry)
        return dropped

    def grant(self, owner: Hashable, gid: int) -> Grant | None:
        """``owner``'s grant ``gid`` if it holds it and it is ready."""
        mine = self.held.get(owner)
        g = mine.get(gid) if mine is not None else None
        return g if g is not None and g.entry.sock is not None else None

    def release(self, g: Grant) -> Any:
        """End ``g``; the cached socket to close if it was the last grant.
        With ``linger``, the last grant leaves it open instead, *lingering*
        (``entry.phantom`` set): the caller calls :meth:`expire` later."""
        self._drop(g)
        entry = g.entry
        if entry.grants or entry.sock is None:  # still held, or still being created
            return None
        seconds = g.linger if g.linger >= 0 else self.linger
        if seconds > 0:
            entry.lingers = seconds
            entry.phantom = (g.share, g.name, g.uid)
            entry.holders.change(g.share, (g.name, g.uid), 1)
            entry.gen += 1
            return None
        sock, entry.sock = entry.sock, None
        self._forget(entry)
        return sock

    def expire(self, entry: Entry, gen: int) -> Any:
        """A lingering time is over: the socket to close, or None if it was
        taken again meanwhile (or lingers anew: ``gen`` is not its current)."""
        if entry.phantom is None or entry.grants or entry.gen != gen or entry.sock is None:
            return None
        self._unghost(entry)
        sock, entry.sock = entry.sock, None
        self._forget(entry)
        return sock

    def _unghost(self, entry: Entry) -> None:
        assert entry.phantom is not None
        share, name, uid = entry.phantom
        entry.phantom = None
        entry.holders.change(share, (name, uid), -1)

    def release_all(self, owner: Hashable) -> list[tuple[Grant, Any]]:
        """End every grant of ``owner`` (its connection closed): each one,
        with the cached socket to close if it was that socket's last grant."""
        mine = self.held.pop(owner, None)
        if not mine:
            return []
        out = []
        for g in list(mine.values()):
            out.append((g, self.release(g)))
        return out

    def owners(self) -> int:
        return len(self.held)

    def _drop(self, g: Grant) -> None:
        entry = g.entry
        if entry.grants.pop(g.id, None) is not None:
            entry.holders.change(g.share, (g.name, g.uid), -1)
        mine = self.held.get(g.owner)
        if mine is not None:
            mine.pop(g.id, None)
            if not mine:
                del self.held[g.owner]

    def _forget(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            near_key = (entry.key[0], entry.key[2])
            near = self.by_port[near_key]
            near.remove(entry)
            if not near:
                del self.by_port[near_key]
        self.live -= 1

    def check(self) -> None:
        """Assert the table's invariants (for tests and fuzzing)."""
        seen: set[int] = set()
        for owner, mine in self.held.items():
            assert mine, f"empty grant set kept for {owner!r}"
            assert len(mine) <= self.max_held
            for gid, g in mine.items():
                assert g.id == gid and g.owner is owner and g.entry.grants.get(gid) is g
                seen.add(gid)
        for key, entry in self.entries.items():
            assert entry.key == key and entry.request.port == key[2] != 0
            for gid in entry.grants:
                assert gid in seen, "a grant nobody holds"
            want = Holders()
            for g in entry.grants.values():
                want.change(g.share, (g.name, g.uid), 1)
            if entry.phantom is not None:
                assert not entry.grants and entry.sock is not None, "a phantom beside grants"
                want.change(entry.phantom[0], entry.phantom[1:], 1)
            assert (want.no, want.sameapp, want.keys) == (
                entry.holders.no,
                entry.holders.sameapp,
                entry.holders.keys,
            )
        assert len(self.entries) <= self.live <= self.max_sockets
        near = [(k, e) for k, es in self.by_port.items() for e in es]
        assert sorted(id(e) for _, e in near) == sorted(id(e) for e in self.entries.values())
        for (typ, port), e in near:
            assert (e.key[0], e.key[2]) == (typ, port)
