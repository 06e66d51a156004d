"""PROGRAM for the interception tests: run by Debian's python3 as an
unprivileged user under ``sockcreator run --intercept``; does one case of
binds and prints one JSON object (what each bind returned, and the state of
the socket after it).  Only the standard library: nothing of ours."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading

libc = ctypes.CDLL("libc.so.6", use_errno=True)


def attempt(fn) -> object:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def raw_bind(fd: int, addr: bytes, length: int | None = None) -> object:
    """bind(2) itself, with any bytes (and length) we like."""
    buf = ctypes.create_string_buffer(addr, len(addr))
    r = libc.bind(fd, buf, len(addr) if length is None else length)
    return 0 if r == 0 else errno.errorcode[ctypes.get_errno()]


def sockaddr_in(port: int, host: str = "127.0.0.1") -> bytes:
    return (
        socket.AF_INET.to_bytes(2, sys.byteorder)
        + port.to_bytes(2, "big")
        + socket.inet_aton(host)
        + bytes(8)
    )


def state(s: socket.socket) -> dict[str, object]:
    flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
    return {
        "name": list(s.getsockname()[:2]),
        "nonblock": bool(flags & os.O_NONBLOCK),
        "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "reuseaddr": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
    }


def fidelity() -> dict[str, object]:
    out: dict[str, object] = {}
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setblocking(False)
    out["bind"] = attempt(lambda: s.bind(("127.0.0.1", 80)))
    out["state"] = state(s)
    out["again"] = attempt(lambda: s.bind(("127.0.0.1", 80)))  # already bound: EINVAL
    s.listen(8)
    t = socket.socket()  # the port is held (and t has no SO_REUSEPORT)
    out["in_use"] = attempt(lambda: t.bind(("127.0.0.1", 80)))
    u = socket.socket()  # reuseport group: both set it, same user
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    out["reuseport_group"] = attempt(lambda: u.bind(("127.0.0.1", 80)))
    out["denied"] = attempt(lambda: socket.socket().bind(("127.0.0.1", 81)))
    out["unprivileged"] = attempt(lambda: socket.socket().bind(("127.0.0.1", 8080)))
    out["port0"] = attempt(lambda: socket.socket().bind(("127.0.0.1", 0)))
    r, _w = os.pipe()
    out["enotsock"] = raw_bind(r, sockaddr_in(80))
    out["ebadf"] = raw_bind(999, sockaddr_in(80))
    keep = socket.socket()
    libc.bind(keep.fileno(), ctypes.c_void_p(16), 16)  # an address we cannot read
    out["efault"] = errno.errorcode[ctypes.get_errno()]
    out["einval_len"] = raw_bind(keep.fileno(), sockaddr_in(80), 8)
    unspec = bytes(2) + (443).to_bytes(2, "big") + bytes(12)  # AF_UNSPEC, 0.0.0.0:443
    old_style = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out["unspec_any"] = raw_bind(old_style.fileno(), unspec)
    old_style.close()  # (443 is the dual-stack case's, below)
    six = socket.socket(socket.AF_INET6)  # an IPv4 sockaddr on an IPv6 socket
    out["wrong_family"] = raw_bind(six.fileno(), sockaddr_in(80))
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    out["dualstack"] = attempt(lambda: v6.bind(("::", 443)))
    out["dualstack_v6only"] = v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out["udp"] = attempt(lambda: d.bind(("127.0.0.1", 53)))
    fb = socket.socket()
    fb.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
    out["freebind"] = attempt(lambda: fb.bind(("192.0.2.1", 80)))  # not local: needs it
    return out


def origins() -> dict[str, object]:
    """Binds from a thread, a forked child and an exec'd grandchild."""
    out: dict[str, object] = {}
    res: list[object] = []
    th = threading.Thread(
        target=lambda: res.append(attempt(lambda: socket.socket().bind(("127.0.0.1", 80))))
    )
    th.start()
    th.join()
    out["thread"] = res[0]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(attempt(lambda: socket.socket().bind(("127.0.0.2", 80)))).encode())
        os._exit(0)
    os.close(w)
    out["fork"] = json.loads(os.read(r, 100))
    os.waitpid(pid, 0)
    code = "import socket; s=socket.socket(); s.bind(('127.0.0.3', 80)); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out["exec"] = done.stdout.strip() or done.stderr.strip().splitlines()[-1]
    # a program in a user and network namespace of its own binds there itself
    ns = subprocess.run(["unshare", "-rn", sys.executable, "-c", code], capture_output=True,
                        text=True)  # fmt: skip
    out["own_netns"] = ns.stdout.strip() or ns.stderr.strip().splitlines()[-1:]
    # a signal while a bind waits for the supervisor (SA_RESTART and not)
    for restart in (True, False):
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.siginterrupt(signal.SIGALRM, not restart)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        base = 4 if restart else 9
        got = []
        for i in range(5):
            s = socket.socket()
            first = attempt(lambda s=s, i=base + i: s.bind((f"127.0.0.{i}", 80)))
            if first == "EINTR":  # nothing was done: the same socket binds on a retry
                again = attempt(lambda s=s, i=base + i: s.bind((f"127.0.0.{i}", 80)))
                first = f"EINTR, then {again}"
            got.append(first)
        signal.setitimer(signal.ITIMER_REAL, 0)
        out[f"signal_restart_{restart}"] = got
    return out


def many(n: int) -> dict[str, object]:
    """A resolver's pattern: many unprivileged binds (the CONTINUE path)."""
    bad = 0
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if attempt(lambda s=s: s.bind(("127.0.0.1", 0))) is not None:
                bad += 1
    return {"failed": bad}


if __name__ == "__main__":
    case = sys.argv[1]
    result = {"fidelity": fidelity, "origins": origins}.get(case)
    print(json.dumps(result() if result else many(int(sys.argv[2]))), flush=True)
