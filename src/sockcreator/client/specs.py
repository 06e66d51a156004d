"""Policy specs on the unprivileged side: ``PROTO:ADDR:PORTS`` and ``--listen``.

The creator enforces its allow-list itself (``creator.py`` parses the same
specs again, with the standard library only): that is the only place where
enforcing it means anything.  This module checks the specs *before* anything
is started, so a typo is a clear :class:`ValueError` here rather than a
creator that exits at start, and gives them a type.

Grammar (exactly what the creator accepts, less two leniencies: a port range
with an empty end such as ``80-``, which the creator reads as ``80``, and specs
longer than 128 characters, which only padding with leading zeros can make)::

    SPEC   = PROTO ":" ADDR ":" PORTS
    PROTO  = "tcp" | "udp" | "*"              (lower case)
    ADDR   = IPv4 dotted quad | "[" IPv6 "]" | "*"
    PORTS  = PORT | PORT "-" PORT             (decimal, low <= high <= 65535)

Addresses are parsed by ``inet_pton``, as in the creator, so no name lookup,
no scope id and no leading zeros in IPv4.  An IPv4-mapped IPv6 address
(``[::ffff:1.2.3.4]``) is an IPv6 address: it does not match ``1.2.3.4``.

A *listen* spec (``sockcreator run --listen``) names one concrete socket:
``tcp`` or ``udp``, one address (not ``*``) and one port in 1..65535.
"""

from __future__ import annotations

import ipaddress
import socket

from ._protocol import Request, make_request

TYPE_CHECKING = False  # (not typing's: see _record)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from .._record import dataclass

__all__ = ["Rule", "allowed", "parse_listen", "parse_rule"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PROTOCOLS = {"tcp": "tcp", "udp": "udp", "*": None}
_MAX_SPEC = 128  # the longest valid spec is far shorter ("udp:[" + 45 + "]:65535-65535")


@dataclass(frozen=True)
class Rule:
    """One allow-list entry.  ``protocol``/``address`` None mean any."""

    protocol: str | None  # "tcp", "udp" or None
    address: IPAddress | None
    low: int
    high: int

    def __post_init__(self) -> None:
        if self.protocol not in (None, "tcp", "udp"):
            raise ValueError(f"protocol must be 'tcp', 'udp' or None, not {self.protocol!r}")
        if not 0 <= self.low <= self.high <= 65535:
            raise ValueError(f"need 0 <= low <= high <= 65535, not {self.low}-{self.high}")

    def matches(self, request: Request) -> bool:
        """Whether the creator would allow ``request`` under this rule."""
        return (
            self.protocol in (None, request.protocol)
            and (self.address is None or self.address == request.address)
            and self.low <= request.port <= self.high
        )

    def __str__(self) -> str:
        """The canonical spec (``parse_rule(str(rule)) == rule``)."""
        proto = self.protocol or "*"
        if self.address is None:
            host = "*"
        elif self.address.version == 6:
            host = f"[{self.address}]"
        else:
            host = str(self.address)
        ports = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"{proto}:{host}:{ports}"


def _split(spec: object, what: str) -> tuple[str, str, str]:
    if not isinstance(spec, str):
        raise TypeError(f"{what} spec must be a str, not {type(spec).__name__}")
    if len(spec) > _MAX_SPEC or not spec.isascii() or not spec.isprintable():
        raise ValueError(f"bad {what} spec {spec[:_MAX_SPEC]!r}: not a PROTO:ADDR:PORTS string")
    proto, sep, rest = spec.partition(":")
    host, sep2, ports = rest.rpartition(":")
    if not (sep and sep2):
        raise ValueError(f"bad {what} spec {spec!r}: expected PROTO:ADDR:PORTS")
    return proto, host, ports


def _address(spec: str, host: str, what: str) -> IPAddress | None:
    if host == "*":
        return None
    try:
        if host.startswith("[") and host.endswith("]"):
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host[1:-1]))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host))
    except (OSError, ValueError):
        raise ValueError(
            f"bad {what} spec {spec!r}: address {host!r} is not *, a dotted-quad IPv4 "
            "address or an IPv6 address in brackets"
        ) from None


def _port(spec: str, text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"bad {what} spec {spec!r}: port {text!r} is not a number in 0..65535")
    return int(text)


def parse_rule(spec: str) -> Rule:
    """``PROTO:ADDR:PORTS`` -> :class:`Rule`; ValueError saying what is wrong."""
    proto, host, ports = _split(spec, "allow")
    if proto not in _PROTOCOLS:
        raise ValueError(f"bad allow spec {spec!r}: protocol must be tcp, udp or *")
    address = _address(spec, host, "allow")
    low_s, dash, high_s = ports.partition("-")
    low = _port(spec, low_s, "allow")
    high = _port(spec, high_s, "allow") if dash else low
    if low > high:
        raise ValueError(f"bad allow spec {spec!r}: port range {low}-{high} is empty")
    return Rule(_PROTOCOLS[proto], address, low, high)


def parse_listen(spec: str, *, any_port: bool = False) -> Request:
    """``tcp|udp:ADDR:PORT`` with one concrete address and port -> Request.

    Port 0 (the kernel picks one) is accepted only with ``any_port``."""
    proto, host, port_s = _split(spec, "listen")
    if proto not in ("tcp", "udp"):
        raise ValueError(f"bad listen spec {spec!r}: protocol must be tcp or udp")
    address = _address(spec, host, "listen")
    if address is None:
        raise ValueError(f"bad listen spec {spec!r}: give one address, not *")
    port = _port(spec, port_s, "listen")
    if port == 0 and not any_port:
        raise ValueError(f"bad listen spec {spec!r}: the port must be in 1..65535")
    return make_request(proto, address, port)


def allowed(rules: list[Rule] | None, request: Request) -> bool:
    """What the creator decides: None allows all, else any rule must match."""
    return rules is None or any(rule.matches(request) for rule in rules)
