"""The files inside a recovery point: volumes, filesystems read in a sandboxed worker,
extraction."""
