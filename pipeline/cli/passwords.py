"""The repository passwords of the command line: from a file (``--password-file``,
``--new-password-file``), the environment or a prompt on a terminal. The repository never asks
for one itself: ``dispatch`` puts this command's source on its arguments (``args.password``),
each command passes it to ``Repository.open`` or ``Repository.init`` (``catalog.repo``), and
``key add`` reads the new password here."""

from __future__ import annotations

import getpass
import os
import sys

from catalog.errors import UsageError
from catalog.repo import PasswordSource

PASSWORD_ENV = "COMB_PASSWORD"
PASSWORD_FILE_ENV = "COMB_PASSWORD_FILE"
NEW_PASSWORD_ENV = "COMB_NEW_PASSWORD"
NEW_PASSWORD_FILE_ENV = "COMB_NEW_PASSWORD_FILE"
VSPHERE_PASSWORD_ENV = "COMB_VSPHERE_PASSWORD"


def password_source(password_file: str | None) -> PasswordSource:
    """The source of the repository's password for one command (``--password-file``)."""

    def source(location: str, confirm: bool) -> str:
        return read_password(location, password_file, confirm=confirm)

    return source


def read_password(
    location: str, password_file: str | None, new: bool = False, confirm: bool = False
) -> str:
    """The password from ``password_file``, COMB_PASSWORD_FILE, COMB_PASSWORD or a prompt on a
    terminal. ``new``: the password of a key being added (--new-password-file,
    COMB_NEW_PASSWORD_FILE, COMB_NEW_PASSWORD); ``confirm``: a terminal asks twice."""
    env, file_env = (
        (NEW_PASSWORD_ENV, NEW_PASSWORD_FILE_ENV) if new else (PASSWORD_ENV, PASSWORD_FILE_ENV)
    )
    confirm = confirm or new
    given = _given(password_file, env, file_env)
    if given is not None:
        password = given
    elif sys.stdin.isatty():
        what = "new password" if new else "password"
        try:
            password = getpass.getpass(f"{what} for {location}: ")
            if confirm and getpass.getpass(f"repeat the {what}: ") != password:
                raise UsageError("the passwords do not match")
        except EOFError:
            raise UsageError("no password given") from None
    else:
        flag = "--new-password-file" if new else "--password-file"
        raise UsageError(
            f"{location} needs a {'new ' if new else ''}password: set {env}, use {flag} "
            "or run on a terminal"
        )
    if not password:
        raise UsageError("an empty password is not allowed")
    return password


def other_password_source(
    path: str | None, env: str, file_env: str, fallback: PasswordSource
) -> PasswordSource:
    """The password of a second repository (``copy --to``): from ``path``, ``file_env`` or
    ``env``, else the first repository's source (``fallback``: one password for both)."""

    def source(location: str, confirm: bool) -> str:
        password = _given(path, env, file_env)
        if password is None:
            return fallback(location, confirm)
        if not password:
            raise UsageError("an empty password is not allowed")
        return password

    return source


def _given(path: str | None, env: str, file_env: str) -> str | None:
    """A password given without a prompt: from ``path``, the file ``file_env`` names, or
    ``env``; None when none is."""
    path = path or os.environ.get(file_env)
    if path:
        return _from_file(path)
    return os.environ.get(env)


def _from_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read password file {path}: {err}") from None
    return text.rstrip("\r\n")


def vsphere_password() -> str:
    """The vSphere user's password: COMB_VSPHERE_PASSWORD, or a prompt on a terminal."""
    password = os.environ.get(VSPHERE_PASSWORD_ENV)
    if password is not None:
        return password
    if sys.stdin.isatty():
        try:
            return getpass.getpass("vSphere password: ")
        except EOFError:
            raise UsageError("no vSphere password given") from None
    raise UsageError(f"no vSphere password: set {VSPHERE_PASSWORD_ENV} (or run from a terminal)")
