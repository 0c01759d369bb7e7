"""python -m chunkq: the chunkq command."""

import sys

from .cli import main

sys.exit(main())
