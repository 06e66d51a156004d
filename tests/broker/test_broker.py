"""``sockcreator serve``: the broker, with real processes as several real users.

Each test starts its own broker as root in a fresh network namespace (so
ports 53 and 80 are free and nothing collides with the host), dropping to
its own user.  Clients are forked children of pytest that switch to a test
user (alice, bob, carol) and then drive a :class:`sockcreator.Broker` on
command: the modules are imported before the switch, since the venv lives
under the 0700 /root.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib.util
import json
import multiprocessing.connection
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TEST_USERS,
    copy_package_world_readable,
    ensure_user,
    fd_count,
    netns_argv,
    requires_linux,
    requires_root,
)

from sockcreator.broker import client as broker_client
from sockcreator.broker._protocol import FatalCode, Hello, Reason, ShareMode, SocketRequest
from sockcreator.broker.aio import AsyncBroker
from sockcreator.broker.client import Broker, SocketRefusedError
from sockcreator.client._protocol import make_request

pytestmark = [requires_root, requires_linux, pytest.mark.root]

ALICE, BOB, CAROL = TEST_USERS
BROKER_USER = "sockc-broker"
CREATOR_USER = "sockc-creator"  # the creator's own user (docs/security.md)
WEB_GROUP = "sockc-web"

POLICY = f"""
[[allow]]
users = ["root", "{ALICE}", "{BOB}"]
protocols = ["tcp", "udp"]
addresses = ["127.0.0.0/8", "0.0.0.0", "::1", "::"]
ports = [0, 80, 53, "8000-8999"]
"""


# --- users and groups -------------------------------------------------------------


def ensure_group(name: str, members: list[str]) -> int:
    import grp

    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        gid = grp.getgrnam(name).gr_gid
    for m in members:
        if m not in grp.getgrnam(name).gr_mem:
            subprocess.run(["usermod", "-aG", name, m], check=True, capture_output=True)
    return gid


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    for name in (ALICE, BOB, CAROL, BROKER_USER, CREATOR_USER):
        ensure_user(name)
    ensure_group(WEB_GROUP, [CAROL])


# --- the broker process -------------------------------------------------------------


class BrokerProc:
    def __init__(
        self, directory: Path, policy: str, extra: list[str], user: str, loop: str = "auto"
    ) -> None:
        self.dir = directory
        self.path = str(directory / "broker.sock")
        (directory / "policy.toml").write_text(policy)
        self.log = directory / "broker.log"
        argv = [
            sys.executable,
            "-m",
            "sockcreator.cli",
            "serve",
            "--socket",
            self.path,
            "--policy",
            str(directory / "policy.toml"),
            "--user",
            user,
            "--creator-user",
            CREATOR_USER,
            "--loop",
            loop,
            *extra,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_argv(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while '"event":"start"' not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"broker did not start: {self.log.read_text()}")
            time.sleep(0.02)
        start = self.audit("start")[0]
        self.creator_pid = start["creator_pid"]
        assert loop in ("auto", start["loop"]), start
        self.expected_status = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        text = self.log.read_text()
        # Only whole lines: the broker may be writing the last one right now.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record["event"] == event:
                    out.append(record)
        return out

    def stop(self) -> int:
        return stop_broker(self.proc)


def stop_broker(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and its exit status; a broker that does not stop fails the test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("broker did not stop on SIGTERM") from None


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sockc-broker-", dir="/tmp"))
    d.chmod(0o755)  # other users must reach the socket inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def start_broker(
    workdir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BrokerProc]]:
    """Brokers on each event loop: asyncio's own, and uvloop (the 'fast' extra)."""
    loop = request.param
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed (the 'fast' and 'test' extras have it)")
    started: list[BrokerProc] = []

    def start(policy: str = POLICY, *extra: str, user: str = BROKER_USER) -> BrokerProc:
        b = BrokerProc(workdir, policy, list(extra), user, loop)
        started.append(b)
        return b

    yield start
    for b in started:
        status = b.stop()
        assert status == b.expected_status, b.log.read_text()
        assert not Path(f"/proc/{b.creator_pid}").exists(), "creator left behind"


# --- clients as other users -----------------------------------------------------------


def _become(user: str) -> None:
    pw = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)


def _serve_commands(conn: multiprocessing.connection.Connection, path: str) -> None:
    broker: Broker | None = None
    held: list[socket.socket] = []
    while True:
        try:
            cmd, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "connect":
                broker = Broker(path, timeout=10)
                reply: tuple[Any, ...] = ("ok",)
            elif cmd == "request":
                assert broker is not None
                s = broker.request_socket(*args, **kwargs)
                held.append(s)
                host, port = s.getsockname()[:2]
                listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                ino = os.fstat(s.fileno()).st_ino
                reply = ("ok", len(held) - 1, host, port, ino, listening, broker.grant_of(s))
            elif cmd == "release":
                assert broker is not None
                broker.release_socket(held[args[0]])
                reply = ("ok",)
            elif cmd == "status":
                assert broker is not None
                reply = (
                    "ok",
                    [(h.grant, h.uid, h.pid, h.share.name, h.name) for h in broker.status()],
                )
            elif cmd == "bind":  # bind by ourselves, without the broker
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(args)
                reply = ("ok",)
            elif cmd == "sockname":
                reply = ("ok", held[args[0]].getsockname())
            elif cmd == "close":
                assert broker is not None
                broker.close()
                reply = ("ok",)
            else:
                reply = ("error", "unknown command")
        except SocketRefusedError as e:
            reply = ("refused", e.errno, e.reason.name)
        except Exception as e:
            reply = ("error", type(e).__name__, str(e))
        conn.send(reply)


class UserClient:
    """A forked child running as ``user`` that drives a Broker on command."""

    def __init__(self, user: str, path: str) -> None:
        ours, theirs = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 65536)  # nothing of the parent's, no broker connections
                _become(user)
                _serve_commands(theirs, path)
            finally:
                os._exit(0)
        theirs.close()
        self.pid = pid
        self.conn = ours
        try:
            self.call("connect")
        except BaseException:
            self.close()  # reap it: no zombie left behind
            raise

    def call(self, cmd: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.conn.send((cmd, args, kwargs))
        if not self.conn.poll(30):
            raise AssertionError(f"client {self.pid} did not answer {cmd}")
        reply: tuple[Any, ...] = self.conn.recv()
        if reply[0] == "error":
            raise AssertionError(f"client error: {reply}")
        return reply

    def request(self, proto: str, host: str, port: int, **kwargs: Any) -> tuple[Any, ...]:
        return self.call("request", proto, host, port, **kwargs)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.conn.close()

    def close(self) -> None:
        self.conn.close()  # EOF: the child exits, and its connection with it
        os.waitpid(self.pid, 0)


@pytest.fixture
def clients() -> Iterator[Callable[[str, str], UserClient]]:
    made: list[UserClient] = []

    def make(user: str, path: str) -> UserClient:
        c = UserClient(user, path)
        made.append(c)
        return c

    yield make
    for c in made:
        if not c.conn.closed:
            c.close()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- the tests ------------------------------------------------------------------------


def test_daemon_runs_as_its_user_with_a_hardened_creator(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()
    uid = pwd.getpwnam(BROKER_USER).pw_uid

    def status(pid: int) -> dict[str, str]:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)

    # The creator drops privileges itself, right after it starts.
    wait_for(lambda: status(b.creator_pid)["Seccomp"] == "2", "the creator to harden")
    broker, creator = status(b.pid), status(b.creator_pid)
    assert broker["Uid"].split() == [str(uid)] * 4
    assert int(broker["CapEff"], 16) == 0
    # The creator has a user of its own: clients cannot spend its budget of
    # descriptors in flight (the kernel charges the sender's user).
    assert creator["Uid"].split() == [str(pwd.getpwnam(CREATOR_USER).pw_uid)] * 4
    assert creator["CapEff"] == "0000000000000400"
    assert creator["Seccomp"] == "2"
    st = os.stat(b.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert [p.name for p in b.dir.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_user_gets_port_80_and_it_works(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker()
    alice = clients(ALICE, b.path)
    ok, _, host, port, _, listening, _ = alice.request("tcp", "0.0.0.0", 80, backlog=16)
    assert (ok, host, port, listening) == ("ok", "0.0.0.0", 80, 1)
    with pytest.raises(AssertionError, match="PermissionError"):
        alice.call("bind", "0.0.0.0", 81)  # alice cannot bind a low port herself
    # Reach it from inside the broker's namespace: a socket from the broker too.
    with Broker(b.path) as root:
        udp = root.request_socket("udp", "127.0.0.1", 53)
        cli = root.request_socket("tcp", "127.0.0.1", 0)
        with udp, cli:
            cli.connect(("127.0.0.1", 80))
            assert udp.getsockname() == ("127.0.0.1", 53)


def _same_name_and_user(h: tuple[str, str, str], r: tuple[str, str, str]) -> bool:
    return h[1] == r[1] and h[2] == r[2]


def _oracle(h: tuple[str, str, str], r: tuple[str, str, str]) -> bool:
    """BIND 10's rule, spelled out: each side's mode must admit the other."""

    def admits(mode: str, me: tuple[str, str, str], other: tuple[str, str, str]) -> bool:
        return mode == "ANY" or (mode == "SAMEAPP" and _same_name_and_user(me, other))

    return admits(h[0], h, r) and admits(r[0], r, h)


def test_share_mode_matrix(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker()
    users = {
        ALICE: clients(ALICE, b.path),
        "alice2": clients(ALICE, b.path),
        BOB: clients(BOB, b.path),
    }
    modes = ("NO", "SAMEAPP", "ANY")
    port = 8000
    results = {}
    for hm in modes:
        for rm in modes:
            for rname in ("web", "dns"):
                for ruser in ("alice2", BOB):
                    port += 1
                    holder = (hm, "web", ALICE)
                    requester = (rm, rname, ALICE if ruser == "alice2" else BOB)
                    first = users[ALICE].request("tcp", "127.0.0.1", port, share=hm, name="web")
                    assert first[0] == "ok"
                    second = users[ruser].request("tcp", "127.0.0.1", port, share=rm, name=rname)
                    granted = second[0] == "ok"
                    results[holder, requester] = granted
                    if granted:
                        assert second[4] == first[4], "not the same socket"
                        users[ruser].call("release", second[1])
                    else:
                        assert second == ("refused", errno.EBUSY, "SHARE")
                    users[ALICE].call("release", first[1])
    assert results == {k: _oracle(*k) for k in results}
    # and spelled out, for the cases that matter most
    assert results[("NO", "web", ALICE), ("NO", "web", ALICE)] is False
    assert results[("ANY", "web", ALICE), ("ANY", "dns", BOB)] is True
    assert results[("ANY", "web", ALICE), ("NO", "web", ALICE)] is False
    assert results[("NO", "web", ALICE), ("ANY", "web", ALICE)] is False
    assert results[("SAMEAPP", "web", ALICE), ("SAMEAPP", "web", ALICE)] is True
    assert (
        results[("SAMEAPP", "web", ALICE), ("SAMEAPP", "web", BOB)] is False
    )  # names are per user
    assert results[("SAMEAPP", "web", ALICE), ("SAMEAPP", "dns", ALICE)] is False
    assert results[("SAMEAPP", "web", ALICE), ("ANY", "web", ALICE)] is True
    assert results[("ANY", "web", ALICE), ("SAMEAPP", "web", ALICE)] is True
    assert results[("ANY", "web", ALICE), ("SAMEAPP", "dns", ALICE)] is False


def test_one_cached_socket_per_key_and_options_must_match(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()
    with Broker(b.path) as one, Broker(b.path) as two:
        a = one.request_socket("tcp", "::", 8080, share="ANY", reuseport=True, backlog=8)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert a.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        b2 = two.request_socket("tcp", "::", 8080, share="ANY", reuseport=True, backlog=8)
        assert os.fstat(a.fileno()).st_ino == os.fstat(b2.fileno()).st_ino
        for kwargs in ({"reuseport": False, "backlog": 8}, {"reuseport": True, "backlog": 9},
                       {"reuseport": True, "backlog": None},
                       {"reuseport": True, "backlog": 8, "freebind": True}):  # fmt: skip
            with pytest.raises(SocketRefusedError) as info:
                two.request_socket("tcp", "::", 8080, share="ANY", **kwargs)
            assert (info.value.errno, info.value.reason) == (errno.EBUSY, Reason.OPTIONS)
        held = {h.grant for h in one.status()}
        assert held == {one.grant_of(a), two.grant_of(b2)}
        # options reach the kernel: dual stack and freebind
        d = one.request_socket("udp", "::", 8081, v6only=False, freebind=True)
        assert d.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert d.getsockopt(socket.IPPROTO_IP, 15) == 1  # IP_FREEBIND
        one.release_socket(a)
        two.release_socket(b2)
        assert {h.grant for h in one.status()} == {one.grant_of(d)}


def test_release_after_kill_9(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker()
    alice, bob = clients(ALICE, b.path), clients(BOB, b.path)
    assert alice.request("tcp", "0.0.0.0", 80, backlog=4)[0] == "ok"
    assert alice.request("udp", "0.0.0.0", 53)[0] == "ok"
    assert bob.request("tcp", "0.0.0.0", 80, backlog=4) == ("refused", errno.EBUSY, "SHARE")
    alice.kill()
    wait_for(lambda: len(b.audit("release")) == 2, "the broker to release alice's grants")
    assert {r["cause"] for r in b.audit("release")} == {"disconnect"}
    got = bob.request("tcp", "0.0.0.0", 80, backlog=4)
    assert got[0] == "ok" and got[3] == 80
    assert bob.request("udp", "0.0.0.0", 53)[0] == "ok"
    with Broker(b.path) as root:
        assert {h.uid for h in root.status()} == {pwd.getpwnam(BOB).pw_uid}


def test_policy_by_user_and_by_group(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    policy = f"""
[[allow]]
users = ["{ALICE}"]
protocols = ["tcp"]
addresses = ["127.0.0.0/8", "::"]
ports = [80, "8000-8080"]

[[allow]]
groups = ["{WEB_GROUP}"]
protocols = ["udp"]
addresses = ["127.0.0.1"]
ports = [53]
"""
    b = start_broker(policy)
    alice, bob, carol = (clients(u, b.path) for u in (ALICE, BOB, CAROL))
    eperm = ("refused", errno.EPERM, "POLICY")
    assert alice.request("tcp", "127.0.0.1", 80)[0] == "ok"
    assert alice.request("tcp", "127.0.0.2", 8080)[0] == "ok"
    assert alice.request("tcp", "127.0.0.1", 8081) == eperm  # port out of range
    assert alice.request("tcp", "0.0.0.0", 80) == eperm  # address not in a prefix
    assert alice.request("udp", "127.0.0.1", 53) == eperm  # protocol; not in the group
    assert alice.request("tcp", "::", 8000)[0] == "ok"
    assert alice.request("tcp", "::", 8001, v6only=False) == eperm  # would take 0.0.0.0 too
    assert carol.request("udp", "127.0.0.1", 53)[0] == "ok"  # by group (supplementary)
    assert carol.request("tcp", "127.0.0.1", 8000) == eperm
    assert bob.request("udp", "127.0.0.1", 53) == eperm
    assert bob.request("tcp", "127.0.0.1", 80) == eperm
    denials = b.audit("deny")
    assert len(denials) == 7
    assert {d["uid"] for d in denials} == {pwd.getpwnam(u).pw_uid for u in (ALICE, BOB, CAROL)}
    assert all(d["result"] == "EPERM" and d["reason"] == "policy" for d in denials)
    grants = b.audit("grant")
    assert [(g["proto"], g["port"]) for g in grants] == [
        ("tcp", 80), ("tcp", 8080), ("tcp", 8000), ("udp", 53)
    ]  # fmt: skip
    assert all(g["pid"] in (alice.pid, carol.pid) for g in grants)


def test_kernel_errors_pass_through(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker()
    with Broker(b.path) as one:
        # ANY: the broker lets overlapping addresses share; the kernel says no
        one.request_socket("tcp", "127.0.0.1", 8000, backlog=1, share="ANY").close()
        with pytest.raises(SocketRefusedError) as info:  # another key, the same port
            one.request_socket("tcp", "0.0.0.0", 8000, backlog=1, share="ANY")
        assert isinstance(info.value, OSError)
        assert (info.value.errno, info.value.reason) == (errno.EADDRINUSE, Reason.BIND)
    (denial,) = b.audit("deny")
    assert (denial["result"], denial["reason"]) == ("EADDRINUSE", "bind")


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    return s


def _read_fatal(s: socket.socket) -> bytes:
    """Read to EOF (the broker closes after an 'X' frame); the X frame's code."""
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    while data:  # walk the frames: kind[1] length[2] body
        kind, length = data[:1], int.from_bytes(data[1:3], "big")
        if kind == b"X":
            return data[3:4]
        data = data[3 + length :]
    return b""


HELLO = Hello().encode()


def _q(proto: bytes, family: bytes, backlog: int, name: bytes) -> bytes:
    """A request frame built by hand (address 127.0.0.1, port 80, share ANY)."""
    body = struct.pack("!I1s1sH1sBIB", 1, proto, family, 80, b"A", 0, backlog, len(name))
    body += socket.inet_aton("127.0.0.1") + name
    return b"Q" + len(body).to_bytes(2, "big") + body


NO_BACKLOG = 0xFFFFFFFF
GOOD = SocketRequest(1, make_request("tcp", "127.0.0.1", 8000), ShareMode.ANY).encode()
MALFORMED = {
    "not a hello first": (GOOD, b"M"),
    "wrong version": (b"H\x00\x01\x03", b"V"),
    "oversized frame": (HELLO + b"Q\xff\xff" + b"x" * 300, b"M"),
    "unknown kind": (HELLO + b"?\x00\x00", b"M"),
    "length mismatch": (HELLO + b"R\x00\x05" + b"\x00" * 5, b"M"),
    "bad family": (HELLO + _q(b"T", b"5", NO_BACKLOG, b""), b"M"),
    "name with a space": (HELLO + _q(b"T", b"4", NO_BACKLOG, b"a b"), b"M"),
    "backlog on udp": (HELLO + _q(b"U", b"4", 5, b""), b"M"),
    "too many pending": (HELLO + GOOD * 40, b"P"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_closes_only_that_connection(
    start_broker: Callable[..., BrokerProc], name: str
) -> None:
    payload, code = MALFORMED[name]
    b = start_broker()
    with Broker(b.path) as good:
        kept = good.request_socket("udp", "127.0.0.1", 8000)
        before = fd_count(b.pid)
        with _raw(b.path) as bad:
            bad.sendall(payload)
            assert _read_fatal(bad) == code, name
        wait_for(lambda: fd_count(b.pid) == before, "the broker to close the bad connection")
        assert good.request_socket("udp", "127.0.0.1", 8001).getsockname()[1] == 8001
        assert {h.grant for h in good.status()} >= {good.grant_of(kept)}
    errors = b.audit("error")
    assert len(errors) == 1 and errors[0]["code"] == {b"M": "MALFORMED", b"V": "VERSION",
                                                       b"P": "PENDING"}[code]  # fmt: skip


def test_descriptors_sent_to_the_broker_are_dropped(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()
    before = fd_count(b.pid)
    with _raw(b.path) as s, open("/dev/null", "rb") as f:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", f.fileno()) * 3)]
        s.sendmsg([HELLO], rights)
        assert s.recv(3)[:1] == b"H"
        assert fd_count(b.pid) == before + 1  # the connection, and nothing else
    with Broker(b.path) as good:
        good.request_socket("tcp", "127.0.0.1", 8000).close()


def test_a_stalled_client_delays_nobody(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker(POLICY, "--client-timeout", "1")
    silent = _raw(b.path)  # connects, says nothing
    half = _raw(b.path)
    half.sendall(HELLO + b"Q\x00\x13\x00\x00")  # a frame cut short
    unread = _raw(b.path)  # asks, never reads (the answer fits in the kernel's buffer)
    unread.sendall(HELLO)
    with silent, half, unread:
        alice = clients(ALICE, b.path)
        for port in range(8000, 8020):
            got = alice.request("tcp", "127.0.0.1", port)
            assert got[0] == "ok"
            alice.call("release", got[1])
        # The stalled ones are cut off by the timeout: an 'X' 'T' then EOF.
        assert _read_fatal(silent) == b"T"
        assert _read_fatal(half) == b"T"
        unread.shutdown(socket.SHUT_WR)
        assert _read_fatal(unread) == b""  # EOF after its hello answer: no timeout
    codes = [e["code"] for e in b.audit("error")]
    assert codes.count("TIMEOUT") == 2


def test_status_is_for_root_and_the_admin_group(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker(POLICY, "--admin-group", WEB_GROUP)
    alice, carol = clients(ALICE, b.path), clients(CAROL, b.path)
    got = alice.request("tcp", "127.0.0.1", 8000, share="SAMEAPP", name="web", backlog=3)
    assert alice.call("status") == ("refused", errno.EPERM, "POLICY")
    _, entries = carol.call("status")  # carol is in the admin group
    assert entries == [(got[6], pwd.getpwnam(ALICE).pw_uid, alice.pid, "SAMEAPP", "web")]
    out = subprocess.run(
        [sys.executable, "-m", "sockcreator.cli", "status", "--socket", b.path, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert record["port"] == 8000 and record["pid"] == alice.pid and record["backlog"] == 3
    assert record["share"] == "SAMEAPP" and record["name"] == "web"


def test_socket_file_mode_group_and_stale_socket(
    start_broker: Callable[..., BrokerProc],
    workdir: Path,
    clients: Callable[[str, str], UserClient],
) -> None:
    import grp

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "broker.sock"))
    stale.close()  # a socket file nobody listens on
    b = start_broker(POLICY, "--mode", "0660", "--group", WEB_GROUP)
    st = os.stat(b.path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(WEB_GROUP).gr_gid
    carol = clients(CAROL, b.path)  # in the group: may connect (the policy then says no)
    assert carol.request("tcp", "127.0.0.1", 8000) == ("refused", errno.EPERM, "POLICY")
    with pytest.raises(AssertionError, match="PermissionError"):
        clients(BOB, b.path)  # not in the group: connect() fails
    # A second broker on a live socket refuses to start, leaving the first alone.
    argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", b.path,
            "--policy", str(workdir / "policy.toml"), "--user", BROKER_USER,
            "--creator-user", CREATOR_USER]  # fmt: skip
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert second.returncode == 4, second.stderr
    assert "answering" in second.stderr
    with Broker(b.path) as root:
        root.request_socket("udp", "127.0.0.1", 8000).close()


@pytest.mark.parametrize("case", ["not a socket", "world-writable dir"])
def test_unsafe_socket_paths_are_refused(workdir: Path, case: str) -> None:
    (workdir / "policy.toml").write_text(POLICY)
    path = workdir / "broker.sock"
    if case == "not a socket":
        path.write_text("precious")
    else:
        workdir.chmod(0o777)
    argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", str(path),
            "--policy", str(workdir / "policy.toml"), "--user", BROKER_USER,
            "--creator-user", CREATOR_USER]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    if case == "not a socket":
        assert path.read_text() == "precious"


def test_event_loop_choice(workdir: Path) -> None:
    """``--loop uvloop`` where uvloop cannot be imported is a configuration
    error (exit 3) before anything starts; ``auto`` then serves on asyncio."""
    (workdir / "policy.toml").write_text(POLICY)
    path = workdir / "broker.sock"
    argv = ["serve", "--socket", str(path), "--policy", str(workdir / "policy.toml"),
            "--user", BROKER_USER, "--creator-user", CREATOR_USER]  # fmt: skip
    no_uvloop = (
        "import sys; sys.modules['uvloop'] = None  # import uvloop: ImportError\n"
        "from sockcreator.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", no_uvloop, *argv, "--loop", "uvloop"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "'fast' extra" in out.stderr and not path.exists()
    log = workdir / "auto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            netns_argv([sys.executable, "-c", no_uvloop, *argv, "--loop", "auto"]),
            stdout=f, stderr=f,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while '"event":"start"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        start = json.loads(next(x for x in log.read_text().splitlines() if '"start"' in x))
        assert start["loop"] == "asyncio"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()


def test_descriptor_counts_flat_over_10000_cycles(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker()
    gc.collect()
    ours = fd_count()
    with Broker(b.path) as one:
        for _ in range(20):  # warm up
            one.release_socket(one.request_socket("tcp", "127.0.0.1", 8000))
        keep = one.request_socket("udp", "127.0.0.1", 8001, share="ANY")
        broker_fds, creator_fds = fd_count(b.pid), fd_count(b.creator_pid)
        for i in range(10_000):
            # alternate: a new socket from the creator, then the cached one (held by keep)
            sock = one.request_socket("udp", "127.0.0.1", 8000 + i % 2, share="ANY")
            one.release_socket(sock)
        # (the creator closes its copy just after sending it: allow it that moment)
        wait_for(lambda: fd_count(b.pid) == broker_fds, "the broker's count back", 5)
        wait_for(lambda: fd_count(b.creator_pid) == creator_fds, "the creator's count back", 5)
        one.release_socket(keep)
        assert one.status() == []
    assert fd_count() == ours
    grants = b.audit("grant")
    assert len(grants) == 10_021
    assert sum(g["holders"] == 2 for g in grants) == 5_000  # the shared ones


def test_async_client(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker()

    async def main() -> None:
        async with AsyncBroker(b.path) as ab:
            socks = await asyncio.gather(
                *(ab.request_socket("udp", "127.0.0.1", 8000 + i) for i in range(20))
            )
            assert sorted(s.getsockname()[1] for s in socks) == list(range(8000, 8020))
            with pytest.raises(SocketRefusedError) as info:
                await ab.request_socket("udp", "127.0.0.1", 8000)
            assert info.value.reason is Reason.SHARE
            assert len(await ab.status()) == 20
            for s in socks:
                await ab.release_socket(s)
            assert await ab.status() == []

    asyncio.run(main())


def test_get_listen_sockets(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker()
    broker, socks = broker_client.get_listen_sockets(
        b.path, ["tcp:0.0.0.0:80", "udp:127.0.0.1:53"], backlog=7
    )
    with broker:
        assert [s.getsockname()[1] for s in socks] == [80, 53]
        assert socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with pytest.raises(SocketRefusedError):  # all or nothing
            broker_client.get_listen_sockets(b.path, ["udp:127.0.0.1:8000", "tcp:0.0.0.0:80"])
        for s in socks:
            s.close()
    wait_for(lambda: len(b.audit("release")) == 3, "releases")


def test_per_connection_and_per_user_limits(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker(POLICY, "--max-held", "3", "--max-connections-per-user", "2")
    with Broker(b.path) as one:
        assert (one.max_held, one.max_pending) == (3, 32)
        held = [one.request_socket("udp", "127.0.0.1", 8000 + i) for i in range(3)]
        with pytest.raises(SocketRefusedError) as info:
            one.request_socket("udp", "127.0.0.1", 8003)
        assert (info.value.errno, info.value.reason) == (errno.EMFILE, Reason.LIMIT)
        one.release_socket(held.pop())
        held.append(one.request_socket("udp", "127.0.0.1", 8003))  # room again
        with Broker(b.path) as two:
            with pytest.raises(broker_client.BrokerFatalError) as fatal:
                Broker(b.path)  # a third connection from root
            assert fatal.value.code is FatalCode.BUSY
            two.request_socket("udp", "127.0.0.1", 8010).close()
        for s in held:
            s.close()


def test_concurrent_requests_for_one_socket_share_one_creation(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()

    async def main() -> None:
        conns = [await AsyncBroker(b.path).connect() for _ in range(8)]
        try:
            socks = await asyncio.gather(
                *(c.request_socket("tcp", "127.0.0.1", 8000, share="ANY", backlog=4) for c in conns)
            )
            assert len({os.fstat(s.fileno()).st_ino for s in socks}) == 1
            # The same, where creating it fails: every waiter gets the kernel's errno.
            results = await asyncio.gather(
                *(c.request_socket("tcp", "0.0.0.0", 8000, share="ANY") for c in conns),
                return_exceptions=True,
            )
            assert all(isinstance(r, SocketRefusedError) for r in results), results
            assert {(r.errno, r.reason) for r in results} == {(errno.EADDRINUSE, Reason.BIND)}  # type: ignore[union-attr]
            for s in socks:
                s.close()
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())
    grants = b.audit("grant")
    assert len(grants) == 8 and max(g["holders"] for g in grants) == 8
    assert len(b.audit("deny")) == 8


def test_answers_left_unread_time_out(start_broker: Callable[..., BrokerProc]) -> None:
    b = start_broker(POLICY, "--client-timeout", "1", "--max-held", "5000")
    with Broker(b.path) as holder:
        # 4000 grants of one socket: three status answers of ~170 KiB each, more
        # than a Unix socket buffers.
        held = [holder.request_socket("udp", "127.0.0.1", 8000, share="ANY") for _ in range(4000)]
        with _raw(b.path) as greedy:
            greedy.sendall(HELLO + b"L\x00\x04\x00\x00\x00\x01" * 3)  # asks, never reads
            with Broker(b.path) as other:  # is served meanwhile
                other.request_socket("tcp", "127.0.0.1", 8001).close()
            wait_for(lambda: bool(b.audit("error")), "the broker to give up on the reader")
        (error,) = b.audit("error")
        assert error["code"] == "TIMEOUT" and "unread" in error["text"]
        assert len(holder.status()) == 4000
        for s in held:
            s.close()


def _frames(s: socket.socket, count: int) -> list[Any]:
    """``count`` answers, read exactly as a client must (AnswerDecoder)."""
    from sockcreator.broker._protocol import AnswerDecoder

    dec, out = AnswerDecoder(), []
    while len(out) < count:
        data, anc, flags, _ = s.recvmsg(dec.bytes_wanted(), socket.CMSG_SPACE(4 * 4))
        assert data and not flags & socket.MSG_CTRUNC
        fds = [fd for _, _, blob in anc for fd in struct.unpack(f"{len(blob) // 4}i", blob)]
        out += dec.feed(data, fds)
    return out


@pytest.mark.parametrize("share", [ShareMode.ANY, ShareMode.NO])
def test_pipelined_release_then_the_same_port_again(
    start_broker: Callable[..., BrokerProc], share: ShareMode
) -> None:
    """Request, release and request again one UDP socket, in one write: the
    first grant's descriptor must still go out (the broker may not close the
    released socket before its G frame is sent), and the port must be free
    again for the second request.  The answers come in order.  With NO the
    client still holds the first socket when the second is made, and the
    kernel refuses the co-bind (no SO_REUSEADDR: finding 4)."""
    from sockcreator.broker._protocol import Denied, Granted, Release, Released

    b = start_broker()
    before = fd_count(b.pid)
    req = make_request("udp", "127.0.0.1", 8000)
    with _raw(b.path) as s:
        s.sendall(HELLO + b"".join([SocketRequest(1, req, share).encode(),
                                    Release(2, 1).encode(),
                                    SocketRequest(3, req, share).encode()]))  # fmt: skip
        _, first, released, second = _frames(s, 4)
        assert isinstance(first, Granted)
        if share is ShareMode.NO:
            assert released == Released(2)
            assert second == Denied(3, errno.EADDRINUSE, Reason.BIND)
            os.close(first.fd)
            wait_for(lambda: fd_count(b.pid) == before + 1, "the broker to close the socket")
            s.sendall(SocketRequest(4, req, share).encode())
            (third,) = _frames(s, 1)
            assert isinstance(third, Granted), third
            os.close(third.fd)
            return
        assert isinstance(second, Granted)
        assert (first.id, first.grant, released, second.id) == (1, 1, Released(2), 3)
        with socket.socket(fileno=first.fd) as a, socket.socket(fileno=second.fd) as c:
            assert a.getsockname() == c.getsockname() == ("127.0.0.1", 8000)
            assert os.fstat(a.fileno()).st_ino != os.fstat(c.fileno()).st_ino
    wait_for(lambda: fd_count(b.pid) == before, "the broker to drop the connection")
    assert [r["grant"] for r in b.audit("grant")] == [1, 2]


def test_each_answer_is_logged_before_it_is_sent(
    start_broker: Callable[..., BrokerProc],
) -> None:
    """The audit line of a grant, denial or release is in the log by the time
    its answer arrives (lines are batched, but written before any send)."""
    b = start_broker()
    with Broker(b.path) as one:
        keep = one.request_socket("udp", "127.0.0.1", 8001, share="ANY")
        for i in range(100):
            s = one.request_socket("udp", "127.0.0.1", 8000 + i % 2, share="ANY")
            grant = one.grant_of(s)
            assert b.audit("grant")[-1]["grant"] == grant
            one.release_socket(s)
            assert b.audit("release")[-1]["grant"] == grant
            with pytest.raises(SocketRefusedError):
                one.request_socket("udp", "127.0.0.1", 8001, share="NO")
            assert b.audit("deny")[-1]["id"] == one._next_id - 1
        one.release_socket(keep)


def test_async_cancelled_request_gives_the_socket_back(
    start_broker: Callable[..., BrokerProc],
) -> None:
    b = start_broker()

    async def main() -> None:
        async with AsyncBroker(b.path) as ab:
            task = asyncio.ensure_future(ab.request_socket("udp", "127.0.0.1", 8000))
            await asyncio.sleep(0)  # sent, not yet answered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if not await ab.status():
                    break
                await asyncio.sleep(0.01)
            assert await ab.status() == []

    asyncio.run(main())


def test_broker_exits_when_its_creator_dies(
    start_broker: Callable[..., BrokerProc], clients: Callable[[str, str], UserClient]
) -> None:
    b = start_broker()
    alice = clients(ALICE, b.path)
    assert alice.request("tcp", "127.0.0.1", 8000, backlog=1)[0] == "ok"
    os.kill(b.creator_pid, signal.SIGKILL)
    b.expected_status = 1  # the creator died: nothing new can be made, so stop
    assert b.proc.wait(20) == 1
    (fatal,) = b.audit("fatal")
    assert fatal["what"] == "creator"
    # alice keeps the socket she was given
    assert alice.call("sockname", 0) == ("ok", ("127.0.0.1", 8000))


# --- sockcreator run --broker, all as an ordinary user ----------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable, unlike the venv's interpreter

BROKER_PROGRAM = """
import json, os, socket, sys
from sockcreator import Broker
out = {"pid": os.getpid(), "uid": os.getuid(), "listen_pid": os.environ.get("LISTEN_PID"),
       "listen_fds": os.environ.get("LISTEN_FDS"), "names": os.environ.get("LISTEN_FDNAMES"),
       "broker_fd": os.environ.get("SOCKCREATOR_BROKER_FD")}
s = socket.socket(fileno=3)
out["fd3"] = [s.getsockname()[1], s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
s.detach()
b = Broker.from_environment()
extra = b.request_socket("udp", "127.0.0.1", int(sys.argv[1]))
out["extra"] = extra.getsockname()[1]
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A world-readable copy of the package, and PROGRAM, for Debian's python3."""

    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing")
    base = Path(tempfile.mkdtemp(prefix="sockc-brun-", dir="/tmp"))
    (base / "program.py").write_text(BROKER_PROGRAM)
    copy_package_world_readable(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_run_with_broker_needs_no_root_anywhere(
    start_broker: Callable[..., BrokerProc], world: Path
) -> None:
    policy = f"""
[[allow]]
users = ["{ALICE}"]
addresses = ["0.0.0.0", "127.0.0.1"]
ports = [80, 8000]
"""
    b = start_broker(policy)
    alice = pwd.getpwnam(ALICE)

    def run(*listen: str) -> subprocess.CompletedProcess[str]:
        argv = [SYSTEM_PYTHON, "-m", "sockcreator.cli", "run", "--broker", b.path]
        for spec in listen:
            argv += ["--listen", spec]
        argv += ["--", SYSTEM_PYTHON, str(world / "program.py"), "8000"]
        return subprocess.run(
            argv, cwd=world, env={"PYTHONPATH": str(world), "PATH": "/usr/bin:/bin"},
            user=alice.pw_uid, group=alice.pw_gid, extra_groups=[],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    done = run("tcp:0.0.0.0:80")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid"] == alice.pw_uid
    assert out["listen_pid"] == str(out["pid"]) and out["listen_fds"] == "1"
    assert out["names"] == "tcp-80" and out["broker_fd"] == "4"
    assert out["fd3"] == [80, 1]  # port 80, listening: and nothing ran as root
    assert out["extra"] == 8000  # asked for at runtime over the inherited connection
    grants = b.audit("grant")
    assert [(g["port"], g["uid"], g["pid"]) for g in grants] == [
        (80, alice.pw_uid, out["pid"]),
        (8000, alice.pw_uid, out["pid"]),
    ]
    # PROGRAM exited: its connection closed, so both grants ended.
    wait_for(lambda: len(b.audit("release")) == 2, "the grants to end with PROGRAM")
    refused = run("tcp:0.0.0.0:81")
    assert refused.returncode == 104, refused.stderr
    assert "refused by the broker (policy)" in refused.stderr
