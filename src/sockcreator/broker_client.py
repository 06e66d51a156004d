"""The broker's clients: kept at this documented path; the code is
:mod:`sockcreator.broker.client` (blocking) and :mod:`sockcreator.broker.aio`."""

from .broker.aio import AsyncBroker as AsyncBroker
from .broker.client import *  # noqa: F403
from .broker.client import __all__ as _all

__all__ = [*_all, "AsyncBroker"]
