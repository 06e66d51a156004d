"""``PROTO:ADDR:PORTS`` specs: kept at this documented path; the code is
:mod:`sockcreator.client.specs`."""

from .client.specs import *  # noqa: F403
from .client.specs import __all__ as __all__
