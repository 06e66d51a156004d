"""sockcreator's privileged socket creator: BIND 10's b10-sockcreator, in Python.

Run only as ``python -I -S -B creator.py [OPTIONS]`` with an empty environment
and stdin and stdout both the same Unix stream socket.  It imports nothing but
the standard library and no other file of this package.

Threat model
------------
The peer on stdin/stdout is unprivileged and may be compromised: it may send
any bytes, stall, vanish or pass descriptors.  This process keeps the one
right the peer lacks (CAP_NET_BIND_SERVICE) and must not lend out any other.
Therefore: nothing from the environment, sys.path or site-packages is trusted
(-I -S -B, empty env); every read has a fixed length; dispatch is an
allow-list and anything else is fatal ('F' 'I', exit); descriptors sent to us
are discarded (no ancillary buffer); every other inherited descriptor is
closed.  On Linux, before the first request, the process drops to the target
uid/gid, keeps only CAP_NET_BIND_SERVICE, sets no_new_privs and PDEATHSIG,
and installs a seccomp filter that allows only the loop's system calls and
socket() for AF_INET/AF_INET6 stream/datagram.  An allow-list policy given at
start is enforced here, because only here does enforcing it mean anything.
Not in scope: a peer that already shares our uid (it can ptrace us unless
the uid differs or ptrace is restricted), and kernel bugs.

Requests (fixed length; anything else is answered 'F' 'I', then exit 12)::

    'T'                                          terminate (no answer)
    'S' ('T'|'U') ('4'|'6') port[2] addr[4|16]   BIND 10's request, byte for byte
    'P' ('T'|'U') ('4'|'6') port[2] addr[4|16] flags[1]
        as 'S', plus options set before bind(): 1 SO_REUSEPORT, 2 IPV6_V6ONLY
        off (family '6' only), 4 IP_FREEBIND, 8 no SO_REUSEADDR (which 'S'
        always sets: without it the kernel refuses to co-bind another socket
        to an overlapping address and port, which is how a broker makes an
        exclusive UDP socket)

    'B' ('4'|'6') port[2] addr[4|16], with exactly one descriptor on the 'B'
        byte (SCM_RIGHTS): bind the peer's own socket (``run --intercept``)

Reads: the command byte alone (a 'T' must leave what follows it unread, and
'B' needs recvmsg for its descriptor), then every 'S' in one read of 8 bytes
(type, family, port, and the first 4 address bytes) and every 'P' in one of
9: the shortest 'S' request is 9 bytes ('S' 'T' '4' port[2] addr[4]) and the
shortest 'P' 10, so these bytes belong to the current request whatever they
turn out to say, and no read ever reaches past it.  An IPv4 request is then
complete (2 reads, where BIND 10's creator takes 4); an IPv6 one takes 12
bytes more, the rest of its address and its 'P' byte (3 reads).  Type and
family are judged once the 8 (or 9) bytes are in: a request that breaks off
before them waits, or at EOF ends with status 10, as BIND 10's creator does
for a type byte whose family byte never comes.  'B' reads family, port and
address as before.

The policy sees every address a socket would take traffic for: an IPv6
request on an IPv4-mapped address (``::ffff:a.b.c.d``) must also be allowed
for ``a.b.c.d``, and one on ``::`` with IPV6_V6ONLY off for ``0.0.0.0``.

Answers to 'S' and 'P': 'S' then one data byte carrying the descriptor
(SCM_RIGHTS), or 'E' ('S'|'B') errno[native int].  Answer to 'B': 'O' (bound)
or 'E' ('S'|'B') errno.  Port and address are in network byte order.

The 'B' command (an extension, for ``sockcreator run --intercept``) changes
the threat model in one place: it is the only request that comes with a
descriptor, so the command byte is read with ``recvmsg`` and a small
ancillary buffer.  Descriptors that come with any other byte, more than one,
or a truncated set are closed unused, as before they were dropped; a 'B'
without exactly one is invalid input.  What arrives is used only through
getsockopt() and bind(), then closed; the filter admits nothing more.  It must
be an AF_INET/AF_INET6 socket of the family the request names, stream or
datagram with the default protocol (TCP or UDP), in our own network
namespace (SO_NETNS_COOKIE, where the kernel has it), else 'E' 'S' EPERM.
The policy is applied to the address as for 'S', except that an IPv6 socket
on '::' always needs the IPv4 wildcard rule too: the peer shares the socket
and may turn IPV6_V6ONLY off until the moment of bind().  A peer can make us
bind only its own socket, to what the policy allows; what it may do with that
socket afterwards it could do anyway.

Options (all given by the trusted starter, never by the peer)::

    --allow PROTO:ADDR:PORTS  allow requests matching this (repeatable);
                              PROTO tcp|udp|*, ADDR 1.2.3.4|[::1]|*,
                              PORTS 80 or 8000-8080
    --allow-all               allow every request (must be explicit)
    --uid N --gid N           drop to this uid/gid (root only)
    --no-harden               keep full privileges (the seed's behaviour)
    --parent PID              the pid that starts us (default: our parent at
                              start); if our parent is not PID once PDEATHSIG
                              is set, it died early: exit

Exit statuses: 0 after 'T'; 10 EOF or read error (the peer went away);
11 write error; 12 protocol error (after 'F' 'I'); 13 internal error;
14 bad start (stdio is not one Unix stream socket, or bad options);
15 hardening failed.

Size: one file on purpose (an auditor reads it in one sitting, and nothing
else is trusted); its code is held to a budget of 360 lines by
tests/creator/test_creator_audit.py, the rest is this docstring and comments.
"""

# The C modules, not signal.py and socket.py: those build enums when imported,
# which would cost every creator ~6 ms of start-up and ~1 MiB of memory.
import _signal as signal  # type: ignore[import-not-found,unused-ignore]
import _socket as socket
import os
import stat
import struct
import sys

EXIT_OK, EXIT_READ, EXIT_WRITE, EXIT_PROTOCOL = 0, 10, 11, 12
EXIT_INTERNAL, EXIT_START, EXIT_HARDEN = 13, 14, 15
INT = struct.Struct("@i")  # errno in an 'E' answer: native C int
CAP_NET_BIND_SERVICE = 10
# IPv6 minimum-MTU options; Python lacks the Linux constants.
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DONT = getattr(socket, "IPV6_PMTUDISC_DONT", 0)
# 'P' flag bits, and the Linux values of options Python may lack.
P_REUSEPORT, P_DUALSTACK, P_FREEBIND, P_NOREUSEADDR = 1, 2, 4, 8
P_ALL = P_REUSEPORT | P_DUALSTACK | P_FREEBIND | P_NOREUSEADDR
MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of ::ffff:a.b.c.d
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_DOMAIN, SO_PROTOCOL, SO_NETNS_COOKIE = 39, 38, 71  # Linux values
ANCBUF = 64  # CMSG_SPACE of a few descriptors: what does not fit is dropped (MSG_CTRUNC)
NETNS = [0]  # our network namespace's cookie, once known
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
ONE = [b"\0"]  # the data byte that carries a descriptor

Rule = tuple[bytes, bytes, bytes, int, int]  # type, family, packed addr ('' = any), lo, hi


def log(message: str) -> None:
    try:
        os.write(2, f"sockcreator-creator: {message}\n".encode("ascii", "replace"))
    except OSError:
        pass


def die(status: int, message: str = "") -> None:
    if message:
        log(message)
    os._exit(status)


def parse_rule(spec: str) -> Rule:
    """PROTO:ADDR:PORTS -> rule; ValueError if malformed."""
    proto, _, rest = spec.partition(":")
    host, _, ports = rest.rpartition(":")
    kind = {"tcp": b"T", "udp": b"U", "*": b""}[proto]  # KeyError is a ValueError below
    if host == "*":
        family, packed = b"", b""
    elif host.startswith("[") and host.endswith("]"):
        family, packed = b"6", socket.inet_pton(socket.AF_INET6, host[1:-1])
    else:
        family, packed = b"4", socket.inet_pton(socket.AF_INET, host)
    lo_s, dash, hi_s = ports.partition("-")
    hi_s = hi_s if dash else lo_s
    if not (lo_s.isascii() and lo_s.isdigit() and hi_s.isascii() and hi_s.isdigit()):
        raise ValueError(spec)
    lo, hi = int(lo_s), int(hi_s)
    if not lo <= hi <= 65535:
        raise ValueError(spec)
    return kind, family, packed, lo, hi


def parse_args(
    argv: list[str],
) -> tuple[list[Rule] | None, int | None, int | None, bool, int | None]:
    rules: list[Rule] = []
    allow_all, uid, gid, harden, parent = False, None, None, True, None
    it = iter(argv)
    try:
        for arg in it:
            if arg == "--allow":
                rules.append(parse_rule(next(it)))
            elif arg == "--allow-all":
                allow_all = True
            elif arg == "--uid":
                uid = int(next(it))
            elif arg == "--gid":
                gid = int(next(it))
            elif arg == "--no-harden":
                harden = False
            elif arg == "--parent":
                parent = int(next(it))
            else:
                raise ValueError(arg)
    except (ValueError, KeyError, OSError, StopIteration) as e:
        die(EXIT_START, f"bad option near {e!s:.80}")
    if parent is not None and parent <= 0:
        die(EXIT_START, "--parent must be a pid")
    if allow_all == bool(rules) or (uid is None) != (gid is None) or (uid is not None and uid < 0):
        die(EXIT_START, "need exactly one of --allow-all or --allow, and --uid with --gid")
    return (None if allow_all else rules), uid, gid, harden, parent


def open_channel() -> tuple[socket.socket, socket.socket]:
    """stdin and stdout must be one Unix stream socket (descriptors go only there)."""
    try:
        st0, st1 = os.fstat(0), os.fstat(1)
        if stat.S_ISSOCK(st0.st_mode) and (st0.st_dev, st0.st_ino) == (st1.st_dev, st1.st_ino):
            rd, wr = socket.socket(fileno=0), socket.socket(fileno=1)
            rd.getpeername()  # ENOTCONN: a listening or unconnected socket is no channel
            if rd.family == socket.AF_UNIX and rd.type == socket.SOCK_STREAM:
                rd.setblocking(True)
                wr.setblocking(True)
                return rd, wr
    except OSError:
        pass
    die(EXIT_START, "stdin and stdout must be the same Unix stream socket")
    raise AssertionError  # not reached


def harden(uid: int | None, gid: int | None, parent: int) -> None:
    """Linux: drop to uid/gid and CAP_NET_BIND_SERVICE, then lock down with seccomp."""
    import ctypes  # only here: the unhardened path never loads it

    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # by soname, never find_library

    def prctl(*args: int) -> int:
        r: int = libc.prctl(*(ctypes.c_ulong(a) for a in args))
        if r < 0:
            raise OSError(ctypes.get_errno(), f"prctl{args}")
        return r

    if len(os.listdir("/proc/self/task")) != 1:
        raise OSError(0, "more than one thread")
    if os.geteuid() == 0:
        for cap in range(64):  # bounding set: keep only CAP_NET_BIND_SERVICE
            try:
                prctl(23, cap)  # PR_CAPBSET_READ; EINVAL past the last capability
            except OSError:
                break
            if cap != CAP_NET_BIND_SERVICE:
                prctl(24, cap)  # PR_CAPBSET_DROP
    prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    if os.geteuid() == 0:
        os.setgroups([])  # root's supplementary groups are not for the creator either
    if uid is not None and gid is not None:
        os.setresgid(gid, gid, gid)
        prctl(8, 1)  # PR_SET_KEEPCAPS
        os.setresuid(uid, uid, uid)
        prctl(8, 0)
        if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
            raise OSError(0, "credentials did not change")
    if os.geteuid() == 0 and os.getgroups():
        raise OSError(0, "supplementary groups remain")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = data[1] & (1 << CAP_NET_BIND_SERVICE)  # keep it only if we have it
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if uid not in (None, 0):
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            pass
        else:
            raise OSError(0, "root could be regained")
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; after the last credential change
    if os.getppid() != parent:
        raise OSError(0, "parent exited during start")
    code = seccomp_filter(os.uname().machine)
    filt = ctypes.create_string_buffer(code)
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(code) // 8, ctypes.addressof(filt)))
    prctl(22, 2, ctypes.addressof(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# Audit architecture, and the system calls the loop needs (socket() is checked apart).
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
# fmt: off
SYSCALLS = {  # name: (x86_64, aarch64): the loop's I/O, then the interpreter's memory,
    # futex, signal return, clock and exit (strace of a loop: recvfrom sendto sendmsg
    # setsockopt socket bind close exit_group)
    "read": (0, 63), "write": (1, 64), "close": (3, 57), "recvfrom": (45, 207),
    "sendto": (44, 206), "sendmsg": (46, 211), "setsockopt": (54, 208), "bind": (49, 200),
    "recvmsg": (47, 212), "getsockopt": (55, 209), "getsockname": (51, 204),  # for B
    "brk": (12, 214), "mmap": (9, 222), "munmap": (11, 215), "mremap": (25, 216),
    "mprotect": (10, 226), "madvise": (28, 233), "futex": (202, 98),
    "rt_sigreturn": (15, 139), "clock_gettime": (228, 113), "exit": (60, 93),
    "exit_group": (231, 94),
}
# fmt: on
SOCKET = (41, 198)


def seccomp_filter(machine: str) -> bytes:
    """Classic BPF: right arch, listed calls, and socket() only for AF_INET/AF_INET6,
    SOCK_STREAM/SOCK_DGRAM (flags aside), protocol 0.  Everything else kills."""
    col, arch = ARCHES[machine]  # KeyError: unsupported arch, hardening fails
    allowed, sock_nr = [nrs[col] for nrs in SYSCALLS.values()], SOCKET[col]
    ld, jeq, ret, kill, allow = 0x20, 0x15, 0x06, 0x80000000, 0x7FFF0000
    n = len(allowed)
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    prog += [(jeq, n + 10 - i, 0, nr) for i, nr in enumerate(allowed)]  # to "allow"
    prog += [  # (code, jump if true, jump if false, k); jumps count the following lines
        (jeq, 0, 9, sock_nr),  # not socket() either: kill
        (ld, 0, 0, 16),  # args[0], low word: domain
        (jeq, 1, 0, socket.AF_INET),
        (jeq, 0, 6, socket.AF_INET6),
        (ld, 0, 0, 24),  # args[1]: type, less SOCK_CLOEXEC/SOCK_NONBLOCK
        (0x54, 0, 0, 0xF),
        (jeq, 1, 0, socket.SOCK_STREAM),
        (jeq, 0, 2, socket.SOCK_DGRAM),
        (ld, 0, 0, 32),  # args[2]: protocol must be 0 (the default for the type)
        (jeq, 1, 0, 0),
        (ret, 0, 0, kill),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def allowed(rules: list[Rule] | None, kind: bytes, family: bytes, addr: bytes, port: int) -> bool:
    return rules is None or any(
        rk in (b"", kind) and (rf == b"" or (rf, ra) == (family, addr)) and lo <= port <= hi
        for rk, rf, ra, lo, hi in rules
    )


def read_exact(rd: socket.socket, n: int) -> bytes:
    """Exactly n bytes; EOF or a read error means the peer is gone."""
    buf = b""
    while len(buf) < n:
        try:
            chunk = rd.recv(n - len(buf))  # no ancillary buffer: sent descriptors are dropped
        except OSError:
            chunk = b""
        if not chunk:
            die(EXIT_READ, "end of input inside a request" if buf else "")
        buf += chunk
    return buf


def create(kind: bytes, family: bytes, port: int, addr: bytes, flags: int) -> socket.socket | bytes:
    """The socket, or the 'E' answer to send."""
    fam = socket.AF_INET if family == b"4" else socket.AF_INET6
    typ = socket.SOCK_STREAM if kind == b"T" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(fam, typ)
    except OSError as e:
        return b"ES" + INT.pack(e.errno or 0)
    try:
        if not flags & P_NOREUSEADDR:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if flags & P_REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if flags & P_FREEBIND:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if fam == socket.AF_INET6:
            v6only = 0 if flags & P_DUALSTACK else 1
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            if typ == socket.SOCK_DGRAM:
                if hasattr(socket, "IPV6_USE_MIN_MTU"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_USE_MIN_MTU, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU, 1280)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
        host = socket.inet_ntop(fam, addr)  # numeric: bind() does no name lookup
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        return b"EB" + INT.pack(e.errno or 0)
    return sock


def read_command(rd: socket.socket) -> tuple[bytes, list[int]]:
    """One command byte and the descriptors that came with it (-1 for any
    the kernel dropped: MSG_CTRUNC)."""
    try:
        data, anc, flags, _ = rd.recvmsg(1, ANCBUF, socket.MSG_CMSG_CLOEXEC)
    except OSError:
        data, anc, flags = b"", [], 0
    fds = [INT.unpack_from(b, i)[0] for lv, k, b in anc if k == socket.SCM_RIGHTS
           for i in range(0, len(b) - 3, 4)]  # fmt: skip
    if not data:
        close_all(fds)
        die(EXIT_READ)
    return data, fds + [-1] * bool(flags & socket.MSG_CTRUNC)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def bind_theirs(fd: int, family: bytes, fields: bytes, rules: list[Rule] | None) -> bytes:
    """'B': check the peer's socket (see the docstring), apply the policy, bind it."""
    fam = socket.AF_INET if family == b"4" else socket.AF_INET6
    try:
        sock = socket.socket(fam, socket.SOCK_STREAM, 0, fileno=fd)  # getsockname() only
    except OSError as e:  # ENOTSOCK: not a socket at all
        os.close(fd)
        return b"ES" + INT.pack(e.errno or 0)
    try:
        opt = [
            sock.getsockopt(socket.SOL_SOCKET, o) for o in (SO_DOMAIN, socket.SO_TYPE, SO_PROTOCOL)
        ]
        kind = {(socket.SOCK_STREAM, 6): b"T", (socket.SOCK_DGRAM, 17): b"U"}.get((opt[1], opt[2]))
        if opt[0] != fam or kind is None or NETNS[0] not in (0, netns_of(sock)):
            log(f"refused to bind a socket of domain, type, protocol {opt}")
            return b"ES" + INT.pack(1)  # EPERM
        port, addr = int.from_bytes(fields[:2], "big"), fields[2:]
        ok = allowed(rules, kind, family, addr, port)
        if ok and family == b"6" and (addr[:12] == MAPPED or not any(addr)):
            ok = allowed(rules, kind, b"4", addr[12:], port)  # V6ONLY may yet change
        if not ok:
            log(f"denied {'tcp' if kind == b'T' else 'udp'} {socket.inet_ntop(fam, addr)} "
                f"port {port} by policy")  # fmt: skip
            return b"EB" + INT.pack(1)  # EPERM
        sock.bind((socket.inet_ntop(fam, addr), port))
        return b"O"
    except OSError as e:  # bind()'s own errno
        return b"EB" + INT.pack(e.errno or 0)
    finally:
        sock.close()


def netns_of(sock: socket.socket) -> int:
    """The socket's network namespace cookie; 0 where the kernel has none."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return 0


def invalid(wr: socket.socket, what: bytes) -> None:
    send(wr, b"FI")
    die(EXIT_PROTOCOL, f"invalid input {what!r}")


def serve(rd: socket.socket, wr: socket.socket, rules: list[Rule] | None) -> None:
    while True:
        command, fds = read_command(rd)
        if command == b"B":
            if len(fds) != 1 or fds[0] < 0:
                close_all(fds)
                invalid(wr, b"B with %d descriptors" % len(fds))
            family = read_exact(rd, 1)
            if family not in (b"4", b"6"):
                close_all(fds)
                invalid(wr, command + family)
            fields = read_exact(rd, 2 + (4 if family == b"4" else 16))
            send(wr, bind_theirs(fds[0], family, fields, rules))
            continue
        if fds:
            close_all(fds)  # nothing else takes a descriptor: dropped, as ever
        if command == b"T":
            die(EXIT_OK)
        if command not in (b"S", b"P"):
            invalid(wr, command)
        # Every 'S' is at least 9 bytes and every 'P' 10 (see the docstring):
        # type, family, port and 4 address bytes (and a 'P' byte) in one read.
        body = read_exact(rd, 8 if command == b"S" else 9)
        kind, family = body[:1], body[1:2]
        if kind not in (b"T", b"U") or family not in (b"4", b"6"):
            invalid(wr, command + body)
        if family == b"6":
            body += read_exact(rd, 12)  # the rest of the address (and the 'P' byte)
        port, addr = body[2:4], body[4:8] if family == b"4" else body[4:20]
        flags = body[-1] if command == b"P" else 0
        if flags & ~P_ALL or (flags & P_DUALSTACK and family == b"4"):
            invalid(wr, command + body)
        number = int.from_bytes(port, "big")
        ok = rules is None or allowed(rules, kind, family, addr, number)
        # IPv4 traffic reaches an IPv6 socket on a mapped address, and on ::
        # with V6ONLY off: the IPv4 address must be allowed too.
        v4 = addr[:12] == MAPPED or (flags & P_DUALSTACK and not any(addr))
        if ok and family == b"6" and v4:
            ok = allowed(rules, kind, b"4", addr[12:], number)
        if not ok:
            fam = socket.AF_INET if family == b"4" else socket.AF_INET6
            log(f"denied {'tcp' if kind == b'T' else 'udp'} {socket.inet_ntop(fam, addr)} "
                f"port {number} by policy")  # fmt: skip
            send(wr, b"EB" + INT.pack(1))  # EPERM
            continue
        result = create(kind, family, number, addr, flags)
        if isinstance(result, bytes):
            send(wr, result)
            continue
        try:  # 'S', then one data byte that carries it, as BIND 10 does
            wr.sendall(b"S")
            wr.sendmsg(ONE, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, INT.pack(result.fileno()))])
        except OSError:
            die(EXIT_WRITE)
        result.close()  # (on a failed write we exit, which closes it)


def send(wr: socket.socket, answer: bytes) -> None:
    try:
        wr.sendall(answer)
    except OSError:
        die(EXIT_WRITE)


def main() -> None:
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    rd, wr = open_channel()
    rules, uid, gid, want_harden, expected_parent = parse_args(sys.argv[1:])
    if expected_parent is not None:
        parent = expected_parent  # known before we were even forked: no start-up race
    os.closerange(3, 2**31 - 1)  # every other inherited descriptor
    if want_harden:
        try:
            if not sys.platform.startswith("linux"):
                raise OSError(0, "hardening is Linux-only (use --no-harden)")
            harden(uid, gid, parent)
        except (OSError, KeyError) as e:
            die(EXIT_HARDEN, f"hardening failed: {e!s:.200}")
    elif uid is not None and gid is not None:
        die(EXIT_START, "--uid needs hardening")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    NETNS[0] = netns_of(probe)  # (socket() is allowed by the filter)
    probe.close()
    serve(rd, wr, rules)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # last resort: one line, a fixed status
        die(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e!s:.200}")
