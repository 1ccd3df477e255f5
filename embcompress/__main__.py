"""``python -m embcompress``: the command line, where the ``embcompress`` script is not installed."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (doctest collection imports every module)
    sys.exit(main())
