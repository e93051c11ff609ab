"""Entry point: ``python -m bench COMMAND [options]`` (commands below)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bench COMMAND [options]

commands:
  backup     full, incremental and restore figures against the targets (--peers for restic/borg)
  chunksize  full time and incremental stored bytes per chunk size (16-256 KiB)
  memory     peak memory of full backups at several image sizes
  batch      work-item and pack size of a full backup
  catalog    every named report and the dashboard on 1,000 points of a 256 GiB disk
  drive      export MB/s per disk image format, against restore
  vsphere    full and CBT incremental backups of a simulated VM, against a local file
  integrity  scrub, scrub --repair and prune on a repository of 100 points
  files      walk, ls and cat of the files inside a point, against the kernel
  files-history  find over 1,000 points' file catalogs; the catalog's cost on an OS disk backup
  s3         a repository on S3 (a local file-backed server) against its ceiling and a local one
  jobs       N sources as one job (one engine run) against N separate backup commands

`python -m bench COMMAND --help` lists a command's options."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "backup":
        from .backup import main as run
    elif cmd == "chunksize":
        from .chunksize import main as run
    elif cmd == "memory":
        from .memory import main as run
    elif cmd == "batch":
        from .batch import main as run
    elif cmd == "catalog":
        from .catalog import main as run
    elif cmd == "drive":
        from .drive import main as run
    elif cmd == "vsphere":
        from .vsphere import main as run
    elif cmd == "integrity":
        from .integrity import main as run
    elif cmd == "files":
        from .files import main as run
    elif cmd == "files-history":
        from .files_history import main as run
    elif cmd == "s3":
        from .s3 import main as run
    elif cmd == "jobs":
        from .jobs import main as run
    else:
        print(f"bench: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
