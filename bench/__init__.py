"""comb's benchmarks: one module per question; each prints figures and asserts nothing.

``python -m bench backup``    full / incremental / restore figures against issue 2's targets
``python -m bench chunksize`` the chunk-size table behind the 64 KiB default
``python -m bench memory``    peak memory at several image sizes (local engine, Ray above idle)
``python -m bench batch``     work-item and pack size of a full backup
See bench/README.md.
"""
