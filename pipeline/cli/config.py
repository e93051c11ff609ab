"""The configuration file: defaults for the command line (README.md, "Configuration").

``$XDG_CONFIG_HOME/comb/config.toml`` (``~/.config/comb/config.toml``), or the file
``COMB_CONFIG`` names. A missing default file is no configuration; a missing file that
``COMB_CONFIG`` names, malformed TOML, an unknown key or a value of the wrong type is a usage
error naming the file and the key. A value here is the last resort before the built-in
default: an option on the command line wins, then its environment variable (``dispatch``
resolves them). Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.errors import UsageError
from catalog.store.s3 import is_s3

CONFIG_ENV = "COMB_CONFIG"
ENGINES = ("ray", "local")
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_KEYS = ("repository", "password-file", "engine", "keep")


@dataclass(frozen=True)
class Config:
    """What the file sets (``None``: not set). ``keep``: the rules it gives, rule -> N."""

    path: str | None = None
    repository: str | None = None
    password_file: str | None = None
    engine: str | None = None
    keep: dict[str, int] = field(default_factory=dict)


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "comb" / "config.toml"


def config_path() -> tuple[Path, bool]:
    """The file to read, and whether it must exist (named by ``COMB_CONFIG``)."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named).expanduser(), True
    return default_path(), False


def load_config() -> Config:
    path, required = config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} (from {CONFIG_ENV}) does not exist") from None
        return Config()
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path}: not valid TOML: {_one_line(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read config file {path}: {_one_line(err)}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    def bad(key: str, what: str) -> UsageError:
        return UsageError(f"config file {path}: `{key}` {what}")

    for key in data:
        if key not in _KEYS:
            raise bad(key, f"is not a known key (known: {', '.join(_KEYS)})")

    def text(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise bad(key, "must be a non-empty string")
        return value

    def location(key: str) -> str | None:
        value = text(key)
        if value is None or (key == "repository" and is_s3(value)):
            return value
        return str(path.parent / Path(value).expanduser())

    engine = text("engine")
    if engine is not None and engine not in ENGINES:
        raise bad("engine", f"must be one of {', '.join(ENGINES)}")
    keep = data.get("keep", {})
    if not isinstance(keep, dict):
        raise bad("keep", f"must be a table ([keep] with {', '.join(KEEP_RULES)})")
    rules: dict[str, int] = {}
    for rule, n in keep.items():
        if rule not in KEEP_RULES:
            raise bad(f"keep.{rule}", f"is not a known key (known: {', '.join(KEEP_RULES)})")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"keep.{rule}", "must be an integer, 0 or more")
        rules[rule] = n
    return Config(
        path=str(path),
        repository=location("repository"),
        password_file=location("password-file"),
        engine=engine,
        keep=rules,
    )


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
