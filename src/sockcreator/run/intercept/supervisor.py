"""The supervisor of ``sockcreator run --intercept``: PROGRAM's parent, with
no privilege, answering every ``bind()`` of PROGRAM and its descendants.

For each notification, in order (see docs/intercept.md):

1. Read the address once from PROGRAM's memory (``process_vm_readv``: we are
   its parent and its user), then check that the notification is still
   pending (``SECCOMP_IOCTL_NOTIF_ID_VALID``): from here on only that copy
   is used, never memory PROGRAM can still change.
2. Not an IP address, port 0, or a port at or above
   ``ip_unprivileged_port_start``: CONTINUE, the kernel does the bind and
   PROGRAM gets exactly its answer.  So do a bad descriptor, a non-socket, a
   socket of another family or protocol, and a socket of another network
   namespace (PROGRAM's own: the kernel decides with PROGRAM's rights there).
3. Privileged and not allowed by the specs: EACCES, what the kernel would
   have said, and one line on stderr.
4. Privileged and allowed: a duplicate of PROGRAM's socket (``pidfd_getfd``)
   goes to the creator in a ``B`` request; the creator re-checks everything
   and binds it.  PROGRAM's call returns 0, or the kernel's errno from the
   creator's bind().  Every option PROGRAM set stays: it is its own socket.

With ``--broker`` (``broker`` given, no creator) steps 3 and 4 are the
broker's: the duplicate goes to it in a ``B`` frame, its policy decides
(EPERM: PROGRAM sees EACCES), its creator binds, its audit records it.

The creator (or the broker) answers within ``timeout`` or PROGRAM's call
fails with EAGAIN; one that is gone makes every later privileged bind fail
with EACCES.  PROGRAM is never left blocked: every notification is answered.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

from ..._terminal import FORWARDED_SIGNALS, forward_signals
from ...client._protocol import BIND_ANSWER_MAX, ProtocolViolation, bind_answer, bind_request
from ...client.specs import Rule
from . import _seccomp
from ._decide import Target, allowed, parse_sockaddr

if TYPE_CHECKING:
    from ...broker.client import Broker

__all__ = ["FORWARDED", "Supervisor", "forward_signals", "unprivileged_port_start"]

FORWARDED = FORWARDED_SIGNALS
_SO_DOMAIN, _SO_PROTOCOL, _SO_NETNS_COOKIE = 39, 38, 71
_IPV6_V6ONLY = 26
_INT = struct.Struct("@i")
_PROTO: dict[tuple[int, int], str] = {(1, 6): "tcp", (2, 17): "udp"}  # (SO_TYPE, protocol)


def unprivileged_port_start() -> int:
    """This network namespace's first unprivileged port."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def netns_cookie(sock: socket.socket) -> int:
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return 0


class Supervisor:
    """Serve one listener until no task uses its filter any more."""

    def __init__(
        self,
        listener: int,
        program: int,
        creator: socket.socket | None,
        rules: list[Rule],
        *,
        prog: str = "sockcreator run",
        timeout: float = 5.0,
        broker: Broker | None = None,
    ) -> None:
        self.listener = listener
        self.program = program
        self.creator = creator
        self.broker = broker  # (None once it failed)
        self.via_broker = broker is not None  # then the rules are the broker's, not ours
        self.rules = rules
        self.prog = prog
        self.timeout = timeout
        self.first_unprivileged = unprivileged_port_start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            self.netns = netns_cookie(probe)
        self.counts = {"continue": 0, "bound": 0, "failed": 0, "denied": 0, "gone": 0}
        if creator is not None:
            creator.settimeout(timeout)

    # The loop ---------------------------------------------------------------

    def run(self) -> int:
        """Answer notifications until PROGRAM and all its descendants are
        gone; PROGRAM's exit status (128+N if signal N killed it)."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            events = poller.poll()  # (EINTR is retried, after our signal handlers ran)
            for _fd, ev in events:
                if ev & select.POLLIN:
                    self._one()
                elif ev & (select.POLLHUP | select.POLLERR):
                    _, status = os.waitpid(self.program, 0)
                    code = os.waitstatus_to_exitcode(status)
                    return code if code >= 0 else 128 - code

    def _one(self) -> None:
        try:
            n = _seccomp.notif_recv(self.listener)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return  # its task died before we took it
            raise
        try:
            self._handle(n)
        except Exception as e:  # a bug, or the kernel refusing us: never leave it hanging
            self._log(f"internal error on pid {n.pid}'s bind: {type(e).__name__}: {e}")
            self._answer(n, error=errno.EAGAIN)

    def _answer(self, n: _seccomp.Notification, *, error: int = 0, flags: int = 0) -> None:
        try:
            if not _seccomp.notif_send(self.listener, n.id, error=error, flags=flags):
                self.counts["gone"] += 1
        except OSError:
            self.counts["gone"] += 1

    def _continue(self, n: _seccomp.Notification) -> None:
        self.counts["continue"] += 1
        try:  # (ENOENT, the task gone, is False: nothing to do for a CONTINUE)
            _seccomp.notif_send(self.listener, n.id, flags=_seccomp.CONTINUE)
        except OSError:
            self.counts["gone"] += 1

    # One bind ---------------------------------------------------------------

    def _handle(self, n: _seccomp.Notification) -> None:
        if not 2 <= n.addrlen <= 128:
            return self._continue(n)  # the kernel's EINVAL
        try:
            raw = _seccomp.read_memory(n.pid, n.addr, n.addrlen)
        except OSError:  # EFAULT: a bad pointer (the kernel says EFAULT); EPERM: not ours
            return self._continue(n)
        # The port sits at the same place in sockaddr_in and sockaddr_in6: most
        # binds (port 0, unprivileged ports) are decided from it alone, and
        # CONTINUE does nothing a stale notification could abuse.
        if not 0 < int.from_bytes(raw[2:4], "big") < self.first_unprivileged:
            return self._continue(n)
        if not _seccomp.notif_id_valid(self.listener, n.id):  # the copy is of a live call
            self.counts["gone"] += 1
            return None
        target = parse_sockaddr(raw)
        if target is None:
            return self._continue(n)
        dup = self._their_socket(n)
        if dup is None:
            return self._continue(n)  # EBADF, ENOTSOCK, another family...: the kernel's
        with dup:
            kind = (dup.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                    dup.getsockopt(socket.SOL_SOCKET, _SO_PROTOCOL))  # fmt: skip
            proto = _PROTO.get(kind)
            if (
                proto is None
                or dup.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN) != target.family
                or (self.netns and netns_cookie(dup) != self.netns)
            ):
                return self._continue(n)
            v6only = target.family != socket.AF_INET6 or bool(
                dup.getsockopt(socket.IPPROTO_IPV6, _IPV6_V6ONLY)
            )
            if self.via_broker:
                err = self._bind_by_broker(dup, target)
                if err < 0:  # the broker's policy
                    return self._denied(n, proto, target, "by the broker's policy")
            elif allowed(self.rules, proto, target, v6only):
                err = self._bind(dup, target)
            else:
                return self._denied(n, proto, target)
        self.counts["bound" if err == 0 else "failed"] += 1
        if err:
            self._log(f"pid {n.pid}: bind {proto} {target}: {os.strerror(err)}")
        return self._answer(n, error=err)

    def _denied(
        self, n: _seccomp.Notification, proto: str, target: Target, why: str = "not allowed"
    ) -> None:
        self.counts["denied"] += 1
        if target.family == socket.AF_INET6 and not any(target.packed):
            why += f"; '::' needs {proto}:0.0.0.0:{target.port} too"
        self._log(f"denied pid {n.pid}: bind {proto} {target} ({why})")
        return self._answer(n, error=errno.EACCES)

    def _their_socket(self, n: _seccomp.Notification) -> socket.socket | None:
        """A duplicate of the descriptor the task passed, if it is an IP socket."""
        try:
            pidfd = _seccomp.pidfd_open(n.pid)
        except OSError:
            return None
        try:
            if not _seccomp.notif_id_valid(self.listener, n.id):
                return None  # (the pid may be another process's by now)
            fd = _seccomp.pidfd_getfd(pidfd, n.fd)
        except OSError:
            return None
        finally:
            os.close(pidfd)
        try:
            return socket.socket(fileno=fd)  # family and type from the kernel
        except OSError:  # ENOTSOCK
            os.close(fd)
            return None

    def _bind(self, sock: socket.socket, target: Target) -> int:
        """The creator binds it: 0 or the errno PROGRAM is to see."""
        creator = self.creator
        if creator is None:
            return errno.EACCES
        wire = bind_request(target.family, target.packed, target.port)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _INT.pack(sock.fileno()))]
        try:
            creator.sendmsg([wire], rights)
            data = creator.recv(1)
            want = {b"E": BIND_ANSWER_MAX, b"F": 2}.get(data, 1)
            while 0 < len(data) < want:
                chunk = creator.recv(want - len(data))
                if not chunk:
                    break
                data += chunk
            if not data:
                raise ProtocolViolation("the creator closed the connection")
            err = bind_answer(data)
            if err is None:
                raise ProtocolViolation(f"the creator's answer was cut short: {data!r}")
        except TimeoutError:
            self._creator_gone(f"no answer within {self.timeout}s")
            return errno.EAGAIN
        except (OSError, ProtocolViolation) as e:
            self._creator_gone(str(e))
            return errno.EACCES
        # The creator's policy denial is EPERM; a privileged port one may not
        # bind is EACCES for the kernel, and so for PROGRAM.
        return errno.EACCES if err == errno.EPERM else err

    def _bind_by_broker(self, sock: socket.socket, target: Target) -> int:
        """The broker binds it: 0, the errno PROGRAM is to see, or -1 for
        its policy's refusal."""
        from ...broker.client import BrokerFatalError, Reason, SocketRefusedError

        broker = self.broker
        if broker is None:
            return errno.EACCES
        try:
            broker.bind_socket(sock, target.host, target.port)
        except SocketRefusedError as e:
            if e.reason is Reason.POLICY:
                return -1
            if e.reason is Reason.BIND:
                return e.errno or errno.EACCES
            self._log(f"the broker refused {target} ({e.reason.name.lower()}): {e.strerror}")
            return errno.EACCES if e.reason is not Reason.UNAVAILABLE else errno.EAGAIN
        except BrokerFatalError as e:
            self._creator_gone(f"the broker: {e}")
            self.broker = None
            return errno.EAGAIN if e.timed_out else errno.EACCES
        return 0

    def _creator_gone(self, why: str) -> None:
        self._log(f"the creator failed ({why}): privileged binds now fail with EACCES")
        if self.creator is not None:
            self.creator.close()
            self.creator = None

    def _log(self, text: str) -> None:
        try:
            os.write(2, f"{self.prog}: {text}\n".encode("utf-8", "replace"))
        except OSError:
            pass
