"""What the blocking and the asyncio client share: starting the creator,
taking descriptors out of ``recvmsg`` results, checking received sockets and
reaping the child.  No protocol logic lives here (that is ``_protocol``)."""

from __future__ import annotations

import array
import contextlib
import ipaddress
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

from ._protocol import AddressSpec, ProtocolSpec, ProtocolViolation, Request, make_request

__all__ = [
    "ANCBUFSIZE",
    "CREATOR_PATH",
    "RECV_FLAGS",
    "RequestSpec",
    "adopt",
    "close_fds",
    "creator_argv",
    "normalize",
    "reap",
    "spawn",
    "unpack_fds",
]

#: The privileged program, run by path with ``python -I -S -B``.
CREATOR_PATH = str(Path(__file__).resolve().with_name("creator.py"))

#: Room for a few descriptors: more than one on an 'S' is already fatal, and
#: the kernel drops (never installs) whatever does not fit (MSG_CTRUNC).
ANCBUFSIZE = socket.CMSG_SPACE(8 * array.array("i").itemsize)
RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

RequestSpec = Union[Request, tuple[ProtocolSpec, AddressSpec, int]]


def normalize(requests: Iterable[RequestSpec]) -> list[Request]:
    """Validate every request before anything is sent."""
    out = []
    for r in requests:
        if isinstance(r, Request):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 3:
            out.append(make_request(*r))
        else:
            raise TypeError(f"a request is a Request or (protocol, address, port), not {r!r}")
    return out


def creator_argv(
    *, allow: Sequence[str] | None = None, user: str | int | None = None, harden: bool = True
) -> list[str]:
    """argv that runs our creator safely: isolated interpreter, no site, no bytecode."""
    if not sys.executable:
        raise RuntimeError("cannot find the Python interpreter to run the creator")
    argv = [sys.executable, "-I", "-S", "-B", CREATOR_PATH]
    if allow is None:
        argv.append("--allow-all")
    else:
        if isinstance(allow, str):
            raise TypeError("allow is a list of PROTO:ADDR:PORTS strings, not one string")
        if not allow:
            raise ValueError("an empty allow list would refuse everything; pass None to allow all")
        for spec in allow:
            argv += ["--allow", spec]
    if user is not None:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        argv += ["--uid", str(pw.pw_uid), "--gid", str(pw.pw_gid)]
    if not harden:
        argv.append("--no-harden")
    return argv


def spawn(argv: Sequence[str]) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start ``argv`` on one end of a socketpair, in its own process group."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    kwargs: dict[str, Any] = (
        {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    )
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            env={},
            close_fds=True,
            **kwargs,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours, proc


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def unpack_fds(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Descriptors from one ``recvmsg``, close-on-exec.  A truncated control
    message closes what did arrive and is a protocol violation."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    if not RECV_FLAGS:  # no MSG_CMSG_CLOEXEC on this system: at once, then
        for fd in fds:
            os.set_inheritable(fd, False)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise ProtocolViolation("too many descriptors in one message (MSG_CTRUNC)")
    return fds


def adopt(fd: int, request: Request) -> socket.socket:
    """Wrap a received descriptor, checking that it is what was asked for.

    The creator is trusted to bind, not to be right: a socket of another
    family, type or address is a protocol violation (and is closed)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        os.close(fd)
        raise ProtocolViolation(f"received descriptor is not a socket: {e}") from None
    try:
        host, port = sock.getsockname()[:2]
        if (
            sock.family != request.family
            or sock.type != request.type
            or ipaddress.ip_address(host) != request.address
            or (request.port and port != request.port)
        ):
            raise ProtocolViolation(
                f"asked for {request}, received {sock.family.name}/{sock.type.name} {host} {port}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def reap(proc: subprocess.Popen[bytes] | None, grace: float) -> int | None:
    """Wait up to ``grace`` seconds, then SIGKILL; always reaps.  The status."""
    if proc is None:
        return None
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
