"""``python -m pipeline.cli ...``: the same as ``comb ...``."""

from pipeline.cli import run

run()
