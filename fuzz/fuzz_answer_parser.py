#!/usr/bin/env python3
"""atheris harness 2: the client's sans-I/O AnswerParser, in process.

Each input is a script of operations on one ``AnswerParser``, decoded with
atheris' FuzzedDataProvider: "expect a request" (one of eight kinds), or
"feed a chunk" (0..9 bytes, with 0..3 descriptors on its first byte, as
recvmsg delivers them).  Descriptor numbers are fresh fake integers: the
parser never touches them, it only hands them out.

Invariants (any other outcome is a crash that atheris records):

- ``feed`` returns events or raises ProtocolViolation, never anything else;
- it agrees with ``answer_model.AnswerModel`` (written from the protocol
  text) on every event, on whether and when it raises, and on the 'F'
  condition;
- fd accounting: a successful ``feed`` hands out every descriptor given with
  it exactly once (in a SocketReceived), a raising one hands out none;
- after a violation every ``feed`` with data raises, and ``bytes_wanted()``
  is 0; otherwise ``bytes_wanted()`` is the model's and ``pending``/``idle``
  match.

Run (see fuzz/README.md)::

    python fuzz/fuzz_answer_parser.py -max_total_time=300 fuzz/corpus/answer_parser
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sockcreator"]):
    from sockcreator.client._protocol import (
        AnswerParser,
        CreationFailed,
        ProtocolViolation,
        SocketReceived,
        make_request,
    )

from answer_model import AnswerModel, ModelViolation

REQUESTS = [
    make_request(p, a, port)
    for p in ("tcp", "udp")
    for a in ("127.0.0.1", "::1")
    for port in (0, 53)
]


def as_tuple(ev: object) -> tuple[object, ...]:
    if isinstance(ev, SocketReceived):
        return ("S", ev.request, ev.fd)
    if isinstance(ev, CreationFailed):
        return ("E", ev.request, ev.stage, ev.errno)
    raise AssertionError(f"feed returned {ev!r}, not an event")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    parser, ref = AnswerParser(), AnswerModel()
    next_fd = 1000
    while fdp.remaining_bytes():
        op = fdp.ConsumeIntInRange(0, 3)
        if op == 0:
            req = REQUESTS[fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)]
            parser.expect(req)
            ref.expect(req)
        else:
            nfds = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else 0
            fds = list(range(next_fd, next_fd + nfds))
            next_fd += nfds
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9))
            check_feed(parser, ref, chunk, fds)
        dead = ref.state == "dead"
        assert parser.bytes_wanted() == ref.wanted(), (parser.bytes_wanted(), ref.wanted())
        if not dead:
            assert parser.pending == len(ref.pending), (parser.pending, len(ref.pending))
            assert parser.idle == (ref.state == "idle")


def check_feed(parser: AnswerParser, ref: AnswerModel, chunk: bytes, fds: list[int]) -> None:
    try:
        want = ref.feed(chunk, fds)
        want_exc: ModelViolation | None = None
    except ModelViolation as e:
        want, want_exc = [], e
    try:
        got = [as_tuple(ev) for ev in parser.feed(chunk, fds)]
    except ProtocolViolation as e:
        if want_exc is None:
            raise AssertionError(f"parser raised {e!r} where the model gives {want}") from e
        assert e.condition == want_exc.condition, (e.condition, want_exc.condition)
        return  # raised: handed out nothing; the caller closes every fd
    if want_exc is not None:
        raise AssertionError(f"parser returned {got} where the model raises {want_exc!r}")
    assert got == want, (got, want)
    handed = sorted(ev[2] for ev in got if ev[0] == "S")
    assert handed == sorted(fds), f"descriptors {fds} given, {handed} handed out"


def replay_coverage(paths: list[str]) -> None:
    """Replay inputs (files or directories) under a line tracer; print how many
    lines of AnswerParser's methods they reach."""
    import json

    from _linecov import replay

    print(json.dumps(replay(TestOneInput, paths, vars(AnswerParser).values())))


def main() -> None:
    if sys.argv[1:2] == ["--coverage"]:
        replay_coverage(sys.argv[2:])
        return
    argv = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=256")
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
