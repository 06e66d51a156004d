"""The service manager's notifications: ``sd_notify(3)`` in Python, for the broker.

A starter that wants to know when the broker is ready (systemd's
``Type=notify``) sets ``NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram socket:
an absolute path, or an abstract name written ``@name``.  Each notification
is one datagram of newline-separated ``KEY=VALUE`` assignments.

:func:`from_environment` reads the variables as ``sd_notify`` and
``sd_watchdog_enabled`` do, and always removes them from ``os.environ``
(``unset_environment``), so no child -- the creator -- ever sees them:

- ``NOTIFY_SOCKET`` unset or empty: no notifications (a :class:`Notifier`
  that sends nothing).  Anything but ``/...`` or ``@...`` is a ValueError
  (``sd_notify`` returns -EAFNOSUPPORT/-EINVAL; the broker says so and stops,
  rather than leave the starter waiting for a READY that never comes).
- The socket is made and *connected* here, while the broker is still root:
  after the drop the path may not be reachable by ``--user``.  The kept
  descriptor is close-on-exec.
- ``WATCHDOG_USEC``: a positive decimal number of microseconds; ignored
  (watchdog off) if ``WATCHDOG_PID`` is set and is not our pid.  Malformed
  values are a ValueError.  Pings go every ``WATCHDOG_USEC / 2``.

The messages are built by plain functions (:func:`ready`, :func:`reloading`,
:func:`stopping`, :func:`status`, :func:`watchdog`): no I/O in them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

__all__ = [
    "Notifier",
    "from_environment",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
]

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


# --- the messages (no I/O) ------------------------------------------------------------


def ready(status_text: str | None = None) -> bytes:
    return _join(["READY=1"], status_text)


def reloading(monotonic_usec: int | None = None) -> bytes:
    """``RELOADING=1`` with ``MONOTONIC_USEC``: CLOCK_MONOTONIC now, in µs
    (what systemd wants with it, to order the reload against its own view)."""
    if monotonic_usec is None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}".encode("ascii")


def stopping(status_text: str | None = None) -> bytes:
    return _join(["STOPPING=1"], status_text)


def status(text: str) -> bytes:
    return _join([], text)


def watchdog() -> bytes:
    return b"WATCHDOG=1"


def _join(lines: list[str], status_text: str | None) -> bytes:
    if status_text is not None:
        # one line: a newline would start another assignment
        lines.append("STATUS=" + status_text.replace("\n", " "))
    return "\n".join(lines).encode("utf-8", "replace")


# --- the environment and the socket -----------------------------------------------------


def _decimal(name: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise ValueError(f"{name}={value[:40]!r} is not a plain decimal number")
    return int(value)


def _address(value: str) -> str | bytes:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # abstract: a leading NUL, no terminator
    raise ValueError(
        f"NOTIFY_SOCKET={value[:60]!r} is neither an absolute path nor an abstract socket (@name)"
    )


class Notifier:
    """A connected datagram socket to the service manager (or nothing)."""

    def __init__(
        self,
        sock: socket.socket | None,
        address: str = "",
        watchdog_usec: int | None = None,
    ) -> None:
        self.sock = sock
        self.address = address  # as NOTIFY_SOCKET gave it (for messages)
        self.watchdog_usec = watchdog_usec
        self.error: str | None = None  # the first send that failed (then we stop trying)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, message: bytes) -> bool:
        """One datagram, never blocking; False if it could not be sent.  The
        first failure is kept in :attr:`error` and ends notifications: a
        manager that went away does not come back on the same socket."""
        if self.sock is None:
            return False
        try:
            self.sock.send(message)
            return True
        except (BlockingIOError, InterruptedError):
            return False  # the manager is behind: this one is lost, like sd_notify's
        except OSError as e:
            self.error = f"NOTIFY_SOCKET={self.address}: {e.strerror or e}"
            self.close()
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def from_environment(environ: MutableMapping[str, str] | None = None) -> Notifier:
    """The notifier the environment asks for (see the module doc); the
    variables are removed from ``environ`` (default ``os.environ``) on every
    path.  ValueError for malformed values, OSError if the socket cannot be
    reached."""
    env = os.environ if environ is None else environ
    values = {name: env.get(name) for name in _VARIABLES}
    for name in _VARIABLES:
        env.pop(name, None)
    where = values["NOTIFY_SOCKET"]
    if not where:
        return Notifier(None)
    address = _address(where)
    usec: int | None = None
    usec_s, pid_s = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
    if usec_s is not None:
        usec = _decimal("WATCHDOG_USEC", usec_s)
        if usec == 0:
            raise ValueError("WATCHDOG_USEC=0 is not a positive number of microseconds")
        if pid_s is not None and _decimal("WATCHDOG_PID", pid_s) != os.getpid():
            usec = None  # meant for another process
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"NOTIFY_SOCKET={where}: cannot connect: {e.strerror}") from None
    return Notifier(sock, where, usec)
