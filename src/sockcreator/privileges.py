"""Dropping root for good, in-process: :func:`drop_privileges`.

For a daemon that starts as root, takes its privileged sockets (from a
:class:`~sockcreator.SocketCreator` or by socket activation), then must run
as an ordinary user.  The order is fixed: supplementary groups, then the gid
(``setresgid``: real, effective and saved), then the uid (``setresuid``).
Groups and gid first, because changing them needs the privilege that
changing the uid gives up.

Afterwards the result is verified, not assumed: the real, effective and
saved ids and the group list are the target; on Linux the permitted,
effective and ambient capability sets are empty (``PR_SET_KEEPCAPS`` set
earlier by anyone would otherwise keep the permitted set across the uid
change); and ``setresuid(0, 0, 0)``, ``setresgid(0, 0, 0)`` and
``setgroups([0])`` fail with EPERM, so root cannot be regained.  Anything else raises
:class:`PermissionError`; the process should then exit, since its
credentials are in an unknown state.

Import what you need before calling it: afterwards the process may no longer
be able to read its own interpreter's files (for example under ``/root``).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Credentials", "drop_privileges", "drop_to", "resolve_credentials"]


@dataclass(frozen=True)
class Credentials:
    """Who to become: ids, group list, and the passwd entry's name and home."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None  # None: a numeric uid with no passwd entry
    home: str | None


def _number(value: str | int) -> int | None:
    if isinstance(value, bool):
        raise TypeError("a user or group is a name or a number, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"ids are not negative: {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a user or group is a str or int, not {type(value).__name__}")
    if value == "":
        raise ValueError("empty user or group name")
    return int(value) if value.isascii() and value.isdigit() else None


def _group(group: str | int) -> int:
    gid = _number(group)
    if gid is not None:
        return gid  # a numeric gid need not have a group entry
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise LookupError(f"unknown group {group!r}") from None


def resolve_credentials(user: str | int, group: str | int | None = None) -> Credentials:
    """Look ``user`` (name or uid) and ``group`` up; LookupError if unknown.

    Without ``group``: the user's primary group and every group that lists
    the user (``getgrouplist``).  With ``group``: that group alone.  A numeric
    uid with no passwd entry needs ``group``.
    """
    uid = _number(user)
    try:
        pw: pwd.struct_passwd | None = pwd.getpwnam(str(user)) if uid is None else pwd.getpwuid(uid)
    except KeyError:
        if uid is None:
            raise LookupError(f"unknown user {user!r}") from None
        pw = None
    if group is not None:
        gid = _group(group)
        groups: tuple[int, ...] = (gid,)
    elif pw is None:
        raise LookupError(f"uid {uid} has no passwd entry: give a group")
    else:
        gid = pw.pw_gid
        groups = tuple(dict.fromkeys(os.getgrouplist(pw.pw_name, pw.pw_gid)))
    return Credentials(
        uid=pw.pw_uid if pw is not None else int(user),
        gid=gid,
        groups=groups,
        name=pw.pw_name if pw is not None else None,
        home=pw.pw_dir if pw is not None else None,
    )


def _capability_sets() -> dict[str, int]:
    """CapPrm/CapEff/CapAmb of this process from /proc (empty if unreadable)."""
    sets: dict[str, int] = {}
    try:
        # Binary: a text codec may be an import, and our own files may be
        # unreadable by now.
        with open("/proc/self/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in (b"CapPrm", b"CapEff", b"CapAmb"):
                    sets[key.decode()] = int(value.strip(), 16)
    except OSError:
        pass
    return sets


def _must_fail(what: str, call: Callable[[], None]) -> None:
    try:
        call()
    except PermissionError:
        return
    except OSError as e:
        raise PermissionError(f"{what} failed with {errno.errorcode.get(e.errno or 0)}") from e
    raise PermissionError(f"{what} succeeded: root can be regained")


def drop_privileges(
    user: str | int, group: str | int | None = None, *, allow_root: bool = False
) -> Credentials:
    """Become ``user`` (and ``group``) for good; returns who we are now.

    LookupError: unknown user or group.  ValueError: the target is uid 0 and
    ``allow_root`` is false.  PermissionError: we may not change ids (not
    root), or the result failed verification (see the module doc).
    """
    creds = resolve_credentials(user, group)
    drop_to(creds, allow_root=allow_root)
    return creds


def drop_to(creds: Credentials, *, allow_root: bool = False) -> None:
    """:func:`drop_privileges` for credentials already resolved."""
    if creds.uid == 0 and not allow_root:
        raise ValueError("refusing to 'drop' privileges to uid 0 (pass allow_root=True)")
    try:
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"cannot change credentials to uid {creds.uid} gid {creds.gid} (not root?)"
        ) from None
    _verify(creds)


def _verify(creds: Credentials) -> None:
    if os.getresuid() != (creds.uid,) * 3 or os.getresgid() != (creds.gid,) * 3:
        raise PermissionError(f"ids are {os.getresuid()}/{os.getresgid()} after the change")
    if sorted(set(os.getgroups())) != sorted(set(creds.groups)):
        raise PermissionError(f"groups are {os.getgroups()}, not {list(creds.groups)}")
    if creds.uid == 0:
        return  # allow_root: nothing more to verify
    if sys.platform.startswith("linux"):
        caps = _capability_sets()
        if any(caps.values()):
            raise PermissionError(f"capabilities remain after the change: {caps}")
    _must_fail("setresuid(0, 0, 0)", lambda: os.setresuid(0, 0, 0))
    if creds.gid != 0:
        _must_fail("setresgid(0, 0, 0)", lambda: os.setresgid(0, 0, 0))
    if 0 not in creds.groups:
        _must_fail("setgroups([0])", lambda: os.setgroups([0]))
