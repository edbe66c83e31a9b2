"""Finding the PostgreSQL server binaries on this machine.

Owns the search order (PATH, ``pg_config --bindir``, the usual install directories
with the highest version first, the ``pgserver`` wheel) and the advice printed when
nothing is found. Nothing here starts a process except ``postgres --version`` and
``pg_config --bindir``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pgroute.errors import LocalClusterError

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


def find_binaries() -> PgBinaries:
    """Find the server binaries: PATH, then `pg_config --bindir`, then the usual
    install directories (highest version first), then the pgserver package."""
    for bindir in _candidate_bindirs():
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            log.debug("PostgreSQL binaries found in %s", bindir)
            return PgBinaries(bindir)
    raise LocalClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, "
        f"through pg_config, or in {', '.join(SEARCH_GLOBS)}; {INSTALL_HINT}"
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
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


@functools.cache
def default_binaries() -> PgBinaries:
    """The binaries found once per process (what a LocalCluster uses unless given others)."""
    return find_binaries()
