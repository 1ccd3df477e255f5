"""``python -m embcompress``: the command line, where the ``embcompress`` script is not installed."""

import sys

from .cli import main

sys.exit(main())
