"""sockcreator: privileged ports for unprivileged daemons.

A tiny separate process (the *creator*, BIND 10's design) keeps the right to
bind ports below 1024 and hands bound sockets over a Unix socket; everything
else runs unprivileged.  See README.md.

The names below are loaded when first used, so that ``import sockcreator``
(and every command but ``serve``) costs no asyncio and no broker.  No
``from __future__ import annotations`` here or in :mod:`.cli`: that import
is a module of its own, and ``sockcreator creator`` loads nothing it can
avoid before its exec.
"""

TYPE_CHECKING = False  # (not typing's: importing typing costs every command ~10 ms)
if TYPE_CHECKING:
    from typing import Any

    from .broker.aio import AsyncBroker
    from .broker.client import Broker, BrokerFatalError, SocketRefusedError
    from .client._errors import CreatorError, CreatorFatalError, SocketCreationError
    from .client._protocol import Request, SocketOptions, make_request
    from .client.aio import AsyncSocketCreator
    from .client.blocking import SocketCreator

__all__ = [
    "AsyncBroker",
    "AsyncSocketCreator",
    "Broker",
    "BrokerFatalError",
    "CreatorError",
    "CreatorFatalError",
    "Request",
    "SocketCreationError",
    "SocketCreator",
    "SocketOptions",
    "SocketRefusedError",
    "make_request",
]

__version__ = "0.1.0"

_WHERE = {
    "AsyncBroker": ".broker.aio",
    "Broker": ".broker.client",
    "BrokerFatalError": ".broker.client",
    "SocketRefusedError": ".broker.client",
    "CreatorError": ".client._errors",
    "CreatorFatalError": ".client._errors",
    "SocketCreationError": ".client._errors",
    "Request": ".client._protocol",
    "SocketOptions": ".client._protocol",
    "make_request": ".client._protocol",
    "AsyncSocketCreator": ".client.aio",
    "SocketCreator": ".client.blocking",
}


def __getattr__(name: str) -> "Any":
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'sockcreator' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
