"""The floor under ``bench_broker.py``: the least a broker in Python can do.

    python benchmarks/floor_broker.py --socket PATH [--loop uvloop|asyncio] [--work-us N]
    python benchmarks/bench_broker.py --socket PATH --held 0 --drivers lean

Speaks just enough of the broker's wire protocol for ``bench_broker.py``'s
clients (hello, request, release) and does per grant only what no broker can
avoid: read the request, ask the real creator (hardened, as ``nobody`` when
started as root) for the socket, read its two-part answer, send the ``G``
frame with the descriptor, read the release, close the socket, send ``K``.
It checks nothing, keeps no policy and writes no audit log: it is not a
broker, only a measuring stick, as ``bench_creator.py``'s bare loop is for the
client library.  Whatever the real broker costs beyond this floor is its
own code; what this floor costs is Python, the event loop and the kernel.

Shared sockets (share ANY) are cached by port and counted, so the
``shared`` scenario needs no creator either.

``--work-us N`` spends N microseconds of CPU (a busy loop) on each grant
before its ``G`` frame goes out: a stand-in for what a real broker does per
grant, to see how the latency at a given rate depends on that cost alone.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from sockcreator.broker._protocol import grant_suffix
from sockcreator.client._channel import creator_argv, spawn

_HELLO_REPLY = b"H\x00\x07" + struct.pack("!BIH", 1, 1 << 20, 1024)
_G_HEAD = struct.Struct("!cHIQ")
_K = struct.Struct("!cHI")
_LOCAL = ipaddress.IPv4Address("127.0.0.1")


class Floor:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, creator: socket.socket, work: float = 0.0
    ) -> None:
        self.loop = loop
        self.work = work  # seconds of CPU to burn per grant
        self.creator = creator
        self.waiting: deque[tuple[socket.socket, int, int]] = deque()  # conn, id, port
        self.grants: dict[int, tuple[socket.socket, int]] = {}  # grant: socket, shared port
        self.shared: dict[int, list[Any]] = {}  # port: [socket, count]
        self.next_grant = 1
        self.got_s = False
        creator.setblocking(False)
        loop.add_reader(creator.fileno(), self.from_creator)

    def accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        buf = bytearray()
        self.loop.add_reader(conn.fileno(), self.from_client, conn, buf)

    def from_client(self, conn: socket.socket, buf: bytearray) -> None:
        data = conn.recv(4096)
        if not data:
            self.loop.remove_reader(conn.fileno())
            conn.close()
            return
        buf += data
        while len(buf) >= 3 and len(buf) >= 3 + int.from_bytes(buf[1:3], "big"):
            n = 3 + int.from_bytes(buf[1:3], "big")
            frame, buf[:n] = bytes(buf[:n]), b""
            kind = frame[:1]
            if kind == b"H":
                conn.send(_HELLO_REPLY)
            elif kind == b"Q":
                rid, port, share = struct.unpack_from("!I2xH1s", frame, 3)
                held = self.shared.get(port) if share == b"A" else None
                if held is not None:
                    held[1] += 1
                    self.grant(conn, rid, held[0], port, port)
                else:
                    self.waiting.append((conn, rid, port if share != b"A" else -port))
                    self.creator.send(b"SU4" + port.to_bytes(2, "big") + _LOCAL.packed)
            elif kind == b"R":
                rid, grant = struct.unpack_from("!IQ", frame, 3)
                sock, shared = self.grants.pop(grant)
                if shared:
                    held = self.shared[shared]
                    held[1] -= 1
                    if not held[1]:
                        del self.shared[shared]
                        sock.close()
                else:
                    sock.close()
                conn.send(_K.pack(b"K", 4, rid))

    def from_creator(self) -> None:
        while True:
            try:
                data, anc, _flags, _ = self.creator.recvmsg(
                    1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            if not data:
                raise SystemExit("the creator is gone")
            if not self.got_s:
                if data != b"S":
                    raise SystemExit(f"the creator refused: {data!r}")
                self.got_s = True
                continue
            self.got_s = False
            fd = struct.unpack("i", anc[0][2][:4])[0]
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0, fileno=fd)
            conn, rid, port = self.waiting.popleft()
            if port < 0:
                self.shared[-port] = [sock, 1]
            self.grant(conn, rid, sock, abs(port), max(0, -port))

    def grant(
        self, conn: socket.socket, rid: int, sock: socket.socket, port: int, shared: int
    ) -> None:
        if self.work:
            until = time.thread_time() + self.work
            while time.thread_time() < until:
                pass
        grant = self.next_grant
        self.next_grant += 1
        self.grants[grant] = (sock, shared)
        suffix = grant_suffix(socket.AF_INET, socket.SOCK_DGRAM, False, _LOCAL, port)
        frame = _G_HEAD.pack(b"G", 12 + len(suffix), rid, grant) + suffix
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", sock.fileno()))]
        conn.sendmsg([frame], rights)


async def serve(path: str, work: float) -> None:
    loop = asyncio.get_running_loop()
    user = "nobody" if os.geteuid() == 0 else None
    creator, proc = spawn(creator_argv(user=user))
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(512)
    listener.setblocking(False)
    floor = Floor(loop, creator, work)
    loop.add_reader(listener.fileno(), floor.accept, listener)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    print(f"floor broker on {path}, pid {os.getpid()}, creator {proc.pid}", flush=True)
    await stop
    creator.send(b"T")
    proc.wait(10)
    os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--socket", required=True, metavar="PATH")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument(
        "--work-us", type=float, default=0.0, metavar="N",
        help="burn N us of CPU per grant (a stand-in for a broker's own work)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.socket, args.work_us / 1e6))
    else:
        asyncio.run(serve(args.socket, args.work_us / 1e6))


if __name__ == "__main__":
    main()
