"""The NBD server: the wire protocol (``proto``), the listener and its exports (``server``,
``exports``), and writable overlays served over NBD (``overlay``)."""
