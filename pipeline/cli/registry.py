"""The command table: every command module, in the order ``comb --help`` lists the commands.

Each module's ``add_parser(subparsers)`` adds its command (``locks_cmd``: ``locks`` and
``unlock``; ``analytics_cmd``: ``query``, ``report``, ``dashboard`` and ``catalog-schema``) and
sets its run function, ``cmd_<name>(repo, args)``, as the parser's ``run`` default.
"""

from __future__ import annotations

from typing import Protocol

from . import (
    Subparsers,
    analytics_cmd,
    backup_cmd,
    boot_cmd,
    catalog_cmd,
    completion_cmd,
    copy_cmd,
    demo_cmd,
    export_cmd,
    files_cmd,
    forget_cmd,
    init_cmd,
    job_cmd,
    key_cmd,
    locks_cmd,
    mount_cmd,
    overlays_cmd,
    points_cmd,
    prune_cmd,
    repair_cmd,
    restore_cmd,
    scrub_cmd,
    serve_cmd,
    stats_cmd,
    verify_cmd,
)


class CommandModule(Protocol):
    __name__: str

    def add_parser(self, sub: Subparsers) -> None: ...


COMMANDS: tuple[CommandModule, ...] = (
    init_cmd,
    key_cmd,
    backup_cmd,
    job_cmd,
    forget_cmd,
    prune_cmd,
    scrub_cmd,
    repair_cmd,
    locks_cmd,  # locks, unlock
    points_cmd,
    stats_cmd,
    files_cmd,  # ls, cat
    catalog_cmd,  # index, find, diff
    restore_cmd,
    copy_cmd,
    export_cmd,
    serve_cmd,
    overlays_cmd,
    boot_cmd,
    mount_cmd,
    verify_cmd,
    analytics_cmd,  # query, report, dashboard, catalog-schema
    demo_cmd,
    completion_cmd,
)
