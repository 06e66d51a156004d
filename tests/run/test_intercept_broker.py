"""``sockcreator run --broker PATH --intercept`` as an ordinary user: no root
anywhere in the chain.

A real broker (``sockcreator serve``, started as root, dropped to its own
user, with a creator of its own user) runs in a fresh network namespace.
``sockcreator run`` is started *as sockc-alice* in that namespace (nsenter,
then setpriv: it never had root), with Debian's python3 and a world-readable
copy of the package; PROGRAM is a real server, unmodified.  Every privileged
bind() of PROGRAM goes to the supervisor, then to the broker in a ``B`` frame
with PROGRAM's own socket; the broker's policy decides, its creator binds,
its audit records it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
from test_intercept_servers import (
    APACHE_CONF,
    ENV,
    NGINX_CONF,
    PAGE,
    WSGI_APP,
    Server,
    assert_dnsmasq_answers,
    assert_page,
    children,
    dnsmasq,
    is_static,
    need,
    nginx,
    waitress_serve,  # (a fixture: Debian's waitress-serve, or one in a venv)
    work,  # (a fixture: the work directory, owned by ``user``)
)

__all__ = ["waitress_serve", "work"]  # fixtures from test_intercept_servers

pytestmark = [requires_root, requires_linux, pytest.mark.root]

SYSTEM_PYTHON = "/usr/bin/python3"
ALICE, BOB, _ = TEST_USERS
BROKER_USER, CREATOR_USER = "sockc-broker", "sockc-creator"
POLICY = f"""
[[allow]]
users = ["{ALICE}"]
protocols = ["tcp"]
addresses = ["127.0.0.1", "::1"]
ports = [80, 443]

[[allow]]
users = ["{ALICE}"]
protocols = ["udp", "tcp"]
addresses = ["127.0.0.1"]
ports = [53]
"""


@pytest.fixture(scope="module")
def user() -> str:
    """PROGRAM's user, and the user that starts ``run``: an ordinary one."""
    for name in (ALICE, BOB, BROKER_USER, CREATOR_USER):
        ensure_user(name)
    return ALICE


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A world-readable copy of the package, for Debian's python3 as alice."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing")
    base = Path(tempfile.mkdtemp(prefix="sockc-ibroker-", dir="/tmp"))
    copy_package_world_readable(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class Broker:
    """``sockcreator serve`` in a fresh network namespace, ready."""

    def __init__(self, directory: Path, policy: str = POLICY) -> None:
        directory.chmod(0o755)
        self.path = str(directory / "broker.sock")
        (directory / "policy.toml").write_text(policy)
        self.log = directory / "broker.log"
        argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", self.path,
                "--policy", str(directory / "policy.toml"), "--user", BROKER_USER,
                "--creator-user", CREATOR_USER]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                netns_argv(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while '"event":"ready"' not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def audit(self, event: str) -> list[dict[str, Any]]:
        text = self.log.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()
        return [r for r in map(json.loads, filter(lambda x: x.startswith("{"), lines))
                if r["event"] == event]  # fmt: skip

    def run_argv(self, world: Path, user: str, program: list[str]) -> list[str]:
        """``run --broker --intercept`` as ``user`` in the broker's netns."""
        pw = pwd.getpwnam(user)
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net",
                "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                "--", "/usr/bin/env", f"PYTHONPATH={world}",
                SYSTEM_PYTHON, "-m", "sockcreator.cli", "run", "--broker", self.path,
                "--intercept", "--", *program]  # fmt: skip

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.log.read_text()


@pytest.fixture
def broker() -> Iterator[Broker]:
    d = Path(tempfile.mkdtemp(prefix="sockc-ibroker-", dir="/tmp"))  # root's: the socket's
    b = Broker(d)
    yield b
    b.stop()
    if os.environ.get("KEEP"):
        print(d)
        return
    shutil.rmtree(d, ignore_errors=True)


def assert_no_root(server: Server, user: str) -> None:
    """The supervisor (``run`` itself) is the user's too, with no capability."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = str(pwd.getpwnam(user).pw_uid)
    assert set(fields["Uid"].split()) == {uid}, fields["Uid"]
    assert int(fields["CapPrm"], 16) == int(fields["CapEff"], 16) == 0, status
    server.assert_unprivileged(user)


def test_nginx_through_the_broker(work: Path, user: str, world: Path, broker: Broker) -> None:
    listen = "listen 127.0.0.1:80; listen [::1]:80;"
    program = nginx(work, listen)
    argv = broker.run_argv(world, user, program)
    with Server(work, user, [], program, argv=argv) as server:
        assert_page(server.get("127.0.0.1"))
        assert_page(server.get("::1"))
        assert_no_root(server, user)
        master = server.program
        assert len(children(master)) == 2, server.output()
        # A reload that binds one more port: asked of the broker again.
        (work / "nginx.conf").write_text(
            NGINX_CONF.format(d=work, listen=listen + " listen 127.0.0.1:443;")
        )
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any(b["port"] == 443 for b in broker.audit("bind")):
            assert time.monotonic() < deadline, (server.output(), broker.log.read_text())
            time.sleep(0.05)
        assert_page(server.get("127.0.0.1", 443))
        assert server.stop() == 0, server.output()
    binds = broker.audit("bind")
    alice = pwd.getpwnam(user).pw_uid
    assert {(b["address"], b["port"]) for b in binds} == {
        ("127.0.0.1", 80), ("::1", 80), ("127.0.0.1", 443)}, binds  # fmt: skip
    assert {b["uid"] for b in binds} == {alice} and all(b["result"] == "ok" for b in binds)
    assert "denied" not in server.output(), server.output()


def test_nginx_port_the_broker_refuses_is_its_own_eacces(
    work: Path, user: str, world: Path, broker: Broker
) -> None:
    program = nginx(work, "listen 127.0.0.1:80; listen 127.0.0.1:81;")
    done = subprocess.run(broker.run_argv(world, user, program), capture_output=True,
                          text=True, timeout=60, env=ENV, stdin=subprocess.DEVNULL,
                          start_new_session=True)  # fmt: skip
    assert done.returncode == 1, done
    assert "bind() to 127.0.0.1:81 failed (13: Permission denied)" in done.stderr, done.stderr
    assert "denied pid" in done.stderr and "by the broker's policy" in done.stderr
    denied = [d for d in broker.audit("deny") if d.get("what") == "bind"]
    assert [(d["port"], d["result"], d["reason"]) for d in denied] == [(81, "EPERM", "policy")]


def test_dnsmasq_through_the_broker(work: Path, user: str, world: Path, broker: Broker) -> None:
    program = dnsmasq(work, user)
    argv = broker.run_argv(world, user, program)
    with Server(work, user, [], program, argv=argv) as server:
        assert_dnsmasq_answers(server)
        assert_no_root(server, user)
        assert server.stop() == 0, server.output()
    kinds = {(b["proto"], b["port"]) for b in broker.audit("bind")}
    assert kinds == {("udp", 53), ("tcp", 53)}, broker.log.read_text()


def _program(name: str, work: Path, waitress: str) -> tuple[list[str], dict[str, str]]:
    """PROGRAM for each of the other servers of test_intercept_servers.py,
    on tcp 127.0.0.1:80, and its environment."""
    www = str(work / "www")
    if name == "apache":
        exe = need("/usr/sbin/apache2", "/usr/sbin/httpd")
        conf = work / "httpd.conf"
        conf.write_text(APACHE_CONF.format(d=work, m="/usr/lib/apache2/modules"))
        return [exe, "-f", str(conf), "-DFOREGROUND"], {}
    if name == "busybox":
        exe = need("/bin/busybox", "/usr/bin/busybox")
        if not is_static(exe):
            pytest.skip(f"{exe} is not static (Debian's busybox-static is)")
        return [exe, "httpd", "-f", "-p", "127.0.0.1:80", "-h", www], {}
    if name == "caddy":
        env = {"XDG_CONFIG_HOME": str(work / "config"), "XDG_DATA_HOME": str(work / "data")}
        return [need("/usr/bin/caddy"), "file-server", "--listen", "127.0.0.1:80",
                "--root", www], env  # fmt: skip
    if name == "waitress":
        (work / "app.py").write_text(WSGI_APP.format(page=PAGE))
        (work / "app.py").chmod(0o644)
        return [waitress, "--listen=127.0.0.1:80", "app:application"], {}
    return [SYSTEM_PYTHON, "-m", "http.server", "--bind", "127.0.0.1", "--directory", www,
            "80"], {}  # fmt: skip


@pytest.mark.parametrize("name", ["apache", "busybox", "caddy", "waitress", "http.server"])
def test_the_other_servers_through_the_broker(
    work: Path, user: str, world: Path, broker: Broker, waitress_serve: str, name: str
) -> None:
    """Apache httpd, busybox httpd (static), caddy (Go), waitress and
    python's http.server, each unmodified, as alice, through the broker."""
    program, env = _program(name, work, waitress_serve)
    argv = broker.run_argv(world, user, program)
    with Server(work, user, [], program, argv=argv, env=env, cwd=work) as server:
        assert_page(server.get("127.0.0.1"))
        assert_no_root(server, user)
        server.stop()
    binds = broker.audit("bind")
    assert [(b["proto"], b["port"], b["result"]) for b in binds] == [("tcp", 80, "ok")], binds
    assert "denied" not in server.output(), server.output()


BINDER = r"""
import errno, json, socket, sys
out = []
for _ in range(int(sys.argv[1])):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 80 if kind == socket.SOCK_STREAM else 53))
        out.append(s.getsockname()[1])
        s.close()
s = socket.socket()
try:
    s.bind(("127.0.0.1", 25))
except OSError as e:
    out.append(errno.errorcode[e.errno])
s.close()
s = socket.socket()
s.bind(("127.0.0.1", 0))
out.append(s.getsockname()[1] > 1023)
print(json.dumps(out))
"""


def test_many_binds_leave_the_broker_flat(
    work: Path, user: str, world: Path, broker: Broker
) -> None:
    """200 binds through the broker, TCP and UDP, closed at once: the
    broker's descriptor count is back where it was; a refused port is the
    program's own EACCES, and port 0 is the kernel's."""
    # (UDP 53 from the policy; tcp 80 too)
    script = work / "binder.py"
    script.write_text(BINDER)
    script.chmod(0o644)
    broker_pid = int(
        next(r for r in broker.audit("start"))["pid"]  # the dropped broker, not unshare's sh
    )
    before = fd_count(broker_pid)
    done = subprocess.run(broker.run_argv(world, user, [SYSTEM_PYTHON, str(script), "100"]),
                          capture_output=True, text=True, timeout=120, env=ENV,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out[:200] == [80, 53] * 100 and out[200:] == ["EACCES", True], out
    deadline = time.monotonic() + 10
    while fd_count(broker_pid) != before:
        assert time.monotonic() < deadline, (before, fd_count(broker_pid))
        time.sleep(0.05)
    assert len(broker.audit("bind")) == 200


# --- a broker that misbehaves (a scripted peer: the error paths) --------------------

TWO_BINDS = r"""
import errno, socket
for _ in range(2):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 80))
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
    s.close()
"""


def _fake_broker(path: str, behaviour: str) -> threading.Thread:
    """One connection: answer the hello (version 1 for "version 1"), then
    take the first ``B`` and stall on it, close, or answer garbage."""
    from sockcreator.broker._protocol import HelloReply

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen()

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(30)
            assert conn.recv(4)[:1] == b"H"
            conn.sendall(HelloReply(1 if behaviour == "version 1" else 2, 16, 8).encode())
            data, anc, _, _ = conn.recvmsg(64, socket.CMSG_SPACE(4))
            for _l, _k, blob in anc:
                os.close(struct.unpack("@i", blob[:4])[0])
            if data[:1] != b"B":
                return
            if behaviour == "stall":
                conn.recv(1)  # until the supervisor gives up and closes
            elif behaviour == "garbage":
                conn.sendall(b"K\x00\x04\x00\x00\x00\x01")  # a release answer, to a bind
                conn.recv(1)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("behaviour", ["stall", "close", "garbage", "version 1"])
def test_a_broker_that_fails_never_leaves_program_blocked(
    work: Path, user: str, behaviour: str
) -> None:
    """Stalled: the bind fails with EAGAIN after the 5 s timeout; gone or
    broken: EACCES; every later privileged bind EACCES.  A broker that does
    not speak version 2: exit 103 before PROGRAM runs."""
    d = Path(tempfile.mkdtemp(prefix="sockc-fakebroker-", dir="/tmp"))
    d.chmod(0o755)
    path = str(d / "broker.sock")
    thread = _fake_broker(path, behaviour)
    script = work / "two_binds.py"
    script.write_text(TWO_BINDS)
    script.chmod(0o644)
    argv = [sys.executable, "-m", "sockcreator.cli", "run", "--broker", path, "--intercept",
            "--user", user, "--", SYSTEM_PYTHON, str(script)]  # fmt: skip
    try:
        done = subprocess.run(netns_argv(argv), capture_output=True, text=True, timeout=60,
                              env=ENV, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        thread.join(10)
        shutil.rmtree(d, ignore_errors=True)
    if behaviour == "version 1":
        assert done.returncode == 103 and "too old for --intercept" in done.stderr, done
        assert not done.stdout
        return
    assert done.returncode == 0, done.stderr
    first = {"stall": "EAGAIN", "close": "EACCES", "garbage": "EACCES"}[behaviour]
    assert done.stdout.split() == [first, "EACCES"], done
    assert "privileged binds now fail with EACCES" in done.stderr, done.stderr
