"""The repository: every byte comb keeps on disk, and the only code that knows their layout.

Imports no other comb package and never imports Ray. Inside, five layers; each may import only
from the layers above it in this list (``errors`` and ``units`` from anywhere). ``lint-imports``
checks this in ``./test.sh`` (contracts in pyproject.toml).

``units``   the one byte-size formatter (binary units), for every package's output

``store/``  the on-disk repository, file kind by file kind (FORMAT.md is their spec)
    storage     the storage interface: all repository I/O goes through it
    inplace     its handles of files written in place (overlay logs, their locks)
    local       ``LocalStorage``: the interface on a local directory (the one system-call site)
    s3          ``S3Storage``: the interface on S3 or an S3-compatible server (every request)
    s3_client   its boto3 client (configuration, retries, API calls counted, errors in one line)
    s3_copies   local copies of its files for readers that take a path, bounded
    s3_lock     S3 Object Lock: retention dates of what cannot be rebuilt, extending them; old
                versions a bucket keeps
    cachedir    where local caches live (outside every repository)
    locations   a repository's location (a directory or ``s3://BUCKET/PREFIX``) -> its storage
    format      format constants and the config file
    sealing     the ``Sealer`` every object passes through, held by the storage; the plain one
    crypto      keys, key files and the AES-256-GCM sealer (FORMAT.md 21)
    chunks      stored chunks: encode (one, or a batch in one zstd call), decode, the id check
                every read passes
    packs       immutable files of chunks, their entry tables
    parity      erasure-coded parity of one pack (FORMAT.md 20)
    parity_codec  its encoder: ISA-L when installed, else zfec (the same bytes)
    parquet_io  content-named Parquet files, written and read back checked
    blocks      block lists: checking parts of a large metadata file (FORMAT.md 7.1)
    index       the chunk index: id -> pack, offset, lengths
    leaves      leaves files: a leaf, random access to one leaves file by ordinal
    manifest    a point's disk: offset -> chunk id, as leaves and a root
    assemble    the manifest builder: a new point's leaves (written or shared) and change rows
    changes     change tables: what each point changed relative to its parent
    points      point documents: the one atomic commit, forgetting, finding points
    locks       repository locks (FORMAT.md 13)
    condemned   a running prune's condemnation record (what backups must not deduplicate
                against)
``read/``   reads of a point
    source      the block-source protocol (size, read_into; extents for formats), read_bytes
    point       a point as a block source (``PointSource``): reads, chunk cache, large reads
    spans       a point's chunk map, loaded span by span; its allocation map
    provenance  which backup wrote which leaves file and segment, their block lists
    locator     chunk locations for a point's reads, segment by segment
    lookup      per-segment lookups by id, cached
    coalesce    the one read-coalescing policy (restore, the drive's large reads)
``repo.py`` the facade: open or create a repository, its config, sealer, points, manifests, and
            a point's reader (``Repository.reader``)
``maint/``  integrity and lifecycle
    check       ``verify``: structure, and every chunk's bytes with ``--read-data``
    scrub       ``scrub``: every pack read, damage located and reported
    heal        parity checks and healing a pack (``scrub --repair``)
    repair      ``repair index``: the index rebuilt from the packs
    gc          what no point needs: marks, a plan, its removal in a crash-safe order
    prune       ``comb prune``: gc under the protocol backups never wait for (condemn, remove)
    repack      copy the live chunks out of mostly-garbage packs (prune, scrub --repair)
    retention   keep policies (``--keep-*``)
    forget      which points a forget removes (overlay bases held) and retiring them
``analytics/`` DuckDB over the history (read-only; prints nothing)
    views       the file views (points, manifests, chunks, packs)
    catalog     the ``Catalog``: every view, the derived ones built on first use
    history     points and change rows as columns, per source in lanes
    lanes       a branched source cut into straight runs
    walk        change rows as columns, and the row walks (incomplete histories)
    lives/      chunk lives: ``model``, ``build`` (from every row), ``cache`` (local file)
    regions, reports, growth_fit, schema_doc    the named reports, the growth fit of the
                projection, and what each column means
    dashboard/  ``data`` (the tables), ``render`` (the page), ``svgchart``

Garbage collection (``maint.gc``, run by ``maint.prune``, FORMAT.md 13): mark what every live
point needs without a lock, repack sparse packs; under the ``condemn`` lock plan the garbage
and condemn it (a record in ``gc/``: backups that start now leave condemned packs out of their
dedup index), wait out the writers running then, and under the ``remove`` lock (no reader
runs) mark again what they committed (and points forgotten since) and remove what is
condemned, still garbage and older than the record: superseded index segments before their
packs, then packs, parity files, metadata files no point names, old temporary files. A crash
at any step leaves a superset of what the points need.

Locking (FORMAT.md 13, ``store.locks``): write the own lock file, then look at the others.

    kind                                   mode       waits for / blocks
    backup, forget                         shared     repair, an old comb's prune
    index, commit (a backup's commit       shared     remove, repair, an old comb's prune
      while a record exists), overlay,
      restore, verify, scrub, export       (once the repository has the ``locks`` feature)
    serve, mount, boot                     shared     the same (always: they run for days)
    condemn (a prune, throughout)          exclusive  condemn, remove, an old comb's prune
    remove (a prune, while it removes)     exclusive  every lock but backup, forget, key
    repair, scrub --repair                 exclusive  every other lock but key, condemn
    key add, key remove                    exclusive  other key changes only
    an overlay (its own lock file)         exclusive  the overlay's other writers
"""
