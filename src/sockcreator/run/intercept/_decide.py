"""What to do with one intercepted bind(), with no I/O.

:func:`parse_sockaddr` reads the bytes the program passed; :func:`privileged`
says whether binding them needs privilege at all: only an AF_INET or
AF_INET6 address of the right size with a port in ``1 ..
ip_unprivileged_port_start - 1`` does.  Everything else is left to the
kernel (CONTINUE), so the program gets exactly the kernel's own answer
(EINVAL, EFAULT, EAFNOSUPPORT, the bind itself).  :func:`allowed` applies
the ``--allow``/``--listen`` specs as the creator will re-check them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from ...client.specs import Rule

__all__ = ["Target", "allowed", "parse_sockaddr"]

_FAMILY = struct.Struct("=H")  # sa_family_t, native order
_PORT = struct.Struct("!H")


@dataclass(frozen=True)
class Target:
    """An IP address and port to bind to."""

    family: int
    packed: bytes  # 4 or 16 bytes
    port: int

    @property
    def host(self) -> str:
        return socket.inet_ntop(self.family, self.packed)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else (
            f"{self.host}:{self.port}")  # fmt: skip


def parse_sockaddr(raw: bytes) -> Target | None:
    """The IP target of a sockaddr, or None if it is not one the kernel would
    take as AF_INET (16 bytes or more; AF_UNSPEC with 0.0.0.0 too) or AF_INET6
    (24 or more)."""
    if len(raw) < 2:
        return None
    (family,) = _FAMILY.unpack_from(raw)
    if family == socket.AF_UNSPEC and len(raw) >= 16 and not any(raw[4:8]):
        # Linux takes AF_UNSPEC with INADDR_ANY on an AF_INET socket as AF_INET
        # (an old compatibility rule); the socket's own family is checked later.
        family = socket.AF_INET
    if family == socket.AF_INET and len(raw) >= 16:
        return Target(family, raw[4:8], _PORT.unpack_from(raw, 2)[0])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return Target(family, raw[8:24], _PORT.unpack_from(raw, 2)[0])
    return None


def _match(rule: Rule, proto: str, address: ipaddress._BaseAddress, port: int) -> bool:
    return (
        rule.protocol in (None, proto)
        and (rule.address is None or rule.address == address)
        and rule.low <= port <= rule.high
    )


def allowed(rules: list[Rule], proto: str, target: Target, v6only: bool) -> bool:
    """The specs' answer, with the creator's rule for IPv6 sockets that may
    take IPv4 traffic (a mapped address, or '::', whose V6ONLY PROGRAM may
    still change).  ``v6only`` is what the socket says now (kept for the log)."""
    address = ipaddress.ip_address(target.packed)
    if not any(_match(r, proto, address, target.port) for r in rules):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        v4 = address.ipv4_mapped
        if v4 is None and address.is_unspecified:
            # As the creator decides it: PROGRAM could still turn V6ONLY off
            # up to the bind, so '::' needs the IPv4 wildcard whatever it says now.
            v4 = ipaddress.IPv4Address(0)
        if v4 is not None:
            return any(_match(r, proto, v4, target.port) for r in rules)
    return True
