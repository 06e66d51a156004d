"""A reload that needs sockets outside the creator's allow-list: the
broker's creator factory (``sockcreator.broker._factory``) starts a new
hardened creator with the new union, the broker switches to it, and the old
one is retired once it has answered what it had in flight.

Real processes throughout: the broker starts as root with a real policy
file and drops to its user, the factory is the root process it forked,
clients are forked children of pytest running as test users and asking all
the time; what the tests look at is the audit log, the clients' own tallies
and /proc.
"""

from __future__ import annotations

import array
import ctypes
import os
import pwd
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import requires_linux, requires_root
from test_broker import (
    ALICE,
    BOB,
    BROKER_USER,
    CREATOR_USER,
    UserClient,
    clients,
    wait_for,
    workdir,
)
from test_broker_daemon import FIRST, NARROWER, RULE, Looper, Served, serve, users

pytestmark = [requires_root, requires_linux, pytest.mark.root]
__all__ = ["clients", "serve", "users", "workdir"]  # fixtures, used by name


def wider(*ports: int) -> str:
    """FIRST, and bob on each of ``ports`` (each outside FIRST's union)."""
    return FIRST + "".join(RULE.format(users=f'"{BOB}"', ports=p) for p in ports)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (it holds nothing any more)."""
    try:
        return _status(pid)["State"].startswith("Z")
    except FileNotFoundError:
        return True


def _reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _granted(c: UserClient, port: int) -> int:
    reply = c.request("udp", "127.0.0.1", port)
    assert reply[0] == "ok", reply
    return int(reply[1])


def _refused(c: UserClient, port: int) -> None:
    assert c.request("udp", "127.0.0.1", port)[:2] == ("refused", 1)  # EPERM


def _retired(b: Served, pid: int) -> None:
    wait_for(lambda: any(r["pid"] == pid for r in b.audit("retire")), f"creator {pid} retired")
    wait_for(lambda: _gone(pid), f"creator {pid} to exit")


def _finish(b: Served, *loopers: Looper) -> None:
    """Every looper asked throughout: none of its requests failed or went
    unanswered (the client's timeout), and the broker granted and released
    exactly as many as it counted (none answered twice).  The last forked
    first: a looper holds the stop pipes of those forked before it."""
    for looper in reversed(loopers):
        ok, errors = looper.finish()
        assert ok > 0 and errors == {}, (ok, errors)
        grants = [r for r in b.audit("grant") if r["pid"] == looper.pid]
        releases = [r for r in b.audit("release") if r["pid"] == looper.pid]
        assert len(grants) == len(releases) == ok, (len(grants), len(releases), ok)
        assert len({r["grant"] for r in grants}) == ok


def test_a_widening_reload_starts_a_new_creator_while_requests_flow(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """Bob gets port 9000 (outside the start's union) after a reload, from
    a new creator: started by the factory with the new union, hardened
    exactly like the first (same user, CAP_NET_BIND_SERVICE only, seccomp,
    the same signal dispositions), switched to after it answered its probe;
    the old one exits once retired.  Twice (the second old creator is the
    factory's own child).  Two clients ask all the time: nothing is lost,
    failed or answered twice, and grants come before and after each switch."""
    b = serve(FIRST)
    start = b.audit("start")[0]
    factory = int(start["factory_pid"])
    wait_for(lambda: bool(b.audit("ready")), "the first creator's answer")
    first = _status(b.creator_pid)  # hardened: it answered
    loopers = [Looper(ALICE, b.path), Looper(ALICE, b.path)]
    bob = clients(BOB, b.path)
    _refused(bob, 9000)
    old = b.creator_pid
    for n, ports in enumerate([(9000,), (9000, 9001)]):
        before = 10 * (n + 1)
        wait_for(lambda: len(b.audit("grant")) > before, "grants before the reload")  # noqa: B023
        record = b.reload(wider(*ports))
        assert record["result"] == "ok", record
        assert (record["added"], record["removed"]) == (1, 0)
        assert record["outside"], record
        new = record["creator"]["to"]
        assert record["creator"]["from"] == old and new != old, record
        assert f"*:127.0.0.1:{ports[-1]}-{ports[-1]}" in record["allow"], record
        assert set(record["outside"]) <= set(record["allow"]), record
        status = _status(new)
        assert int(status["PPid"]) == factory
        uid = pwd.getpwnam(CREATOR_USER).pw_uid
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "SigIgn", "SigBlk"):
            assert status[key] == first[key], (key, status[key], first[key])
        assert int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE
        _granted(bob, ports[-1])  # from the new creator
        _retired(b, old)
        seen = len(b.audit("grant"))
        wait_for(lambda: len(b.audit("grant")) > seen + 10, "grants after it")  # noqa: B023
        old = new
    _finish(b, *loopers)
    assert [r["result"] for r in b.audit("reload")] == ["ok", "ok"]


def test_a_narrowing_reload_keeps_the_creator(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """Within the fence: no new creator, the old one serves on; after a
    widening the fence stays wide, so going back needs none either."""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    bob = clients(BOB, b.path)
    record = b.reload(NARROWER)
    assert record["result"] == "ok" and "creator" not in record, record
    _refused(bob, 8001)
    assert not _gone(b.creator_pid) and not b.audit("retire")
    record = b.reload(wider(9000))
    assert record["result"] == "ok" and record["creator"]["from"] == b.creator_pid, record
    _granted(bob, 9000)
    record = b.reload(FIRST)
    assert record["result"] == "ok" and "creator" not in record, record
    _refused(bob, 9000)
    _finish(b, looper)


def test_a_sighup_during_a_widening_is_served_after_it(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """A SIGHUP while a new creator is being started (sent once the factory
    has forked it) waits for that reload and then runs; the fence is wide
    by then, so it needs no other creator.  (Should the first reload be
    over already, the second is the same plain reload: the test holds
    either way.)"""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    factory = int(b.audit("start")[0]["factory_pid"])
    children = Path(f"/proc/{factory}/task/{factory}/children")
    b.policy.write_text(wider(9000))
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(children.read_text().split()), "the factory to fork a creator")
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(b.audit("reload")) >= 2, "two reload lines")
    first, second = b.audit("reload")
    assert first["result"] == second["result"] == "ok", (first, second)
    assert "creator" in first and "creator" not in second, (first, second)
    _granted(clients(BOB, b.path), 9000)
    _finish(b, looper)


@pytest.mark.parametrize("how", ["group-writable", "not-roots", "symlink"])
def test_the_factory_needs_a_policy_only_root_can_change(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient], how: str
) -> None:
    """The broker can make the factory read the file whenever it likes, so
    the file must be one the broker's user (or anyone but root) could not
    have written: else the widening is an error and the old policy stays."""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    text = wider(9000)
    if how == "symlink":
        target = b.dir / "elsewhere.toml"
        target.write_text(text)
        b.policy.unlink()
        b.policy.symlink_to(target)
    else:
        b.policy.write_text(text)
        if how == "group-writable":
            b.policy.chmod(0o664)
        else:
            os.chown(b.policy, pwd.getpwnam(BROKER_USER).pw_uid, -1)
    record = b.reload(None)
    assert record["result"] == "error", record
    want = "Too many levels of symbolic links" if how == "symlink" else "is not root's alone"
    assert want in record["error"] and "the old policy stays" in record["error"], record
    _refused(clients(BOB, b.path), 9000)
    if how != "symlink":
        b.policy.chmod(0o644)
        os.chown(b.policy, 0, -1)
        assert b.reload(None)["result"] == "ok"
        _granted(clients(BOB, b.path), 9000)
    _finish(b, looper)


# --- the factory's own state ----------------------------------------------------------

_BOUNDING = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10)  # SETGID SETUID SETPCAP NET_BIND


def test_the_factory_is_root_confined_and_idle(serve: Callable[..., Served]) -> None:
    """Root, but with no capability of its own and a bounding set of what
    spawning a creator needs; PR_SET_PDEATHSIG and the broker's signals
    ignored; descriptors 0-2 and its link and the policy's directory only."""
    b = serve(FIRST)
    factory = int(b.audit("start")[0]["factory_pid"])
    status = _status(factory)
    assert int(status["PPid"]) == b.pid
    assert status["Uid"].split() == ["0"] * 4
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert int(status["CapBnd"], 16) == _BOUNDING, status["CapBnd"]
    ignored = int(status["SigIgn"], 16)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        assert ignored & (1 << (sig - 1)), sig
    fds = {
        int(n): os.readlink(f"/proc/{factory}/fd/{n}") for n in os.listdir(f"/proc/{factory}/fd")
    }
    assert sorted(fds) == [0, 1, 2, 3, 4], fds
    assert fds[0] == fds[1] == "/dev/null" and fds[3].startswith("socket:")
    assert fds[4] == str(b.dir)
    assert status["State"].startswith("S")  # asleep in recvmsg
    b.proc.send_signal(signal.SIGHUP)  # a reload in reach of the factory's signals
    os.kill(factory, signal.SIGHUP)  # (as a process-group or cgroup signal would)
    os.kill(factory, signal.SIGTERM)
    assert b.reload(NARROWER)["result"] == "ok"
    assert not _gone(factory)


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of descriptor ``fd`` of process ``pid`` (pidfd_getfd(2), as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd (same on every arch)
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def _broker_link(broker: int) -> socket.socket:
    """The broker's end of its link to the factory: its one SEQPACKET socket."""
    found = []
    for name in os.listdir(f"/proc/{broker}/fd"):
        try:  # (a client's socket may come and go meanwhile)
            if not os.readlink(f"/proc/{broker}/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=_pidfd_getfd(broker, int(name)))
        except OSError:
            continue
        if s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET:
            found.append(s)
        else:
            s.close()
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("garbage", ["X", "RR", "empty", "R+fd"])
def test_the_factory_exits_on_anything_but_its_one_byte(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient], garbage: str
) -> None:
    """What a compromised broker could send on the link, sent on the
    broker's own end of it (taken with pidfd_getfd): another byte, more
    bytes, an empty message, the right byte with a descriptor.  The factory
    exits; the broker sees it (one audit line), reaps it, and serves on; a
    widening reload is then an error (old policy kept), a narrowing one
    still applies."""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    factory = int(b.audit("start")[0]["factory_pid"])
    link = _broker_link(b.pid)
    try:
        if garbage == "R+fd":
            r, w = os.pipe()
            link.sendmsg([b"R"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
            os.close(r)
            os.close(w)
        else:
            link.send({"X": b"X", "RR": b"RR", "empty": b""}[garbage])
    finally:
        link.close()
    wait_for(lambda: _reaped(factory), "the factory to exit and be reaped")
    errors = [r for r in b.audit("error") if r.get("what") == "factory"]
    assert len(errors) == 1 and errors[0]["error"] == "it exited", errors
    if garbage != "empty":
        assert "sockcreator factory: exits: the broker sent" in b.log.read_text()
    record = b.reload(wider(9000))
    assert record["result"] == "error", record
    assert "the creator factory is gone (it exited)" in record["error"], record
    _refused(clients(BOB, b.path), 9000)
    assert b.reload(NARROWER)["result"] == "ok"
    _finish(b, looper)
    assert b.stop() == 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_nothing_is_left_behind_when_the_broker_stops(
    serve: Callable[..., Served], how: str
) -> None:
    """After a widening (the factory then has a creator of its own), the
    broker stops or is killed: the factory, its creator and the retired
    ones are gone, and no process of this broker is left (no root one
    among them)."""
    b = serve(FIRST)
    factory = int(b.audit("start")[0]["factory_pid"])
    record = b.reload(wider(9000))
    assert record["result"] == "ok", record
    creators = [b.creator_pid, record["creator"]["to"]]
    if how == "SIGKILL":
        b.proc.kill()
        b.proc.wait()
    else:
        assert b.stop() == 0
        stops = b.audit("stop")
        assert stops and stops[0]["status"] == 0
    for pid in (factory, *creators):
        wait_for(lambda: _gone(pid), f"process {pid} to exit")  # noqa: B023
    wait_for(lambda: _reaped(factory), "the factory to be reaped")
    left = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if b.path.encode() in cmdline or f"--parent\0{factory}\0".encode() in cmdline:
                left.append((name, cmdline))
    assert not left, left


def test_descriptors_stay_flat_across_widening_reloads(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """Five widenings, each a new creator: the broker's descriptors and the
    factory's are the same after each (no client asking meanwhile: a
    request in flight holds a socket), and the factory has one child left
    (the creator in service)."""
    b = serve(FIRST)
    factory = int(b.audit("start")[0]["factory_pid"])
    bob = clients(BOB, b.path)
    ports: list[int] = []
    counts = []
    for i in range(5):
        ports.append(9000 + i)
        record = b.reload(wider(*ports))
        assert record["result"] == "ok" and "creator" in record, record
        _retired(b, record["creator"]["from"])
        s = _granted(bob, 9000 + i)
        bob.call("release", s)
        counts.append((_fds(b.pid), _fds(factory)))
    assert counts[1:] == counts[:1] * 4, counts
    children = Path(f"/proc/{factory}/task/{factory}/children").read_text().split()
    assert children == [str(record["creator"]["to"])], children


def _fds(pid: int) -> list[str]:
    """What ``pid``'s descriptors are: their kinds (a socket, a pipe, a
    path), sorted; not their numbers, which a switch may permute."""
    fd = f"/proc/{pid}/fd"
    return sorted(os.readlink(f"{fd}/{n}").split(":[")[0] for n in os.listdir(fd))


def test_the_policy_directory_is_the_one_from_the_start(serve: Callable[..., Served]) -> None:
    """The factory reads the file in the directory it was given at start,
    by descriptor: that directory renamed away and another put in its
    place changes nothing it reads."""
    b = serve(FIRST)
    original = b.dir
    moved = original.with_name(original.name + "-moved")
    original.rename(moved)
    try:
        original.mkdir()
        (original / "policy.toml").write_text(wider(9999))
        (moved / "policy.toml").write_text(wider(9000))
        b.log, b.policy = moved / "broker.log", moved / "policy.toml"
        record = b.reload(None)
        assert record["result"] == "ok", record
        assert "*:127.0.0.1:9000-9000" in record["allow"], record
        assert "*:127.0.0.1:9999-9999" not in record["allow"], record
    finally:
        b.stop()
        shutil.rmtree(original)
        moved.rename(original)
