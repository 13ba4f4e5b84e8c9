"""``python -m fxtile``: the same as the ``fxtile`` command."""

import sys

from .cli import main

sys.exit(main())
