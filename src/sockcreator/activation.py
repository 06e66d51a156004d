"""Socket activation, the receiving side: ``sd_listen_fds`` in Python.

A starter (systemd, or ``sockcreator run``) passes sockets at descriptors 3,
4, ... and says so in the environment::

    LISTEN_PID=<pid the descriptors are meant for>
    LISTEN_FDS=<how many>
    LISTEN_FDNAMES=<name>:<name>:...     (optional, one name per descriptor)

:func:`listen_fds` follows ``sd_listen_fds_with_names(3)``:

- Nothing (an empty list, not an error) unless ``LISTEN_PID`` is our pid and
  ``LISTEN_FDS`` is set: the variables may have been inherited by a child
  they were not meant for.
- Malformed values are a :class:`ValueError`: ``LISTEN_PID`` must be a
  positive decimal pid; ``LISTEN_FDS`` plain decimal digits (no sign, no
  blanks), small enough that 3 + n - 1 is below the descriptor limit
  (``LISTEN_FDS=0`` gives an empty list).
- Every descriptor 3 .. 3+n-1 must be open (else ValueError); each is made
  non-inheritable (close-on-exec) at once, before names are checked.
- ``LISTEN_FDNAMES`` is split on ``:``; its count must equal ``LISTEN_FDS``,
  else ValueError (an empty value is zero names).  That is what
  ``sd_listen_fds_with_names`` does (-EINVAL): a wrong count means every name
  may be attached to the wrong socket, which is worse than no names.
  Without the variable every name is ``"unknown"``.
- With ``unset_environment`` (the default) the three variables are removed
  from ``os.environ`` on every path, errors included, so they never leak
  into a child process.  On an error the descriptors are left open (the
  caller cannot know which are valid) but those that exist are close-on-exec.

Descriptors may be any kind of file (systemd also passes FIFOs and more);
:func:`listen_sockets` wraps the ones that must be sockets.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from ._record import dataclass

__all__ = ["SD_LISTEN_FDS_START", "ListenFD", "listen_fds", "listen_sockets"]

#: The first passed descriptor (systemd's ``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_MAX_DIGITS = 10  # pids and descriptor counts fit in a C int


@dataclass(frozen=True)
class ListenFD:
    """One passed descriptor (now non-inheritable) and its name."""

    fd: int
    name: str


def _decimal(name: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_DIGITS:
        raise ValueError(f"{name}={value[:40]!r} is not a plain decimal number")
    return int(value)


def _fd_limit() -> int:
    import resource  # (only here: PROGRAM calls this, the launcher never does)

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 2**31 - 1:
        return 2**31 - 1
    return int(soft)


def _take(environ: Mapping[str, str]) -> list[ListenFD]:
    pid_s = environ.get("LISTEN_PID")
    if pid_s is None:
        return []
    pid = _decimal("LISTEN_PID", pid_s)
    if pid <= 0:
        raise ValueError(f"LISTEN_PID={pid_s!r} is not a process id")
    if pid != os.getpid():
        return []  # inherited: meant for another process
    count_s = environ.get("LISTEN_FDS")
    if count_s is None:
        return []
    count = _decimal("LISTEN_FDS", count_s)
    if SD_LISTEN_FDS_START + count > _fd_limit():
        raise ValueError(f"LISTEN_FDS={count} exceeds the descriptor limit")
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    missing = []
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            missing.append(fd)
    if missing:
        raise ValueError(f"LISTEN_FDS={count} but descriptor(s) {missing} are not open")
    names_s = environ.get("LISTEN_FDNAMES")
    if names_s is None:
        names = ["unknown"] * count
    else:
        names = names_s.split(":") if names_s else []
        if len(names) != count:
            raise ValueError(
                f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
            )
    return [ListenFD(fd, name) for fd, name in zip(fds, names, strict=True)]


def listen_fds(unset_environment: bool = True) -> list[ListenFD]:
    """The descriptors passed to this process, with their names (see module doc)."""
    try:
        return _take(os.environ)
    finally:
        if unset_environment:
            for name in _VARIABLES:
                os.environ.pop(name, None)


def listen_sockets(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """:func:`listen_fds`, each wrapped as a ``socket.socket`` (family and
    type read from the kernel).  ValueError if one is not a socket; then no
    descriptor is closed or wrapped."""
    out: list[tuple[str, socket.socket]] = []
    try:
        for item in listen_fds(unset_environment):
            try:
                out.append((item.name, socket.socket(fileno=item.fd)))
            except OSError as e:
                raise ValueError(f"passed descriptor {item.fd} is not a socket: {e}") from None
    except BaseException:
        for _, sock in out:
            sock.detach()  # leave the descriptor to the caller, as listen_fds does
        raise
    return out
