"""PostgreSQL connection strings: parsing a ``postgresql://`` URL into a ``Dsn``,
turning it into libpq keyword/value form, and masking passwords in any text.

Invariant: a password never leaves this module in clear except through
``Dsn.password`` (for libpq) and ``Dsn.libpq_conninfo()`` (for CREATE SUBSCRIPTION);
``str()``/``repr()`` of a Dsn and everything ``mask_dsn``/``mask_conninfo`` return
are safe to log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit


@dataclass(frozen=True)
class Dsn:
    """A parsed PostgreSQL URL. ``str()`` and ``repr()`` never show the password."""

    url: str
    host: str
    port: int
    user: str
    dbname: str
    password: str | None

    @property
    def masked(self) -> str:
        return mask_dsn(self.url)

    def libpq_conninfo(self, *, password: str | None = None) -> str:
        """Keyword/value form for CREATE SUBSCRIPTION ... CONNECTION; ``password``
        (one found outside the DSN) when the DSN has none."""
        parts = {"host": self.host, "port": str(self.port), "user": self.user, "dbname": self.dbname}
        if self.password or password:
            parts["password"] = self.password or password or ""
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in parts.items())

    def url_without_password(self) -> str:
        """The URL with no password in it (user-info or ``password=`` parameter): for
        a command line, where other users of the machine can read it."""
        parts = urlsplit(self.url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = userinfo.partition(":")[0] + "@" + hostport
        query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def with_dbname(self, dbname: str) -> Dsn:
        return parse_dsn(_replace_path(self.url, dbname))

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Dsn({self.masked!r})"


def _quote_conninfo(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _replace_path(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return parts._replace(path="/" + dbname).geturl()


_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)([^\s/]*)(@[^@/\s]*)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(text: str) -> str:
    """Hide passwords in ``text``: URL user-info of any scheme (up to the last '@'
    before the host, since libpq accepts an unencoded '@' in a password), the
    ``?password=`` URI parameter and the keyword form ``password=...``."""
    text = _URL_USERINFO.sub(r"\1***\3", text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _KEYWORD_PASSWORD.sub(r"\1***", text)


def parse_dsn(url: str) -> Dsn:
    """Parse a ``postgresql://`` URL; raise ValueError with a reason when it is not one."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("empty DSN")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            "expected postgresql://user@host:port/dbname (a password goes after the user, separated by a colon)"
        )
    try:
        port = parts.port or 5432
    except ValueError:
        raise ValueError("port is not a number between 1 and 65535") from None
    if not 1 <= port <= 65535:
        raise ValueError("port is not a number between 1 and 65535")
    host = parts.hostname
    if not host:
        raise ValueError("no host in DSN")
    dbname = unquote(parts.path.lstrip("/")) or "postgres"
    user = unquote(parts.username) if parts.username else "postgres"
    password = unquote(parts.password) if parts.password is not None else None
    return Dsn(url=url.strip(), host=host, port=port, user=user, dbname=dbname, password=password)


def mask_conninfo(text: str | None) -> str | None:
    """Mask passwords in a libpq keyword/value string and in any URL inside it."""
    if text is None:
        return None
    return mask_dsn(text)
