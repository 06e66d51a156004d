"""The link between the broker and its creator factory, each side against a
real peer on a real SOCK_SEQPACKET socketpair (no root needed): the broker
takes only a well-formed answer, and the factory's limit on live creators
holds.  The factory as a process, as root: test_broker_widen.py."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable

import pytest

from sockcreator.broker._factory import MAX_LIVE, Factory, FactoryError, Spawned, _serve_one

HEADER = struct.Struct("!cII")


def _ask(answer: Callable[[socket.socket], None]) -> tuple[Spawned | FactoryError, str | None]:
    """The broker's side asks; ``answer`` plays the factory.  The result,
    and whether the broker then takes the factory for gone (why)."""

    async def main() -> tuple[Spawned | FactoryError, str | None]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        factory = Factory(ours, os.getpid())  # (reaping our own pid: ECHILD, "gone")
        factory.attach()
        task = asyncio.ensure_future(factory.spawn(timeout=10))
        await asyncio.sleep(0)
        assert theirs.recv(16) == b"R"
        answer(theirs)
        try:
            result: Spawned | FactoryError = await task
        except FactoryError as e:
            result = e
        await asyncio.sleep(0.01)  # (anything else the link says is read by now)
        gone = factory.gone
        await factory.close()
        theirs.close()
        return result, gone

    return asyncio.run(main())


def _rights(fd: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def test_a_well_formed_answer_is_a_creator_channel() -> None:
    a, b = socket.socketpair()
    allow = ["tcp:*:80-80"]
    payload = json.dumps(allow).encode()
    result, gone = _ask(
        lambda s: s.sendmsg([HEADER.pack(b"C", 1234, len(payload)) + payload], _rights(a.fileno()))
    )
    a.close()
    assert isinstance(result, Spawned), result
    assert (result.pid, result.allow) == (1234, allow)
    result.sock.send(b"x")
    assert b.recv(1) == b"x"  # the very socket that was passed
    result.sock.close()
    b.close()
    assert gone is None


def test_an_error_answer_keeps_the_link() -> None:
    text = b"/etc/x.toml is not root's alone"
    result, gone = _ask(lambda s: s.send(HEADER.pack(b"E", 0, len(text)) + text))
    assert isinstance(result, FactoryError) and str(result) == text.decode()
    assert gone is None  # a refusal, not a broken factory


@pytest.mark.parametrize(
    "case", ["short", "length", "no-fd", "two-fds", "pipe", "bad-json", "empty-list", "E+fd"]
)
def test_a_malformed_answer_is_refused_and_ends_the_link(case: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    a, b = socket.socketpair()
    r, w = os.pipe()
    ok = json.dumps(["tcp:*:80-80"]).encode()

    def answer(s: socket.socket) -> None:
        fd = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a.fileno()]).tobytes())]
        msg, anc = {
            "short": (b"C\0\0", fd),
            "length": (HEADER.pack(b"C", 1, len(ok) + 1) + ok, fd),
            "no-fd": (HEADER.pack(b"C", 1, len(ok)) + ok, []),
            "two-fds": (
                HEADER.pack(b"C", 1, len(ok)) + ok,
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a.fileno(), r]))],
            ),
            "pipe": (HEADER.pack(b"C", 1, len(ok)) + ok, _rights(r)),
            "bad-json": (HEADER.pack(b"C", 1, 3) + b"[1,", fd),
            "empty-list": (HEADER.pack(b"C", 1, 2) + b"[]", fd),
            "E+fd": (HEADER.pack(b"E", 0, 2) + b"no", fd),
        }[case]
        s.sendmsg([msg], anc)

    result, gone = _ask(answer)
    assert isinstance(result, FactoryError), result
    assert str(result) == "the creator factory sent a malformed answer"
    assert gone == "it sent a malformed answer"
    for s in (a, b):
        s.close()
    os.close(r)
    os.close(w)
    # what came with the answer was closed, and so was the link
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_factory_exiting_is_an_error_and_the_end_of_the_link() -> None:
    result, gone = _ask(lambda s: s.close())
    assert isinstance(result, FactoryError) and "exited" in str(result)
    assert gone == "it exited"


def test_no_creator_while_max_live_of_the_factorys_are_running() -> None:
    """The limit comes before anything is read or started."""
    live = {}
    for _ in range(MAX_LIVE):
        p = subprocess.Popen(["sleep", "30"])
        live[p.pid] = p
    try:
        answer, sock = _serve_one("/nonexistent/policy.toml", "nobody", live)
    finally:
        for p in live.values():
            p.kill()
            p.wait()
    assert sock is None
    kind, pid, n = HEADER.unpack(answer[: HEADER.size])
    assert (kind, pid) == (b"E", 0)
    assert answer[HEADER.size :] == f"{MAX_LIVE} creators it started are still running".encode()
    assert n == len(answer) - HEADER.size
