"""An oracle for the creator program: run it on one input, check every invariant.

Shared by the atheris harness (``fuzz_creator.py``) and the hypothesis
property tests (``tests/test_fuzz_properties.py``).  It drives the REAL
creator (``python -I -S -B creator.py``, empty environment) over a real
socketpair and checks its behaviour against :func:`model`, a reference
reading of the protocol written here from the documentation, independent of
both creator.py and the library's ``_protocol``:

- the output is exactly the answers the model predicts, in order: for each
  complete request 'S' + one data byte carrying exactly one descriptor, or
  'E' ('S'|'B') errno[native int]; a request the policy refuses is exactly
  'E' 'B' EPERM; an invalid request ends with 'F' 'I' and nothing after it;
- every received socket is what was asked for (family, type, address, port,
  SO_REUSEADDR, IPV6_V6ONLY, the 'P' options), is not listening, and is closed;
- the exit status is the documented one (0 after 'T', 10 at EOF, 12 after
  'F' 'I'), never a signal, never 13 (internal error);
- stderr holds only "sockcreator-creator: ..." lines (never a traceback):
  one "denied ..." line per refused request, "invalid input" iff 'F' 'I';
- no hang: every wait is bounded (:data:`TIMEOUT`), and overrunning it is a
  violation;
- descriptors: while it waits for more input the creator holds exactly 0, 1
  and 2, whatever we sent it (including descriptors of our own); this
  process's count is the caller's to check (see ``fuzz_creator.py``).

Any violation raises :class:`InvariantViolation` with a description.
"""

from __future__ import annotations

import array
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sockcreator.client._channel import CREATOR_PATH

__all__ = [
    "CONFIGS",
    "TIMEOUT",
    "Config",
    "Expected",
    "InvariantViolation",
    "Outcome",
    "Spawned",
    "model",
    "run_input",
    "spawn",
]

TIMEOUT = 10.0  # seconds: any wait longer than this is a hang
INT = struct.Struct("@i")
EPERM = 1
EXIT_OK, EXIT_READ, EXIT_PROTOCOL = 0, 10, 12
PREFIX = "sockcreator-creator: "
TRACER = str(Path(__file__).resolve().with_name("_traced_creator.py"))
COV_MARK = b"\0COV "
_ANCBUF = socket.CMSG_SPACE(8 * INT.size)
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT = 23, 0
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)


class InvariantViolation(AssertionError):
    """The creator broke one of the invariants in the module docstring."""


# --- The policy used by the "policy" configurations, as plain predicates ---
# (the same rules are passed to the creator as --allow specs below)


def _policy_allows(kind: str, family: int, addr: bytes, port: int, flags: int = 0) -> bool:
    """The policy, with the creator's IPv4 rule for IPv6 sockets that take
    IPv4 traffic: a mapped address, or :: with V6ONLY off (flag 2)."""
    takes_ipv4 = addr[:12] == bytes(10) + b"\xff\xff" or (flags & 2 and not any(addr))
    if family == 6 and takes_ipv4 and not _policy_allows(kind, 4, addr[12:], port):
        return False
    v4 = family == 4
    if kind == "tcp" and v4 and addr == bytes([127, 0, 0, 1]) and 1 <= port <= 1024:
        return True
    if kind == "udp" and not v4 and addr == bytes(15) + b"\1" and port == 53:
        return True
    if 8000 <= port <= 8080:
        return True
    return kind == "udp" and v4 and addr == bytes(4) and port == 0


POLICY_ARGS = [
    "--allow",
    "tcp:127.0.0.1:1-1024",
    "--allow",
    "udp:[::1]:53",
    "--allow",
    "*:*:8000-8080",
    "--allow",
    "udp:0.0.0.0:0",
]


@dataclass(frozen=True)
class Config:
    name: str
    args: tuple[str, ...]
    policy: bool  # True: _policy_allows applies; False: everything allowed


NOBODY = ("--uid", "65534", "--gid", "65534")
CONFIGS = (
    Config("allow-all,no-harden", ("--allow-all", "--no-harden"), False),
    Config("allow-all,hardened", ("--allow-all",), False),
    Config("policy,hardened,nobody", (*POLICY_ARGS, *NOBODY), True),
    Config("policy,no-harden", (*POLICY_ARGS, "--no-harden"), True),
)


# --- The reference model ---


@dataclass(frozen=True)
class Req:
    kind: str  # "tcp" | "udp"
    family: int  # 4 | 6
    port: int
    addr: bytes
    flags: int  # 0 for 'S'

    def __str__(self) -> str:
        host = ipaddress.ip_address(self.addr)
        return f"{self.kind}:{host}:{self.port} flags={self.flags}"


@dataclass
class Expected:
    """What the creator must do with an input."""

    requests: list[tuple[Req, bool]]  # each complete valid request, and "allowed"
    end: str  # "eof" (exit 10), "T" (exit 0) or "invalid" ('F' 'I', exit 12)
    mid_request: bool = False  # for "eof": the input stopped inside a request

    @property
    def status(self) -> int:
        return {"eof": EXIT_READ, "T": EXIT_OK, "invalid": EXIT_PROTOCOL}[self.end]


def model(data: bytes, policy: bool) -> Expected:
    """What the protocol says the creator does with ``data`` followed by EOF."""
    reqs: list[tuple[Req, bool]] = []
    pos = 0
    n = len(data)
    while True:
        if pos >= n:
            return Expected(reqs, "eof")
        cmd = data[pos : pos + 1]
        if cmd == b"T":
            return Expected(reqs, "T")
        if cmd not in (b"S", b"P"):
            return Expected(reqs, "invalid")
        # The shortest 'S' is 9 bytes and the shortest 'P' 10: the creator
        # judges type and family only once that much is in.
        if pos + (9 if cmd == b"S" else 10) > n:
            return Expected(reqs, "eof", True)
        kind = {b"T": "tcp", b"U": "udp"}.get(data[pos + 1 : pos + 2])
        if kind is None:
            return Expected(reqs, "invalid")
        family = {b"4": 4, b"6": 6}.get(data[pos + 2 : pos + 3])
        if family is None:
            return Expected(reqs, "invalid")
        size = 3 + 2 + (4 if family == 4 else 16) + (1 if cmd == b"P" else 0)
        if pos + size > n:
            return Expected(reqs, "eof", True)
        port = int.from_bytes(data[pos + 3 : pos + 5], "big")
        addr = data[pos + 5 : pos + 5 + (4 if family == 4 else 16)]
        flags = data[pos + size - 1] if cmd == b"P" else 0
        if flags & ~15 or (flags & 2 and family == 4):
            return Expected(reqs, "invalid")
        req = Req(kind, family, port, addr, flags)
        reqs.append((req, not policy or _policy_allows(kind, family, addr, port, flags)))
        pos += size


# --- Running the real creator ---


@dataclass
class Spawned:
    """A creator process on one end of a socketpair; stderr in a memfd."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    stderr_fd: int
    config: Config

    def discard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        os.close(self.stderr_fd)


def spawn(
    config: Config,
    *,
    traced: bool = False,
    wrap: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> Spawned:
    """Start the real creator for ``config`` (under the line tracer if
    ``traced``), prefixed by ``wrap`` (e.g. a new network namespace: it must
    exec, keeping the pid).  ``argv`` replaces the creator (tests of this oracle)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    err = os.memfd_create("creator-stderr", os.MFD_CLOEXEC)
    if argv is None:
        argv = [sys.executable, "-I", "-S", "-B"]
        argv += [TRACER, CREATOR_PATH] if traced else [CREATOR_PATH]
        argv += [*config.args, "--parent", str(os.getpid())]
    try:
        proc = subprocess.Popen(
            [*wrap, *argv], stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=err, env={}
        )
    except BaseException:
        ours.close()
        os.close(err)
        raise
    finally:
        theirs.close()
    ours.settimeout(TIMEOUT)
    return Spawned(proc, ours, err, config)


@dataclass
class Outcome:
    """What happened (for statistics and coverage)."""

    status: int
    answers: list[str]  # "S", "ES<errno>", "EB<errno>", "deny"
    edges: set[int] = field(default_factory=set)
    stderr_lines: list[str] = field(default_factory=list)


def _fail(what: str) -> InvariantViolation:
    return InvariantViolation(what)


def _recv(sock: socket.socket, n: int) -> tuple[bytes, list[int], int]:
    try:
        data, anc, flags, _ = sock.recvmsg(n, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise _fail(f"hang: no output from the creator within {TIMEOUT}s") from None
    except ConnectionResetError:
        return b"", [], 0
    fds = array.array("i")
    for level, kind, blob in anc:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    return data, list(fds), flags


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _read_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        data, fds, flags = _recv(sock, n - len(buf))
        if fds or flags & socket.MSG_CTRUNC:
            _close(fds)
            raise _fail(f"descriptor(s) inside {what} {buf + data!r}")
        if not data:
            raise _fail(f"EOF inside {what} after {buf!r}")
        buf += data
    return buf


def _check_socket(sock: socket.socket, req: Req) -> None:
    fam = socket.AF_INET if req.family == 4 else socket.AF_INET6
    typ = socket.SOCK_STREAM if req.kind == "tcp" else socket.SOCK_DGRAM
    got = (sock.family, sock.type)
    if got != (fam, typ):
        raise _fail(f"asked for {req}, got {got}")
    host, port = sock.getsockname()[:2]
    if socket.inet_pton(fam, host.partition("%")[0]) != req.addr:
        raise _fail(f"asked for {req}, bound to {host}")
    if req.port and port != req.port:
        raise _fail(f"asked for {req}, bound to port {port}")
    opt = sock.getsockopt
    if bool(opt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) == bool(req.flags & 8):
        raise _fail(f"{req}: SO_REUSEADDR does not match the flags (8: not set)")
    if opt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise _fail(f"{req}: the socket is listening")
    if bool(opt(socket.SOL_SOCKET, SO_REUSEPORT)) != bool(req.flags & 1):
        raise _fail(f"{req}: SO_REUSEPORT does not match the flags")
    if bool(opt(socket.IPPROTO_IP, IP_FREEBIND)) != bool(req.flags & 4):
        raise _fail(f"{req}: IP_FREEBIND does not match the flags")
    if req.family == 6:
        v6only = opt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        # Linux turns IPV6_V6ONLY on itself when binding a specific address that
        # is not v4-mapped: DUALSTACK leaves it off only for :: and ::ffff:a.b.c.d.
        addr = ipaddress.IPv6Address(req.addr)
        dual = req.flags & 2 and (addr.is_unspecified or addr.ipv4_mapped is not None)
        if bool(v6only) == bool(dual):
            raise _fail(f"{req}: IPV6_V6ONLY is {v6only}")
        if req.kind == "udp":
            pmtu = opt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER)
            if pmtu != IPV6_PMTUDISC_DONT:
                raise _fail(f"{req}: IPV6_MTU_DISCOVER is {pmtu}, not DONT")


def _read_answer(sock: socket.socket, req: Req, allowed: bool) -> str:
    status, fds, flags = _recv(sock, 1)
    if fds or flags & socket.MSG_CTRUNC:
        _close(fds)
        raise _fail(f"descriptor(s) on the status byte {status!r} for {req}")
    if status == b"S":
        if not allowed:
            raise _fail(f"'S' for {req}, which the policy refuses")
        data, fds, flags = _recv(sock, 1)
        if len(data) != 1 or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            _close(fds)
            raise _fail(f"'S' then {data!r} with {len(fds)} descriptors (flags {flags:#x})")
        with socket.socket(fileno=fds[0]) as s:
            _check_socket(s, req)
        return "S"
    if status == b"E":
        rest = _read_exact(sock, 1 + INT.size, "an 'E' answer")
        stage, err = rest[:1], INT.unpack(rest[1:])[0]
        if stage not in (b"S", b"B") or not 0 < err < 4096:
            raise _fail(f"bad 'E' answer {rest!r} for {req}")
        if not allowed:
            if (stage, err) != (b"B", EPERM):
                raise _fail(f"refused {req} answered E{stage!r} {err}, not EB EPERM")
            return "deny"
        if (stage, err) == (b"B", EPERM):
            raise _fail(f"allowed {req} answered EB EPERM")
        return f"E{stage.decode()}{err}"
    if not status:
        raise _fail(f"EOF where the answer to {req} was due")
    raise _fail(f"unknown answer byte {status!r} for {req}")


def _read_rest(sock: socket.socket) -> bytes:
    out = b""
    while True:
        data, fds, _ = _recv(sock, 4096)
        if fds:
            _close(fds)
            raise _fail(f"descriptor(s) after the last answer, with {data!r}")
        if not data:
            return out
        out += data


def _wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise _fail(f"hang: the creator did not exit within {TIMEOUT}s") from None


# Idle between requests: the command byte is read with recvmsg (it may carry
# a descriptor, for 'B'); the fields after it with recvfrom.
_RECVFROM = {"x86_64": ("45", "47"), "aarch64": ("207", "212")}.get(os.uname().machine)


def _wait_idle(proc: subprocess.Popen[bytes]) -> bool:
    """Until ``proc`` is blocked reading fd 0 (/proc/PID/syscall), i.e.
    done with every request so far.  False if this cannot be seen here."""
    if _RECVFROM is None:
        return False
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _fail(f"exited {proc.returncode} while its input was still open")
        try:
            with open(f"/proc/{proc.pid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            return False
        if fields[:1] and fields[0] in _RECVFROM and fields[1:2] == ["0x0"]:
            return True
        time.sleep(0.0002)
    raise _fail(f"hang: the creator did not come back to reading within {TIMEOUT}s")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stderr(fd: int) -> tuple[list[str], set[int]]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    raw = b"".join(chunks)
    edges: set[int] = set()
    lines = []
    for line in raw.split(b"\n"):
        if line.startswith(COV_MARK):
            edges.update(int(x) for x in line[len(COV_MARK) :].split(b",") if x)
        elif line:
            lines.append(line.decode("utf-8", "replace"))
    return lines, edges


def run_input(sp: Spawned, data: bytes, pass_fds: Sequence[int] = ()) -> Outcome:
    """Feed ``data`` (with ``pass_fds`` attached, if any) to the spawned creator,
    then EOF; check everything.  Always reaps the process and closes ``sp``."""
    try:
        return _run(sp, data, pass_fds)
    finally:
        sp.discard()


def _run(sp: Spawned, data: bytes, pass_fds: Sequence[int]) -> Outcome:
    exp = model(data, sp.config.policy)
    sock = sp.sock
    try:
        if data and pass_fds:  # descriptors of ours ride on the first byte
            rights = array.array("i", pass_fds).tobytes()
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            sock.sendall(data[sent:])
        elif data:
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # it may already have exited (after 'T' or 'F' 'I'): the checks below tell
    except TimeoutError:
        raise _fail("hang: the creator stopped reading its input") from None
    answers = [_read_answer(sock, req, allowed) for req, allowed in exp.requests]
    if exp.end == "eof":
        # Once it is blocked reading its input again, only 0, 1 and 2 are open.
        if _wait_idle(sp.proc):
            n = fd_count(sp.proc.pid)
            if n != 3:
                raise _fail(f"creator holds {n} descriptors while idle, not 3")
        sock.shutdown(socket.SHUT_WR)
    rest = _read_rest(sock)
    want = b"FI" if exp.end == "invalid" else b""
    if rest != want:
        raise _fail(f"after the answers: {rest!r}, expected {want!r} ({exp.end})")
    status = _wait(sp.proc)
    lines, edges = _stderr(sp.stderr_fd)
    if status != exp.status:
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
        raise _fail(f"creator ended with {how}, expected {exp.status}; stderr {lines!r}")
    bad = [ln for ln in lines if not ln.startswith(PREFIX) or "Traceback" in ln]
    if bad:
        raise _fail(f"stderr lines that are not the creator's diagnostics: {bad!r}")
    denied = sum(1 for ln in lines if ln.startswith(PREFIX + "denied "))
    if denied != answers.count("deny"):
        raise _fail(f"{denied} 'denied' lines for {answers.count('deny')} refusals")
    invalid = any(ln.startswith(PREFIX + "invalid input") for ln in lines)
    if invalid != (exp.end == "invalid"):
        raise _fail(f"'invalid input' logged: {invalid}, but the input ends {exp.end}")
    cut = any(ln.startswith(PREFIX + "end of input inside") for ln in lines)
    if cut and not (exp.end == "eof" and exp.mid_request):  # (not always logged when it is)
        raise _fail("'end of input inside a request' logged, but the input ended between requests")
    return Outcome(status, answers, edges, lines)
