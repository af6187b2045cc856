"""``python -m prlhf``: the ``prlhf`` command."""

import sys

from .cli import main

sys.exit(main())
