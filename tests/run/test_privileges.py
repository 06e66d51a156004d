"""``sockcreator.privileges.drop_privileges`` with real users and the real kernel.

Each drop happens in a forked child of this (root) process, which reports
its credentials as JSON through a pipe and exits with ``os._exit``: pytest's
own process never changes its ids.  The child imports everything before it
drops (afterwards our venv under the 0700 /root may be unreadable).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import json
import os
import pwd
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from conftest import IS_ROOT, TEST_USERS, ensure_user, requires_linux

from sockcreator.privileges import Credentials, drop_privileges, resolve_credentials

pytestmark = [requires_linux]
requires_root = pytest.mark.skipif(not IS_ROOT, reason="changing ids needs root")

EXTRA_GROUP = "sockc-extra"
NO_SUCH = "sockc-no-such-name"
ORPHAN_ID = 54321  # no passwd or group entry


def status_caps() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", "rb") as f:
        for line in f:
            key, _, value = line.partition(b":")
            if key.startswith(b"Cap"):
                out[key.decode()] = int(value.strip(), 16)
    return out


def in_child(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` in a forked child; its result, or the exception it raised."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(rd)
            try:
                payload: dict[str, Any] = {"value": fn()}
            except BaseException as e:
                payload = {"error": type(e).__name__, "message": str(e)}
                payload["errno"] = getattr(e, "errno", None)
            payload["ids"] = [os.getresuid(), os.getresgid(), sorted(os.getgroups())]
            os.write(wr, json.dumps(payload).encode())
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(data)
    return result


def after_drop(user: str | int, group: str | int | None = None) -> dict[str, Any]:
    """What a process looks like after drop_privileges, and what it may still do."""
    creds = drop_privileges(user, group)
    attempts = {}
    for name, call in [
        ("setuid0", lambda: os.setuid(0)),
        ("seteuid0", lambda: os.seteuid(0)),
        ("setresuid0", lambda: os.setresuid(0, 0, 0)),
        ("setgid0", lambda: os.setgid(0)),
        ("setgroups0", lambda: os.setgroups([0])),
    ]:
        try:
            call()
            attempts[name] = "succeeded"
        except OSError as e:
            attempts[name] = e.errno
    return {"creds": list(creds.groups), "caps": status_caps(), "attempts": attempts}


@pytest.fixture(scope="module")
def alice() -> pwd.struct_passwd:
    return ensure_user(TEST_USERS[0])


@pytest.fixture(scope="module")
def bob_with_extra_group() -> tuple[pwd.struct_passwd, int]:
    """bob, also a member of a supplementary group."""
    bob = ensure_user(TEST_USERS[1])
    if not IS_ROOT:
        pytest.skip("creating a group needs root")
    subprocess.run(["groupadd", "-f", EXTRA_GROUP], check=True, capture_output=True)
    subprocess.run(
        ["usermod", "-a", "-G", EXTRA_GROUP, bob.pw_name], check=True, capture_output=True
    )
    return bob, grp.getgrnam(EXTRA_GROUP).gr_gid


@requires_root
def test_drop_to_a_user_by_name(alice: pwd.struct_passwd) -> None:
    r = in_child(lambda: after_drop(alice.pw_name))
    uid, gid = alice.pw_uid, alice.pw_gid
    groups = sorted(set(os.getgrouplist(alice.pw_name, gid)))
    assert r["ids"] == [[uid] * 3, [gid] * 3, groups]
    assert sorted(r["value"]["creds"]) == groups
    caps = r["value"]["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == caps["CapInh"] == 0
    assert caps["CapBnd"] == 0  # dropped while still root
    # root cannot be regained, by any route
    assert set(r["value"]["attempts"].values()) == {errno.EPERM}


@requires_root
@pytest.mark.parametrize("as_text", [False, True])
def test_drop_to_a_user_by_number(alice: pwd.struct_passwd, as_text: bool) -> None:
    user: str | int = str(alice.pw_uid) if as_text else alice.pw_uid
    r = in_child(lambda: after_drop(user))
    assert r["ids"][:2] == [[alice.pw_uid] * 3, [alice.pw_gid] * 3]


@requires_root
def test_supplementary_groups_come_from_the_group_database(
    bob_with_extra_group: tuple[pwd.struct_passwd, int],
) -> None:
    bob, extra = bob_with_extra_group
    r = in_child(lambda: after_drop(bob.pw_name))
    assert r["ids"][2] == sorted({bob.pw_gid, extra})


@requires_root
def test_group_given_is_the_only_group(
    bob_with_extra_group: tuple[pwd.struct_passwd, int],
) -> None:
    bob, extra = bob_with_extra_group
    r = in_child(lambda: after_drop(bob.pw_name, EXTRA_GROUP))
    assert r["ids"] == [[bob.pw_uid] * 3, [extra] * 3, [extra]]
    r = in_child(lambda: after_drop(bob.pw_name, extra))  # by number too
    assert r["ids"] == [[bob.pw_uid] * 3, [extra] * 3, [extra]]


@requires_root
def test_numeric_ids_without_entries() -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(ORPHAN_ID)
    r = in_child(lambda: after_drop(ORPHAN_ID, ORPHAN_ID))
    assert r["ids"] == [[ORPHAN_ID] * 3, [ORPHAN_ID] * 3, [ORPHAN_ID]]
    assert set(r["value"]["attempts"].values()) == {errno.EPERM}
    # without a group there is nothing to take the gid from
    r = in_child(lambda: drop_privileges(ORPHAN_ID))
    assert r["error"] == "LookupError"
    assert r["ids"][0] == [0, 0, 0]


@requires_root
def test_root_target_refused_unless_allowed() -> None:
    r = in_child(lambda: drop_privileges("root"))
    assert r["error"] == "ValueError"
    assert r["ids"][0] == [0, 0, 0]  # refused before any change
    r = in_child(lambda: drop_privileges(0, allow_root=True).uid)
    assert r["value"] == 0
    assert r["ids"][:2] == [[0, 0, 0], [0, 0, 0]]


@requires_root
def test_not_root_cannot_drop(alice: pwd.struct_passwd) -> None:
    bob = ensure_user(TEST_USERS[1])

    def become_bob_then_drop() -> None:
        os.setgroups([])
        os.setresgid(bob.pw_gid, bob.pw_gid, bob.pw_gid)
        os.setresuid(bob.pw_uid, bob.pw_uid, bob.pw_uid)
        drop_privileges(alice.pw_name)

    r = in_child(become_bob_then_drop)
    assert (r["error"], r["errno"]) == ("PermissionError", errno.EPERM)
    assert "not root" in r["message"]
    assert r["ids"][0] == [bob.pw_uid] * 3


@requires_root
def test_kept_capabilities_fail_verification(alice: pwd.struct_passwd) -> None:
    """With PR_SET_KEEPCAPS set beforehand, setresuid keeps the permitted set:
    root's powers would survive, so the drop must not report success."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def keepcaps_then_drop() -> None:
        if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS
            raise OSError(ctypes.get_errno(), "prctl")
        drop_privileges(alice.pw_name)

    r = in_child(keepcaps_then_drop)
    assert r["error"] == "PermissionError"
    assert "capabilities remain" in r["message"]


CAP_NET_RAW = 13


def _raise_inheritable(libc: Any, cap: int) -> None:
    """Add ``cap`` to this thread's inheritable set (root has it in its permitted set)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[2] |= 1 << cap
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@requires_root
def test_inheritable_and_bounding_sets_are_emptied(alice: pwd.struct_passwd) -> None:
    """A caller's inheritable capability (setpriv --inh-caps) does not survive the drop."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def inheritable_then_drop() -> dict[str, Any]:
        _raise_inheritable(libc, CAP_NET_RAW)
        before = status_caps()["CapInh"]
        return {"before": before, **after_drop(alice.pw_name)}

    r = in_child(inheritable_then_drop)
    assert r["value"]["before"] == 1 << CAP_NET_RAW
    caps = r["value"]["caps"]
    assert (caps["CapInh"], caps["CapBnd"], caps["CapAmb"], caps["CapPrm"]) == (0, 0, 0, 0)


@requires_root
def test_remaining_inheritable_capability_fails_verification(alice: pwd.struct_passwd) -> None:
    """The check after the drop, on its own: ids changed by hand, CapInh left non-empty."""
    from sockcreator import privileges

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    creds = resolve_credentials(alice.pw_name)

    def change_ids_only_then_verify() -> None:
        _raise_inheritable(libc, CAP_NET_RAW)
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
        privileges._verify(creds)

    r = in_child(change_ids_only_then_verify)
    assert r["error"] == "PermissionError"
    assert "capabilities remain" in r["message"] and "CapInh" in r["message"]


@requires_root
def test_root_target_keeps_its_bounding_set() -> None:
    r = in_child(lambda: (drop_privileges(0, allow_root=True), status_caps())[1])
    assert r["value"]["CapBnd"] == status_caps()["CapBnd"] != 0
    assert r["value"]["CapInh"] == 0


def test_unknown_user_and_group() -> None:
    with pytest.raises(LookupError, match=NO_SUCH):
        resolve_credentials(NO_SUCH)
    with pytest.raises(LookupError, match=NO_SUCH):
        drop_privileges(NO_SUCH)  # looked up before anything changes
    with pytest.raises(LookupError, match=NO_SUCH):
        resolve_credentials("root", NO_SUCH)


def test_resolve_credentials() -> None:
    root = resolve_credentials("root")
    assert (root.uid, root.gid, root.name) == (0, 0, "root")
    assert 0 in root.groups
    assert resolve_credentials(0, 0) == Credentials(0, 0, (0,), "root", root.home)


@pytest.mark.parametrize("bad", [True, -1, 1.5, "", None])
def test_bad_arguments(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        resolve_credentials(bad)
