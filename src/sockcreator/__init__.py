"""sockcreator: privileged ports for unprivileged daemons.

A tiny separate process (the *creator*, BIND 10's design) keeps the right to
bind ports below 1024 and hands bound sockets over a Unix socket; everything
else runs unprivileged.  See README.md.
"""

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
