"""``python -m sockcreator``: the same as the ``sockcreator`` command."""

import sys

from .cli import main

sys.exit(main())
