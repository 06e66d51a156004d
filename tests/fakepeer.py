"""A scripted fake socket creator, for driving clients down their error paths.

Two flavours, both speaking real bytes and real descriptors over a real Unix
stream socket (nothing is mocked):

:class:`FakePeer` runs a *script* in a thread of this process, on one end of a
socketpair; the other end (:attr:`FakePeer.client_socket`) goes to the client
under test, e.g. ``SocketCreator.from_socket(peer.client_socket)``::

    def script(p: PeerIO) -> None:
        req = p.read_request()          # a Request, "T", or None at EOF
        p.send_error("B", errno.EACCES)
        p.serve()                       # then answer everything for real until 'T'/EOF

    with FakePeer(script) as peer:
        c = SocketCreator.from_socket(peer.client_socket, timeout=2)
        ...
        c.terminate()
    assert peer.received == b"...T"     # every byte the script read, in order

Leaving the ``with`` block closes the peer's end and joins the thread,
re-raising any exception the script raised (so a script's own assertion
failures fail the test).  The peer's descriptors live in this process, so a
test measuring this process's descriptor count must measure outside the
``with`` block.  The client socket is the client's once handed over; if it is
never handed over, the ``with`` block closes it too.

:func:`fake_creator_command` is argv for a fake creator in a *subprocess*
(``SocketCreator(command=fake_creator_command(code))``): for tests about exit
statuses, killing and reaping.  ``code`` (dedented) runs after a prelude that
imports array, os, socket, sys and time and defines ``sock`` (fd 0, the
channel), ``read(n)`` (exactly n bytes unless EOF), ``send(b)``,
``send_fds(data, fds)`` and ``serve_one()`` (read one 'S' request and answer it
with a real bound socket; returns the request bytes, or None at EOF)::

    SocketCreator(command=fake_creator_command("read(9); os._exit(7)"), timeout=1)
"""

from __future__ import annotations

import array
import ipaddress
import socket
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

from sockcreator.client._protocol import INT, Request, make_request

__all__ = ["FakePeer", "PeerIO", "fake_creator_command", "parse_request"]


def parse_request(head: bytes, rest: bytes) -> Request:
    """A Request from the 5-byte head ('S' type family port) and the address bytes."""
    assert head[:1] == b"S", head
    proto = {b"T": "tcp", b"U": "udp"}[head[1:2]]
    addr = ipaddress.ip_address(rest)
    assert addr.version == int(head[2:3]), (head, rest)
    return make_request(proto, addr, int.from_bytes(head[3:5], "big"))


class PeerIO:
    """What a script gets: blocking reads and writes on the peer's end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes: exactly ``n`` unless EOF (or reset) came first."""
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError:  # ECONNRESET and friends: the client is gone
                chunk = b""
            if not chunk:
                break
            buf += chunk
        self.received += buf
        return buf

    def read_request(self) -> Request | str | None:
        """The next request: a Request for 'S', ``"T"`` for 'T', None at EOF."""
        cmd = self.read(1)
        if not cmd:
            return None
        if cmd == b"T":
            return "T"
        head = cmd + self.read(4)
        assert len(head) == 5, f"short request {head!r}"
        rest = self.read(4 if head[2:3] == b"4" else 16)
        return parse_request(head, rest)

    def read_until_eof(self) -> bytes:
        out = b""
        while chunk := self.read(4096):
            out += chunk
        return out

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """``data`` with ``fds`` (SCM_RIGHTS) on its first byte.  The fds stay ours.

        A client that already gave up (EPIPE/ECONNRESET) is not the script's error."""
        try:
            if fds:
                rights = array.array("i", fds).tobytes()
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def make_socket(self, request: Request) -> socket.socket:
        """A real socket bound as ``request`` asks (what a creator would send)."""
        s = socket.socket(request.family, request.type)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if request.family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((str(request.address), request.port))
        except BaseException:
            s.close()
            raise
        return s

    def send_socket(self, request: Request) -> None:
        """A correct 'S' answer: b"S", then one byte carrying the socket."""
        with self.make_socket(request) as s:
            self.send(b"S")
            self.send(b"\0", [s.fileno()])

    def send_error(self, stage: str, errno: int) -> None:
        """An 'E' answer; ``stage`` is "S" (socket) or "B" (bind)."""
        self.send(b"E" + stage.encode() + INT.pack(errno))

    def serve(self, handler: Callable[[PeerIO, Request], None] | None = None) -> None:
        """Answer requests (with ``handler``, default a correct socket) until 'T' or EOF."""
        while True:
            req = self.read_request()
            if not isinstance(req, Request):
                return
            (handler or PeerIO.send_socket)(self, req)


class FakePeer:
    """A thread running ``script(PeerIO)`` on the far end of a socketpair.

    ``script=None`` means :meth:`PeerIO.serve` (a correct creator).  After
    the script returns, the peer's end is closed (the client sees EOF).
    """

    def __init__(self, script: Callable[[PeerIO], None] | None = None) -> None:
        self.client_socket, self._peer_socket = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM
        )
        self.io = PeerIO(self._peer_socket)
        self._script = script or PeerIO.serve
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fakepeer")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._script(self.io)
        except BaseException as e:
            self._error = e
        finally:
            self._peer_socket.close()

    @property
    def received(self) -> bytes:
        """Every byte the script has read so far."""
        return bytes(self.io.received)

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the script to end; re-raise its exception if it raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("fake peer script did not finish")
        if self._error is not None:
            raise self._error

    def __enter__(self) -> FakePeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Wake a script blocked on read: shut the peer's end down for reading.
        # (Closing client_socket would be wrong: the client under test owns it.)
        try:
            self._peer_socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._thread.join(10.0)
        if exc_type is None:
            self.join(0)


_PRELUDE = """
import array, os, socket, sys, time
sock = socket.socket(fileno=0)

def read(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf

def send(b):
    sock.sendall(b)

def send_fds(data, fds):
    rights = array.array("i", fds).tobytes()
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

def serve_one():
    head = read(5)
    if len(head) < 5:
        return None
    fam = socket.AF_INET if head[2:3] == b"4" else socket.AF_INET6
    addr = read(4 if fam == socket.AF_INET else 16)
    typ = socket.SOCK_STREAM if head[1:2] == b"T" else socket.SOCK_DGRAM
    s = socket.socket(fam, typ)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((socket.inet_ntop(fam, addr), int.from_bytes(head[3:5], "big")))
    send(b"S")
    send_fds(b"\\0", [s.fileno()])
    s.close()
    return head + addr
"""


def fake_creator_command(code: str) -> list[str]:
    """argv running ``code`` as a fake creator on fd 0/1 (see the module doc)."""
    return [sys.executable, "-c", _PRELUDE + "\n" + textwrap.dedent(code)]
