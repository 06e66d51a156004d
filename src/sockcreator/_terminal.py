"""A program started from root's terminal: a new session for it, and a
signal relay left in root's (see "From root's terminal" in
:mod:`sockcreator.run.launcher`, where the design is argued).  Shared by
``sockcreator run`` and ``sockcreator serve``: neither may leave a process
that reads untrusted input holding root's terminal.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from types import FrameType

from .privileges import Credentials, drop_to, make_non_dumpable

TYPE_CHECKING = False  # (not typing's: no typing at run time)
if TYPE_CHECKING:
    import signal
    from typing import NoReturn
else:
    # signal's functions without its enums (signal.py makes three IntEnums
    # at import, a millisecond): the same calls, with plain numbers.
    import _signal as signal

__all__ = ["FORWARDED_SIGNALS", "fork_relay", "forward_signals", "open_fds", "terminal_in_reach"]

EXIT_SYSTEM = 111  # the relay could not drop (as ``sockcreator run``'s 111)


FORWARDED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
)


def forward_signals(
    pidfd: int, pid: int, signals: Iterable[int] = FORWARDED_SIGNALS
) -> Callable[[int], None]:
    """Pass these signals on to ``pid`` (through its pidfd when we have one:
    never to a reused pid); the sender, for the caller's own use."""

    def send(sig: int) -> None:
        try:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
        except OSError:
            pass  # gone already: its status is on its way

    def forward(sig: int, _frame: FrameType | None) -> None:
        send(sig)

    for sig in signals:
        signal.signal(sig, forward)
    return send


def open_fds() -> list[int]:
    """This process's descriptors (from /proc; every possible one without it)."""
    try:
        return sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        return list(range(os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024))


def _has_controlling_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # ENXIO: none (EIO: hung up)
    os.close(fd)
    return True


def terminal_in_reach() -> bool:
    """A terminal on stdio, or a controlling one (``/dev/tty`` opens)."""
    return any(os.isatty(fd) for fd in (0, 1, 2)) or _has_controlling_terminal()


def _reopen_write_only(fd: int) -> int:
    """A new, write-only open of the terminal at ``fd`` (close-on-exec), as root."""
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return os.open(f"/proc/self/fd/{fd}", flags)
    except FileNotFoundError:
        return os.open(os.ttyname(fd), flags)  # no /proc


def _detach_stdio_from_terminal() -> None:
    """In the child: a terminal stdin becomes /dev/null, a terminal stdout or
    stderr a write-only open of it (which cannot be read, nor made a
    controlling terminal)."""
    for fd in (0, 1, 2):
        if not os.isatty(fd):
            continue
        try:
            if fd == 0:
                new = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            else:
                new = _reopen_write_only(fd)
            os.dup2(new, fd)  # inheritable
            os.close(new)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot detach descriptor {fd} from the terminal: {e.strerror}"
            ) from None


def fork_relay(creds: Credentials, prog: str) -> int:
    """Fork; return in the child only, after setsid() and with stdio detached
    from the terminal.  The parent becomes the relay and never returns: once
    the child has dropped to ``creds`` it drops there too.  The child learns
    of that from EOF on the pipe whose writing end this returns (close-on-
    exec): a child that execs after its drop may leave it to the exec; one
    that does not (a daemon) closes it once it has dropped.  OSError if
    the fork (or, in the child, the detaching) fails; ``prog`` names us in
    the relay's one possible message."""
    try:
        ready_r, ready_w = os.pipe()  # both close-on-exec
    except OSError as e:
        raise OSError(e.errno, f"cannot make a pipe: {e.strerror}") from None
    # Blocked from before the fork until the relay's handlers are in place: a
    # Ctrl-C meanwhile is delivered then, and forwarded.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        child = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_r)
        os.close(ready_w)
        raise OSError(e.errno, f"cannot fork: {e.strerror}") from None
    if child == 0:
        os.close(ready_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.setsid()  # cannot fail: a fresh child leads no process group
        _detach_stdio_from_terminal()
        # ready_w stays open, close-on-exec: the relay reads EOF when PROGRAM
        # starts (or when we fail and exit, or place_fds reuses its number):
        # every one of these comes after our own drop.
        return ready_w
    os.close(ready_w)
    _relay(creds, prog, child, ready_r, old_mask)


def _relay(
    creds: Credentials, prog: str, child: int, ready: int, old_mask: Iterable[int]
) -> NoReturn:
    """The parent: forward terminal signals to ``child``; exit with its status."""
    # A write-only handle, for our own error message only; then 0-2 become
    # /dev/null and everything else we inherited is closed.
    try:
        err = _reopen_write_only(2) if os.isatty(2) else fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        err = -1  # then a failure below goes unexplained, but still fails
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        pidfd = os.pidfd_open(child)  # signals can never reach a reused pid
    except (AttributeError, OSError):  # not Linux 5.3+
        pidfd = -1
    for fd in open_fds():
        if fd > 2 and fd not in (ready, err, pidfd):
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir used, closed by now

    send = forward_signals(pidfd, child)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    os.read(ready, 1)  # EOF once the child has dropped (signals are forwarded meanwhile)
    os.close(ready)
    try:
        drop_to(creds)
        make_non_dumpable()
    except (OSError, ValueError, LookupError) as e:
        try:
            os.write(err, f"{prog}: the relay cannot drop privileges ({e}): stopping\n".encode())
        except OSError:
            pass  # err is -1, or its reader is gone
        send(signal.SIGKILL)
        os.waitpid(child, 0)
        os._exit(EXIT_SYSTEM)
    if err >= 0:
        os.close(err)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)  # killed by a signal: 128+N, as a shell
