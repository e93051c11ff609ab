"""``python -m pipeline.cli ...``: the same as ``comb ...``."""

import sys

from pipeline.cli import main

sys.exit(main())
