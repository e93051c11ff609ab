"""Where comb keeps local caches: outside every repository, never part of one.

Owns the cache root (``COMB_CACHE_DIR``, else ``$XDG_CACHE_HOME/comb``, else ``~/.cache/comb``).
Must not: create or read anything there (each cache's module does, and checks what it reads).
"""

from __future__ import annotations

import os

CACHE_ENV = "COMB_CACHE_DIR"


def cache_dir() -> str:
    """``$COMB_CACHE_DIR``, else ``$XDG_CACHE_HOME/comb``, else ``~/.cache/comb``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "comb")
