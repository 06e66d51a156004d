"""Finding 3: root must not follow anyone else's symlink in ``--socket PATH``.

Real brokers started as root, and a real attacker running as sockc-alice:
no mocking.  The arena is a root-owned sticky directory that alice's group
may write (it passes the directory rule, as /tmp does, without the kernel's
``fs.protected_symlinks`` stepping in): alice can put her own symlink ``x``
in it and flip it between the real directory and one of her own, where she
swaps a symlink to a root-only victim file in for every entry the broker
creates.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_USERS, ensure_user, fd_count, requires_linux, requires_root

import sockcreator
from sockcreator.broker._path import SocketPathError, create_socket_file, open_directory

pytestmark = [requires_root, requires_linux, pytest.mark.root]

ALICE = TEST_USERS[0]
BROKER_USER = "sockc-broker"
CREATOR_USER = "sockc-creator"
POLICY = f"""
[[allow]]
users = ["root", "{ALICE}"]
protocols = ["tcp"]
addresses = ["127.0.0.1"]
ports = [8000]
"""
ATTEMPTS = int(os.environ.get("SOCKC_RACE_ATTEMPTS", "48"))
RACE_BUDGET = float(os.environ.get("SOCKC_RACE_SECONDS", "50"))


@dataclass
class Arena:
    base: Path  # root:alice 1770, like a shared spool: alice may add entries
    real: Path  # root 0755: where the socket belongs
    evil: Path  # alice's own directory
    victim: Path  # root 0600, in a root 0700 directory
    policy: Path
    alice: pwd.struct_passwd


@pytest.fixture
def arena() -> Iterator[Arena]:
    alice = ensure_user(ALICE)
    ensure_user(BROKER_USER)
    ensure_user(CREATOR_USER)
    top = Path(tempfile.mkdtemp(prefix="sockc-pathsafe-", dir="/tmp"))
    top.chmod(0o755)
    base = top / "spool"
    base.mkdir()
    os.chown(base, 0, alice.pw_gid)
    base.chmod(0o1770)
    real = top / "real"
    real.mkdir()
    real.chmod(0o755)
    evil = top / "evil"
    evil.mkdir()
    os.chown(evil, alice.pw_uid, alice.pw_gid)
    evil.chmod(0o755)
    vault = top / "vault"
    vault.mkdir()
    vault.chmod(0o700)
    victim = vault / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    policy = top / "policy.toml"
    policy.write_text(POLICY)
    yield Arena(base, real, evil, victim, policy, alice)
    shutil.rmtree(top, ignore_errors=True)


def _as(user: pwd.struct_passwd, argv: list[str]) -> subprocess.Popen[bytes]:
    """``argv`` run as ``user`` (with /usr/bin/python3: /root is 0700)."""
    return subprocess.Popen(
        argv,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd="/",
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _serve(socket_path: str, policy: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", socket_path,
            "--policy", str(policy), "--user", BROKER_USER,
            "--creator-user", CREATOR_USER, *extra]  # fmt: skip


def _run_broker(argv: list[str], log: Path) -> tuple[int, str, bool]:
    """Start a broker; once it has started (or died), SIGTERM it.  Its exit
    status, its log, and whether it answered at ``check`` while it ran."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    deadline = time.monotonic() + 30
    try:
        while proc.poll() is None and '"event":"start"' not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(20)
    return status, log.read_text(), '"event":"start"' in log.read_text()


# --- (1) who owns the symlink decides --------------------------------------------------


def test_alices_symlink_is_refused_roots_is_followed(arena: Arena) -> None:
    # alice's symlink in the path: refused, naming it and her.
    link = arena.base / "alice-link"
    subprocess.run(["ln", "-s", str(arena.real), str(link)], check=True,
                   user=arena.alice.pw_uid, group=arena.alice.pw_gid)  # fmt: skip
    assert os.lstat(link).st_uid == arena.alice.pw_uid
    argv = _serve(f"{link}/broker.sock", arena.policy, "--mode", "0666")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    assert str(link) in out.stderr and ALICE in out.stderr and "symbolic link" in out.stderr
    assert not (arena.real / "broker.sock").exists()

    # root's own symlink (as Debian's /var/run -> /run): followed, the socket
    # lands in the real directory with the mode asked for.
    mine = arena.real.parent / "link"
    mine.symlink_to(arena.real)
    status, log, started = _run_broker(
        _serve(f"{mine}/broker.sock", arena.policy, "--mode", "0660", "--group", ALICE),
        arena.real.parent / "broker.log",
    )
    assert started and status == 0, log
    st = os.lstat(arena.real / "broker.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_uid == 0 and st.st_gid == grp.getgrnam(ALICE).gr_gid


def test_the_walk(arena: Arena) -> None:
    """The walk itself, in this (root) process: relative and absolute targets,
    ``..``, a loop, and a root-owned symlink into alice's directory; no
    descriptor left behind on any path."""
    top = arena.real.parent
    (top / "rel").symlink_to("real")  # relative target
    (top / "up").symlink_to("real/../real/.")  # .. inside a target
    (top / "abs").symlink_to(top / "rel")  # absolute target, then another link
    (top / "loop").symlink_to("loop")
    (top / "to-evil").symlink_to(arena.evil)  # root's link, alice's directory
    (top / "file").write_text("")
    before = fd_count()
    real = os.stat(arena.real)
    for via in ("rel", "up", "abs", "rel/../real", "abs/./"):
        fd, where = open_directory(str(top / via))
        try:
            st = os.fstat(fd)
            assert (st.st_dev, st.st_ino) == (real.st_dev, real.st_ino), via
            assert where == str(arena.real), (via, where)
        finally:
            os.close(fd)
    refusals = {
        "loop": "too many symbolic links",
        "to-evil": re.escape(f"{arena.evil} is owned by uid {arena.alice.pw_uid} ({ALICE})"),
        "file": "is not a directory",
        "missing": "No such file",
    }
    for via, message in refusals.items():
        with pytest.raises(SocketPathError, match=message):
            open_directory(str(top / via))
    with pytest.raises(SocketPathError, match="writable by others and not sticky"):
        arena.real.chmod(0o777)
        try:
            create_socket_file(str(arena.real / "s"), 0o600)
        finally:
            arena.real.chmod(0o755)
    (arena.real / "precious").write_text("x")
    with pytest.raises(SocketPathError, match="exists and is not a socket"):
        create_socket_file(str(arena.real / "precious"), 0o600)
    # A default ACL can take bits the umask left (the kernel applies the
    # umask for sockets, then the ACL): the mode is checked, not trusted.
    acl = arena.real / "acl"
    acl.mkdir()
    entries = [(0x01, 7), (0x04, 7), (0x20, 0)]  # user::rwx group::rwx other::---
    value = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries
    )
    try:
        os.setxattr(acl, "system.posix_acl_default", value)
    except OSError:
        pass  # no ACLs on this file system
    else:
        with pytest.raises(SocketPathError, match="default ACL"):
            create_socket_file(str(acl / "s"), 0o666)
        assert os.listdir(acl) == [], "the temporary name left behind"
    assert fd_count() == before, "a descriptor left open"
    with create_socket_file(str(top / "rel" / "s"), 0o640) as f:
        assert fd_count() == before + 2  # the socket and its directory
        st = os.lstat(arena.real / "s")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(arena.real / "s"))
        assert f.unlink_if_ours() and not (arena.real / "s").exists()
    assert fd_count() == before


# --- (2) the race, for real -------------------------------------------------------------

_FLIPPER = r"""
import os, random, sys, time
base, real, evil = sys.argv[1:4]
x, new = os.path.join(base, "x"), os.path.join(base, "x.new")
targets = (real, evil)
i = 0
while True:
    i ^= 1
    try:
        os.unlink(new)
    except FileNotFoundError:
        pass
    os.symlink(targets[i], new)
    os.rename(new, x)
    until = time.perf_counter() + random.uniform(0, 400e-6)
    while time.perf_counter() < until:
        pass
"""

_SWAPPER = r"""
import ctypes, os, struct, sys
evil, victim = sys.argv[1:3]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
IN_CREATE = 0x100
if fd < 0 or libc.inotify_add_watch(fd, evil.encode(), IN_CREATE) < 0:
    sys.exit("inotify: " + os.strerror(ctypes.get_errno()))
n = 0
def spare():
    global n
    n += 1
    name = os.path.join(evil, "~%d" % n)
    os.symlink(victim, name)
    return name
ready = spare()
while True:
    buf = os.read(fd, 65536)
    off = 0
    while off < len(buf):
        _wd, _mask, _cookie, size = struct.unpack_from("iIII", buf, off)
        name = buf[off + 16 : off + 16 + size].rstrip(b"\0").decode()
        off += 16 + size
        if name.startswith("~"):
            continue  # one of ours
        try:
            os.rename(ready, os.path.join(evil, name))  # one syscall: the swap
        except OSError:
            continue
        ready = spare()
"""


def test_race_alice_flips_the_directory_and_swaps_in_a_symlink(arena: Arena) -> None:
    victim_before = os.stat(arena.victim)
    x = arena.base / "x"
    flipper = _as(arena.alice, ["/usr/bin/python3", "-c", _FLIPPER,
                                str(arena.base), str(arena.real), str(arena.evil)])  # fmt: skip
    swapper = _as(arena.alice, ["/usr/bin/python3", "-c", _SWAPPER,
                                str(arena.evil), str(arena.victim)])  # fmt: skip
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    started_at = time.monotonic()
    attempts = 0
    try:
        deadline = time.monotonic() + 30
        while not x.is_symlink():
            assert flipper.poll() is None and time.monotonic() < deadline, "no flipper"
            time.sleep(0.01)
        # At least 40 attempts; more, up to ATTEMPTS, while the time budget lasts.
        while attempts < 40 or (
            attempts < ATTEMPTS and time.monotonic() - started_at < RACE_BUDGET
        ):
            attempts += 1
            for p in (flipper, swapper):
                if p.poll() is not None:
                    err = p.stderr.read() if p.stderr else b""
                    raise AssertionError(f"the attacker died: {err!r}")
            real_sock = arena.real / "broker.sock"
            if real_sock.exists():
                real_sock.unlink()
            argv = _serve(f"{x}/broker.sock", arena.policy, "--mode", "0666")
            if attempts % 2:
                argv += ["--group", ALICE]  # a chown in the window, too
            status, log, started = _run_broker(argv, arena.real.parent / "broker.log")
            st = os.stat(arena.victim)
            changed = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (
                stat.S_IMODE(victim_before.st_mode), victim_before.st_uid, victim_before.st_gid
            )  # fmt: skip
            if changed:
                failures.append(f"attempt {attempts}: victim now mode {st.st_mode:o} "
                                f"uid {st.st_uid} gid {st.st_gid}")  # fmt: skip
                os.chmod(arena.victim, victim_before.st_mode)  # undo, and keep counting
                os.chown(arena.victim, victim_before.st_uid, victim_before.st_gid)
            if started:
                kind = "bound"
                start = json.loads(next(ln for ln in log.splitlines() if '"start"' in ln))
                assert status == 0, log
                # bound in the real directory: a socket there that is no one else's
                sock = os.lstat(real_sock) if real_sock.is_socket() else None
                if sock is None or sock.st_uid != 0:
                    failures.append(f"attempt {attempts}: started, but no socket of root's in "
                                    f"{arena.real} ({start['socket']})")  # fmt: skip
            elif status == 4:
                kind = "refused"
            else:
                kind = f"status {status}"
                failures.append(f"attempt {attempts}: exit status {status}: {log}")
            outcomes[kind] = outcomes.get(kind, 0) + 1
    finally:
        for p in (flipper, swapper):
            p.kill()
            p.wait()
        elapsed = time.monotonic() - started_at
        print(f"{attempts} attempts in {elapsed:.1f} s: {outcomes}; failures: {failures}")
    assert not failures, "\n".join(failures)
    st = os.stat(arena.victim)
    assert (st.st_mode, st.st_uid, st.st_gid) == (
        victim_before.st_mode, victim_before.st_uid, victim_before.st_gid
    )  # fmt: skip


@pytest.mark.parametrize("replaced", [False, True])
def test_broker_unlinks_only_its_own_socket(arena: Arena, replaced: bool) -> None:
    """At stop the broker removes its socket through its directory's
    descriptor, only if the inode there is still its own.  Run as the broker
    user itself (started as root it can no longer write a directory that
    passes the rule), in that user's own directory."""
    broker = pwd.getpwnam(BROKER_USER)
    home = arena.real / "run"
    home.mkdir()
    os.chown(home, broker.pw_uid, broker.pw_gid)
    arena.policy.chmod(0o644)
    path = home / "broker.sock"
    log = home.parent / "broker.log"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(sockcreator.__file__).parents[1])}
    argv = ["/usr/bin/python3", "-m", "sockcreator.cli", "serve", "--socket", str(path),
            "--policy", str(arena.policy), "--loop", "asyncio"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, user=broker.pw_uid, group=broker.pw_gid, extra_groups=[],
                                cwd="/", env=env, stdout=f, stderr=f)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while '"event":"start"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        ours = os.lstat(path)
        assert stat.S_ISSOCK(ours.st_mode) and ours.st_uid == broker.pw_uid
        if replaced:  # another socket renamed over it: not the broker's to remove
            with socket.socket(socket.AF_UNIX) as other:
                other.bind(str(home / "other"))
            os.rename(home / "other", path)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    assert path.exists() == replaced, log.read_text()
