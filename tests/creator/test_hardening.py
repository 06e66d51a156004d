"""The creator's hardening (issue 3, part 1) and policy (part 2), with real
processes, real users, real namespaces and the real kernel.

Three kinds of test:

* whole creator processes: their ``/proc/PID/status`` once they have answered
  a request, their exit statuses, what they answer on the wire;
* ``harden()`` called in a forked child of this (root) process, which then
  tries something forbidden: seccomp must kill it with SIGSYS, or (with the
  filter swapped for an allow-all one) the dropped credentials must refuse it;
* the BPF program, run through a tiny classic-BPF interpreter.

Protocol byte-level tests live in test_creator.py and
test_creator_privileged.py; this file does not repeat them.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import importlib.util
import os
import pwd
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import (
    IP,
    TEST_USERS,
    creator_argv,
    ensure_user,
    netns_argv,
    public_creator_path,
    requires_linux,
    requires_root,
    unprivileged_port_start,
)

from sockcreator.client._channel import CREATOR_PATH

pytestmark = [requires_linux]

TIMEOUT = 30.0  # a hang guard only; nothing here asserts on time
SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable, unlike the venv's under /root
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
ONLY_BIND = "0000000000000400"  # CAP_NET_BIND_SERVICE alone
NO_CAPS = "0000000000000000"
EPERM_ANSWER = b"EB" + struct.pack("@i", errno.EPERM)
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_I386 = 0x40000003
AF_PACKET = getattr(socket, "AF_PACKET", 17)  # Linux-only names
AF_NETLINK = getattr(socket, "AF_NETLINK", 16)

requires_system_python = pytest.mark.skipif(
    not os.access(SYSTEM_PYTHON, os.X_OK),
    reason=f"{SYSTEM_PYTHON} (world-executable) is needed to run the creator as another user",
)


def load_creator() -> ModuleType:
    """creator.py as a module, from its file (it imports only the stdlib)."""
    spec = importlib.util.spec_from_file_location("creator_under_test", CREATOR_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CREATOR = load_creator()
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


# -- helpers: /proc, users, waiting ------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def ids(value: str) -> list[int]:
    return [int(x) for x in value.split()]


@pytest.fixture
def user() -> pwd.struct_passwd:
    pw = ensure_user(TEST_USERS[0])
    assert pw.pw_uid != 0 and pw.pw_gid != 0
    return pw


@pytest.fixture(scope="module")
def public_creator() -> Iterator[str]:
    """A copy of creator.py another user can read (the repo may sit under /root)."""
    yield public_creator_path()


def wait_pid(pid: int, timeout: float = TIMEOUT) -> int | None:
    """Wait status of our child ``pid``, or None if it is still running after ``timeout``."""
    fd = os.pidfd_open(pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            return None
    finally:
        os.close(fd)
    return os.waitpid(pid, 0)[1]


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans below this process become our children, so we can reap them and
    read how they died (here, the creator whose parent we killed)."""
    if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        LIBC.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


# -- helpers: a creator process and the raw protocol ---------------------------------


def encode(kind: str, host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (
        b"S"
        + {"tcp": b"T", "udp": b"U"}[kind]
        + (b"6" if family == socket.AF_INET6 else b"4")
        + port.to_bytes(2, "big")
        + socket.inet_pton(family, host)
    )


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


@dataclass
class Creator:
    """A creator process on one end of a socketpair; we hold the other end."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    received: list[socket.socket] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        argv: list[str],
        *,
        user: pwd.struct_passwd | None = None,
        groups: list[int] | None = None,
    ) -> Creator:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        if groups is not None:
            kwargs["extra_groups"] = groups
        try:
            proc = subprocess.Popen(
                argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                env={},
                cwd="/",
                close_fds=True,
                **kwargs,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(TIMEOUT)
        return cls(proc, ours)

    def ask(self, kind: str, host: str, port: int) -> bytes | socket.socket:
        """One request: the received socket, or the raw error answer bytes."""
        self.sock.sendall(encode(kind, host, port))
        first = self.sock.recv(1)
        if first != b"S":
            return first + recv_exact(self.sock, 5) if first == b"E" else first
        msg, anc, flags, _ = self.sock.recvmsg(1, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
        fds = [
            fd
            for level, typ, data in anc
            if (level, typ) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            for fd in struct.unpack(f"@{len(data) // 4}i", data[: len(data) - len(data) % 4])
        ]
        assert msg == b"\0" and not flags & socket.MSG_CTRUNC and len(fds) == 1, (msg, fds)
        sock = socket.socket(fileno=fds[0])
        self.received.append(sock)
        return sock

    def finish(self) -> tuple[int, str]:
        """Send 'T' if we can; the exit status and everything on stderr."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"T")
        _, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, err.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            self.proc.communicate(timeout=TIMEOUT)
        for s in [self.sock, *self.received]:
            s.close()


@pytest.fixture
def creators() -> Iterator[list[Creator]]:
    started: list[Creator] = []
    yield started
    for c in started:
        c.close()


def start(
    creators: list[Creator],
    argv: list[str],
    user: pwd.struct_passwd | None = None,
    groups: list[int] | None = None,
) -> Creator:
    c = Creator.start(argv, user=user, groups=groups)
    creators.append(c)
    return c


def as_user(public_creator: str, *args: str) -> list[str]:
    """argv for a creator run directly as another (unprivileged) user."""
    return [SYSTEM_PYTHON, "-I", "-S", "-B", public_creator, *args]


# -- /proc/PID/status of real creators --------------------------------------------


@requires_root
def test_status_with_target_user(creators: list[Creator], user: pwd.struct_passwd) -> None:
    uid, gid = str(user.pw_uid), str(user.pw_gid)
    argv = netns_argv(creator_argv("--allow-all", "--uid", uid, "--gid", gid))
    c = start(creators, argv, groups=[0, user.pw_gid])  # groups it must shed
    # Port 80 and 53 for real, in a fresh network namespace, as a non-root uid.
    tcp = c.ask("tcp", "0.0.0.0", 80)
    udp = c.ask("udp", "::1", 53)
    assert isinstance(tcp, socket.socket) and tcp.getsockname() == ("0.0.0.0", 80)
    assert isinstance(udp, socket.socket) and udp.getsockname()[:2] == ("::1", 53)
    st = proc_status(c.proc.pid)  # hardening is done: the creator has answered
    assert ids(st["Uid"]) == [user.pw_uid] * 4
    assert ids(st["Gid"]) == [user.pw_gid] * 4
    assert st["Groups"] == ""
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == (ONLY_BIND,) * 3
    assert (st["CapInh"], st["CapAmb"]) == (NO_CAPS, NO_CAPS)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert c.finish() == (0, "")


@requires_root
def test_status_root_without_target_user(creators: list[Creator]) -> None:
    argv = creator_argv("--allow-all")
    if os.access(SETPRIV, os.X_OK):  # start with inheritable and ambient caps to shed
        argv = [SETPRIV, "--inh-caps", "+net_raw", "--ambient-caps", "+net_raw", *argv]
    c = start(creators, argv)
    assert isinstance(c.ask("tcp", "127.0.0.1", 0), socket.socket)
    st = proc_status(c.proc.pid)
    assert ids(st["Uid"]) == [0] * 4  # the uid stays root ...
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == (ONLY_BIND,) * 3  # ... without root's caps
    assert (st["CapInh"], st["CapAmb"]) == (NO_CAPS, NO_CAPS)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert c.finish() == (0, "")


@requires_root
def test_no_harden_keeps_full_privileges(creators: list[Creator]) -> None:
    mine = proc_status(os.getpid())
    c = start(creators, creator_argv("--allow-all", "--no-harden"))
    assert isinstance(c.ask("tcp", "127.0.0.1", 0), socket.socket)
    st = proc_status(c.proc.pid)
    assert ids(st["Uid"]) == [0] * 4
    assert int(st["CapEff"], 16) == int(mine["CapEff"], 16) != int(ONLY_BIND, 16)
    assert st["CapBnd"] == mine["CapBnd"]
    assert st["Seccomp"] == "0"
    assert st["NoNewPrivs"] == mine["NoNewPrivs"]
    assert c.finish() == (0, "")


@requires_root
def test_no_harden_refuses_a_target_user(creators: list[Creator], user: pwd.struct_passwd) -> None:
    uid, gid = str(user.pw_uid), str(user.pw_gid)
    c = start(creators, creator_argv("--allow-all", "--no-harden", "--uid", uid, "--gid", gid))
    assert c.sock.recv(1) == b""  # nothing served
    status, err = c.finish()
    assert status == CREATOR.EXIT_START, err


# -- step failures: a distinct exit status before serving anything ----------------------


@requires_root
@requires_system_python
def test_failed_step_exits_15_before_serving(
    creators: list[Creator], user: pwd.struct_passwd, public_creator: str
) -> None:
    # An unprivileged creator told to become root: setgroups/setresuid fail.
    c = start(creators, as_user(public_creator, "--allow-all", "--uid", "0", "--gid", "0"), user)
    assert c.sock.recv(1) == b""  # EOF: not a byte was answered
    status, err = c.finish()
    assert status == CREATOR.EXIT_HARDEN == 15
    assert "hardening failed" in err


def test_unknown_architecture_exits_15(creators: list[Creator]) -> None:
    # Run the real creator as __main__, with os.uname() claiming another machine.
    wrapper = textwrap.dedent(
        """
        import os, runpy, sys
        u = os.uname()
        fake = os.uname_result((u.sysname, u.nodename, u.release, u.version, "vax"))
        os.uname = lambda: fake
        sys.argv = [sys.argv[1], "--allow-all"]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )
    c = start(creators, [sys.executable, "-I", "-S", "-B", "-c", wrapper, CREATOR_PATH])
    assert c.sock.recv(1) == b""
    status, err = c.finish()
    assert status == 15, err
    assert "hardening failed" in err and "vax" in err


# -- started unprivileged ------------------------------------------------------------


@requires_root
@requires_system_python
def test_started_unprivileged_hardens_what_it_can(
    creators: list[Creator], user: pwd.struct_passwd, public_creator: str
) -> None:
    c = start(creators, as_user(public_creator, "--allow-all"), user)
    with socket.socket() as probe:  # a free high port, for this namespace
        probe.bind(("127.0.0.1", 0))
        high = probe.getsockname()[1]
    assert high >= 1024
    got = c.ask("tcp", "127.0.0.1", high)
    assert isinstance(got, socket.socket) and got.getsockname() == ("127.0.0.1", high)
    st = proc_status(c.proc.pid)
    assert ids(st["Uid"]) == [user.pw_uid] * 4
    assert ids(st["Gid"]) == [user.pw_gid] * 4
    assert (st["CapEff"], st["CapPrm"]) == (NO_CAPS, NO_CAPS)
    assert (st["CapInh"], st["CapAmb"]) == (NO_CAPS, NO_CAPS)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    if unprivileged_port_start() > 80:
        assert c.ask("tcp", "127.0.0.1", 80) == b"EB" + struct.pack("@i", errno.EACCES)
    assert c.finish() == (0, "")


# -- harden() in a forked child: what the hardened process can and cannot do -------------

# A filter that allows everything: isolates the credential layer from seccomp.
ALLOW_ALL_BPF = struct.pack("=HBBI", 0x06, 0, 0, SECCOMP_RET_ALLOW)


@dataclass
class Outcome:
    status: int
    report: bytes
    fds: list[int]

    @property
    def hardened(self) -> bool:
        return self.report.startswith(b"hardened;")

    @property
    def result(self) -> bytes:
        return self.report.removeprefix(b"hardened;")

    def killed_by_seccomp(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGSYS

    def __str__(self) -> str:
        return f"{describe(self.status)}, report {self.report!r}"


def in_hardened_child(
    action: Callable[[socket.socket], bytes],
    *,
    uid: int | None = None,
    gid: int | None = None,
    netns: bool = False,
    seccomp: bool = True,
) -> Outcome:
    """Fork; the child (optionally in a new network namespace with lo up) calls
    creator.harden(uid, gid, getppid()), reports, then runs ``action``.  Only
    calls seccomp allows may follow harden(), so the child reports over a
    socket made before it and never formats a traceback."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: always leaves through os._exit
        code = 3
        try:
            ours.close()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if netns:
                if LIBC.unshare(CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "unshare")
                subprocess.run([IP, "link", "set", "lo", "up"], check=True)
            if not seccomp:
                CREATOR.seccomp_filter = lambda machine: ALLOW_ALL_BPF
            CREATOR.harden(uid, gid, os.getppid())
            theirs.sendall(b"hardened;")
            theirs.sendall(action(theirs))
            code = 0
        except BaseException as e:
            with contextlib.suppress(BaseException):
                theirs.sendall(f"raised {type(e).__name__} {e}".encode())
        finally:
            os._exit(code)
    theirs.close()
    report, fds = b"", []
    try:
        ours.settimeout(TIMEOUT)
        while True:
            data, anc, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            for level, typ, cdata in anc:
                if (level, typ) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds += struct.unpack(f"@{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4])
            if not data:
                break
            report += data
    finally:
        ours.close()
        status = wait_pid(pid)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
    return Outcome(status, report, fds)


def errno_name(call: Callable[[], object]) -> bytes:
    """What ``call`` did, as bytes: b'ok' or the errno name (no syscalls needed)."""
    try:
        call()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, "?").encode()
    return b"ok"


def _setresuid_root(chan: socket.socket) -> bytes:
    os.setresuid(0, 0, 0)
    return b"became root"


def _setuid_root(chan: socket.socket) -> bytes:
    os.setuid(0)
    return b"became root"


def _open_file(chan: socket.socket) -> bytes:
    os.close(os.open("/etc/hostname", os.O_RDONLY))
    return b"opened"


def _socket(family: int, kind: int, proto: int = 0) -> Callable[[socket.socket], bytes]:
    def action(chan: socket.socket) -> bytes:
        socket.socket(family, kind, proto).close()
        return b"made a socket"

    return action


def _socketpair(chan: socket.socket) -> bytes:
    for s in socket.socketpair():
        s.close()
    return b"made a socketpair"


def _execve(chan: socket.socket) -> bytes:
    os.execv("/bin/true", ["true"])


def _fork(chan: socket.socket) -> bytes:
    if os.fork() == 0:
        os._exit(0)
    return b"forked"


def _kill(chan: socket.socket) -> bytes:
    os.kill(1, 0)
    return b"signalled"


def _connect(chan: socket.socket) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect(("127.0.0.1", 9))
    return b"connected"


def _listen(chan: socket.socket) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.listen()
    return b"listening"


FORBIDDEN = {
    "setresuid(0)": _setresuid_root,
    "setuid(0)": _setuid_root,
    "open a file": _open_file,
    "raw IPv4 socket": _socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "raw IPv6 socket": _socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
    "AF_UNIX socket": _socket(socket.AF_UNIX, socket.SOCK_STREAM),
    "AF_PACKET socket": _socket(AF_PACKET, socket.SOCK_RAW),
    "AF_NETLINK socket": _socket(AF_NETLINK, socket.SOCK_RAW),
    "SOCK_SEQPACKET": _socket(socket.AF_INET, socket.SOCK_SEQPACKET),
    "socketpair": _socketpair,
    "execve": _execve,
    "fork": _fork,
    "kill": _kill,
    "connect": _connect,
    "listen": _listen,
}


@requires_root
@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_hardened_process_is_killed_for(what: str, user: pwd.struct_passwd) -> None:
    out = in_hardened_child(FORBIDDEN[what], uid=user.pw_uid, gid=user.pw_gid)
    assert out.hardened, str(out)
    assert out.killed_by_seccomp(), f"{what}: {out}"


@requires_root
@pytest.mark.parametrize("what", ["setresuid(0)", "open a file", "raw IPv4 socket"])
def test_hardened_root_is_killed_for(what: str) -> None:
    out = in_hardened_child(FORBIDDEN[what])  # uid stays 0: seccomp still stops it
    assert out.hardened, str(out)
    assert out.killed_by_seccomp(), f"{what}: {out}"


BINDS = [  # (family, type, host, port): what the creator does, privileged ports included
    (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 80),
    (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 53),
    (socket.AF_INET6, socket.SOCK_STREAM, "::", 80),
    (socket.AF_INET6, socket.SOCK_DGRAM, "::1", 53),
    (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 8080),
]


def _bind_all(chan: socket.socket) -> bytes:
    socks = []
    for family, kind, host, port in BINDS:
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        socks.append(s)
    socket.send_fds(chan, [b"F"], [s.fileno() for s in socks])
    for s in socks:
        s.close()
    return b"bound"


def check_bound(out: Outcome) -> None:
    assert out.status == 0 and out.result == b"Fbound", str(out)
    assert len(out.fds) == len(BINDS)
    for fd, (family, kind, host, port) in zip(out.fds, BINDS, strict=True):
        with socket.socket(fileno=fd) as s:
            assert (s.family, s.type) == (family, kind)
            assert s.getsockname()[:2] == (host, port)


@requires_root
def test_hardened_process_binds_privileged_ports(user: pwd.struct_passwd) -> None:
    check_bound(in_hardened_child(_bind_all, uid=user.pw_uid, gid=user.pw_gid, netns=True))


@requires_root
def test_hardened_root_binds_privileged_ports() -> None:
    check_bound(in_hardened_child(_bind_all, netns=True))


@requires_root
def test_credentials_alone_refuse_root(user: pwd.struct_passwd) -> None:
    """Defence in depth: with the seccomp filter swapped for allow-all, the
    dropped credentials still refuse root, raw sockets and root's files, and
    CAP_NET_BIND_SERVICE still binds port 80 for a non-root uid."""

    def probe(chan: socket.socket) -> bytes:
        def bind80() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 80))

        def shadow() -> None:
            os.close(os.open("/etc/shadow", os.O_RDONLY))

        results = [
            errno_name(lambda: os.setresuid(0, 0, 0)),
            errno_name(lambda: os.setresgid(0, 0, 0)),
            errno_name(lambda: os.setgroups([0])),
            errno_name(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close()),
            errno_name(shadow) if os.path.exists("/etc/shadow") else b"EACCES",
            errno_name(bind80),
            proc_status(os.getpid())["CapEff"].encode(),
            proc_status(os.getpid())["NoNewPrivs"].encode(),
        ]
        return b" ".join(results)

    out = in_hardened_child(probe, uid=user.pw_uid, gid=user.pw_gid, netns=True, seccomp=False)
    assert out.status == 0, str(out)
    expected = ["EPERM", "EPERM", "EPERM", "EPERM", "EACCES", "ok", ONLY_BIND, "1"]
    assert out.result.decode().split() == expected


@requires_root
def test_credentials_alone_root_without_caps() -> None:
    """Without a target user the uid stays 0 but root's capabilities are gone."""

    def probe(chan: socket.socket) -> bytes:
        def bind80() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 80))

        results = [
            errno_name(lambda: os.setgroups([1])),  # CAP_SETGID
            errno_name(lambda: os.setresuid(1, 1, 1)),  # CAP_SETUID
            errno_name(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close()),
            errno_name(bind80),
        ]
        return b" ".join(results)

    out = in_hardened_child(probe, netns=True, seccomp=False)
    assert out.status == 0, str(out)
    assert out.result.decode().split() == ["EPERM", "EPERM", "EPERM", "ok"]


@requires_root
def test_harden_refuses_a_threaded_process_and_applies_nothing() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(r)
            release = threading.Event()
            thread = threading.Thread(target=release.wait)
            thread.start()
            before = proc_status(os.getpid())
            try:
                CREATOR.harden(None, None, os.getppid())
                verdict = "no error"
            except OSError:
                verdict = "OSError"
            after = proc_status(os.getpid())
            release.set()
            thread.join()
            keys = ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")
            changed = [k for k in keys if before[k] != after[k]]
            os.write(w, f"{verdict} changed={','.join(changed)}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    status = wait_pid(pid)
    assert status == 0, describe(status) if status is not None else "hung"
    assert report == b"OSError changed="


# -- the BPF program ------------------------------------------------------------------


def run_bpf(code: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A minimal classic-BPF interpreter for the instructions the filter may use;
    any other instruction, or running off the end, fails the test."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    prog = [struct.unpack_from("=HBBI", code, off) for off in range(0, len(code), 8)]
    acc, pc = 0, 0
    for _ in range(len(prog)):  # forward jumps only: at most len(prog) steps
        op, jt, jf, k = prog[pc]
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            assert k % 4 == 0 and k + 4 <= len(data)
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif op == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
            pc += 1
        elif op == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += 1 + (jt if acc == k else jf)
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {op:#x} at {pc}")
        assert pc < len(prog), "ran off the end of the filter"
    raise AssertionError("no return")


ARCH_CASES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


@pytest.mark.parametrize("machine", sorted(ARCH_CASES))
def test_filter_is_well_formed(machine: str) -> None:
    code = CREATOR.seccomp_filter(machine)
    assert code and len(code) % 8 == 0 and len(code) // 8 <= 4096
    prog = [struct.unpack_from("=HBBI", code, off) for off in range(0, len(code), 8)]
    for pc, (op, jt, jf, k) in enumerate(prog):
        assert op in (0x20, 0x54, 0x15, 0x06), (pc, op)
        if op == 0x15:
            assert pc + 1 + max(jt, jf) < len(prog), f"jump out of range at {pc}"
        if op == 0x06:
            assert k in (SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ALLOW)
    assert prog[-1][0] == 0x06  # the last instruction returns
    assert prog[0] == (0x20, 0, 0, 4)  # first thing: load the architecture ...
    assert prog[1][0] == 0x15 and prog[1][3] == ARCH_CASES[machine]  # ... and check it


@pytest.mark.parametrize("machine", sorted(ARCH_CASES))
def test_filter_decisions(machine: str) -> None:
    code, arch = CREATOR.seccomp_filter(machine), ARCH_CASES[machine]
    col = 0 if machine == "x86_64" else 1
    nrs = {name: pair[col] for name, pair in CREATOR.SYSCALLS.items()}
    sock_nr = CREATOR.SOCKET[col]
    kill, allow = SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ALLOW

    for name, nr in nrs.items():
        assert run_bpf(code, nr, arch) == allow, name
        assert run_bpf(code, nr, AUDIT_ARCH_I386) == kill, f"{name} under another arch"
    if machine == "x86_64":  # x32 system calls share AUDIT_ARCH_X86_64
        assert run_bpf(code, nrs["read"] | 0x40000000, arch) == kill
    # a sample of calls the loop must not make
    forbidden = {
        "x86_64": (2, 257, 59, 56, 57, 435, 105, 117, 62, 53, 42, 50, 101),
        "aarch64": (56, 221, 220, 146, 147, 129, 199, 203, 201, 117, 435),
    }[machine]
    for nr in forbidden:
        assert run_bpf(code, nr, arch) == kill, nr

    cloexec, nonblock = socket.SOCK_CLOEXEC, socket.SOCK_NONBLOCK
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            for flags in (0, cloexec, cloexec | nonblock):
                assert run_bpf(code, sock_nr, arch, (family, kind | flags)) == allow
        for kind in (socket.SOCK_RAW, socket.SOCK_SEQPACKET, socket.SOCK_RDM, 0, 15):
            assert run_bpf(code, sock_nr, arch, (family, kind | cloexec)) == kill, kind
    for family in (socket.AF_UNIX, AF_PACKET, AF_NETLINK, 0, 44, 2 + 2**16):
        assert run_bpf(code, sock_nr, arch, (family, socket.SOCK_STREAM)) == kill, family


def test_unknown_machine_has_no_filter() -> None:
    with pytest.raises(KeyError):
        CREATOR.seccomp_filter("vax")


def test_libc_by_soname_never_find_library() -> None:
    tree = ast.parse(Path(CREATOR_PATH).read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imported = {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert "find_library" not in names | imported
    assert not any("ctypes.util" in m for m in imported)
    assert not any(
        isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ctypes")
        for n in ast.walk(tree)
    )


# -- PDEATHSIG and the parent check -----------------------------------------------------

# Spawns a creator the library's way (its argv) on the socket whose descriptor
# number is argv[2], prints the creator's pid, then waits to be killed.  We keep the other end of
# the socket, so the creator never sees EOF: only PDEATHSIG can stop it.
PARENT_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    from sockcreator.client._channel import creator_argv
    argv = creator_argv(user=sys.argv[1])
    fd = int(sys.argv[2])
    proc = subprocess.Popen(argv, stdin=fd, stdout=fd, env={}, close_fds=True)
    print(proc.pid, flush=True)
    sys.stdin.read()
    """
)

# Forks; the child waits until this parent is dead and it has been reparented,
# and only then execs the creator (the library's argv, computed here, in the
# parent).  So the parent always dies before the creator could set PDEATHSIG.
VANISHING_PARENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from sockcreator.client._channel import creator_argv
    argv = creator_argv(user=sys.argv[1])
    me = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # EOF: the parent has closed its files, i.e. is exiting
        while os.getppid() == me:  # until the reparenting is done
            time.sleep(0.001)
        os.dup2(int(sys.argv[2]), 0)
        os.dup2(int(sys.argv[2]), 1)
        os.execve(argv[0], argv, {})
    print(pid, flush=True)
    os._exit(0)
    """
)


def run_parent(script: str, user: str) -> tuple[subprocess.Popen[bytes], socket.socket, int]:
    """Start ``script`` with one end of a socketpair; we keep the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        parent = subprocess.Popen(
            [sys.executable, "-c", script, user, str(theirs.fileno())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[theirs.fileno()],
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), line
    ours.settimeout(TIMEOUT)
    return parent, ours, int(line)


def orphan_status(pid: int) -> int:
    """How orphan ``pid`` (reparented to us, the subreaper) ended; SIGKILL if it did not."""
    status = wait_pid(pid)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"creator {pid} still running after its parent died")
    return status


@requires_root
@pytest.mark.usefixtures("subreaper")
def test_creator_dies_with_its_parent(user: pwd.struct_passwd) -> None:
    parent, ours, creator = run_parent(PARENT_SCRIPT, user.pw_name)
    with ours:
        try:
            got = Creator(parent, ours).ask("tcp", "127.0.0.1", 0)  # hardening is done
            assert isinstance(got, socket.socket)
            got.close()
            assert proc_status(creator)["PPid"] == str(parent.pid)
        finally:
            parent.kill()
            parent.communicate()
        # We still hold our end: no EOF reaches the creator, only PDEATHSIG can.
        status = orphan_status(creator)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, describe(status)


@requires_root
@pytest.mark.usefixtures("subreaper")
def test_creator_whose_parent_died_before_pdeathsig_never_serves(
    user: pwd.struct_passwd,
) -> None:
    parent, ours, creator = run_parent(VANISHING_PARENT_SCRIPT, user.pw_name)
    parent.communicate()  # the parent is gone; its forked child execs the creator now
    with ours:
        try:
            ours.sendall(encode("tcp", "127.0.0.1", 0))
            answer = ours.recv(1)
        except ConnectionResetError:
            answer = b""
        if answer:  # it serves: stop it, then fail
            os.kill(creator, signal.SIGKILL)
            os.waitpid(creator, 0)
            pytest.fail(f"creator answered {answer!r} although its parent died before PDEATHSIG")
        status = orphan_status(creator)
    assert os.waitstatus_to_exitcode(status) == CREATOR.EXIT_HARDEN, describe(status)


# -- policy (part 2) -------------------------------------------------------------------


@requires_root
def test_policy_denies_outside_the_allowlist(creators: list[Creator]) -> None:
    rules = ["--allow", "tcp:127.0.0.1:8000-8080", "--allow", "udp:[::1]:53", "--allow", "*:*:80"]
    c = start(creators, netns_argv(creator_argv(*rules)))
    for kind, host, port in [
        ("tcp", "127.0.0.1", 8000),
        ("tcp", "127.0.0.1", 8080),
        ("udp", "::1", 53),
        ("tcp", "0.0.0.0", 80),
        ("udp", "::", 80),
    ]:
        got = c.ask(kind, host, port)
        assert isinstance(got, socket.socket), (kind, host, port, got)
        assert got.getsockname()[:2] == (host, port)
    denied = [
        ("tcp", "127.0.0.1", 8081),  # port outside the range
        ("tcp", "127.0.0.1", 7999),
        ("udp", "127.0.0.1", 8000),  # wrong protocol
        ("tcp", "0.0.0.0", 8000),  # wrong address
        ("tcp", "::1", 8000),  # wrong family
        ("tcp", "::1", 53),  # udp only
        ("udp", "127.0.0.1", 53),  # [::1] only
        ("tcp", "127.0.0.1", 81),
    ]
    for kind, host, port in denied:
        assert c.ask(kind, host, port) == EPERM_ANSWER, (kind, host, port)
    assert isinstance(c.ask("tcp", "127.0.0.1", 8001), socket.socket)  # still serving
    status, err = c.finish()
    assert status == 0, err
    lines = err.splitlines()
    assert len(lines) == len(denied), err
    for line, (kind, host, port) in zip(lines, denied, strict=True):
        assert "denied" in line and kind in line and host in line and f"port {port}" in line


@requires_root
def test_kernel_errors_pass_through_the_policy(creators: list[Creator]) -> None:
    c = start(creators, netns_argv(creator_argv("--allow", "*:*:8000", "--allow", "tcp:*:80")))
    eaddrnotavail = b"EB" + struct.pack("@i", errno.EADDRNOTAVAIL)
    assert c.ask("tcp", "192.0.2.1", 8000) == eaddrnotavail  # allowed, but not local
    assert c.ask("udp", "2001:db8::1", 8000) == eaddrnotavail
    first = c.ask("tcp", "127.0.0.1", 80)
    assert isinstance(first, socket.socket)
    first.listen()
    eaddrinuse = b"EB" + struct.pack("@i", errno.EADDRINUSE)
    assert c.ask("tcp", "127.0.0.1", 80) == eaddrinuse  # the kernel's, not the policy's
    status, err = c.finish()
    assert status == 0 and "denied" not in err, err


@pytest.mark.parametrize(
    "args",
    [
        [],  # no allowlist at all: must be explicit
        ["--allow-all", "--allow", "tcp:*:80"],  # both
        ["--allow", "tcp:*:99999"],
        ["--allow", "tcp:*:90-80"],
        ["--allow", "sctp:*:80"],
        ["--allow", "tcp:localhost:80"],
        ["--allow", "tcp:[::1:80"],
        ["--allow", "tcp:*:+80"],
        ["--allow"],
        ["--allow-all", "--uid", "1000"],  # --uid without --gid
        ["--allow-all", "--frobnicate"],
    ],
)
def test_bad_start_exits_14_before_serving(creators: list[Creator], args: list[str]) -> None:
    c = start(creators, creator_argv(*args))
    assert c.sock.recv(1) == b""
    status, err = c.finish()
    assert status == CREATOR.EXIT_START == 14, err
    assert err.startswith("sockcreator-creator: ")


def test_parse_rule_and_allowed() -> None:
    rules = [
        CREATOR.parse_rule(spec)
        for spec in ("tcp:0.0.0.0:80", "udp:[::]:53", "tcp:*:8000-8080", "*:[::1]:443")
    ]
    any4, any6 = bytes(4), bytes(16)
    loop6 = socket.inet_pton(socket.AF_INET6, "::1")
    ok = CREATOR.allowed
    assert ok(rules, b"T", b"4", any4, 80)
    assert not ok(rules, b"U", b"4", any4, 80)
    assert not ok(rules, b"T", b"6", any6, 80)
    assert not ok(rules, b"T", b"4", b"\x7f\0\0\1", 80)
    assert ok(rules, b"U", b"6", any6, 53)
    assert not ok(rules, b"U", b"6", loop6, 53)
    assert ok(rules, b"T", b"6", loop6, 8000) and ok(rules, b"T", b"4", any4, 8080)
    assert not ok(rules, b"T", b"4", any4, 8081) and not ok(rules, b"U", b"4", any4, 8000)
    assert ok(rules, b"U", b"6", loop6, 443) and ok(rules, b"T", b"6", loop6, 443)
    assert not ok(rules, b"T", b"6", any6, 443)
    assert not ok([], b"T", b"4", any4, 80)  # an empty list allows nothing
    assert ok(None, b"U", b"6", loop6, 1)  # None is --allow-all
