"""Dropping root for good, in-process: :func:`drop_privileges`.

For a daemon that starts as root, takes its privileged sockets (from a
:class:`~sockcreator.SocketCreator` or by socket activation), then must run
as an ordinary user.  The order is fixed:

1. (Linux) While still root, unless the target is uid 0 (``allow_root``):
   every capability still in the bounding set is dropped
   (``PR_CAPBSET_DROP``; it needs CAP_SETPCAP, which only root has here).
   A later exec of a set-user-ID-root or file-capability binary can then
   gain nothing.
2. (Linux) The ambient set is cleared (``PR_CAP_AMBIENT_CLEAR_ALL``) and the
   inheritable set emptied (``capset``, effective and permitted unchanged).
   A uid change empties neither: a caller's ``setpriv --inh-caps`` or
   ``capsh --inh`` would otherwise reach a binary with inheritable file
   capabilities (``setcap cap_net_raw+ei``) and give it those capabilities.
3. Supplementary groups, then the gid (``setresgid``: real, effective and
   saved), then the uid (``setresuid``): groups and gid first, because
   changing them needs the privilege that changing the uid gives up.  The
   uid change empties the permitted and effective sets.

Capability sets belong to a thread: steps 1 and 2 change the calling
thread's, so call this before starting threads (another thread keeps its
own bounding set, and verification fails if one keeps any other set).

Afterwards the result is verified, not assumed: the real, effective and
saved ids and the group list are the target; on Linux the inheritable,
permitted, effective and ambient sets of every thread are empty, and so is
the calling thread's bounding set where step 1 dropped it
(``PR_SET_KEEPCAPS`` set earlier by anyone would otherwise keep the permitted
set across the uid change); and ``setresuid(0, 0, 0)``, ``setresgid(0, 0, 0)`` and
``setgroups([0])`` fail with EPERM, so root cannot be regained.  Anything else raises
:class:`PermissionError`; the process should then exit, since its
credentials are in an unknown state.  Elsewhere only steps 3 and the id
checks apply.

Import what you need before calling it: afterwards the process may no longer
be able to read its own interpreter's files (for example under ``/root``).
The one import done here, ``ctypes`` (Linux), happens before any change.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import sys
from collections.abc import Callable, Iterable

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from ._record import dataclass

__all__ = [
    "Credentials",
    "drop_privileges",
    "drop_to",
    "make_non_dumpable",
    "resolve_credentials",
    "shed_capabilities",
]


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


_CAP_SETS = (b"CapInh", b"CapPrm", b"CapEff", b"CapBnd", b"CapAmb")


def _capability_sets(status: str = "/proc/thread-self/status") -> dict[str, int]:
    """The capability sets in a /proc status file (empty if unreadable)."""
    sets: dict[str, int] = {}
    try:
        # Binary: a text codec may be an import, and our own files may be
        # unreadable by now.
        with open(status, "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in _CAP_SETS:
                    sets[key.decode()] = int(value.strip(), 16)
    except OSError:
        pass
    return sets


class _Libc:
    """prctl and capset by ctypes: libc by soname (never ctypes.util.find_library)."""

    PR_GET_DUMPABLE = 3
    PR_SET_DUMPABLE = 4
    PR_CAPBSET_READ = 23
    PR_CAPBSET_DROP = 24
    PR_CAP_AMBIENT = 47
    PR_CAP_AMBIENT_CLEAR_ALL = 4
    _LINUX_CAPABILITY_VERSION_3 = 0x20080522

    def __init__(self) -> None:
        import ctypes  # here, before any credential changes, and only on Linux

        self._ctypes = ctypes
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def prctl(self, *args: int) -> int:
        c = self._ctypes
        r: int = self._libc.prctl(*(c.c_ulong(a) for a in args))
        if r < 0:
            e = c.get_errno()
            raise OSError(e, f"prctl{args}: {os.strerror(e)}")
        return r

    def clear_inheritable(self) -> None:
        """capset: the same effective and permitted sets, an empty inheritable set."""
        c = self._ctypes
        header = (c.c_uint32 * 2)(self._LINUX_CAPABILITY_VERSION_3, 0)  # 0: this thread
        data = (c.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
        if self._libc.capget(header, data) != 0:
            e = c.get_errno()
            raise OSError(e, f"capget: {os.strerror(e)}")
        data[2] = data[5] = 0
        if self._libc.capset(header, data) != 0:
            e = c.get_errno()
            raise OSError(e, f"capset: {os.strerror(e)}")

    def clear_all(self) -> None:
        """capset: empty effective, permitted and inheritable sets."""
        c = self._ctypes
        header = (c.c_uint32 * 2)(self._LINUX_CAPABILITY_VERSION_3, 0)
        if self._libc.capset(header, (c.c_uint32 * 6)()) != 0:
            e = c.get_errno()
            raise OSError(e, f"capset: {os.strerror(e)}")


def make_non_dumpable() -> None:
    """Linux: ``PR_SET_DUMPABLE`` 0, checked: no core dumps, and processes of
    the same uid can neither ptrace this one nor open its ``/proc/PID`` files.
    A later credential change resets it, so call it after the drop."""
    if not sys.platform.startswith("linux"):
        return
    libc = _Libc()
    libc.prctl(libc.PR_SET_DUMPABLE, 0, 0, 0, 0)
    if libc.prctl(libc.PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise PermissionError("PR_SET_DUMPABLE 0 did not take")


def shed_capabilities(bounding: Iterable[int]) -> None:
    """Linux, as root, staying uid 0: the bounding set cut down to
    ``bounding`` (capability numbers), and the ambient, inheritable,
    permitted and effective sets emptied; verified from /proc, or
    PermissionError.  What is left is uid 0 with no capability: it still owns
    root's files (no DAC override), and a program it execs gets the bounding
    set back as its capabilities (root's exec rule), nothing more.  A
    narrower root, not an unprivileged one: for a process that must start
    privileged programs and do little else (the broker's creator factory)."""
    if not sys.platform.startswith("linux"):
        return
    keep = set(bounding)
    libc = _Libc()
    for cap in range(64):
        try:
            present = libc.prctl(libc.PR_CAPBSET_READ, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break
            raise
        if present and cap not in keep:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
    try:
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    libc.clear_all()
    sets = _capability_sets()
    want = sum(1 << cap for cap in keep)
    left = {k: v for k, v in sets.items() if k != "CapBnd" and v}
    if not sets or left or sets.get("CapBnd", 0) & ~want:
        raise PermissionError(f"capabilities remain after shedding them: {sets}")


def _drop_capabilities(bounding: bool) -> None:
    """Steps 1 and 2 of the module doc, for the calling thread."""
    libc = _Libc()
    if bounding:
        for cap in range(64):
            try:
                present = libc.prctl(libc.PR_CAPBSET_READ, cap)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    break  # past the kernel's last capability
                raise
            if present:
                try:
                    libc.prctl(libc.PR_CAPBSET_DROP, cap)
                except PermissionError:
                    raise PermissionError(
                        errno.EPERM,
                        f"cannot drop capability {cap} from the bounding set "
                        "(not root, or no CAP_SETPCAP?)",
                    ) from None
    try:
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel before 4.3 has no ambient set
            raise
    libc.clear_inheritable()


def _all_threads_capabilities() -> dict[str, dict[str, int]]:
    """Thread id -> its capability sets, for every thread of this process."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    return {tid: _capability_sets(f"/proc/self/task/{tid}/status") for tid in tids}


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
    linux = sys.platform.startswith("linux")
    bounding = linux and creds.uid != 0
    if linux:
        _drop_capabilities(bounding)
    try:
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"cannot change credentials to uid {creds.uid} gid {creds.gid} (not root?)"
        ) from None
    _verify(creds, bounding=bounding)


def _verify(creds: Credentials, *, bounding: bool = True) -> None:
    if os.getresuid() != (creds.uid,) * 3 or os.getresgid() != (creds.gid,) * 3:
        raise PermissionError(f"ids are {os.getresuid()}/{os.getresgid()} after the change")
    if sorted(set(os.getgroups())) != sorted(set(creds.groups)):
        raise PermissionError(f"groups are {os.getgroups()}, not {list(creds.groups)}")
    if creds.uid == 0:
        return  # allow_root: nothing more to verify
    if sys.platform.startswith("linux"):
        for tid, caps in _all_threads_capabilities().items():
            left = {k: v for k, v in caps.items() if k != "CapBnd" and v}
            if left:
                raise PermissionError(
                    f"capabilities remain after the change (thread {tid}): {left}"
                )
        mine = _capability_sets()
        if not mine:
            raise PermissionError("cannot read this thread's capability sets from /proc")
        if bounding and mine.get("CapBnd"):
            raise PermissionError(f"capabilities remain in the bounding set: {mine}")
    _must_fail("setresuid(0, 0, 0)", lambda: os.setresuid(0, 0, 0))
    if creds.gid != 0:
        _must_fail("setresgid(0, 0, 0)", lambda: os.setresgid(0, 0, 0))
    if 0 not in creds.groups:
        _must_fail("setgroups([0])", lambda: os.setgroups([0]))
