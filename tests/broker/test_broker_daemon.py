"""``sockcreator serve`` as a daemon: SIGHUP reloads the policy, the service
manager hears READY/RELOADING/STOPPING/STATUS/WATCHDOG on a real datagram
socket (sd_notify), and the listening socket may come from the real
``systemd-socket-activate`` (LISTEN_FDS).

Real processes throughout: the broker starts as root and drops to its user,
clients are forked children of pytest running as test users (see
test_broker.py), the notification socket is bound here.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ensure_user, netns_argv, requires_linux, requires_root
from test_broker import (
    ALICE,
    BOB,
    BROKER_USER,
    CAROL,
    CREATOR_USER,
    UserClient,
    _become,
    clients,
    stop_broker,
    wait_for,
    workdir,
)

import sockcreator
from sockcreator.broker.client import Broker, SocketRefusedError

pytestmark = [requires_root, requires_linux, pytest.mark.root]
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
__all__ = ["clients", "workdir"]  # fixtures, used by name

# alice: always allowed (the looping client); bob: allowed, then removed;
# carol: added.  Every version stays within the first one's creator allow-list.
RULE = """
[[allow]]
users = [{users}]
protocols = ["tcp", "udp"]
addresses = ["127.0.0.1"]
ports = [{ports}]
"""
PORTS = '0, "8000-8999"'
FIRST = RULE.format(users=f'"root", "{ALICE}"', ports=PORTS) + RULE.format(
    users=f'"{BOB}"', ports='"8000-8999"'
)
SECOND = RULE.format(users=f'"root", "{ALICE}"', ports=PORTS) + RULE.format(
    users=f'"{CAROL}"', ports='"8000-8999"'
)
WIDER = FIRST + RULE.format(users=f'"{BOB}"', ports="9000")
NARROWER = RULE.format(users=f'"root", "{ALICE}"', ports=PORTS)


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    for name in (ALICE, BOB, CAROL, BROKER_USER, CREATOR_USER):
        ensure_user(name)


class Served:
    """One ``sockcreator serve`` (as root, dropping to BROKER_USER)."""

    def __init__(
        self,
        directory: Path,
        policy: str,
        *,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        socket_arg: bool = True,
        netns: bool = True,
        extra: tuple[str, ...] = (),
        wait: bool = True,
        as_user: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.dir = directory
        self.path = str(directory / "broker.sock")
        self.policy = directory / "policy.toml"
        self.policy.write_text(policy)
        self.log = directory / "broker.log"
        argv = [python, "-m", "sockcreator.cli", "serve"]
        if socket_arg:
            argv += ["--socket", self.path]
        argv += ["--policy", str(self.policy)]
        if as_user is None:  # as root, dropping to BROKER_USER
            argv += ["--user", BROKER_USER, "--creator-user", CREATOR_USER]
        else:  # started unprivileged, in a directory of its own
            pw = pwd.getpwnam(as_user)
            os.chown(directory, pw.pw_uid, pw.pw_gid)
            ids = [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
            wrap = [SETPRIV, *ids, *(wrap or [])]
        argv = (wrap or []) + [*argv, *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_argv(argv) if netns else argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
            )
        if wait:
            self.wait_start()

    def wait_start(self) -> None:
        wait_for(lambda: bool(self.audit("start")) or self.proc.poll() is not None, "start")
        assert self.proc.poll() is None, self.log.read_text()
        self.creator_pid = int(self.audit("start")[0]["creator_pid"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        text = self.log.read_text()
        out = []
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record["event"] == event:
                    out.append(record)
        return out

    def reload(self, policy: str | None) -> dict[str, Any]:
        """Write ``policy`` (None: leave the file), SIGHUP, the audit line."""
        if policy is not None:
            tmp = self.policy.with_suffix(".new")
            tmp.write_text(policy)
            tmp.rename(self.policy)  # as an editor or a config manager does
        n = len(self.audit("reload"))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(self.audit("reload")) > n, "the reload's audit line")
        assert self.proc.poll() is None, self.log.read_text()
        return self.audit("reload")[n]

    def stop(self) -> int:
        return stop_broker(self.proc)


@pytest.fixture
def serve(workdir: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(policy: str = FIRST, **kwargs: Any) -> Served:
        s = Served(workdir, policy, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# --- a client that asks all the time -------------------------------------------------


class Looper:
    """A forked child as ``user`` that requests and releases (fresh sockets:
    port 0, so every request goes to the creator) until told to stop; its
    tally is (granted, {error: count})."""

    def __init__(self, user: str, path: str) -> None:
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                os.close(r2)
                _become(user)
                ok, errors = 0, {}
                with Broker(path, timeout=10) as b:
                    while not select.select([r], [], [], 0)[0]:
                        try:
                            s = b.request_socket("udp", "127.0.0.1", 0)
                            b.release_socket(s)
                            ok += 1
                        except Exception as e:  # every kind counts, and is named
                            key = f"{type(e).__name__}: {e}"
                            errors[key] = errors.get(key, 0) + 1
                            if not isinstance(e, SocketRefusedError):
                                break
                os.write(w2, json.dumps([ok, errors]).encode())
            finally:
                os._exit(0)
        os.close(r)
        os.close(w2)
        self.pid, self.stop_w, self.result_r = pid, w, r2

    def finish(self) -> tuple[int, dict[str, int]]:
        os.close(self.stop_w)
        data = b""
        while chunk := os.read(self.result_r, 65536):
            data += chunk
        os.close(self.result_r)
        os.waitpid(self.pid, 0)
        ok, errors = json.loads(data or b"[0, {}]")
        return ok, errors


# --- reloading ------------------------------------------------------------------------


def _granted(c: UserClient, port: int) -> int:
    reply = c.request("udp", "127.0.0.1", port)
    assert reply[0] == "ok", reply
    return int(reply[1])


def test_reload_applies_to_live_connections_and_keeps_grants(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """A valid change: carol (newly allowed) gets a socket on the connection
    she opened before; bob (removed) is refused EPERM afterwards, on his old
    connection and on a new one, while his grant stays (and his socket
    works).  A client looping requests throughout sees no error at all."""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    bob, carol = clients(BOB, b.path), clients(CAROL, b.path)
    held = _granted(bob, 8001)
    assert carol.request("udp", "127.0.0.1", 8002)[:2] == ("refused", 1)  # EPERM
    record = b.reload(SECOND)
    assert record["result"] == "ok", record
    assert (record["added"], record["removed"], record["rules"]) == (1, 1, 2)
    _granted(carol, 8002)  # the same connection: its cached decision went
    assert bob.request("udp", "127.0.0.1", 8003)[:2] == ("refused", 1)
    bob2 = clients(BOB, b.path)
    assert bob2.request("udp", "127.0.0.1", 8003)[:2] == ("refused", 1)
    assert bob.call("sockname", held)[1] == ("127.0.0.1", 8001)  # his grant stays:
    root = Broker(b.path, timeout=10)
    assert 8001 in {h.request.port for h in root.status() if h.uid == pwd_uid(BOB)}
    root.close()
    # and back again, with the loop still going
    assert b.reload(FIRST)["result"] == "ok"
    _granted(bob, 8004)
    ok, errors = looper.finish()
    assert ok > 0 and errors == {}, (ok, errors)


def _interpreter_for(user: str) -> str:
    """An interpreter ``user`` can run again by its path (as an unprivileged
    broker does to start its creator) and that can import the package from
    its source (PYTHONPATH): this one, or the system's; else skip."""
    pw = pwd.getpwnam(user)
    ids = [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    src = str(Path(sockcreator.__file__).resolve().parent.parent)
    again = "import os, sys, sockcreator; os.execv(sys.executable, [sys.executable, '-c', ''])"
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        run = subprocess.run(
            [SETPRIV, *ids, python, "-c", again],
            capture_output=True,
            env={**os.environ, "PYTHONPATH": src},
            cwd="/",
        )
        if run.returncode == 0:
            return python
    pytest.skip(f"{user} can run no interpreter that imports sockcreator from {src}")


def pwd_uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


@pytest.mark.parametrize("broken", ["toml", "user", "unreadable", "empty"])
def test_reload_of_a_broken_file_keeps_the_old_policy(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient], broken: str
) -> None:
    """The file cannot be used: one audit line says why, the old policy
    keeps working, the broker keeps serving (and a later good reload works)."""
    b = serve(FIRST)
    looper = Looper(ALICE, b.path)
    bob = clients(BOB, b.path)
    if broken == "unreadable":  # the broker reads it as its own user, after the drop
        b.policy.chmod(0o600)
        record = b.reload(None)
    else:
        text = {
            "toml": "[[allow]\nusers = [",
            "user": SECOND.replace(CAROL, "no-such-user-here"),
            "empty": "version = 1\n",
        }[broken]
        record = b.reload(text)
    assert record["result"] == "error", record
    assert "the old policy stays" in record["error"]
    want = {
        "toml": "not valid TOML",
        "user": "unknown user 'no-such-user-here'",
        "unreadable": "Permission denied",
        "empty": "allows nothing",
    }[broken]
    assert want in record["error"], record
    _granted(bob, 8001)  # bob is still allowed: the old policy
    assert clients(CAROL, b.path).request("udp", "127.0.0.1", 8002)[:2] == ("refused", 1)
    b.policy.chmod(0o644)
    assert b.reload(SECOND)["result"] == "ok"
    ok, errors = looper.finish()
    assert ok > 0 and errors == {}, (ok, errors)


def test_reload_beyond_the_creators_allow_list_is_refused_without_root(
    serve: Callable[..., Served], clients: Callable[[str, str], UserClient]
) -> None:
    """A broker started unprivileged has no creator factory (nothing can
    start a creator it could not start itself): a policy that needs more
    than its creator's allow-list is refused as a whole, and says so; a
    narrower one then applies (the creator keeps its wider fence).  (As
    root, a widening starts a new creator: test_broker_widen.py.)"""
    python = _interpreter_for(BROKER_USER)
    src = str(Path(sockcreator.__file__).resolve().parent.parent)
    b = serve(FIRST, as_user=BROKER_USER, python=python, env={"PYTHONPATH": src})
    assert b.audit("start")[0]["factory_pid"] is None
    looper = Looper(ALICE, b.path)
    bob = clients(BOB, b.path)
    record = b.reload(WIDER)
    assert record["result"] == "refused", record
    assert "needs a restart: the creator's allow-list is fixed at start" in record["error"]
    assert record["outside"] == ["tcp:127.0.0.1:9000-9000", "udp:127.0.0.1:9000-9000"] or (
        record["outside"] == ["*:127.0.0.1:9000-9000"]
    ), record
    assert (record["added"], record["removed"]) == (1, 0)
    assert bob.request("udp", "127.0.0.1", 9000)[:2] == ("refused", 1)  # still the old one
    _granted(bob, 8001)
    record = b.reload(NARROWER)
    assert record["result"] == "ok" and record["removed"] == 1, record
    assert bob.request("udp", "127.0.0.1", 8002)[:2] == ("refused", 1)
    ok, errors = looper.finish()
    assert ok > 0 and errors == {}, (ok, errors)


# --- sd_notify ------------------------------------------------------------------------

_UCRED = struct.Struct("=iII")


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket, bound here,
    that learns each sender's pid (SO_PASSCRED) as systemd does."""

    def __init__(self, directory: Path, form: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if form == "path":
            where = str(directory / "notify.sock")
            self.sock.bind(where)
            self.env = where
        else:
            name = f"sockc-notify-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name

    def next(self, timeout: float = 30) -> tuple[dict[str, str], int]:
        """The next message as a dict, and its sender's pid."""
        self.sock.settimeout(timeout)
        data, anc, _flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = -1
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(blob[: _UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return fields, pid

    def expect(self, key: str, skip: tuple[str, ...] = ("STATUS", "WATCHDOG")) -> dict[str, str]:
        """The next message with ``key``; what comes before it may only be
        ``skip`` messages (status updates, watchdog pings)."""
        while True:
            fields, self.last_pid = self.next()
            if key in fields:
                return fields
            assert set(fields) <= set(skip), (key, fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify(workdir: Path, request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    n = NotifySocket(workdir, request.param)
    yield n
    n.close()


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_notify_ready_reloading_stopping(
    serve: Callable[..., Served], notify: NotifySocket
) -> None:
    """READY=1 only once the creator has answered (it reads no request
    before it hardened: Seccomp 2 when READY arrives) and the socket is in
    place; RELOADING=1 with MONOTONIC_USEC, then READY=1, on SIGHUP;
    STOPPING=1 on SIGTERM.  Every message from the broker's own pid (what
    NotifyAccess=main checks); the creator never sees NOTIFY_SOCKET.
    (No network namespace: abstract sockets belong to one.)"""
    b = serve(FIRST, env={"NOTIFY_SOCKET": notify.env}, netns=False, wait=False)
    fields = notify.expect("READY")
    assert fields["READY"] == "1"
    assert fields["STATUS"] == "0 connections, 0 sockets, 0 grants"
    assert notify.last_pid == b.pid
    b.wait_start()
    assert _proc_status(b.creator_pid)["Seccomp"] == "2"
    assert os.path.exists(b.path)
    ready = b.audit("ready")
    assert len(ready) == 1 and ready[0]["answer"] == "EPERM", ready  # the probe: refused
    env = Path(f"/proc/{b.creator_pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in env if v.startswith((b"NOTIFY_SOCKET", b"WATCHDOG", b"LISTEN"))]
    assert b.audit("start")[0]["notify"] == notify.env

    with Broker(b.path, timeout=10) as c:
        s = c.request_socket("udp", "127.0.0.1", 8001)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:  # ('B': counted)
            c.bind_socket(own, "127.0.0.1", 8002)
            with pytest.raises(SocketRefusedError):
                c.bind_socket(own, "127.0.0.1", 7999)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        b.proc.send_signal(signal.SIGHUP)
        fields = notify.expect("RELOADING")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
        fields = notify.expect("READY")
        assert fields["STATUS"] == "1 connections, 1 sockets, 1 grants, 1 binds (1 refused)"
        assert notify.last_pid == b.pid
        c.release_socket(s)
    b.proc.send_signal(signal.SIGTERM)
    fields = notify.expect("STOPPING")
    assert fields["STOPPING"] == "1"
    assert b.proc.wait(20) == 0


def test_notify_watchdog_pings(serve: Callable[..., Served], workdir: Path) -> None:
    """WATCHDOG_USEC set, WATCHDOG_PID ours: WATCHDOG=1 again and again (every
    WATCHDOG_USEC/2); WATCHDOG_PID someone else's: the watchdog is off."""
    n = NotifySocket(workdir, "path")
    try:
        # WATCHDOG_PID=$$ names the shell, which execs the broker: our pid.
        wrap = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"']
        env = {"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "200000"}
        b = serve(FIRST, env=env, netns=False, wrap=wrap, wait=False)
        n.expect("READY")
        for _ in range(3):
            assert n.expect("WATCHDOG", skip=("STATUS",))["WATCHDOG"] == "1"
            assert n.last_pid == b.pid
        b.wait_start()
        assert b.audit("start")[0]["watchdog_usec"] == 200000
        b.stop()
    finally:
        n.close()
    other = serve(FIRST, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, netns=False)
    assert other.audit("start")[0]["watchdog_usec"] is None


@pytest.mark.parametrize("value", ["relative/path", "@", "/nonexistent/notify.sock"])
def test_notify_socket_unusable_is_a_configuration_error(
    serve: Callable[..., Served], value: str
) -> None:
    b = serve(FIRST, env={"NOTIFY_SOCKET": value}, netns=False, wait=False)
    assert b.proc.wait(20) == 3
    assert "notification socket" in b.log.read_text() and value in b.log.read_text()


# --- socket activation ------------------------------------------------------------------

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="needs systemd-socket-activate")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


@needs_activate
def test_socket_activation_serves_a_client_that_connected_first(
    serve: Callable[..., Served], workdir: Path
) -> None:
    """systemd-socket-activate holds the socket and starts the broker on the
    first connection: that client, connected before the broker existed, is
    served once it is up.  No --socket: the inherited socket is the one."""
    assert ACTIVATE is not None
    path = str(workdir / "broker.sock")
    b = serve(FIRST, wrap=[ACTIVATE, "-l", path], socket_arg=False, wait=False)
    wait_for(lambda: os.path.exists(b.path), "systemd-socket-activate to listen")
    # no broker yet: the activator (exec'd by the netns shell) has no child
    assert not b.audit("start") and not _children(b.pid)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(b.path)  # queued in the backlog; starts the broker
    with Broker.from_socket(c, timeout=30) as broker:
        s = broker.request_socket("udp", "127.0.0.1", 8001)
        assert s.getsockname() == ("127.0.0.1", 8001)
        broker.release_socket(s)
    b.wait_start()
    start = b.audit("start")[0]
    assert start["inherited"] is True and start["socket"] == b.path
    assert start["pid"] == b.pid  # it execs: the broker is the activator's pid
    assert b.stop() == 0


@needs_activate
@pytest.mark.parametrize("kind", ["tcp", "datagram", "seqpacket"])
def test_socket_activation_refuses_a_wrong_socket(
    serve: Callable[..., Served], workdir: Path, kind: str
) -> None:
    """Anything but a listening AF_UNIX stream socket: exit 4, saying what
    it got and what it needs."""
    assert ACTIVATE is not None
    path = str(workdir / "wrong.sock")
    listen = {"tcp": ["-l", "127.0.0.1:8123"], "datagram": ["-d", "-l", path]}
    listen["seqpacket"] = ["--seqpacket", "-l", path]
    policy = workdir / "policy.toml"
    policy.write_text(FIRST)
    argv = [ACTIVATE, *listen[kind], sys.executable, "-m", "sockcreator.cli", "serve"]
    argv += ["--policy", str(policy), "--user", BROKER_USER, "--creator-user", CREATOR_USER]
    # (no network namespace: the test must reach the TCP socket too)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:  # trigger the start, however this kind is triggered
            try:
                if kind == "tcp":
                    socket.create_connection(("127.0.0.1", 8123)).close()
                    break
                t = socket.socket(
                    socket.AF_UNIX,
                    socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_SEQPACKET,
                )
                t.connect(path)
                if kind == "datagram":
                    t.send(b"x")
                t.close()
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 4, err
        family_type = {
            "tcp": "AF_INET SOCK_STREAM",
            "datagram": "AF_UNIX SOCK_DGRAM",
            "seqpacket": "AF_UNIX SOCK_SEQPACKET",
        }
        assert family_type[kind] in err, err
        assert "the broker needs a listening AF_UNIX stream socket" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
