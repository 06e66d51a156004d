"""The kernel interface of bind interception: a seccomp filter that sends
``bind()`` to a listener, the listener's ioctls, pidfds, and reading the
program's memory.  ctypes over libc (by soname), x86_64 and aarch64.

Kernel requirements (checked when the filter is installed): seccomp user
notification (5.0), ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`` (5.19: without
it a signal during a bind restarts a bind that already happened),
``pidfd_open`` (5.3) and ``pidfd_getfd`` (5.6).
"""

from __future__ import annotations

import ctypes
import os
import struct

__all__ = [
    "CONTINUE",
    "Notification",
    "Unsupported",
    "die_with_parent",
    "install_filter",
    "no_new_privs",
    "notif_id_valid",
    "notif_recv",
    "notif_send",
    "pidfd_getfd",
    "pidfd_open",
    "read_memory",
]

_MACHINES = {  # audit arch, and the system call numbers we use
    "x86_64": (0xC000003E, {"bind": 49, "seccomp": 317, "pidfd_open": 434,
                            "pidfd_getfd": 438, "process_vm_readv": 310}),
    "aarch64": (0xC00000B7, {"bind": 200, "seccomp": 277, "pidfd_open": 434,
                             "pidfd_getfd": 438, "process_vm_readv": 270}),
}  # fmt: skip
_X32 = 0x40000000  # x86_64's x32 ABI: the same bind, its own number
_SET_MODE_FILTER = 1
_FLAG_NEW_LISTENER, _FLAG_WAIT_KILLABLE_RECV = 8, 32
_RET_ALLOW, _RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000
CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE
_PR_SET_NO_NEW_PRIVS = 38
# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data
# {int nr; u32 arch; u64 ip; u64 args[6]}}, and seccomp_notif_resp
# {u64 id; s64 val; s32 error; u32 flags}.
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")


def _ioc(direction: int, nr: int, size: int) -> int:  # asm-generic/ioctl.h, type '!'
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_NOTIF_RECV = _ioc(3, 0, _NOTIF.size)  # 0xc0502100
_NOTIF_SEND = _ioc(3, 1, _RESP.size)  # 0xc0182101
_NOTIF_ID_VALID = _ioc(1, 2, 8)  # 0x40082102


class Unsupported(OSError):
    """This kernel or machine lacks something interception needs."""


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_machine = os.uname().machine
_arch, _nr = _MACHINES.get(_machine, (0, {}))


def _syscall(name: str, *args: object) -> int:
    r: int = _libc.syscall(ctypes.c_long(_nr[name]), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return r


def _filter() -> bytes:
    """Classic BPF: bind() (and x32's) of the native arch to the listener;
    everything else, other arches included, runs as usual (an unprivileged
    32-bit program's bind gets the kernel's own answer)."""
    ld, jeq, ret = 0x20, 0x15, 0x06
    prog = [
        (ld, 0, 0, 4),  # arch
        (jeq, 0, 3, _arch),  # not ours: allow
        (ld, 0, 0, 0),  # nr
        (jeq, 2, 0, _nr["bind"]),
        (jeq, 1, 0, _nr["bind"] | _X32),
        (ret, 0, 0, _RET_ALLOW),
        (ret, 0, 0, _RET_USER_NOTIF),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _prctl(*args: int) -> None:
    if _libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl{args}: {os.strerror(e)}")


def no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: nothing PROGRAM execs gains privilege (and an
    unprivileged process may install a filter)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL), after the last credential change (which
    resets it): PROGRAM must not outlive its supervisor, since every later
    bind() would fail with ENOSYS.  Exit at once if the parent is gone."""
    _prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(111)


def install_filter() -> int:
    """In the child, after :func:`no_new_privs` and :func:`die_with_parent`:
    the filter; the listener's descriptor (close-on-exec).  Unsupported if
    the kernel lacks what we need."""
    if not _nr:
        raise Unsupported(0, f"bind interception is not available on {_machine}")
    code = _filter()
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("@HP", len(code) // 8, ctypes.addressof(buf))
    prog = ctypes.create_string_buffer(fprog)
    flags = _FLAG_NEW_LISTENER | _FLAG_WAIT_KILLABLE_RECV
    try:
        return _syscall("seccomp", _SET_MODE_FILTER, flags, prog)
    except OSError as e:  # EINVAL: an unknown flag; ENOSYS/EACCES: no seccomp here
        raise Unsupported(e.errno, f"seccomp user notification with killable waits "
                          f"(Linux 5.19+) is not available: {e.strerror}") from None  # fmt: skip


class Notification:
    """One intercepted bind(): who, and its three arguments."""

    __slots__ = ("addr", "addrlen", "arch", "fd", "id", "nr", "pid")

    def __init__(self, raw: bytes) -> None:
        nid, pid, _flags, nr, arch, _ip, fd, addr, addrlen, *_ = _NOTIF.unpack(raw)
        self.id, self.pid, self.nr, self.arch = nid, pid, nr, arch
        fd &= 0xFFFFFFFF  # int arguments: the low 32 bits, signed
        self.fd = fd - (1 << 32) if fd >= 1 << 31 else fd
        self.addr = addr
        addrlen &= 0xFFFFFFFF
        self.addrlen = addrlen - (1 << 32) if addrlen >= 1 << 31 else addrlen


# Buffers made once: the CONTINUE path runs for every unprivileged bind.
_recv_buf = ctypes.create_string_buffer(_NOTIF.size)
_zero = bytes(_NOTIF.size)
_resp_buf = ctypes.create_string_buffer(_RESP.size)
_ioctl = _libc.ioctl


def notif_recv(listener: int) -> Notification:
    """The next notification (OSError ENOENT: its task is gone already)."""
    ctypes.memmove(_recv_buf, _zero, _NOTIF.size)  # the kernel wants it zeroed
    if _ioctl(listener, _NOTIF_RECV, _recv_buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return Notification(_recv_buf.raw)


def notif_send(listener: int, nid: int, *, error: int = 0, flags: int = 0) -> bool:
    """Answer: 0 (``error`` 0), an errno, or CONTINUE.  False if the task is
    gone (ENOENT: it was killed meanwhile)."""
    buf = _resp_buf
    _RESP.pack_into(buf, 0, nid, 0, -error, flags)
    if _ioctl(listener, _NOTIF_SEND, buf) != 0:
        e = ctypes.get_errno()
        if e == 2:  # ENOENT
            return False
        raise OSError(e, os.strerror(e))
    return True


def notif_id_valid(listener: int, nid: int) -> bool:
    """Whether the notification is still pending (its task still waits)."""
    value = ctypes.c_uint64(nid)
    return bool(_libc.ioctl(listener, _NOTIF_ID_VALID, ctypes.byref(value)) == 0)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_mem_buf = ctypes.create_string_buffer(128)
_local, _remote = _IoVec(ctypes.addressof(_mem_buf), 0), _IoVec(0, 0)
_vm_readv = _libc.syscall
_vm_args = (ctypes.byref(_local), ctypes.c_ulong(1), ctypes.byref(_remote), ctypes.c_ulong(1),
            ctypes.c_ulong(0))  # fmt: skip


def read_memory(pid: int, address: int, length: int) -> bytes:
    """``length`` (at most 128) bytes of task ``pid``'s memory, read once."""
    _local.len = _remote.len = length
    _remote.base = address
    n = _vm_readv(ctypes.c_long(_nr["process_vm_readv"]), ctypes.c_int(pid), *_vm_args)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"process_vm_readv: {os.strerror(e)}")
    return _mem_buf.raw[:n]


_PIDFD_THREAD = os.O_EXCL  # Linux 6.9: a pidfd for a thread, not only a leader


def pidfd_open(tid: int) -> int:
    """A pidfd for the process of task ``tid`` (a notification names the
    thread that called bind(), not its process)."""
    try:
        return _syscall("pidfd_open", ctypes.c_int(tid), ctypes.c_uint(_PIDFD_THREAD))
    except OSError as e:
        if e.errno != 22:  # EINVAL: an older kernel
            raise
    with open(f"/proc/{tid}/status", "rb") as f:  # (checked again by NOTIF_ID_VALID)
        tgid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
    return _syscall("pidfd_open", ctypes.c_int(tgid), ctypes.c_uint(0))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate (close-on-exec) of descriptor ``fd`` of the pidfd's process."""
    return _syscall("pidfd_getfd", ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
