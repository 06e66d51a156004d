"""Shared test helpers: real processes, real namespaces, real users."""

from __future__ import annotations

import array
import atexit
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import pytest

from sockcreator.client._channel import CREATOR_PATH

IS_ROOT = os.geteuid() == 0
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
IP = shutil.which("ip") or "/usr/sbin/ip"

requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CI runs as root)")
requires_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux-only (/proc, namespaces, hardening)"
)


def fd_count(pid: int | None = None) -> int:
    """Open descriptors of ``pid`` (default: this process), from /proc."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def creator_argv(*creator_args: str) -> list[str]:
    """argv that runs our creator the safe way (python -I -S -B)."""
    return [sys.executable, "-I", "-S", "-B", CREATOR_PATH, *creator_args]


def netns_argv(argv: list[str]) -> list[str]:
    """Run ``argv`` in a fresh network namespace whose loopback is up.

    The sockets such a creator binds live in that namespace, so ports 53 and
    80 are free there; a client socket from the same creator can reach them."""
    script = f'{IP} link set lo up && exec "$0" "$@"'
    return [UNSHARE, "-n", "/bin/sh", "-c", script, *argv]


_public_creator: str | None = None


def public_creator_path() -> str:
    """A copy of creator.py that another user can read and run with
    /usr/bin/python3 (the checkout may sit under the 0700 /root).  Made once
    per test session, removed at exit."""
    global _public_creator
    if _public_creator is None:
        d = tempfile.mkdtemp(prefix="sockc-public-creator-")
        atexit.register(shutil.rmtree, d, True)
        os.chmod(d, 0o755)
        path = os.path.join(d, "creator.py")
        shutil.copyfile(CREATOR_PATH, path)
        os.chmod(path, 0o644)
        _public_creator = path
    return _public_creator


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except OSError:
        return 1024


TEST_USERS = ("sockc-alice", "sockc-bob", "sockc-carol")


def ensure_user(name: str) -> pwd.struct_passwd:
    """A real unprivileged user (created if missing; root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if not IS_ROOT:
        pytest.skip(f"user {name} missing and not root to create it")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


@pytest.fixture
def test_user() -> pwd.struct_passwd:
    return ensure_user(TEST_USERS[0])


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Assert this process's descriptor count is the same after the test."""
    before = fd_count()
    yield
    assert fd_count() == before, "descriptor leak in the test process"


# --- Driving a real creator at the byte level (tests of the creator program) ---

WIRE_INT = struct.Struct("@i")  # the errno in an 'E' answer: native C int
_ANCBUF = socket.CMSG_SPACE(8 * WIRE_INT.size)


def wire_request(proto: str, host: str, port: int) -> bytes:
    """An 'S' request built by hand from the seed's text (not by the library)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (
        b"S"
        + {"tcp": b"T", "udp": b"U"}[proto]
        + (b"6" if family == socket.AF_INET6 else b"4")
        + struct.pack("!H", port)
        + socket.inet_pton(family, host)
    )


def recv_with_fds(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    """One recvmsg of up to ``n`` bytes and the descriptors that came with them
    (close-on-exec); a truncated control message fails the test."""
    data, anc, flags, _ = sock.recvmsg(n, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, blob in anc:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS), (level, kind)
        fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    assert not flags & socket.MSG_CTRUNC, "control message truncated"
    return data, list(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


Answer = tuple[bytes, Union[socket.socket, int]]


def read_answer(sock: socket.socket) -> Answer:
    """Read one answer exactly: ``(b"S", socket)`` or ``(b"EB"|b"ES", errno)``.

    The descriptor must arrive alone, on the one data byte after the 'S', and
    nowhere else; anything else fails the test (and closes what arrived)."""
    status, fds = recv_with_fds(sock, 1)
    if fds:
        _close_all(fds)
        raise AssertionError(f"descriptor(s) on the status byte {status!r}")
    if status == b"S":
        data, fds = recv_with_fds(sock, 1)
        if len(data) != 1 or len(fds) != 1:
            _close_all(fds)
            raise AssertionError(f"'S' then {data!r} with {len(fds)} descriptors, not 1 and 1")
        return b"S", socket.socket(fileno=fds[0])
    if status == b"E":
        rest = b""
        while len(rest) < 1 + WIRE_INT.size:
            chunk, fds = recv_with_fds(sock, 1 + WIRE_INT.size - len(rest))
            if fds or not chunk:
                _close_all(fds)
                raise AssertionError(f"'E' answer cut short or with descriptors: {rest + chunk!r}")
            rest += chunk
        assert rest[:1] in (b"S", b"B"), rest
        return b"E" + rest[:1], WIRE_INT.unpack(rest[1:])[0]
    raise AssertionError(f"unexpected answer byte {status!r}")


def read_to_end(sock: socket.socket) -> tuple[bytes, int, str]:
    """Everything until the peer is gone: (data, descriptors seen, "EOF" or
    "RESET").  RESET means the peer exited with input it never read."""
    data, nfds = b"", 0
    while True:
        try:
            chunk, fds = recv_with_fds(sock, 4096)
        except ConnectionResetError:
            return data, nfds, "RESET"
        _close_all(fds)
        nfds += len(fds)
        if not chunk:
            return data, nfds, "EOF"
        data += chunk


class RawCreator:
    """A creator process (``argv``) with stdin and stdout on one end of a
    socketpair; the test holds the other end, :attr:`sock`.  stderr goes to
    a temporary file (:meth:`stderr_text`).  The environment is empty."""

    def __init__(
        self, argv: list[str], *, pass_fds: tuple[int, ...] = (), timeout: float = 10.0
    ) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=self._stderr,
                env={},
                pass_fds=pass_fds,
            )
        except BaseException:
            self.sock.close()
            self._stderr.close()
            raise
        finally:
            theirs.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, proto: str, host: str, port: int) -> Answer:
        self.sock.sendall(wire_request(proto, host, port))
        return read_answer(self.sock)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        self._stderr.close()

    def __enter__(self) -> RawCreator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_package_world_readable(base: Path) -> None:
    """The package copied into ``base/sockcreator``, everything world-readable
    (for processes of other users running Debian's python3 with PYTHONPATH=base:
    the test interpreter may live under the 0700 /root)."""
    import sockcreator

    shutil.copytree(Path(sockcreator.__file__).parent, base / "sockcreator",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for root, _dirs, files in os.walk(base):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def socket_in_netns(netns: str | int, family: int = socket.AF_INET,
                    kind: int = socket.SOCK_STREAM) -> socket.socket:  # fmt: skip
    """A socket made in another network namespace (a path such as
    /proc/PID/ns/net, or an open descriptor of one), by a thread that enters
    it: setns() changes the calling thread only."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if isinstance(netns, str) else netns
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
            made.append(socket.socket(family, kind))
        except BaseException as e:
            made.append(e)
        finally:
            if isinstance(netns, str):
                os.close(fd)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
