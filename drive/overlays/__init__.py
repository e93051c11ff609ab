"""Writable overlays kept in the repository: the overlay and its lock (``overlay``), its write
records (``log``), and a point read with an overlay on top (``reader``)."""
