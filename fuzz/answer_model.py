"""A reference model of the creator's answer stream, byte by byte.

Written from the protocol text (``_protocol``'s module docstring and the
seed), not from ``AnswerParser``: the fuzz harness and the property tests
compare the two.  Descriptors given with a chunk ride on its first byte, as
``recvmsg`` delivers them.

Events are plain tuples: ``("S", request, fd)`` and
``("E", request, stage, errno)``.  A protocol violation raises
:class:`ModelViolation`, whose ``condition`` is the 'F' answer's condition
byte as a str (None for any other violation).  Violations are decided per
chunk: a chunk that contains one yields no events at all.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["AnswerModel", "ModelViolation"]

INT = struct.Struct("@i")
_STAGES = {ord("S"): "socket", ord("B"): "bind"}
_SIZE = {"idle": 1, "fd": 1, "err": 1 + INT.size, "fatal": 1}


class ModelViolation(Exception):
    def __init__(self, why: str, condition: str | None = None) -> None:
        super().__init__(why)
        self.condition = condition


class AnswerModel:
    def __init__(self) -> None:
        self.pending: collections.deque[Any] = collections.deque()
        self.state = "idle"  # idle | fd | err | fatal | dead
        self.buf = b""

    def expect(self, request: Any) -> None:
        self.pending.append(request)

    def wanted(self) -> int:
        """Bytes left in the answer now being read (0 once dead)."""
        return 0 if self.state == "dead" else _SIZE[self.state] - len(self.buf)

    def _die(self, why: str, condition: str | None = None) -> ModelViolation:
        self.state = "dead"
        return ModelViolation(why, condition)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[tuple[Any, ...]]:
        events: list[tuple[Any, ...]] = []
        if self.state == "dead" and data:
            raise self._die("data after a violation")
        if not data and fds:
            raise self._die("descriptors without a data byte")
        for i, byte in enumerate(data):
            here = list(fds) if i == 0 else []
            if self.state == "fd":
                if len(here) != 1:
                    raise self._die(f"{len(here)} descriptors on the 'S' data byte")
                events.append(("S", self.pending.popleft(), here[0]))
                self.state = "idle"
                continue
            if here:
                raise self._die("descriptors outside an 'S' answer")
            if self.state == "idle":
                if byte == ord("F"):
                    self.state = "fatal"
                elif not self.pending:
                    raise self._die("an answer nobody asked for")
                elif byte == ord("S"):
                    self.state = "fd"
                elif byte == ord("E"):
                    self.state, self.buf = "err", b""
                else:
                    raise self._die(f"unknown answer {byte:#x}")
            elif self.state == "err":
                self.buf += bytes((byte,))
                if len(self.buf) == _SIZE["err"]:
                    stage = _STAGES.get(self.buf[0])
                    if stage is None:
                        raise self._die("unknown stage")
                    errno = INT.unpack(self.buf[1:])[0]
                    events.append(("E", self.pending.popleft(), stage, errno))
                    self.state, self.buf = "idle", b""
            else:  # fatal: the condition byte
                raise self._die("'F'", bytes((byte,)).decode("ascii", "backslashreplace"))
        return events
