"""``sockcreator run`` for real: as root, in a fresh network namespace, with
PROGRAM running as an unprivileged user.

PROGRAM is ``run_program.py`` (beside this file) run by Debian's
/usr/bin/python3: our venv's interpreter lives under the 0700 /root, which
the user cannot read.  It is copied, with the package, into a world-readable
directory; a script's own directory is first on ``sys.path``, so PROGRAM
imports that copy.  ``sockcreator run`` itself runs from this venv, as root.

Clients reach the namespace's ports through ``nsenter --net``: a separate
process, as any client would be.  Where a test must show that nothing is
left running, the whole tree runs under a child subreaper (``run_program.py
reaper``) that reaps every descendant and exits only when none is left.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    IS_ROOT,
    TEST_USERS,
    ensure_user,
    netns_argv,
    requires_linux,
    unprivileged_port_start,
)

import sockcreator
from sockcreator.run import launcher as launcher

pytestmark = [
    requires_linux,
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="sockcreator run must be started as root"),
]

SYSTEM_PYTHON = "/usr/bin/python3"  # world-executable, unlike the venv's interpreter
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
TIMEOUT = 60.0  # a hang guard only; nothing here asserts on time
HERE = Path(__file__).resolve().parent


def _world_readable(path: Path) -> None:
    """chmod -R a+rX (symbolic links are left alone)."""
    for root, _dirs, files in os.walk(path):
        os.chmod(root, os.stat(root).st_mode | 0o555)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                mode = os.stat(full).st_mode
                os.chmod(full, mode | 0o444 | (0o111 if mode & 0o111 else 0))


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A world-readable copy of the package and of PROGRAM."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (Debian's python3 runs PROGRAM)")
    if not os.access(NSENTER, os.X_OK):
        pytest.skip("nsenter (util-linux) is missing")
    base = Path(tempfile.mkdtemp(prefix="sockc-run-", dir="/tmp"))
    shutil.copytree(
        Path(sockcreator.__file__).parent,
        base / "sockcreator",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(HERE / "run_program.py", base / "run_program.py")
    _world_readable(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def alice() -> pwd.struct_passwd:
    return ensure_user(TEST_USERS[0])


def run_argv(opts: list[str], program: list[str]) -> list[str]:
    """``sockcreator run OPTS -- PROGRAM`` inside a fresh network namespace."""
    return netns_argv([sys.executable, "-m", "sockcreator.cli", "run", *opts, "--", *program])


def prog(world: Path, mode: str, *args: str) -> list[str]:
    return [SYSTEM_PYTHON, str(world / "run_program.py"), mode, *args]


class Started:
    """A process tree with stdout/stderr pipes; killed and reaped at the end."""

    def __init__(self, argv: list[str], cwd: Path, reaper_log: Path | None = None) -> None:
        if reaper_log is not None:
            argv = [sys.executable, str(cwd / "run_program.py"), "reaper", str(reaper_log), *argv]
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        self._buf = b""

    def line(self) -> dict[str, Any]:
        """PROGRAM's next JSON line on stdout (a bounded wait)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                out, err = self.finish()
                raise AssertionError(f"no line from PROGRAM; stdout {out!r} stderr {err!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def wait_stderr(self, text: str) -> str:
        """Read stderr until ``text`` appears (a bounded wait); what was read."""
        assert self.proc.stderr is not None
        fd, seen = self.proc.stderr.fileno(), b""
        while text.encode() not in seen:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                self.kill()
                raise AssertionError(f"{text!r} never appeared on stderr: {seen!r}")
            seen += chunk
        return seen.decode(errors="replace")

    def finish(self) -> tuple[str, str]:
        """Wait for the end (the pipes close only when every holder exited)."""
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
        return (self._buf + out).decode(errors="replace"), err.decode(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def started() -> Iterator[list[Started]]:
    procs: list[Started] = []
    yield procs
    for p in procs:
        p.kill()
        p.proc.wait()
        for f in (p.proc.stdout, p.proc.stderr):
            if f is not None:
                f.close()


def start(
    started: list[Started], world: Path, argv: list[str], reaper_log: Path | None = None
) -> Started:
    s = Started(argv, world, reaper_log)
    started.append(s)
    return s


def in_netns(pid: int, code: str) -> str:
    """Run Python ``code`` as a separate client process in ``pid``'s network namespace."""
    result = subprocess.run(
        [NSENTER, f"--target={pid}", "--net", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def reaped(log: Path) -> dict[int, int]:
    """pid -> exit code (negative: signal) of everything the reaper reaped."""
    return {int(p): int(c) for p, c in (line.split() for line in log.read_text().splitlines())}


# --- PROGRAM gets 80 and 53 and serves real traffic ---------------------------------------


@pytest.fixture(scope="module")
def served(world: Path, alice: pwd.struct_passwd) -> Iterator[dict[str, Any]]:
    """One ``serve`` run: what PROGRAM saw, what a client got, how it ended."""
    opts = ["--user", alice.pw_name, "--name", "web", "--name", "dns"]
    opts += ["--listen", "tcp:127.0.0.1:80", "--listen", "udp:127.0.0.1:53"]
    procs: list[Started] = []
    try:
        s = start(procs, world, run_argv(opts, prog(world, "serve")))
        report = s.line()
        client = in_netns(
            report["pid"],
            """
            import socket
            with socket.create_connection(("127.0.0.1", 80), timeout=30) as c:
                c.sendall(b"hello")
                print(c.recv(100).decode())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(30)
                u.sendto(b"ping", ("127.0.0.1", 53))
                print(u.recv(100).decode())
            """,
        )
        _, err = s.finish()
        yield {"report": report, "client": client.split(), "status": s.proc.returncode, "err": err}
    finally:
        for p in procs:
            p.kill()
            p.proc.wait()


def test_program_gets_the_sockets_at_3_and_4(served: dict[str, Any]) -> None:
    d = served["report"]["described"]
    assert d["3"] == {
        "inheritable": True,
        "family": socket.AF_INET,
        "type": socket.SOCK_STREAM,
        "addr": ["127.0.0.1", 80],
        "listening": 1,
        "blocking": True,
        "kernel_timeouts": False,
    }
    assert d["4"] == {
        "inheritable": True,
        "family": socket.AF_INET,
        "type": socket.SOCK_DGRAM,
        "addr": ["127.0.0.1", 53],
        "listening": 0,
        "blocking": True,
        "kernel_timeouts": False,
    }
    # the creator channel comes right after them, blocking, with no SO_RCVTIMEO/SO_SNDTIMEO
    # left over from the launcher's client
    assert d["5"] == {
        "inheritable": True,
        "family": socket.AF_UNIX,
        "type": socket.SOCK_STREAM,
        "blocking": True,
        "kernel_timeouts": False,
    }
    # nothing else was inherited: 0-2, the three above, and listdir's own descriptor
    assert served["report"]["fds"] == [0, 1, 2, 3, 4, 5, 6]


def test_program_gets_the_activation_environment(served: dict[str, Any]) -> None:
    r = served["report"]
    assert r["env"] == {
        "LISTEN_PID": str(r["pid"]),  # exec kept the launcher's pid
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "web:dns",
        "SOCKCREATOR_FD": "5",
    }
    # sockcreator.activation.listen_fds() in PROGRAM: named, close-on-exec, env unset
    assert r["listen_fds"] == [[3, "web", False], [4, "dns", False]]
    assert r["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None}


def test_program_runs_as_the_user(served: dict[str, Any], alice: pwd.struct_passwd) -> None:
    r = served["report"]
    assert r["uid"] == [alice.pw_uid] * 3
    assert r["gid"] == [alice.pw_gid] * 3
    assert r["groups"] == sorted(set(os.getgrouplist(alice.pw_name, alice.pw_gid)))
    assert r["user"] == alice.pw_name


def test_program_cannot_bind_81_itself(served: dict[str, Any]) -> None:
    if unprivileged_port_start() <= 81:
        pytest.skip("ip_unprivileged_port_start lets anyone bind port 81 here")
    assert served["report"]["bind81"] == errno.EACCES


def test_program_serves_tcp_80_and_udp_53(served: dict[str, Any]) -> None:
    assert served["client"] == ["tcp-ok:hello", "udp-ok:ping"]
    assert served["status"] == 0, served["err"]


# --- More sockets at runtime, within the policy --------------------------------------------


def runtime_results(
    started: list[Started], world: Path, user: str, opts: list[str], specs: list[str]
) -> dict[str, Any]:
    s = start(started, world, run_argv(["--user", user, *opts], prog(world, "runtime", *specs)))
    report = s.line()
    _, err = s.finish()
    assert s.proc.returncode == 0, err
    assert report["env_fd"] is None  # from_environment() unset it
    results: dict[str, Any] = {r[0]: r[1:] for r in report["results"]}
    results["before"] = report["before"]
    return results


def test_runtime_sockets_within_the_policy(
    started: list[Started], world: Path, alice: pwd.struct_passwd
) -> None:
    opts = ["--listen", "tcp:127.0.0.1:80"]
    opts += ["--allow", "tcp:127.0.0.1:8000-8080", "--allow", "udp:[::1]:53"]
    results = runtime_results(
        started,
        world,
        alice.pw_name,
        opts,
        [
            "tcp:127.0.0.1:8080",
            "udp:[::1]:53",  # a privileged port, bound by the creator at runtime
            "tcp:127.0.0.1:8081",
            "udp:127.0.0.1:8080",
            "tcp:127.0.0.1:443",
        ],
    )
    assert results["tcp:127.0.0.1:8080"] == ["ok", ["127.0.0.1", 8080]]
    assert results["udp:[::1]:53"] == ["ok", ["::1", 53]]
    # outside the policy: EPERM from the creator (an older client sees a bind failure)
    for spec in ("tcp:127.0.0.1:8081", "udp:127.0.0.1:8080", "tcp:127.0.0.1:443"):
        assert results[spec][:2] == ["error", errno.EPERM], spec


def test_runtime_socket_refused_without_allow(
    started: list[Started], world: Path, alice: pwd.struct_passwd
) -> None:
    results = runtime_results(
        started,
        world,
        alice.pw_name,
        ["--listen", "tcp:127.0.0.1:80"],
        ["tcp:127.0.0.1:8080", "tcp:127.0.0.1:80"],
    )
    assert results["tcp:127.0.0.1:8080"][:2] == ["error", errno.EPERM]
    # allowed (it is a --listen spec), but the kernel refuses: its errno passes through
    assert results["tcp:127.0.0.1:80"][:2] == ["error", errno.EADDRINUSE]


def test_allow_only_passes_just_the_creator(
    started: list[Started], world: Path, alice: pwd.struct_passwd
) -> None:
    """No --listen: no activation variables, the channel is descriptor 3."""
    results = runtime_results(
        started, world, alice.pw_name, ["--allow", "udp:127.0.0.1:53"], ["udp:127.0.0.1:53"]
    )
    assert results["before"] == {"SOCKCREATOR_FD": "3", "LISTEN_FDS": None, "LISTEN_PID": None}
    assert results["udp:127.0.0.1:53"] == ["ok", ["127.0.0.1", 53]]


def test_a_dead_creator_is_exit_status_103() -> None:
    """The mapping used when the creator cannot start (e.g. hardening fails)."""
    from sockcreator import SocketCreator
    from sockcreator.client.specs import parse_listen
    from sockcreator.privileges import resolve_credentials

    plan = launcher.Plan(
        listens=(parse_listen("tcp:127.0.0.1:80"),),
        listen_specs=("tcp:127.0.0.1:80",),
        allow_specs=(),
        names=("tcp-80",),
        backlog=1,
        creds=resolve_credentials("root"),
        executable="/bin/true",
        argv=("/bin/true",),
    )
    creator = SocketCreator(["/bin/sh", "-c", "exit 15"])
    with pytest.raises(launcher.LaunchError) as info:
        launcher.get_sockets(creator, plan)
    assert info.value.status == launcher.EXIT_CREATOR == 103
    assert "exit status 15" in str(info.value)


# --- Nothing left behind --------------------------------------------------------------------


def test_killing_program_leaves_no_creator(
    started: list[Started], world: Path, alice: pwd.struct_passwd, tmp_path: Path
) -> None:
    log = tmp_path / "reaped"
    opts = ["--user", alice.pw_name, "--listen", "tcp:127.0.0.1:80"]
    s = start(started, world, run_argv(opts, prog(world, "sleep")), reaper_log=log)
    report = s.line()
    program = report["pid"]
    (creator,) = report["children"]
    # the creator runs as the user too, hardened (its own tests check this in depth)
    st = proc_status(creator)
    assert st["PPid"] == str(program)
    assert st["Uid"].split() == [str(alice.pw_uid)] * 4
    assert st["CapEff"] == st["CapPrm"] == "0000000000000400"
    assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
    # same uid, yet PROGRAM cannot inspect or trace it (not dumpable, more capabilities)
    assert report["creator_access"] == {"mem": errno.EACCES, "environ": errno.EACCES}

    os.kill(program, signal.SIGKILL)
    s.finish()  # the reaper exits only when no descendant is left
    assert s.proc.returncode is not None
    got = reaped(log)
    assert got[program] == -signal.SIGKILL
    # EOF (10) or PR_SET_PDEATHSIG (SIGKILL), whichever came first
    assert got[creator] in (10, -signal.SIGKILL)
    assert not os.path.exists(f"/proc/{creator}")


def test_garbage_from_program_kills_the_creator(
    started: list[Started], world: Path, alice: pwd.struct_passwd
) -> None:
    opts = ["--user", alice.pw_name, "--listen", "tcp:127.0.0.1:80"]
    s = start(started, world, run_argv(opts, prog(world, "garbage")))
    report = s.line()
    _, err = s.finish()
    assert report["creator_status"] == 12  # it exited: protocol error ...
    assert report["said"] == "FI"  # ... after answering 'F' 'I'
    assert report["first"] == report["again"] == "CreatorFatalError"
    assert s.proc.returncode == 0, err
    assert "invalid input" in err  # the creator's own log line


# --- Exit statuses before PROGRAM runs ---------------------------------------------------

NO_SUCH_USER = "sockc-no-such-user"
LISTEN80 = ["--listen", "tcp:127.0.0.1:80"]
STATUS_CASES = [
    # (id, options ("@user": the test user), PROGRAM, status, in the message)
    ("bad-port", ["--user", "@user", "--listen", "tcp:127.0.0.1:99999"], None, 100, "port"),
    ("listen-any", ["--user", "@user", "--listen", "tcp:*:80"], None, 100, "one address"),
    ("bad-allow", ["--user", "@user", "--allow", "sctp:*:1"], None, 100, "protocol"),
    ("bad-name", ["--user", "@user", *LISTEN80, "--name", "a:b"], None, 100, "--name"),
    ("name-count", ["--user", "@user", *LISTEN80, "--name", "a", "--name", "b"], None, 100, "one"),
    ("no-sockets", ["--user", "@user"], None, 100, "at least one"),
    ("no-user", LISTEN80, None, 100, "--user"),
    ("root-user", ["--user", "root", *LISTEN80], None, 100, "as root"),
    ("unknown-user", ["--user", NO_SUCH_USER, *LISTEN80], None, 102, NO_SUCH_USER),
    ("unknown-group", ["--user", "@user", "--group", NO_SUCH_USER, *LISTEN80], None, 102, "group"),
    ("not-found", ["--user", "@user", *LISTEN80], ["/nonexistent/prog"], 127, "not found"),
    ("not-in-path", ["--user", "@user", *LISTEN80], ["sockc-no-such-prog"], 127, "not found"),
    ("not-executable", ["--user", "@user", *LISTEN80], ["@plain"], 126, "Permission denied"),
    ("root-only-exec", ["--user", "@user", *LISTEN80], ["@secret"], 126, "Permission denied"),
    ("no-such-addr", ["--user", "@user", "--listen", "tcp:192.0.2.1:80"], None, 104, "bind"),
    ("in-use", ["--user", "@user", *LISTEN80, *LISTEN80], None, 104, "Address already in use"),
]


@pytest.mark.parametrize(
    ("opts", "program", "status", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in STATUS_CASES],
)
def test_exit_status(
    world: Path,
    alice: pwd.struct_passwd,
    tmp_path: Path,
    opts: list[str],
    program: list[str] | None,
    status: int,
    message: str,
) -> None:
    if "group" in message:
        with pytest.raises(KeyError):
            grp.getgrnam(NO_SUCH_USER)
    if NO_SUCH_USER in message:
        with pytest.raises(KeyError):
            pwd.getpwnam(NO_SUCH_USER)
    plain = world / "plain-file"  # world-readable, executable by nobody
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    secret = world / "secret-program"  # root may exec it (so PATH lookup finds it); the user not
    secret.write_text("#!/bin/sh\nexit 0\n")
    secret.chmod(0o700)
    subst = {"@user": alice.pw_name, "@plain": str(plain), "@secret": str(secret)}
    opts = [subst.get(o, o) for o in opts]
    program = [subst.get(a, a) for a in (program or ["/bin/true"])]
    log = tmp_path / "reaped"
    s = Started(run_argv(opts, program), world, reaper_log=log)
    try:
        _, err = s.finish()  # the reaper ends only when nothing is left running
    finally:
        s.kill()
    assert (s.proc.returncode, message in err) == (status, True), err
    assert err.startswith("sockcreator run: ") or err.startswith("usage:"), err


def test_exit_status_not_root(world: Path, alice: pwd.struct_passwd) -> None:
    """Started as the user (with Debian's python3 and the world-readable copy)."""
    result = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-m",
            "sockcreator.cli",
            "run",
            "--user",
            alice.pw_name,
            *LISTEN80,
            "--",
            "/bin/true",
        ],
        cwd=world,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(world)},
        user=alice.pw_uid,
        group=alice.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == launcher.EXIT_NOT_ROOT, result.stderr
    assert "root" in result.stderr


# --- A real socket-activation-aware server from PyPI -------------------------------------

WSGI_APP = """\
import os


def app(environ, start_response):
    body = f"hello-from-uid-{os.getuid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.fixture(scope="module")
def gunicorn(world: Path) -> Path:
    """gunicorn in a venv of Debian's python3, in the world-readable directory."""
    venv = world / "gunicorn-venv"
    made = subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv with {SYSTEM_PYTHON}: {made.stderr[-300:]}")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "gunicorn>=25.1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(
            f"pip cannot install gunicorn (package index unreachable?): {pip.stderr[-300:]}"
        )
    (world / "wsgi_hello.py").write_text(WSGI_APP)
    _world_readable(world)
    return venv / "bin" / "gunicorn"


def test_gunicorn_serves_http_on_port_80(
    started: list[Started], world: Path, gunicorn: Path, alice: pwd.struct_passwd
) -> None:
    opts = ["--user", alice.pw_name, "--listen", "tcp:127.0.0.1:80"]
    program = [str(gunicorn), "--no-control-socket", "--workers", "1"]
    program += ["--chdir", str(world), "wsgi_hello:app"]
    s = start(started, world, run_argv(opts, program))
    log = s.wait_stderr("Booting worker")
    assert "Listening at: http://127.0.0.1:80" in log  # from LISTEN_FDS, not its own bind
    response = in_netns(
        s.proc.pid,  # unshare, sh, sockcreator run and gunicorn: one pid, exec after exec
        """
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
        conn.request("GET", "/")
        r = conn.getresponse()
        print(r.status, r.read().decode())
        """,
    )
    assert response.split() == ["200", f"hello-from-uid-{alice.pw_uid}"]
    st = proc_status(s.proc.pid)  # the arbiter runs as the user too
    assert st["Uid"].split() == [str(alice.pw_uid)] * 4
    os.kill(s.proc.pid, signal.SIGTERM)
    s.finish()
    assert s.proc.returncode == 0
