"""PROGRAM for the ``sockcreator run`` tests, and a reaper to run it under.

Copied with the package into a world-readable directory and run by Debian's
/usr/bin/python3 as an unprivileged user (our venv lives under the 0700
/root).  Standard library and ``sockcreator`` only.  Modes (``argv[1]``):

``serve``
    Print one JSON line describing what it inherited (before touching any
    of it), then answer one TCP connection on descriptor 3 and one UDP
    datagram on descriptor 4, then exit 0.
``runtime SPEC...``
    Ask the inherited creator for each ``PROTO:HOST:PORT``; print the
    outcome of each as JSON; exit 0.
``garbage``
    Write garbage to the creator connection; wait for the creator to exit
    (it is our child); print its status and what it said, and what the
    client raises when asked for a socket afterwards.
``sleep``
    Print our pid and the creator's, and whether we could open the
    creator's /proc mem and environ; then wait to be killed.
``reaper LOG ARGV...`` (as root, with any Python)
    Become a child subreaper, run ARGV, reap every descendant that exits,
    write ``pid status`` lines to LOG, and exit once none is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def children() -> list[int]:
    """Our child processes, from /proc."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append(int(name))
    return out


def describe_fd(fd: int) -> dict[str, object]:
    info: dict[str, object] = {"inheritable": os.get_inheritable(fd)}
    sock = socket.socket(fileno=fd)
    try:
        info["family"] = int(sock.family)
        info["type"] = int(sock.type)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            info["addr"] = list(sock.getsockname()[:2])
            info["listening"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        info["blocking"] = os.get_blocking(fd)
        timeouts = [
            sock.getsockopt(socket.SOL_SOCKET, o, 16)
            for o in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
        ]
        info["kernel_timeouts"] = any(any(t) for t in timeouts)
    finally:
        sock.detach()
    return info


def serve() -> int:
    env = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env["SOCKCREATOR_FD"] = os.environ.get("SOCKCREATOR_FD")
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))  # includes listdir's own
    described = {fd: describe_fd(fd) for fd in (3, 4, 5)}
    from sockcreator.activation import listen_fds

    passed = listen_fds()
    try:
        socket.socket().bind(("127.0.0.1", 81))
        bind81: object = "bound"
    except OSError as e:
        bind81 = e.errno
    emit(
        {
            "pid": os.getpid(),
            "env": env,
            "env_after": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS")},
            "fds": fds,
            "described": described,
            "listen_fds": [[p.fd, p.name, os.get_inheritable(p.fd)] for p in passed],
            "uid": os.getresuid(),
            "gid": os.getresgid(),
            "groups": sorted(os.getgroups()),
            "bind81": bind81,
            "user": os.environ.get("USER"),
        }
    )
    tcp = socket.socket(fileno=3)
    conn, _ = tcp.accept()
    with conn:
        data = conn.recv(100)
        conn.sendall(b"tcp-ok:" + data)
    udp = socket.socket(fileno=4)
    data, peer = udp.recvfrom(100)
    udp.sendto(b"udp-ok:" + data, peer)
    return 0


def runtime(specs: list[str]) -> int:
    from sockcreator import SocketCreator

    before = {k: os.environ.get(k) for k in ("SOCKCREATOR_FD", "LISTEN_FDS", "LISTEN_PID")}
    creator = SocketCreator.from_environment()
    assert creator is not None, "no SOCKCREATOR_FD"
    results = []
    for spec in specs:
        proto, _, rest = spec.partition(":")
        host, _, port = rest.rpartition(":")
        try:
            with creator.get_socket(proto, host.strip("[]"), int(port)) as sock:
                results.append([spec, "ok", list(sock.getsockname()[:2])])
        except OSError as e:
            results.append([spec, "error", e.errno, type(e).__name__])
    emit({"results": results, "before": before, "env_fd": os.environ.get("SOCKCREATOR_FD")})
    return 0


def garbage() -> int:
    from sockcreator import CreatorFatalError, SocketCreator

    (creator_pid,) = children()
    fd = int(os.environ["SOCKCREATOR_FD"])
    os.write(fd, b"Zgarbage")
    _, status = os.waitpid(creator_pid, 0)  # it is our child
    raw = socket.socket(fileno=fd)
    try:
        said = raw.recv(16, socket.MSG_PEEK)  # what it answered before exiting
    finally:
        raw.detach()
    report: dict[str, object] = {
        "creator_status": os.waitstatus_to_exitcode(status),
        "said": said.decode("ascii", "replace"),
    }
    creator = SocketCreator.from_environment()
    assert creator is not None
    for attempt in ("first", "again"):
        try:
            creator.get_socket("tcp", "127.0.0.1", 80)
            report[attempt] = "ok"
        except CreatorFatalError as e:
            report[attempt] = type(e).__name__
    emit(report)
    return 0


def sleep() -> int:
    kids = children()
    tries = {}
    for what in ("mem", "environ"):  # ptrace-mode access to the creator, same uid as us
        try:
            with open(f"/proc/{kids[0]}/{what}", "rb") as f:
                f.read(1)
            tries[what] = "opened"
        except OSError as e:
            tries[what] = e.errno
    emit({"pid": os.getpid(), "children": kids, "creator_access": tries})
    while True:
        signal.pause()


def reaper(log: str, argv: list[str]) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "PR_SET_CHILD_SUBREAPER")
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    status = 1
    with open(log, "w") as out:
        while True:
            try:
                reaped, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                return status  # no descendant left
            code = os.waitstatus_to_exitcode(raw)
            out.write(f"{reaped} {code}\n")
            out.flush()
            if reaped == pid:
                status = code


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "reaper":
        sys.exit(reaper(args[0], args[1:]))
    if mode == "runtime":
        sys.exit(runtime(args))
    sys.exit({"serve": serve, "garbage": garbage, "sleep": sleep}[mode]())
