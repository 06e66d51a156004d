"""``sockcreator.activation.listen_fds``: sd_listen_fds semantics.

Each case runs in a fresh interpreter (a subprocess), so the environment and
descriptors it sets up, and the changes ``listen_fds`` makes to them, never
touch pytest's process.  The child places real sockets (or a pipe) at
descriptors 3, 4, ..., sets the variables, calls the function and reports
as JSON what it returned, what was left in the environment and whether each
descriptor is still open and inheritable.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest

CHILD = textwrap.dedent(
    """
    import fcntl, json, os, resource, socket, sys
    from sockcreator import activation

    case = json.loads(sys.argv[1])
    made = []
    for kind in case.get("place", []):
        if kind == "pipe":
            r, w = os.pipe()
            made.append(r)
            os.close(w)
        else:
            fam = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
            typ = socket.SOCK_STREAM if kind.startswith("tcp") else socket.SOCK_DGRAM
            s = socket.socket(fam, typ)
            made.append(s.detach())
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in made]
    for fd in made:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    if case.get("nofile"):
        resource.setrlimit(resource.RLIMIT_NOFILE, (case["nofile"], case["nofile"]))
    subst = {"$PID": str(os.getpid()), "$PARENT": str(os.getppid())}
    for key, value in case["env"].items():
        os.environ[key] = subst.get(value, value)
    result = {}
    try:
        if case.get("sockets"):
            got = activation.listen_sockets(**case.get("kwargs", {}))
            result["result"] = [[n, s.fileno(), int(s.family), int(s.type)] for n, s in got]
        else:
            got = activation.listen_fds(**case.get("kwargs", {}))
            result["result"] = [[p.fd, p.name] for p in got]
    except ValueError as e:
        result["error"] = str(e)
    names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    result["env"] = {k: os.environ[k] for k in names if k in os.environ}
    state = {}
    for fd in range(3, 3 + len(high)):
        try:
            state[fd] = "inheritable" if os.get_inheritable(fd) else "cloexec"
        except OSError:
            state[fd] = "closed"
    result["fds"] = state
    print(json.dumps(result))
    """
)


def run_case(**case: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(case)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    result["fds"] = {int(k): v for k, v in result["fds"].items()}
    return result


def ours(n: int, names: str | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": "$PID", "LISTEN_FDS": str(n)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_descriptors_for_us() -> None:
    r = run_case(place=["tcp", "udp6"], env=ours(2, "web:dns"))
    assert r["result"] == [[3, "web"], [4, "dns"]]
    assert r["fds"] == {3: "cloexec", 4: "cloexec"}  # made non-inheritable at once
    assert r["env"] == {}  # all three unset


def test_names_default_to_unknown() -> None:
    r = run_case(place=["tcp", "udp"], env=ours(2))
    assert r["result"] == [[3, "unknown"], [4, "unknown"]]


def test_keep_environment_when_asked() -> None:
    env = ours(1, "web")
    r = run_case(place=["tcp"], env=env, kwargs={"unset_environment": False})
    assert r["result"] == [[3, "web"]]
    assert set(r["env"]) == {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
    assert r["fds"] == {3: "cloexec"}


def test_not_for_us_is_nothing() -> None:
    """Variables inherited from a parent they were meant for: ignored, unset."""
    env = {"LISTEN_PID": "$PARENT", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    r = run_case(place=["tcp"], env=env)
    assert r["result"] == []
    assert r["env"] == {}
    assert r["fds"] == {3: "inheritable"}  # not ours: not touched


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},  # no LISTEN_PID
        {"LISTEN_PID": "$PID"},  # no LISTEN_FDS
        {"LISTEN_PID": "$PID", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "$PID", "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""},
    ],
)
def test_nothing_passed(env: dict[str, str]) -> None:
    r = run_case(place=["tcp"], env=env)
    assert r["result"] == []
    assert r["env"] == {}
    assert r["fds"] == {3: "inheritable"}


@pytest.mark.parametrize(
    "count", ["x", "-1", "+1", " 1", "1 ", "", "1.0", "\u0661", "99999999999", "0x1"]
)
def test_bad_count(count: str) -> None:
    r = run_case(place=["tcp"], env={"LISTEN_PID": "$PID", "LISTEN_FDS": count})
    assert "LISTEN_FDS" in r["error"]
    assert r["env"] == {}  # unset on the error path too
    assert r["fds"] == {3: "inheritable"}  # nothing done before the count was valid


@pytest.mark.parametrize("pid", ["abc", "0", "-5", "+1", "", "12345678901"])
def test_bad_pid(pid: str) -> None:
    r = run_case(place=["tcp"], env={"LISTEN_PID": pid, "LISTEN_FDS": "1"})
    assert "LISTEN_PID" in r["error"]
    assert r["env"] == {}


def test_count_beyond_the_descriptor_limit() -> None:
    r = run_case(place=["tcp"], env=ours(62), nofile=64)  # 3 + 62 - 1 = 64: one too many
    assert "limit" in r["error"]
    assert r["env"] == {}
    r = run_case(place=["tcp"], env=ours(4294967299), nofile=64)
    assert "LISTEN_FDS" in r["error"]


def test_count_more_than_open() -> None:
    r = run_case(place=["tcp", "udp"], env=ours(3, "a:b:c"))
    assert "[5]" in r["error"]
    assert r["env"] == {}
    assert r["fds"] == {3: "cloexec", 4: "cloexec"}  # the open ones are made safe anyway


@pytest.mark.parametrize("names", ["a", "a:b:c", "", "a:b:"])
def test_name_count_must_match(names: str) -> None:
    r = run_case(place=["tcp", "udp"], env=ours(2, names))
    assert "LISTEN_FDNAMES" in r["error"]
    assert r["env"] == {}
    assert r["fds"] == {3: "cloexec", 4: "cloexec"}


def test_empty_names_are_names() -> None:
    r = run_case(place=["tcp", "udp"], env=ours(2, ":"))
    assert r["result"] == [[3, ""], [4, ""]]


def test_listen_sockets() -> None:
    r = run_case(place=["tcp", "udp6"], env=ours(2, "web:dns"), sockets=True)
    assert r["result"] == [
        ["web", 3, socket.AF_INET, socket.SOCK_STREAM],
        ["dns", 4, socket.AF_INET6, socket.SOCK_DGRAM],
    ]
    assert r["env"] == {}


def test_listen_sockets_rejects_a_non_socket() -> None:
    r = run_case(place=["tcp", "pipe"], env=ours(2, "web:fifo"), sockets=True)
    assert "descriptor 4 is not a socket" in r["error"]
    assert r["fds"] == {3: "cloexec", 4: "cloexec"}  # none closed behind the caller's back
    assert r["env"] == {}
