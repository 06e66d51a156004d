"""Attacks on the broker by ordinary users (issue 15, findings 1, 4 and 7),
kept as tests: each performs the attack for real, as a real user, against a
real broker and creator in a fresh network namespace, and asserts that it
now fails.

Each attacker is a forked child of pytest that becomes a test user and then
runs, on command, module-level functions of this file (modules are imported
before the switch, since the venv may live under the 0700 /root).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ensure_user, fd_count, netns_argv, requires_linux, requires_root
from test_broker import (
    ALICE,
    BOB,
    BROKER_USER,
    CREATOR_USER,
    _become,
    wait_for,
    workdir,  # noqa: F401 (a fixture)
)

from sockcreator.broker._protocol import Hello, ShareMode, SocketRequest
from sockcreator.broker.client import Broker, SocketRefusedError
from sockcreator.client._protocol import make_request

pytestmark = [requires_root, requires_linux, pytest.mark.root]

POLICY = f"""
[[allow]]
users = ["{ALICE}", "{BOB}"]
addresses = ["127.0.0.0/8", "0.0.0.0", "::1", "::"]
ports = [0, 53, 54, 80]
"""


class Attacker:
    """A forked child running as ``user``: ``call(fn, *args)`` runs
    ``fn(state, *args)`` there (``state`` a dict that lives as long as the
    child) and returns its result."""

    def __init__(self, user: str) -> None:
        ours, theirs = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:
            try:
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 65536)
                _become(user)
                state: dict[str, Any] = {}
                while True:
                    try:
                        fn, args, kwargs = theirs.recv()
                    except EOFError:
                        break
                    try:
                        theirs.send(("ok", fn(state, *args, **kwargs)))
                    except Exception as e:
                        theirs.send(("error", f"{type(e).__name__}: {e}"))
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.conn = pid, ours

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60, **kw: Any) -> Any:
        self.conn.send((fn, args, kw))
        if not self.conn.poll(timeout):
            raise AssertionError(f"attacker {self.pid} did not answer {fn.__name__}")
        status, value = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"attacker: {value}")
        return value

    def close(self) -> None:
        self.conn.close()
        os.waitpid(self.pid, 0)


@pytest.fixture
def attackers() -> Iterator[Callable[[str], Attacker]]:
    made: list[Attacker] = []

    def make(user: str) -> Attacker:
        a = Attacker(user)
        made.append(a)
        return a

    yield make
    for a in made:
        if not a.conn.closed:
            a.close()


class Broker_:
    """``sockcreator serve`` as root in a fresh netns, with a low
    RLIMIT_NOFILE so that the kernel's in-flight limit is near."""

    def __init__(self, directory: Path, *extra: str, nofile: int = 1024) -> None:
        for name in (ALICE, BOB, BROKER_USER, CREATOR_USER):
            ensure_user(name)
        self.path = str(directory / "broker.sock")
        (directory / "policy.toml").write_text(POLICY)
        self.log = directory / "broker.log"
        argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", self.path,
                "--policy", str(directory / "policy.toml"), "--user", BROKER_USER,
                "--creator-user", CREATOR_USER, "--max-connections", "256", *extra]  # fmt: skip

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_argv(argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                preexec_fn=limit,
            )  # fmt: skip
        wait_for(lambda: bool(self.audit("start")) or self.proc.poll() is not None, "start")
        assert self.proc.poll() is None, self.log.read_text()
        self.creator_pid = self.audit("start")[0]["creator_pid"]

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        records = [json.loads(x) for x in self.log.read_text().splitlines() if x[:1] == "{"]
        return [r for r in records if event is None or r["event"] == event]

    def alive(self) -> bool:
        return self.proc.poll() is None and Path(f"/proc/{self.creator_pid}").exists()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


# --- what the attackers run (as their user) -----------------------------------------


def _flood(state: dict[str, Any], path: str, conns: int, pending: int) -> dict[str, Any]:
    """Finding 1: on each of ``conns`` connections, ask ``pending`` times for
    the one socket alice may have, never read an answer, then break the
    protocol so that the broker closes the connection; keep every end open."""
    req = SocketRequest(0, make_request("udp", "127.0.0.1", 53), ShareMode.SAMEAPP, "dns")
    frames = b"".join(
        SocketRequest(i + 1, req.request, req.share, req.name).encode() for i in range(pending)
    )
    opened = refused = 0
    state.setdefault("socks", [])
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            refused += 1
            state["error"] = str(e)
            continue
        state["socks"].append(s)
        s.settimeout(5)
        opened += 1
        try:
            s.sendall(Hello(1).encode() + frames)
            time.sleep(0.05)  # let the broker answer (into our unread queue)
            s.sendall(b"\xff\x00\x00")  # malformed: the broker closes this one
        except OSError as e:  # it did already (too many connections: busy)
            state["error"] = str(e)
    return {"opened": opened, "refused": refused, "error": state.get("error")}


def _drain(state: dict[str, Any]) -> dict[str, int]:
    """Read everything queued on every connection: how many descriptors
    were in flight to us, and how many connections were turned away busy."""
    fds = busy = 0
    for s in state.pop("socks", []):
        s.settimeout(5)
        data = b""
        while True:
            try:
                chunk, anc, _flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except (ConnectionResetError, TimeoutError):
                break
            for _level, _kind, blob in anc:
                for i in range(0, len(blob) - len(blob) % 4, 4):
                    os.close(int.from_bytes(blob[i : i + 4], sys.byteorder))
                    fds += 1
            if not chunk:
                break
            data += chunk
        if b"X\x00" in data and b"connections from this user" in data:
            busy += 1
        s.close()
    return {"fds": fds, "busy": busy}


def _one_grant(
    state: dict[str, Any], path: str, proto: str, host: str, port: int, **kw: Any
) -> str:
    try:
        with Broker(path, timeout=10) as b:
            b.request_socket(proto, host, port, **kw).close()
    except SocketRefusedError as e:
        return f"refused {errno.errorcode[e.errno]}"
    except OSError as e:
        return f"failed {e}"
    return "ok"


def _request(state: dict[str, Any], path: str, proto: str, host: str, port: int,
             **kw: Any) -> str:  # fmt: skip
    """Ask on a connection kept in ``state``; the socket is kept too."""
    if "broker" not in state:
        state["broker"] = Broker(path, timeout=10)
        state["held"] = []
    try:
        s = state["broker"].request_socket(proto, host, port, **kw)
    except SocketRefusedError as e:
        return f"refused {errno.errorcode[e.errno]} {e.reason.name}"
    state["held"].append(s)
    return "ok"


def _release_keep(state: dict[str, Any]) -> int:
    """Release the last grant at the broker but keep a duplicate of it."""
    s = state["held"].pop()
    keep = s.dup()
    state["broker"].release_socket(s)
    state.setdefault("kept", []).append(keep)
    return len(state["kept"])


def _status_count(state: dict[str, Any]) -> int:
    return len(state["held"])


# --- finding 1: the in-flight budget --------------------------------------------------


def test_unread_descriptors_cannot_stop_the_broker(
    workdir: Path,  # noqa: F811
    attackers: Callable[[str], Attacker],
) -> None:
    """Alice floods connections with requests she never reads and keeps them
    open after the broker closed them.  Before the fix, the broker's and the
    creator's shared budget ran out (ETOOMANYREFS): the creator exited 11,
    the broker 1, and bob got nothing.  Now alice's descriptors in flight are
    bounded (40 here), also after her connections were closed, the creator
    has a user of its own, and bob is served throughout."""
    b = Broker_(workdir, "--max-inflight-per-user", "40", "--max-connections-per-user", "3",
                "--client-timeout", "3")  # fmt: skip
    try:
        alice = attackers(ALICE)
        # One connection of hers holds the socket, so that it stays cached.
        kw = {"share": "SAMEAPP", "name": "dns"}
        assert alice.call(_request, b.path, "udp", "127.0.0.1", 53, **kw) == "ok"
        flood = alice.call(_flood, b.path, 60, 30, timeout=120)
        assert flood["opened"] > 0, flood
        assert b.alive(), b.log.read_text()
        bob = attackers(BOB)
        for port in (54, 80, 0, 53):  # new sockets: the creator must send again
            for proto in ("udp", "tcp"):
                got = bob.call(_one_grant, b.path, proto, "127.0.0.1", port)
                # (udp 53 is alice's: the broker says EBUSY while she holds it,
                # the kernel EADDRINUSE while her unread copies keep it bound)
                want = ("ok", "refused EBUSY", "refused EADDRINUSE") if port == 53 else ("ok",)
                assert got in want, (proto, port, got, b.audit("error")[-3:])
        assert b.alive(), b.log.read_text()
        before = fd_count(b.proc.pid)
        got = alice.call(_drain)
        # What was in flight to alice, read at last: never above her budget
        # (the broker closed most of those connections long before).
        assert 0 < got["fds"] <= 40, got
        # The broker's closed-but-unread connections still counted against
        # her connection cap: some of the 60 were turned away.
        assert got["busy"] + flood["refused"] > 0, (got, flood)
        wait_for(lambda: fd_count(b.proc.pid) < before, "the draining connections to go")
        assert alice.call(_one_grant, b.path, "udp", "127.0.0.1", 53, **kw) == "ok"
        errors = {e["code"] for e in b.audit("error")}
        assert "INFLIGHT" in errors, errors
        assert not b.audit("fatal"), b.audit("fatal")
    finally:
        assert b.stop() == 0, b.log.read_text()


def test_the_creator_needs_a_user_of_its_own(workdir: Path) -> None:  # noqa: F811
    (workdir / "policy.toml").write_text(POLICY)
    base = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket",
            str(workdir / "b.sock"), "--policy", str(workdir / "policy.toml"),
            "--user", BROKER_USER]  # fmt: skip
    ensure_user(BROKER_USER)
    for extra, message in (([], "--creator-user"), (["--creator-user", BROKER_USER], "not")):
        out = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert out.returncode == 3 and message in out.stderr, out.stderr
    out = subprocess.run([*base, "--creator-user", "root"], capture_output=True, text=True)
    assert out.returncode == 3 and "root" in out.stderr, out.stderr


# --- finding 4: share mode NO across overlapping addresses ---------------------------


def test_no_means_no_on_overlapping_addresses(
    workdir: Path,  # noqa: F811
    attackers: Callable[[str], Attacker],
) -> None:
    b = Broker_(workdir)
    try:
        alice, bob = attackers(ALICE), attackers(BOB)
        assert alice.call(_request, b.path, "udp", "0.0.0.0", 53) == "ok"
        # The attack: bob asked for a more specific address (or dual stack).
        for host, kw in (("127.0.0.1", {}), ("::", {"v6only": False})):
            got = bob.call(_request, b.path, "udp", host, 53, **kw)
            assert got == "refused EBUSY SHARE", got
        # IPv6 only does not overlap IPv4: that one is bob's.
        assert bob.call(_request, b.path, "udp", "::", 53) == "ok"
        # SO_REUSEPORT lets any later reuseport socket of the creator join:
        # only share mode ANY may ask for it.
        for share in ("NO", "SAMEAPP"):
            kw = {"share": share, "name": "web", "reuseport": True, "backlog": 8}
            got = alice.call(_request, b.path, "tcp", "0.0.0.0", 80, **kw)
            assert got == "refused EINVAL OPTIONS", got
        kw = {"share": "ANY", "reuseport": True, "backlog": 8}
        assert alice.call(_request, b.path, "tcp", "0.0.0.0", 80, **kw) == "ok"
        got = bob.call(_request, b.path, "tcp", "127.0.0.1", 80, backlog=8)
        assert got == "refused EBUSY SHARE", got  # bob's NO would not let alice stay
    finally:
        assert b.stop() == 0, b.log.read_text()


def test_no_holds_against_a_descriptor_kept_after_release(
    workdir: Path,  # noqa: F811
    attackers: Callable[[str], Attacker],
) -> None:
    """Alice releases her grants but keeps duplicates; a later NO grant of an
    overlapping address to bob must not co-bind with them.  The broker no
    longer knows of alice's sockets, so it is the kernel that refuses: the
    broker's UDP sockets for NO have no SO_REUSEADDR, and a listening TCP
    socket conflicts with any overlapping bind."""
    b = Broker_(workdir)
    try:
        alice, bob = attackers(ALICE), attackers(BOB)
        assert alice.call(_request, b.path, "udp", "0.0.0.0", 53) == "ok"
        assert alice.call(_release_keep) == 1
        got = bob.call(_request, b.path, "udp", "127.0.0.1", 53)
        assert got == "refused EADDRINUSE BIND", got
        assert alice.call(_request, b.path, "tcp", "0.0.0.0", 80, backlog=8) == "ok"
        assert alice.call(_release_keep) == 2
        for host in ("127.0.0.1", "0.0.0.0"):
            got = bob.call(_request, b.path, "tcp", host, 80, backlog=8)
            assert got == "refused EADDRINUSE BIND", got
        # Once alice really lets go, bob gets them.
        alice.close()
        assert bob.call(_request, b.path, "udp", "127.0.0.1", 53) == "ok"
        assert bob.call(_request, b.path, "tcp", "127.0.0.1", 80, backlog=8) == "ok"
    finally:
        assert b.stop() == 0, b.log.read_text()


# --- finding 7: release-and-keep and the per-connection caps --------------------------


def test_release_and_keep_counts_honestly(
    workdir: Path,  # noqa: F811
    attackers: Callable[[str], Attacker],
) -> None:
    """``--max-held`` counts grants held at once.  A client that releases a
    port-0 grant and keeps the descriptor keeps an unprivileged socket that
    is now its own (charged to its own RLIMIT_NOFILE): the broker holds none
    of them, and the cap on grants held at once still holds."""
    b = Broker_(workdir, "--max-held", "4")
    try:
        alice = attackers(ALICE)
        base = fd_count(b.proc.pid)
        for _ in range(100):
            assert alice.call(_request, b.path, "udp", "127.0.0.1", 0) == "ok"
            alice.call(_release_keep)
        assert fd_count(b.proc.pid) <= base + 1  # her connection; none of her sockets
        for _ in range(4):
            assert alice.call(_request, b.path, "udp", "127.0.0.1", 0) == "ok"
        got = alice.call(_request, b.path, "udp", "127.0.0.1", 0)
        assert got == "refused EMFILE LIMIT", got
        assert alice.call(_status_count) == 4
    finally:
        assert b.stop() == 0, b.log.read_text()
