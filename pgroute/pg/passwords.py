"""Where a password comes from when the DSN has none, the way libpq looks for it: the
connection service file (``service=`` in the URL, else ``PGSERVICE``), then
``PGPASSWORD``, then the password file (``passfile=`` in the URL, else
``PGPASSFILE``, else ``~/.pgpass``).

pgroute's own connections find it themselves (asyncpg and libpq read the same
places); this module exists for the one connection pgroute does not open: a
subscription, which the *subscriber's server* opens with the conninfo it is given.

Invariant: a password found here is returned to the caller only; it never reaches a
log line or an exception message (the source is named, never the value).
"""

from __future__ import annotations

import configparser
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .dsn import Dsn


@dataclass(frozen=True)
class FoundPassword:
    """A password and where it was found (``PGPASSWORD``, a file's path, ...)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"FoundPassword(source={self.source!r})"


def _query(dsn: Dsn) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(dsn.url).query).items()}


def service_name(dsn: Dsn) -> str | None:
    """The connection service that applies to ``dsn``: its own, else PGSERVICE."""
    return _query(dsn).get("service") or os.environ.get("PGSERVICE") or None


def _service_password(dsn: Dsn) -> FoundPassword | None:
    name = service_name(dsn)
    if not name:
        return None
    path = Path(os.environ.get("PGSERVICEFILE") or Path.home() / ".pg_service.conf")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except (OSError, configparser.Error):
        return None
    if parser.has_option(name, "password"):
        return FoundPassword(parser.get(name, "password"), f"service {name} in {path}")
    return None


def _pgpass_fields(line: str) -> list[str]:
    """Split one .pgpass line on unescaped colons; backslash escapes ':' and '\\'."""
    fields, current, chars = [], [], iter(line)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def _passfile_password(dsn: Dsn) -> FoundPassword | None:
    path = Path(_query(dsn).get("passfile") or os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode) or mode & (stat.S_IRWXG | stat.S_IRWXO):
            return None  # libpq ignores a password file others can read
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    wanted = (dsn.host, str(dsn.port), dsn.dbname, dsn.user)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _pgpass_fields(line)
        if len(fields) < 5:
            continue
        if all(f in ("*", w) for f, w in zip(fields[:4], wanted, strict=True)):
            return FoundPassword(":".join(fields[4:]), str(path))
    return None


def find_password(dsn: Dsn) -> FoundPassword | None:
    """The password libpq would send for ``dsn``: the DSN's own, else the service
    file's, else PGPASSWORD, else the first matching password-file line; None when
    there is none."""
    if dsn.password:
        return FoundPassword(dsn.password, "the DSN")
    found = _service_password(dsn)
    if found is None and os.environ.get("PGPASSWORD"):
        found = FoundPassword(os.environ["PGPASSWORD"], "PGPASSWORD")
    return found or _passfile_password(dsn)
