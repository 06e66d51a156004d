"""Attacks on ``sockcreator run`` that once worked, performed for real; each must now fail.

Finding 2: started from root's terminal, PROGRAM kept that terminal as
descriptors 0-2 and stayed in root's session, so it could push input into
root's shell with TIOCSTI (``dev.tty.legacy_tiocsti = 1`` here) and read
what root typed.  The tests give the launcher a real pty as its stdio and
controlling terminal (``setsid --ctty``), run an attacking PROGRAM as
sockc-alice, and then look at both ends of the pty.

Finding 6: a caller's inheritable capability survived into PROGRAM, which
then gained it from a binary with inheritable file capabilities
(``setcap cap_net_raw+ei``): a raw AF_PACKET socket as an ordinary user.

PROGRAM is Debian's /usr/bin/python3 (``-c``) or a small C program: the
venv's interpreter lives under the 0700 /root, which the user cannot read.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, TEST_USERS, ensure_user, netns_argv, requires_linux

pytestmark = [
    requires_linux,
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="sockcreator run must be started as root"),
]

SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable, unlike the venv's interpreter
SETSID = shutil.which("setsid") or "/usr/bin/setsid"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
TIMEOUT = 60.0  # a hang guard only
INJECTED = b"sockc-injected"
TYPED = b"typed-by-root-after-start"


@pytest.fixture(scope="module")
def alice() -> pwd.struct_passwd:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (Debian's python3 runs PROGRAM)")
    return ensure_user(TEST_USERS[0])


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory PROGRAM (as the user) can write its report into."""
    d = Path(tempfile.mkdtemp(prefix="sockc-attack-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_argv(user: str, program: list[str], *opts: str) -> list[str]:
    """``sockcreator run --user USER --listen tcp:127.0.0.1:80 -- PROGRAM`` in a fresh netns."""
    argv = [sys.executable, "-m", "sockcreator.cli", "run", "--user", user]
    return netns_argv([*argv, "--listen", "tcp:127.0.0.1:80", *opts, "--", *program])


BROKER_USER = "sockc-broker"
CREATOR_USER = "sockc-creator"
BROKER_POLICY = f"""
[[allow]]
users = ["{TEST_USERS[0]}"]
protocols = ["tcp"]
addresses = ["127.0.0.0/8"]
ports = [80]
"""


@pytest.fixture
def broker(shared: Path) -> Iterator[str]:
    """A broker (``sockcreator serve``, as its own user, in a fresh netns); its socket path."""
    ensure_user(BROKER_USER)
    ensure_user(CREATOR_USER)
    d = shared / "broker"
    d.mkdir(mode=0o755)
    (d / "policy.toml").write_text(BROKER_POLICY)
    path, log = str(d / "broker.sock"), d / "broker.log"
    argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", path]
    argv += ["--policy", str(d / "policy.toml"), "--user", BROKER_USER]
    argv += ["--creator-user", CREATOR_USER]
    with open(log, "wb") as out:
        proc = subprocess.Popen(netns_argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + TIMEOUT
        while '"event":"start"' not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not start: {log.read_text()}")
            time.sleep(0.02)
        yield path
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if proc.poll() is not None and not predicate():
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}")
        time.sleep(0.02)


def read_available(fd: int, wait: float = 0.0) -> bytes:
    """Whatever ``fd`` (set non-blocking) has now, waiting up to ``wait`` for the first bytes."""
    os.set_blocking(fd, False)
    out = b""
    deadline = time.monotonic() + wait
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return out
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        except OSError as e:  # EIO: the pty's other side is gone
            if e.errno == errno.EIO:
                return out
            raise
        if not chunk:
            return out
        out += chunk
        deadline = time.monotonic() + 0.2  # a little more, then stop


class Pty:
    """A real pty; the launcher gets the slave as stdio and controlling terminal.

    ``setsid --ctty`` makes the launched process a session leader whose
    controlling terminal is the pty (TIOCSCTTY on its stdin), then execs
    ``unshare``, ``sh`` and our launcher in place: one pid, as root's shell
    would run a foreground job.  The master side is root's terminal emulator:
    what is written there is "typed"; what is read there is "shown"."""

    def __init__(self, argv: list[str], *, stdio_on_tty: bool = True) -> None:
        self.master, self.slave = pty.openpty()  # canonical mode, ECHO and ISIG by default
        self.shown = b""
        if not stdio_on_tty:  # the terminal stays the controlling one; stdio goes elsewhere
            argv = ["/bin/sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1', "sh", *argv]
        self.proc = subprocess.Popen(
            [SETSID, "--ctty", *argv],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            cwd="/",
        )

    def read(self, wait: float = 0.0) -> bytes:
        self.shown += read_available(self.master, wait)
        return self.shown

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def ptys() -> Iterator[Callable[..., Pty]]:
    made: list[Pty] = []

    def make(argv: list[str], **kwargs: Any) -> Pty:
        p = Pty(argv, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# --- Finding 2: PROGRAM must not type into, or read from, root's terminal -------------------

ATTACK = r"""
import errno, fcntl, json, os, select, sys, termios, time

report_path, go_path = sys.argv[1], sys.argv[2]


def attempt(fn):
    try:
        return ["ok", fn()]
    except OSError as e:
        return ["error", errno.errorcode.get(e.errno, e.errno)]


def inject(fd):
    for c in b"sockc-injected-%d\n" % fd:
        fcntl.ioctl(fd, termios.TIOCSTI, bytes([c]))


def read_now(fd):  # every line the terminal has for us within 2 s (canonical: one a read)
    os.set_blocking(fd, False)
    got, deadline = b"", time.monotonic() + 2.0
    while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not data:
            return got.decode(errors="replace") or "EOF"
        got += data
    return got.decode(errors="replace")


def open_tty():
    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    inject(fd)
    return "opened and injected"


r = {
    "pid": os.getpid(),
    "sid": os.getsid(0),
    "uid": os.getuid(),
    "listen_pid": os.environ.get("LISTEN_PID"),
}
r["tiocsti"] = {fd: attempt(lambda: inject(fd)) for fd in (0, 1, 2)}
r["dev_tty"] = attempt(open_tty)
r["reopen_read"] = {
    fd: attempt(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))) for fd in (1, 2)
}
for fd in (1, 2):
    try:
        os.write(fd, b"PROGRAM-WRITES-%d\n" % fd)  # output still reaches the terminal
    except OSError:
        pass
open(report_path + ".ready", "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go_path) and time.monotonic() < deadline:
    time.sleep(0.02)
r["read"] = {fd: attempt(lambda: read_now(fd)) for fd in (0, 1, 2)}
with open(report_path, "w") as f:
    json.dump(r, f)
"""


@pytest.mark.parametrize(
    ("via", "stdio_on_tty"),
    [("creator", True), ("creator", False), ("broker", True)],
    ids=["stdio-is-the-tty", "ctty-only", "broker-stdio-is-the-tty"],
)
def test_program_cannot_type_into_or_read_roots_terminal(
    alice: pwd.struct_passwd,
    shared: Path,
    ptys: Callable[..., Pty],
    request: pytest.FixtureRequest,
    via: str,
    stdio_on_tty: bool,
) -> None:
    report, go = shared / "report.json", shared / "go"
    program = [SYSTEM_PYTHON, "-c", ATTACK, str(report), str(go)]
    if via == "broker":  # run --broker, started as root: the same drop, the same exec
        path = request.getfixturevalue("broker")
        argv = [sys.executable, "-m", "sockcreator.cli", "run", "--broker", path]
        argv += ["--user", alice.pw_name, "--listen", "tcp:127.0.0.1:80", "--", *program]
    else:
        argv = run_argv(alice.pw_name, program)
    t = ptys(argv, stdio_on_tty=stdio_on_tty)
    slave = os.fstat(t.slave)
    # the pty is root's: the user cannot open it by name (so only inherited handles matter)
    assert slave.st_uid == 0 and not slave.st_mode & (stat.S_IROTH | stat.S_IWOTH)
    launcher_sid = t.proc.pid  # setsid --ctty: the launcher leads the terminal's session

    wait_for(lambda: Path(f"{report}.ready").exists(), "PROGRAM's attack", t.proc)
    t.type(TYPED + b"\n")  # root types, after PROGRAM started
    time.sleep(0.3)
    go.touch()
    status = t.finish()
    r = json.loads(report.read_text())
    pending = read_available(t.slave, 0.5)  # the terminal's unread input: what root's shell gets

    assert r["uid"] == alice.pw_uid
    # the attack: nothing typed into root's terminal, nothing of root's read
    for fd in ("0", "1", "2"):
        assert r["tiocsti"][fd][0] == "error", (fd, r["tiocsti"])
        assert r["tiocsti"][fd][1] in ("EPERM", "EIO", "ENOTTY"), (fd, r["tiocsti"])
    assert r["dev_tty"] == ["error", "ENXIO"]  # no controlling terminal to open either
    assert INJECTED not in pending and INJECTED not in t.shown, (pending, t.shown)
    for fd in ("0", "1", "2"):
        # never what root typed: EOF (/dev/null) or EBADF (the terminal, write-only)
        assert r["read"][fd] in (["ok", "EOF"], ["error", "EBADF"]), (fd, r["read"])
    assert TYPED in pending  # root's own input is still there for root's shell, unread
    # why: a session of its own, so the terminal is nobody's controlling terminal there
    assert r["sid"] != launcher_sid
    assert r["listen_pid"] == str(r["pid"])  # socket activation still names PROGRAM
    if stdio_on_tty:
        for fd in ("1", "2"):  # the write-only terminal cannot be reopened for reading
            assert r["reopen_read"][fd] == ["error", "EACCES"], (fd, r["reopen_read"])
        assert b"PROGRAM-WRITES-1" in t.shown and b"PROGRAM-WRITES-2" in t.shown
        assert r["read"]["0"] == ["ok", "EOF"] and r["read"]["1"] == ["error", "EBADF"]
    assert status == 0


SLEEPER = r"""
import os, signal, sys, time

for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_DFL)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(7)
"""


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


@pytest.mark.parametrize(
    ("how", "status"),
    [("ctrl-c", 128 + signal.SIGINT), ("sigterm", 128 + signal.SIGTERM), ("exit", 7)],
)
def test_the_relay_forwards_signals_and_the_exit_status(
    alice: pwd.struct_passwd, shared: Path, ptys: Callable[..., Pty], how: str, status: int
) -> None:
    ready, go = shared / "pid", shared / "go"
    t = ptys(run_argv(alice.pw_name, [SYSTEM_PYTHON, "-c", SLEEPER, str(ready), str(go)]))
    relay = t.proc.pid
    wait_for(ready.exists, "PROGRAM to start", t.proc)
    program = int(ready.read_text())
    assert program != relay
    assert proc_status(program)["PPid"] == str(relay)

    # the relay, still in root's session: the user, not dumpable, no handle on the terminal
    dropped = [str(alice.pw_uid)] * 4
    wait_for(lambda: proc_status(relay)["Uid"].split() == dropped, "the relay's drop", t.proc)
    assert os.getsid(relay) == relay and os.getsid(program) == program
    assert proc_status(relay)["CapBnd"] == "0000000000000000"
    assert os.stat(f"/proc/{relay}/fd").st_uid == 0  # non-dumpable: /proc/PID is root's
    fds = {int(n): os.readlink(f"/proc/{relay}/fd/{n}") for n in os.listdir(f"/proc/{relay}/fd")}
    assert [fds[n] for n in (0, 1, 2)] == ["/dev/null"] * 3
    assert not [p for p in fds.values() if p.startswith("/dev/pts/") or p == "/dev/tty"], fds

    if how == "ctrl-c":
        t.type(b"\x03")  # ISIG: SIGINT to the terminal's foreground process group
    elif how == "sigterm":
        os.kill(relay, signal.SIGTERM)
    else:
        go.touch()
    assert t.finish() == status
    assert not Path(f"/proc/{program}").exists()


def test_without_a_terminal_program_is_exec_d_in_place(
    alice: pwd.struct_passwd, shared: Path
) -> None:
    """systemd's case: no terminal anywhere, so no relay: PROGRAM has the launcher's pid."""
    code = (
        "import json, os; print(json.dumps([os.getpid(), os.getsid(0), os.getenv('LISTEN_PID')]))"
    )
    proc = subprocess.run(
        run_argv(alice.pw_name, [SYSTEM_PYTHON, "-c", code]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,  # and no controlling terminal
        timeout=TIMEOUT,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    # run() cannot tell us the pid it started; the session id can: it is the launcher's pid
    pid, sid, listen_pid = json.loads(proc.stdout)
    assert pid == sid == int(listen_pid)


# --- Finding 6: an inheritable capability must not survive into PROGRAM ----------------------

RAW_SOCKET_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    /* AF_PACKET = 17, SOCK_RAW; needs CAP_NET_RAW */
    int s = socket(17, SOCK_RAW, 0);
    printf("%d %d\n", (int)getpid(), s >= 0 ? 0 : errno);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {}  /* stay until the test has looked at us */
    return 0;
}
"""


@pytest.fixture(scope="module")
def raw_socket_program() -> Iterator[Path]:
    """The C program above, with ``cap_net_raw+ei``, in a world-readable directory."""
    cc, setcap = shutil.which("cc"), shutil.which("setcap")
    if cc is None or setcap is None:
        pytest.skip("needs cc and setcap (gcc, libcap2-bin)")
    d = Path(tempfile.mkdtemp(prefix="sockc-filecaps-", dir="/tmp"))
    d.chmod(0o755)
    (d / "raw.c").write_text(RAW_SOCKET_C)
    subprocess.run([cc, "-o", str(d / "raw"), str(d / "raw.c")], check=True, timeout=TIMEOUT)
    subprocess.run([setcap, "cap_net_raw+ei", str(d / "raw")], check=True)
    (d / "raw").chmod(0o755)
    yield d / "raw"
    shutil.rmtree(d, ignore_errors=True)


def test_inheritable_capabilities_do_not_survive_run(
    alice: pwd.struct_passwd, raw_socket_program: Path
) -> None:
    # PROGRAM is a shell that execs the file-capability binary, as an attacker would
    program = ["/bin/sh", "-c", 'exec "$0"', str(raw_socket_program)]
    argv = [SETPRIV, "--inh-caps", "+net_raw", *run_argv(alice.pw_name, program)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/"
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        assert line, proc.stderr.read() if proc.stderr else b""
        pid, err = map(int, line.split())
        st = proc_status(pid)
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert st["Uid"].split() == [str(alice.pw_uid)] * 4
    caps = {k: st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd")}
    assert caps == dict.fromkeys(caps, "0" * 16)
    assert err == errno.EPERM  # no raw socket for the user


# --- The same for the broker: `sockcreator serve` started from root's terminal -------------


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for {pid}/{fd}")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_the_broker_started_from_a_terminal_holds_no_readable_handle_on_it(
    shared: Path, ptys: Callable[..., Pty], stop: str
) -> None:
    """The broker reads every client; it must not hold root's terminal
    either (found while fixing finding 2): it serves in a new session, with
    /dev/null for stdin and the terminal write-only for its audit log, while
    a relay in root's session forwards Ctrl-C and SIGTERM."""
    for name in (BROKER_USER, CREATOR_USER):
        ensure_user(name)
    d = shared / "serve"
    d.mkdir(mode=0o755)
    (d / "policy.toml").write_text(BROKER_POLICY)
    argv = [sys.executable, "-m", "sockcreator.cli", "serve", "--socket", str(d / "b.sock"),
            "--policy", str(d / "policy.toml"), "--user", BROKER_USER,
            "--creator-user", CREATOR_USER]  # fmt: skip
    t = ptys(netns_argv(argv))
    relay = t.proc.pid
    wait_for(lambda: b'"event":"start"' in t.read(), "the broker to start", t.proc)
    children = Path(f"/proc/{relay}/task/{relay}/children").read_text().split()
    (broker,) = (int(c) for c in children)
    broker_uid = str(pwd.getpwnam(BROKER_USER).pw_uid)
    wait_for(lambda: proc_status(relay)["Uid"].split() == [broker_uid] * 4, "relay drop", t.proc)
    assert os.getsid(broker) == broker != os.getsid(relay)
    with open(f"/proc/{broker}/stat") as f:
        tty_nr = int(f.read().rsplit(")", 1)[1].split()[4])
    assert tty_nr == 0  # no controlling terminal
    assert os.readlink(f"/proc/{broker}/fd/0") == "/dev/null"
    for fd in (1, 2):
        assert os.readlink(f"/proc/{broker}/fd/{fd}").startswith("/dev/pts/")
        assert _fd_flags(broker, fd) & os.O_ACCMODE == os.O_WRONLY
    held = [os.readlink(f"/proc/{relay}/fd/{n}") for n in os.listdir(f"/proc/{relay}/fd")]
    assert not [p for p in held if p.startswith("/dev/pts/") or p == "/dev/tty"], held
    if stop == "ctrl-c":
        t.type(b"\x03")
    else:
        os.kill(relay, signal.SIGTERM)
    assert t.finish() == 0  # the broker's own status: stopped by a signal it handles
    assert not Path(f"/proc/{broker}").exists()
