#!/usr/bin/env python3
"""atheris harness 3: the broker's message parsing (sans-I/O), in process.

Two targets, chosen by the first byte of the input:

RequestDecoder (what the broker does with a client's bytes).  The rest of
the input is a byte stream, cut into chunks at fuzzed points.  Invariants:

- ``feed`` returns messages or raises BrokerProtocolError, nothing else;
- chunking does not matter: the messages returned are a prefix of what
  frame-by-frame decoding gives, and it raises iff that does;
- every decoded message encodes back to exactly the bytes of its frame;
- at most one unfinished frame is buffered (< 3 + MAX_BODY bytes).

AnswerDecoder (what a client does with the broker's bytes).  The input is
a script: frames built from fuzzed fields (G, D, K, S, Z, H, X) or raw bytes,
each delivered in reads of at most ``bytes_wanted()`` bytes (sometimes
more, breaking the contract), with 0..2 descriptors on some reads.
Invariants:

- ``feed`` returns messages or raises BrokerProtocolError, nothing else;
- fd accounting: after a successful feed every descriptor given so far is
  in exactly one returned Granted or still held for the frame in progress;
  after a raise, ``error.fds`` is exactly every descriptor not yet handed out;
- a well-formed frame read by the contract decodes to the message encoded.

Run (see fuzz/README.md)::

    python fuzz/fuzz_broker_protocol.py -max_total_time=300 fuzz/corpus/broker_protocol
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from typing import Any

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sockcreator"]):
    from sockcreator.broker._protocol import (
        MAX_BODY,
        AnswerDecoder,
        BrokerProtocolError,
        Denied,
        Fatal,
        FatalCode,
        Granted,
        Hello,
        HelloReply,
        Reason,
        Release,
        Released,
        RequestDecoder,
        ShareMode,
        SocketRequest,
        StatusEnd,
        StatusEntry,
        StatusQuery,
    )
    from sockcreator.client._protocol import SocketOptions, make_request

_ADDRS = [ipaddress.ip_address(a) for a in ("127.0.0.1", "0.0.0.0", "::1", "::")]


def _encode_back(m: Any) -> bytes:
    return bytes(m.encode())


def _frames(stream: bytes) -> list[bytes]:
    """Split into whole frames (the last may be cut short)."""
    out, pos = [], 0
    while len(stream) - pos >= 3:
        length = struct.unpack_from("!H", stream, pos + 1)[0]
        out.append(stream[pos : pos + 3 + length])
        pos += 3 + length
    if pos < len(stream):
        out.append(stream[pos:])
    return out


def _mutate(fdp: atheris.FuzzedDataProvider, frame: bytes) -> bytes:
    """Sometimes overwrite one byte of a well-formed frame (its fields' checks)."""
    if not frame or fdp.ConsumeIntInRange(0, 2):
        return frame
    i = fdp.ConsumeIntInRange(0, len(frame) - 1)
    return frame[:i] + bytes((fdp.ConsumeIntInRange(0, 255),)) + frame[i + 1 :]


def _request_piece(fdp: atheris.FuzzedDataProvider) -> bytes:
    return _mutate(fdp, _request_frame(fdp))


def _request_frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A frame built from fuzzed fields, or raw bytes."""
    kind = fdp.ConsumeIntInRange(0, 5)
    rid = fdp.ConsumeIntInRange(0, 2**32 - 1)
    if kind == 0:
        return bytes(Hello(fdp.ConsumeIntInRange(0, 2)).encode())
    if kind == 1:
        addr = _ADDRS[fdp.ConsumeIntInRange(0, len(_ADDRS) - 1)]
        proto = "tcp" if fdp.ConsumeBool() else "udp"
        opts = fdp.ConsumeIntInRange(0, 7) & (7 if addr.version == 6 else 5)
        req = make_request(proto, addr, fdp.ConsumeIntInRange(0, 65535), options=opts)
        share = list(ShareMode)[fdp.ConsumeIntInRange(0, 2)]
        name = "x" * fdp.ConsumeIntInRange(1 if share is ShareMode.SAMEAPP else 0, 64)
        listen = proto == "tcp" and fdp.ConsumeBool()
        backlog = fdp.ConsumeIntInRange(0, 65535) if listen else None
        return bytes(SocketRequest(rid, req, share, name, backlog).encode())
    if kind == 2:
        return bytes(Release(rid, fdp.ConsumeIntInRange(0, 2**64 - 1)).encode())
    if kind == 3:
        return bytes(StatusQuery(rid).encode())
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 60))


def check_requests(fdp: atheris.FuzzedDataProvider) -> None:
    stream = bytes(Hello().encode()) if fdp.ConsumeBool() else b""
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        stream += _request_piece(fdp)
    n_cuts = fdp.ConsumeIntInRange(0, 8)
    cuts = sorted({fdp.ConsumeIntInRange(0, len(stream)) for _ in range(n_cuts)})
    # The reference: frame by frame.
    ref, ref_error = [], False
    d = RequestDecoder()
    for frame in _frames(stream):
        try:
            got = d.feed(frame)
        except BrokerProtocolError:
            ref_error = True
            break
        if len(frame) >= 3 and len(frame) - 3 == struct.unpack_from("!H", frame, 1)[0]:
            assert len(got) == 1, (frame, got)
            assert _encode_back(got[0]) == frame, (frame, got[0])
            ref.append(got[0])
        else:
            assert got == []
    # Chunked.
    d = RequestDecoder()
    seen: list[Any] = []
    error = False
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        try:
            seen += d.feed(stream[a:b])
        except BrokerProtocolError:
            error = True
            break
        assert len(d._buf) < 3 + MAX_BODY, len(d._buf)
    assert error == ref_error, (error, ref_error)
    assert seen == ref[: len(seen)], (seen, ref)
    if not error:
        assert seen == ref


def _answer_frame(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, Any]:
    """(bytes, the message they encode, or None for raw bytes)."""
    kind = fdp.ConsumeIntInRange(0, 7)
    rid = fdp.ConsumeIntInRange(0, 2**32 - 1)
    addr = _ADDRS[fdp.ConsumeIntInRange(0, len(_ADDRS) - 1)]
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    port = fdp.ConsumeIntInRange(0, 65535)
    msg: Any
    if kind == 0:
        typ = socket.SOCK_STREAM if fdp.ConsumeBool() else socket.SOCK_DGRAM
        msg = Granted(
            rid, fdp.ConsumeIntInRange(0, 2**64 - 1), fam, typ, fdp.ConsumeBool(), addr, port
        )
    elif kind == 1:
        reason = list(Reason)[fdp.ConsumeIntInRange(0, len(Reason) - 1)]
        msg = Denied(rid, fdp.ConsumeIntInRange(0, 2**32 - 1), reason)
    elif kind == 2:
        msg = Released(rid)
    elif kind == 3:
        proto = "tcp" if fdp.ConsumeBool() else "udp"
        opts = fdp.ConsumeIntInRange(0, 7) & (7 if addr.version == 6 else 5)
        req = make_request(proto, addr, port, options=SocketOptions(opts))
        share = list(ShareMode)[fdp.ConsumeIntInRange(0, 2)]
        name = "n" * fdp.ConsumeIntInRange(0, 64)
        backlog = fdp.ConsumeIntInRange(0, 65535) if fdp.ConsumeBool() else None
        ids = [fdp.ConsumeIntInRange(0, 2**32 - 1) for _ in range(3)]
        msg = StatusEntry(rid, fdp.ConsumeIntInRange(0, 2**64 - 1), req, share, name, backlog, *ids)
    elif kind == 4:
        msg = StatusEnd(rid, fdp.ConsumeIntInRange(0, 2**32 - 1))
    elif kind == 5:
        msg = HelloReply(fdp.ConsumeIntInRange(0, 255), rid, fdp.ConsumeIntInRange(0, 65535))
    elif kind == 6:
        code = list(FatalCode)[fdp.ConsumeIntInRange(0, len(FatalCode) - 1)]
        msg = Fatal(code, fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40)))
    else:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 40)), None
    return bytes(msg.encode()), msg


def check_answers(fdp: atheris.FuzzedDataProvider) -> None:
    d = AnswerDecoder()
    next_fd = 1000
    held: set[int] = set()  # given to the decoder, not handed out yet
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        data, msg = _answer_frame(fdp)
        mutated = _mutate(fdp, data)
        data, msg = mutated, (msg if mutated == data else None)
        clean = d.idle  # a raw frame before may have left a frame unfinished
        pos, got = 0, []
        while pos < len(data):
            want = d.bytes_wanted()
            n = min(len(data) - pos, fdp.ConsumeIntInRange(1, max(1, want)))
            if fdp.ConsumeIntInRange(0, 15) == 0:
                n = min(len(data) - pos, want + 1)  # break the read contract
            nfds = 0
            if fdp.ConsumeIntInRange(0, 3) == 0 or (pos == 0 and isinstance(msg, Granted)):
                nfds = fdp.ConsumeIntInRange(0, 2) if fdp.ConsumeBool() else 1
            fds = list(range(next_fd, next_fd + nfds))
            next_fd += nfds
            try:
                out = d.feed(data[pos : pos + n], fds)
            except BrokerProtocolError as e:
                assert set(e.fds) == held | set(fds), (e.fds, held, fds)
                assert len(e.fds) == len(set(e.fds))
                return
            handed = [m.fd for m in out if isinstance(m, Granted)]
            after = d._fd
            assert sorted([*handed, *([after] if after != -1 else [])]) == sorted(held | set(fds))
            held = {after} if after != -1 else set()
            got += out
            pos += n
        if clean and msg is not None and not isinstance(msg, Fatal):
            assert len(got) == 1, (msg, got)
            m = got[0]
            if isinstance(m, Granted):
                m = Granted(m.id, m.grant, m.family, m.type, m.listening, m.address, m.port)
            assert m == msg, (m, msg)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        check_requests(fdp)
    else:
        check_answers(fdp)


def _requests_seed() -> bytes:
    req = make_request("tcp", "0.0.0.0", 80)
    frames = [
        Hello().encode(),
        SocketRequest(1, req, ShareMode.SAMEAPP, "web", 128).encode(),
        Release(2, 7).encode(),
        StatusQuery(3).encode(),
    ]
    return b"".join(bytes(f) for f in frames)


def replay_coverage(paths: list[str]) -> None:
    """Replay inputs under a line tracer; print how many lines of the two
    decoders (and the frame decoders they call) they reach."""
    import json

    from _linecov import replay

    import sockcreator.broker._protocol as bp

    functions = [
        *vars(bp.RequestDecoder).values(),
        *vars(bp.AnswerDecoder).values(),
        bp._decode_request,
        bp._decode_answer,
        bp._decode_grant,
        bp._decode_entry,
    ]
    print(json.dumps(replay(TestOneInput, paths, functions)))


def main() -> None:
    if sys.argv[1:2] == ["--coverage"]:
        replay_coverage(sys.argv[2:])
        return
    if sys.argv[1:2] == ["--seeds"]:  # write a small seed corpus
        os.makedirs(sys.argv[2], exist_ok=True)
        with open(os.path.join(sys.argv[2], "requests"), "wb") as f:
            body = _requests_seed()
            f.write(b"\x01" + len(body).to_bytes(2, "little") + body)
        return
    argv = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=1024")
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
