"""``python -m moshpit_trio`` is the ``moshpit`` command."""

import sys

from .cli import main

sys.exit(main())
