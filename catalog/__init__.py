"""The repository: every byte comb keeps on disk, and the only code that knows their layout.

Owns config, packs, the chunk index, manifests, recovery-point documents, checks and the DuckDB
views. Imports no other comb package and never imports Ray.
"""
