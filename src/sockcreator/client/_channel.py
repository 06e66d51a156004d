"""What the blocking and the asyncio client share: starting the creator,
taking descriptors out of ``recvmsg`` results, checking received sockets and
reaping the child.  No protocol logic lives here (that is ``_protocol``)."""

from __future__ import annotations

import _thread
import array
import contextlib
import errno
import functools
import math
import os
import pwd
import socket
import struct
import sys
from collections.abc import Iterable, Sequence

from ._protocol import AddressSpec, ProtocolSpec, ProtocolViolation, Request, make_request

TYPE_CHECKING = False  # (not typing's: no typing at run time)
if TYPE_CHECKING:
    # At run time subprocess (and threading) is imported by the first spawn, queue and
    # concurrent.futures by the first spawn from another thread: a broker
    # client, or an adopted channel, needs none of them.
    import concurrent.futures
    import queue
    import subprocess
    from typing import Any

__all__ = [
    "ANCBUFSIZE",
    "CREATOR_PATH",
    "RECV_FLAGS",
    "SEND_FLAGS",
    "RequestSpec",
    "adopt",
    "close_fds",
    "creator_argv",
    "descriptor_lost",
    "descriptor_lost_error",
    "normalize",
    "reap",
    "request_of",
    "spawn",
    "unpack_fds",
]

#: The privileged program, run by path with ``python -I -S -B``.
CREATOR_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "creator.py"
)

#: Room for a few descriptors: more than one on an 'S' is already fatal, and
#: the kernel drops (never installs) whatever does not fit (MSG_CTRUNC).
ANCBUFSIZE = socket.CMSG_SPACE(8 * array.array("i").itemsize)
RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_INT_SIZE = array.array("i").itemsize
_INT = struct.Struct("@i")
#: A dead creator is an EPIPE error, never a SIGPIPE that kills a client
#: whose SIGPIPE disposition is the default.
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag '&' costs a microsecond
# The protocol a received socket of each type is taken to have (not asked).
_PROTO = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
# A socket object's family and type as the kernel gave them (getsockname()
# and SO_TYPE, read when the object is made), as plain ints: socket.socket's
# own properties turn them into enums at a microsecond each.
_kernel_family = socket.SocketType.family.__get__
_kernel_type = socket.SocketType.type.__get__

RequestSpec = Request | tuple[ProtocolSpec, AddressSpec, int]


@functools.lru_cache(maxsize=256, typed=True)  # typed: True is not 1, 0.0 is not 0
def cached_request(protocol: ProtocolSpec, address: AddressSpec, port: int) -> Request:
    """make_request for requests made again and again: Requests are immutable,
    and validating the same arguments again costs a tenth of a sequential
    request.  Refusals are exceptions, which lru_cache never stores."""
    return make_request(protocol, address, port)


def request_of(protocol: ProtocolSpec, address: AddressSpec, port: int) -> Request:
    try:
        return cached_request(protocol, address, port)
    except TypeError:  # unhashable, or refused: let make_request say what is wrong
        return make_request(protocol, address, port)


def normalize(requests: Iterable[RequestSpec]) -> list[Request]:
    """Validate every request before anything is sent."""
    out = []
    for r in requests:
        if isinstance(r, Request):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 3:
            out.append(request_of(*r))
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
    # Our pid, known before the fork: if we die before the creator has set
    # PR_SET_PDEATHSIG, it sees a parent other than this and exits.
    argv += ["--parent", str(os.getpid())]
    return argv


Spawned = tuple[socket.socket, "subprocess.Popen[bytes]"]
_spawn_queue: queue.SimpleQueue[tuple[list[str], concurrent.futures.Future[Spawned]]] | None = None
_spawner_lock = _thread.allocate_lock()  # (threading.Lock: threading waits for spawn)


def _spawner_loop(
    jobs: queue.SimpleQueue[tuple[list[str], concurrent.futures.Future[Spawned]]],
) -> None:
    while True:
        argv, fut = jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(_spawn(argv))
            except BaseException as e:
                fut.set_exception(e)


def _forget_spawner() -> None:
    """After fork: the spawner thread did not come along (waiting on it would hang)."""
    global _spawn_queue, _spawner_lock
    _spawn_queue, _spawner_lock = None, _thread.allocate_lock()


os.register_at_fork(after_in_child=_forget_spawner)


def spawn(argv: Sequence[str]) -> Spawned:
    """Start ``argv`` on one end of a socketpair, in its own process group.

    Linux sends PR_SET_PDEATHSIG when the *thread* that forked the creator
    exits, not the process.  So a creator is only ever forked by the main
    thread or by one daemon spawner thread that lives as long as the process
    (a daemon thread is never joined at exit, so it outlives atexit handlers):
    a SocketCreator made in a short-lived worker thread survives that thread."""
    global _spawn_queue
    import threading  # (subprocess, which _spawn needs, imports it anyway)

    if threading.current_thread() is threading.main_thread():
        return _spawn(argv)
    import concurrent.futures
    import queue

    with _spawner_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawn_queue,), name="sockcreator-spawner", daemon=True
            ).start()
        jobs = _spawn_queue
    fut: concurrent.futures.Future[Spawned] = concurrent.futures.Future()
    jobs.put((list(argv), fut))
    return fut.result()


def _spawn(argv: Sequence[str]) -> Spawned:
    import subprocess

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


def set_kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """Make ``sock`` blocking, with the timeout kept by the kernel.

    ``sock.settimeout()`` would poll() before every call, which costs as much
    again as the request itself; SO_RCVTIMEO/SO_SNDTIMEO bound each call the
    same way at no cost.  An expired timeout raises BlockingIOError (EAGAIN).
    """
    usec = max(1, math.ceil(min(timeout, 2.0**31) * 1e6))  # 0 would mean "never"
    tv = struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)  # struct timeval
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def unpack_fds(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Descriptors from one ``recvmsg``, close-on-exec.  A truncated control
    message closes what did arrive and is a protocol violation."""
    if len(ancdata) == 1 and not flags & _MSG_CTRUNC and RECV_FLAGS:  # the usual: one descriptor
        level, kind, data = ancdata[0]
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) == _INT_SIZE:
            return [_INT.unpack(data)[0]]
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    if not RECV_FLAGS:  # no MSG_CMSG_CLOEXEC on this system: at once, then
        for fd in fds:
            os.set_inheritable(fd, False)
    if flags & _MSG_CTRUNC:
        close_fds(fds)
        if not fds:  # the kernel could not install even one: our table is full
            raise ProtocolViolation(
                "a descriptor was lost (MSG_CTRUNC, none received): "
                "this process is probably out of descriptors (EMFILE)"
            )
        raise ProtocolViolation("too many descriptors in one message (MSG_CTRUNC)")
    return fds


def _describe(family: int, kind: int) -> str:
    """Names such as AF_INET/SOCK_STREAM, or the kernel's numbers where no name fits."""
    names = []
    for value, enum_type in ((family, socket.AddressFamily), (kind, socket.SocketKind)):
        try:
            names.append(enum_type(value).name)
        except ValueError:
            names.append(str(value))
    return "/".join(names)


def descriptor_lost(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> bool:
    """True when a ``recvmsg`` brought data and MSG_CTRUNC but not one
    descriptor: the kernel could not install it because *this* process's
    descriptor table is full (EMFILE).  The creator did nothing wrong."""
    return (
        bool(data)
        and bool(flags & _MSG_CTRUNC)
        and not any(
            level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(d) >= _INT_SIZE
            for level, kind, d in ancdata
        )
    )


def descriptor_lost_error(request: Request) -> OSError:
    """The error for a socket the creator sent that we had no room to receive."""
    return OSError(
        errno.EMFILE, f"{os.strerror(errno.EMFILE)}: no room to receive the socket for {request}"
    )


def adopt(fd: int, request: Request) -> socket.socket:
    """Wrap a received descriptor, checking that it is what was asked for.

    The creator is trusted to bind, not to be right: a socket of another
    family, type or address is a protocol violation (and is closed).

    Three system calls, the fewest the stdlib allows: CPython's constructor
    always calls getsockname() on a descriptor it is given (to validate it;
    its result is not kept), SO_TYPE for the type, and getsockname() again
    for the address."""
    try:  # family (getsockname) and type (SO_TYPE) from the kernel; the protocol
        # is not asked (one call fewer): a wrong type is refused below anyway
        sock = socket.socket(-1, -1, _PROTO[request.type], fileno=fd)
    except OSError as e:
        os.close(fd)
        raise ProtocolViolation(f"received descriptor is not a socket: {e}") from None
    try:
        family, kind = _kernel_family(sock), _kernel_type(sock)
        want_family, want_type, want_host, want_port = request._expected
        if family != want_family or kind != want_type:
            raise ProtocolViolation(f"asked for {request}, received {_describe(family, kind)}")
        name = sock.getsockname()
        host, port = name[0], name[1]
        # The kernel's address as CPython writes it (inet_ntop of the bytes),
        # against inet_ntop of the bytes asked for: equal text, equal bytes.
        if host != want_host or (want_port and port != want_port):
            raise ProtocolViolation(
                f"asked for {request}, received {_describe(family, kind)} {host} {port}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def reap(proc: subprocess.Popen[bytes] | None, grace: float) -> int | None:
    """Wait up to ``grace`` seconds, then SIGKILL; always reaps.  The status."""
    if proc is None:
        return None
    import subprocess  # (loaded already: it made proc)

    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
