"""The creator factory: a small root process, forked by ``serve`` before the
broker drops privileges, that starts a new hardened creator when a reload
needs a wider allow-list (OpenSSH's privileged monitor, cut down to one
question).  See docs/security.md, "The creator factory", and docs/broker.md,
"Reloading the policy".

The link is an AF_UNIX SOCK_SEQPACKET socketpair (one message per request
and per answer, so neither side can be made to read half of one).

- The broker sends exactly one message, the byte ``R``.  Nothing else is
  defined: any other message (another byte, more bytes, an empty one, one
  with descriptors or truncated), and EOF, make the factory exit.
- The factory then reads the policy file itself (by the same name, in the
  directory whose descriptor ``serve`` opened at start, following no link
  there; the file and that directory must be root's and writable by nobody
  else), computes the union of its rules (``Policy.creator_allow()``),
  starts a creator exactly as ``serve`` starts its first one, and answers
  with one message: a 9-byte header ``!cII`` (kind, pid, length) and
  ``length`` bytes (at most :data:`MAX_PAYLOAD`).  Kind ``C``: the
  creator's end of its socketpair as the one descriptor of the message
  (SCM_RIGHTS), its pid, and the allow-list it was started with as JSON (a
  list of specs, or null for ``--allow-all``).  Kind ``E``: no descriptor,
  pid 0, the reason as UTF-8.

Requests are served one at a time, at most one spawn per
:data:`MIN_INTERVAL` seconds, and never while :data:`MAX_LIVE` of the
factory's creators are still running: a compromised broker can have it start
creators fenced by the administrator's own policy, slowly, and no more than
a few at once.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..client._channel import RECV_FLAGS, SEND_FLAGS, creator_argv, spawn, unpack_fds
from ..client._protocol import ProtocolViolation
from ..privileges import make_non_dumpable, shed_capabilities
from .policy import PolicyError, parse_policy

__all__ = ["MAX_LIVE", "MAX_PAYLOAD", "MIN_INTERVAL", "Factory", "FactoryError", "Spawned"]

REQUEST = b"R"
_HEADER = struct.Struct("!cII")  # kind, pid, payload length
MAX_PAYLOAD = 1 << 16
MAX_LIVE = 4  # the factory's creators running at once
MIN_INTERVAL = 0.5  # seconds between two spawns
_MAX_POLICY = 1 << 20
_ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)
# What spawning a creator needs (the creator drops its bounding set, its
# groups, gid and uid, and keeps CAP_NET_BIND_SERVICE): CAP_SETGID,
# CAP_SETUID, CAP_SETPCAP, CAP_NET_BIND_SERVICE.  Nothing else survives an
# exec of the factory's.
_BOUNDING = (6, 7, 8, 10)
# Signals anyone in the broker's process group or cgroup may get: the
# factory ends by EOF on its link, or with the broker (PR_SET_PDEATHSIG).
_IGNORED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
_LINK_FD, _DIR_FD = 3, 4  # where the factory keeps its two descriptors


class FactoryError(Exception):
    """No new creator: the reason (the factory's, or about the link)."""


@dataclass(frozen=True)
class Spawned:
    """A creator the factory started: the broker's end of its link."""

    sock: socket.socket
    pid: int
    allow: list[str] | None


# --- the factory's side (root) ----------------------------------------------------


def _say(text: str) -> None:
    try:
        os.write(2, f"sockcreator factory: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def _read_policy(path: str, dir_fd: int) -> list[str] | None:
    """The union of the policy file's rules, read as at start (see the
    module doc); PolicyError or OSError if it cannot be used."""
    where = os.path.abspath(path)
    d = os.fstat(dir_fd)
    if d.st_uid != 0 or (d.st_mode & 0o022 and not d.st_mode & stat.S_ISVTX):
        raise PolicyError(
            f"{os.path.dirname(where)} is not root's alone (uid {d.st_uid}, mode "
            f"{d.st_mode & 0o7777:04o}): a new creator needs a policy only root can change"
        )
    fd = os.open(
        os.path.basename(path),
        os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW,
        dir_fd=dir_fd,
    )
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"{where} is not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PolicyError(
                f"{where} is not root's alone (uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})"
                ": a new creator needs a policy only root can change"
            )
        data = f.read(_MAX_POLICY + 1)
    if len(data) > _MAX_POLICY:
        raise PolicyError(f"{where} is larger than {_MAX_POLICY} bytes")
    policy = parse_policy(data.decode("utf-8"))
    if not policy.rules:
        raise PolicyError(f"{where} allows nothing")
    return policy.creator_allow()


def _place_descriptors(link: int, policy_dir: int) -> None:
    """0 and 1 become /dev/null, 2 stays (the broker's log: the creators'
    too), the link and the directory go to 3 and 4; every other descriptor
    inherited from the broker is closed."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (link, policy_dir)]
    os.dup2(high[0], _LINK_FD, inheritable=False)
    os.dup2(high[1], _DIR_FD, inheritable=False)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > _DIR_FD:
            try:
                os.close(int(name))
            except OSError:
                pass  # the descriptor listdir used, closed by now


def _factory(
    link_fd: int, policy_path: str, policy_dir: int, creator_user: str, broker: int
) -> int:
    """The factory's life, in the forked child: harden, then serve."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        _say("cannot set PR_SET_PDEATHSIG")
        return 1
    if os.getppid() != broker:
        return 0  # the broker is gone already
    for sig in (*_IGNORED, signal.SIGPIPE):  # (SIGPIPE: Popen resets it in a child)
        signal.signal(sig, signal.SIG_IGN)
    _place_descriptors(link_fd, policy_dir)
    try:
        shed_capabilities(_BOUNDING)
        make_non_dumpable()
    except OSError as e:
        _say(f"cannot harden itself: {e}")
        return 1
    live: dict[int, subprocess.Popen[bytes]] = {}

    def reap(*_: object) -> None:
        for pid, proc in list(live.items()):
            if proc.poll() is not None:
                live.pop(pid, None)

    signal.signal(signal.SIGCHLD, reap)
    link = socket.socket(fileno=_LINK_FD)
    last = -MIN_INTERVAL
    while True:
        try:
            data, anc, flags, _ = link.recvmsg(16, _ANCBUF, RECV_FLAGS)
        except OSError:
            return 0
        try:
            fds = unpack_fds(anc, flags)
        except ProtocolViolation:  # truncated (what came is closed)
            fds = []
        for fd in fds:
            os.close(fd)
        if data != REQUEST or anc or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            if data:
                _say(f"exits: the broker sent {data[:16]!r}, not a request")
            return 0 if not data else 2
        wait = last + MIN_INTERVAL - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        answer, sock = _serve_one(policy_path, creator_user, live)
        last = time.monotonic()
        reap()
        try:
            if sock is None:
                link.sendmsg([answer], [], SEND_FLAGS)
            else:
                rights = array.array("i", [sock.fileno()])
                link.sendmsg([answer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], SEND_FLAGS)
        except OSError:
            return 0
        finally:
            if sock is not None:
                sock.close()


def _serve_one(
    policy_path: str, creator_user: str, live: dict[int, subprocess.Popen[bytes]]
) -> tuple[bytes, socket.socket | None]:
    """One answer: (message, the creator's socket to pass, or None)."""
    try:
        if len(live) >= MAX_LIVE:
            raise PolicyError(f"{MAX_LIVE} creators it started are still running")
        allow = _read_policy(policy_path, _DIR_FD)
        # As serve starts its first creator, with the default signal
        # dispositions (ignored ones would survive the exec).
        saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in _IGNORED}
        try:
            sock, proc = spawn(creator_argv(allow=allow, user=creator_user))
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    except (OSError, ValueError, LookupError, RuntimeError) as e:
        where = os.path.abspath(policy_path)
        text = f"{where}: {e.strerror}" if isinstance(e, OSError) and e.strerror else str(e)
        message = text.encode("utf-8", "replace")[:MAX_PAYLOAD]
        return _HEADER.pack(b"E", 0, len(message)) + message, None
    live[proc.pid] = proc
    payload = json.dumps(allow).encode()
    if len(payload) > MAX_PAYLOAD:
        sock.close()  # the creator reads EOF and exits
        message = b"the allow-list is too long to send"
        return _HEADER.pack(b"E", 0, len(message)) + message, None
    return _HEADER.pack(b"C", proc.pid, len(payload)) + payload, sock


# --- the broker's side --------------------------------------------------------------


class Factory:
    """The broker's end of the link to its creator factory."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self.gone: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._answer: asyncio.Future[tuple[bytes, list[int], int]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, on_lost: Callable[[str], None] | None = None) -> None:
        """Watch the link from the running loop: the factory's exit is seen
        (and reaped) when it happens, not at the next reload."""
        self._loop = asyncio.get_running_loop()
        self.on_lost = on_lost
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                _HEADER.size + MAX_PAYLOAD + 1, _ANCBUF, RECV_FLAGS
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc, flags = b"", [], 0
        try:
            fds = unpack_fds(anc, flags)
        except ProtocolViolation:
            fds, flags = [], flags | socket.MSG_CTRUNC
        fut = self._answer
        if fut is None or fut.done():
            for fd in fds:
                os.close(fd)
            self._lost("it exited" if not data else "it sent an answer nobody asked for")
            return
        fut.set_result((data, fds, flags))

    def _lost(self, reason: str) -> None:
        if self.gone is not None:
            return
        self.gone = reason
        if self.sock.fileno() != -1:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self._reap_soon(0.01)
        if self.on_lost is not None:
            self.on_lost(reason)

    def _reap_soon(self, delay: float) -> None:
        """Reap the factory once it is gone: its EOF comes while it exits,
        before it can be waited for."""
        if not self.reap() and self._loop is not None:
            self._loop.call_later(delay, self._reap_soon, min(delay * 2, 1.0))

    def reap(self) -> bool:
        """Whether the factory has exited (and is reaped now)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return pid != 0

    async def spawn(self, timeout: float = 30.0) -> Spawned:
        """A new creator from the factory; FactoryError if none comes."""
        if self.gone is not None or self._loop is None:
            raise FactoryError(f"the creator factory is gone ({self.gone or 'not attached'})")
        fut = self._answer = self._loop.create_future()
        try:
            self.sock.send(REQUEST, SEND_FLAGS)
            data, fds, flags = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._lost(f"no answer within {timeout:g} s")
            raise FactoryError(f"the creator factory gave no answer within {timeout:g} s") from None
        except OSError as e:
            self._lost(f"cannot write to it: {e.strerror}")
            raise FactoryError(f"cannot reach the creator factory: {e.strerror}") from None
        except BaseException:  # cancelled: an answer may still come, out of step
            self._lost("a request was abandoned")
            raise
        finally:
            self._answer = None
        return self._parse(data, fds, flags)

    def _parse(self, data: bytes, fds: list[int], flags: int) -> Spawned:
        if not data:
            self._lost("it exited")
            raise FactoryError("the creator factory exited")
        kind, pid, n = (
            _HEADER.unpack(data[: _HEADER.size]) if len(data) >= _HEADER.size else (b"", 0, -1)
        )
        sane = not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) and n == len(data) - _HEADER.size
        if sane and kind == b"E" and not fds:
            raise FactoryError(data[_HEADER.size :].decode("utf-8", "replace"))
        if sane and kind == b"C" and len(fds) == 1 and pid > 0:
            try:
                allow = json.loads(data[_HEADER.size :])
            except ValueError:
                allow = 0
            if allow is None or (
                isinstance(allow, list) and allow and all(isinstance(s, str) for s in allow)
            ):
                try:
                    sock = socket.socket(fileno=fds[0])
                except OSError:  # not a socket
                    sock = None
                if sock is not None:
                    if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                        return Spawned(sock, pid, allow)
                    sock.close()
                    fds = []
        for fd in fds:
            os.close(fd)
        self._lost("it sent a malformed answer")
        raise FactoryError("the creator factory sent a malformed answer")

    async def close(self, grace: float = 5.0) -> None:
        """EOF to the factory (it exits), and reap it."""
        if self.gone is None:
            self.gone = "closed"
            if self.sock.fileno() != -1:
                if self._loop is not None:
                    self._loop.remove_reader(self.sock.fileno())
                self.sock.close()
        deadline = time.monotonic() + grace
        while not self.reap() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def start_factory(policy_path: str, policy_dir: int, creator_user: str) -> Factory:
    """Fork the factory (as root, before the drop, before the event loop
    runs); the broker's end of the link.  OSError if it cannot be forked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    broker = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:  # pragma: no cover - the child (tested through /proc)
        status = 1
        try:
            status = _factory(theirs.fileno(), policy_path, policy_dir, creator_user, broker)
        except BaseException as e:
            _say(f"failed: {type(e).__name__}: {e}")
        finally:
            os._exit(status)
    theirs.close()
    return Factory(ours, pid)
