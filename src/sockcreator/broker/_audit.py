"""The broker's audit log: one JSON object per line, per event.

Lines are buffered and written together by :meth:`Audit.flush`; the broker
flushes before it sends anything, so the line of every grant, denial and
release is written before its answer leaves (and a crash loses no line of
an answer already given).  One write per batch instead of one per event
matters when the log is a pipe or the journal: each write wakes the reader.

The hot lines (grant, deny, release) are put together from fragments the
broker computes once per connection (who) and per socket (what); the
fields and their order are those of :meth:`Audit.log` with the same
arguments, so every line is the JSON object it would have encoded.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable
from typing import Any

from ..client._protocol import Request, SocketOptions

__all__ = ["Audit", "describe", "fragment", "json_text"]

_encode = json.JSONEncoder(separators=(",", ":")).encode

_OPTION_NAMES = [
    [o.name.lower() for o in SocketOptions if o.value & bits and o.name] for bits in range(8)
]


def describe(request: Request, backlog: int | None) -> dict[str, Any]:
    """What a socket is, as the audit log and ``status --json`` say it."""
    return {
        "proto": request.protocol,
        "addr": str(request.address),
        "port": request.port,
        "options": _OPTION_NAMES[int(request.options) & 7],
        "backlog": backlog,
    }


def fragment(fields: dict[str, Any]) -> str:
    """``fields`` as the inside of a JSON object (no braces), to splice."""
    return _encode(fields)[1:-1]


def json_text(text: str) -> str:
    return _encode(text)


class Audit:
    """Buffered JSON lines on ``fd``.  ``on_pending`` is called when a line
    is buffered and none was before: the owner then arranges a flush."""

    def __init__(self, fd: int, on_pending: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self.lines: list[str] = []  # buffered (the hot callers append themselves: wake())
        self.on_pending = on_pending

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": float(f"{time.time():.3f}"), "event": event, **fields}
        self.add(_encode(record))

    def event(self, event: str, body: str) -> None:
        """A line from fragments: ``body`` is the JSON object's fields after
        ``ts`` and ``event`` (their text, comma-separated, no braces)."""
        lines = self.lines  # (add() inlined: twice per grant and release)
        if not lines and self.on_pending is not None:
            self.on_pending()
        lines.append(f'{{"ts":{time.time():.3f},"event":"{event}",{body}}}')  # (3x round()'s)

    def wake(self) -> None:
        """For a caller about to append to :attr:`lines` while it is empty
        (what :meth:`add` does, inlined where it is hot)."""
        if self.on_pending is not None:
            self.on_pending()

    def add(self, line: str) -> None:
        if not self.lines and self.on_pending is not None:
            self.on_pending()
        self.lines.append(line)

    @property
    def pending(self) -> bool:
        return bool(self.lines)

    def flush(self) -> None:
        """Write every buffered line (one write as a rule).  A non-blocking
        log that is full is waited for: a line is never dropped.  A log that
        cannot be written at all (EBADF, EPIPE) loses its lines."""
        lines = self.lines
        if not lines:
            return
        if len(lines) == 1:  # (as a rule: one turn, one event)
            data = (lines[0] + "\n").encode("utf-8", "replace")
        else:
            lines.append("")
            data = "\n".join(lines).encode("utf-8", "replace")
        lines.clear()
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:  # a non-blocking stderr: wait, never drop a line
                select.select([], [self._fd], [], 1.0)
            except InterruptedError:
                continue
            except OSError:
                return
