"""The NBD server: the wire format (``proto``), the request loop (``transmission``), the
listener and its exports (``server``, ``exports``), and writable overlays served over NBD
(``overlay``)."""
