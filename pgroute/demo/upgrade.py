"""`pgroute demo --upgrade`: a PostgreSQL major-version upgrade by switchover, under a
writer, told as the README's recipe ("Upgrading PostgreSQL by switchover").

The story: the application writes straight to its server on the OLD major version; an
empty server on the NEW version is added as pgroute's mirror (``pgroute
setup-replication``: database, schema, publication, subscription, initial copy);
pgroute starts and the application writes through it; once the new node has caught
up (``/api/status``) and ``pgroute check`` passes, ``pgroute switchover`` moves the
applications to the new version while the old node keeps following it (reverse
replication), ``pgroute failback`` rolls back to the old version and a second
switchover goes forward again. Every operator step is the real command line run as a
subprocess (``python -m pgroute.cli ...``) or a real API call; pgroute itself runs in
this process, as in the tour.

Invariants:

- The exit status is 0 only when every step completed and every write the writers
  saw acknowledged is on the new-version node (and on the old node, which follows)
  at the end; 1 otherwise, 130 when interrupted.
- The operator commands run with the demo's configuration file and nothing of the
  caller's environment that would redirect them (DSN or other pgroute variables),
  and with the NEW version's client programs (``PGROUTE_PG_VERSION``): pg_dump must
  not be older than the server it dumps.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg

from pgroute import local
from pgroute.errors import LocalClusterError
from pgroute.local.binaries import SEARCH_GLOBS, find_version
from pgroute.local.workload import Ack, Chrispar, Writer, missing
from pgroute.pg.clients import VERSION_ENV, WHEELS
from pgroute.pg.naming import quote_ident

from .setup import DBNAME, PUBLICATION, SEED_SQL, SUBSCRIPTION, Demo, configure, ignore_stop_signals, stop_signals
from .setup import say as _say
from .tour import _Clock, _indent

if TYPE_CHECKING:
    from pgroute.app import Running

log = logging.getLogger(__name__)

WRITERS = 4
"""Writer connections through pgroute during the switches (the bench uses 4 too)."""
DIRECT_WRITES = 50
"""Writes straight to the old server before pgroute, some during the initial copy."""
CATCH_UP_BYTES = 1 << 20
"""The new node counts as caught up once /api/status shows it this close (under load)."""
SETTLE = 0.3
"""A switch's stall window closes with a write acknowledged this long after it returned."""
FOLLOW_TIMEOUT = 60.0

_REDIRECTING_ENV = ("DATABASE_URL", "MIRROR_DATABASE_URL", "AUTO_FAILOVER_ENABLED")


# --------------------------------------------------------------------------- versions


def installed_versions() -> list[int]:
    """Major versions whose server binaries `find_version` finds here, oldest first."""
    candidates = set(WHEELS)
    for pattern in SEARCH_GLOBS:
        for path in glob.glob(pattern):
            numbers = re.findall(r"\d+", path)
            if numbers:
                candidates.add(int(numbers[0]))
    found = []
    for version in sorted(candidates):
        try:
            find_version(version)
        except LocalClusterError:
            continue
        found.append(version)
    return found


def choose_versions(old: int | None, new: int | None) -> tuple[int, int]:
    """(old, new): the ones asked for, defaults the oldest and newest installed.
    LocalClusterError naming what to install when there are not two versions."""
    if old is not None and new is not None and old >= new:
        raise LocalClusterError(f"--from {old} --to {new}: an upgrade goes from an older major version to a newer one")
    versions = installed_versions()
    if old is None or new is None:
        others = [v for v in versions if v != (old if old is not None else new)]
        if (old is None and new is None and len(versions) < 2) or not others:
            have = ", ".join(map(str, versions)) or "none"
            raise LocalClusterError(
                f"an upgrade needs two PostgreSQL major versions; installed here: {have}. Install another: "
                f"{WHEELS[18][1]} (18) or {WHEELS[16][1]} (16) into the Python environment running pgroute, "
                "or apt-get install postgresql-<version>"
            )
        old = min(versions) if old is None else old
        new = max(versions) if new is None else new
        if old >= new:
            raise LocalClusterError(
                f"--from {old} --to {new}: no newer (or older) version installed to pair it with; installed: "
                + ", ".join(map(str, versions))
            )
    for flag, version in (("--from", old), ("--to", new)):
        if version not in versions:
            how = f"apt-get install postgresql-{version}"
            if version in WHEELS:
                how = f"{WHEELS[version][1]} (into the Python environment running pgroute), or {how}"
            raise LocalClusterError(
                f"{flag} {version}: PostgreSQL {version} is not installed here (installed: "
                f"{', '.join(map(str, versions)) or 'none'}); install it: {how}"
            )
    return old, new


# --------------------------------------------------------------------------- servers


def prepare_upgrade(base: Path, old: int, new: int) -> Demo:
    """The application's server on `old` (chrispar schema and seed) and an empty server
    on `new`, both running; the demo's pgroute.toml points primary.dsn at the first and
    mirror.dsn at the second. Nothing replicates yet: `pgroute setup-replication` is a
    step of the story. Destroys both servers when it fails."""
    pair = local.LocalPair(
        primary=local.LocalCluster(base / "primary", name=f"primary-pg{old}", binaries=find_version(old)),
        mirror=local.LocalCluster(base / "mirror", name=f"mirror-pg{new}", binaries=find_version(new)),
        dbname=DBNAME,
        publication=PUBLICATION,
        subscription=SUBSCRIPTION,
    )
    try:

        def old_server() -> None:
            pair.primary.init().start()
            pair.primary.sql(f"CREATE DATABASE {quote_ident(DBNAME)}")
            pair.primary.sql(local.DEFAULT_SCHEMA + SEED_SQL, DBNAME)

        with ThreadPoolExecutor(2) as pool:  # initdb dominates: both at once
            for future in [pool.submit(old_server), pool.submit(lambda: pair.mirror.init().start())]:
                future.result()
        return configure(base, pair)
    except BaseException:
        pair.destroy()
        raise


# --------------------------------------------------------------------------- the story


@dataclass
class _Switch:
    """One switch measured under the writer."""

    label: str
    stall_s: float
    pgroute_stall_ms: Any
    active: str


class _Failed(Exception):
    """A step did not do what it must; the message says which."""


async def upgrade_main(demo: Demo, old: int, new: int) -> int:
    """Run the upgrade story; SIGINT, SIGTERM or SIGHUP end it (130). Returns the exit status."""
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    stoppers = stop_signals()
    for sig in stoppers:
        loop.add_signal_handler(sig, main_task.cancel)
    story = _Story(demo, old, new)
    try:
        return await story.run()
    except asyncio.CancelledError:
        _say("pgroute demo: upgrade interrupted", err=True)
        return 130
    except _Failed as exc:
        _say(f"pgroute demo: upgrade stopped: {exc}", err=True)
        return 1
    except Exception as exc:  # the story's one catch-all: say what broke, then clean up
        log.debug("upgrade demo failed", exc_info=True)
        _say(f"pgroute demo: upgrade failed: {type(exc).__name__}: {exc}", err=True)
        return 1
    finally:
        for sig in stoppers:
            loop.remove_signal_handler(sig)
        ignore_stop_signals()  # a second signal must not cut the clean-up short
        await story.close()


class _Story:
    """The steps of the upgrade, and what they leave running (writers, pgroute)."""

    def __init__(self, demo: Demo, old: int, new: int) -> None:
        self.demo, self.old, self.new = demo, old, new
        self.clock = _Clock()
        self.say = self.clock.say
        self.running: Running | None = None
        self.writers: list[Writer] = []
        self.http: aiohttp.ClientSession | None = None
        self.switches: list[_Switch] = []

    # -- the steps -----------------------------------------------------------------------

    async def run(self) -> int:
        demo, old, new, say = self.demo, self.old, self.new, self.say
        pair = demo.pair
        versions = {
            old: await asyncio.to_thread(pair.primary.sql, "SHOW server_version"),
            new: await asyncio.to_thread(pair.mirror.sql, "SHOW server_version"),
        }
        ports = {pair.primary.port: old, pair.mirror.port: new}
        say(
            f"the application's server: PostgreSQL {versions[old]} at {pair.primary.host}:{pair.primary.port} "
            f"(database {DBNAME}); a new, empty PostgreSQL {versions[new]} server at "
            f"{pair.mirror.host}:{pair.mirror.port}"
        )
        direct = self._writer(pair.primary_dsn(), "direct", 1)
        say(f"application writer: inserting straight into PostgreSQL {old} (pgroute is not there yet)")
        await direct.wait_acked(DIRECT_WRITES // 2, 60)

        say(f"1. {demo.config_path.name}: primary.dsn = the PostgreSQL {old} server, mirror.dsn = the new one")
        _say(_indent([line for line in demo.config_path.read_text().splitlines() if "dsn =" in line]))

        say("2. the new node becomes the mirror: database, schema, publication, subscription, initial copy")
        await self._cli("setup-replication", "--config", str(demo.config_path))

        await direct.wait_acked(DIRECT_WRITES // 2, 60)
        await direct.stop()
        say(f"3. {self._cmd('run', '--config', str(demo.config_path))} (here: in this process)")
        from pgroute.app import start

        self.running = await start(demo.config)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        through = self._writer(demo.database_url, "app", WRITERS)
        say(
            f"the application now connects to pgroute ({demo.database_url}): {WRITERS} writer connections; "
            f"{len(direct.acks)} writes went straight to PostgreSQL {old} before"
        )
        await through.wait_acked(100, 60)

        say(f"4. catch-up: waiting until /api/status shows the PostgreSQL {new} mirror following")
        st = await self._wait_status(
            lambda s: (
                s["active"] == "primary"
                and s["replication"] == "ok"
                and s["nodes"]["mirror"]["lag_bytes"] is not None
                and s["nodes"]["mirror"]["lag_bytes"] <= CATCH_UP_BYTES
            ),
            "the mirror to catch up",
        )
        say(f"caught up: the mirror is {st['nodes']['mirror']['lag_bytes']} bytes behind (under load)")

        say("5. readiness: what logical replication does not carry is checked before the switch")
        await self._cli("check", "--config", str(demo.config_path))

        say(f"6. the upgrade: switchover to PostgreSQL {new} while the writers run")
        await self._switch("switchover", f"switchover {old} -> {new}", "mirror")
        await self._show_versions()
        st = await self._following("primary")
        say(
            f"the PostgreSQL {old} node follows the new one (subscription "
            f"{st['nodes']['primary']['subscription']['name']}, {st['nodes']['primary']['lag_bytes']} bytes "
            f"behind): it is the rollback"
        )

        say(f"7. rollback: failback to PostgreSQL {old}, then forward again")
        await self._switch("failback", f"rollback (failback) {new} -> {old}", "primary")
        await self._following("mirror")
        await self._switch("switchover", f"switchover again {old} -> {new}", "mirror")
        await self._following("primary")
        await through.wait_acked(100, 60)
        await through.stop()
        say(f"writers stopped: {len(through.acks)} writes through pgroute, {through.error_count} errors retried")

        say("8. checking every acknowledged write on both nodes ...")
        acks = direct.acks + through.acks
        lost_new = await missing(pair.mirror_dsn(), acks)
        lost_old = await self._missing_on_follower(pair.primary_dsn(), acks)
        served = await self._server_version_through_pgroute()
        st = await self._status()
        by_version = {v: sum(1 for a in acks if ports.get(a.port) == v) for v in (old, new)}
        lost = {(a.table, a.name) for a in lost_new + lost_old}
        rows = "\n".join(
            f"  write stall, {s.label}: {s.stall_s * 1000:.0f} ms (pgroute write_stall_ms: {s.pgroute_stall_ms})"
            for s in self.switches
        )
        _say(f"""
summary: PostgreSQL {old} -> {new} by switchover, {WRITERS} writers through pgroute
  writes acknowledged: {len(acks)} ({len(direct.acks)} straight to PostgreSQL {old} before pgroute)
  committed by PostgreSQL {old}: {by_version[old]}, by PostgreSQL {new}: {by_version[new]}
  lost: {len(lost)} (missing on the PostgreSQL {new} node: {len(lost_new)}, on the PostgreSQL {old} node: \
{len(lost_old)})
{rows}
  active node: {st["active"]}, PostgreSQL {served} (SHOW server_version through pgroute)
  rollback ready: the PostgreSQL {old} node follows it, replication {st["replication"]}
  measured by: {self._cmd("demo", "--upgrade", "--from", str(old), "--to", str(new))}
  (more runs, next to same-version switches: python bench/upgrade.py --from {old} --to {new})
""")
        if lost:
            for a in (lost_new + lost_old)[:10]:
                _say(f"  LOST: {a.table} id {a.id} ({a.name})", err=True)
            return 1
        if st["active"] != "mirror" or not served.startswith(f"{new}."):
            _say(f"pgroute demo: the application is not on PostgreSQL {new} at the end", err=True)
            return 1
        return 0

    # -- helpers ---------------------------------------------------------------------------

    def _writer(self, dsn: str, tag: str, clients: int) -> Writer:
        writer = Writer(dsn, Chrispar(tag), clients=clients)
        self.writers.append(writer)
        return writer.start()

    def _cmd(self, *args: str) -> str:
        return " ".join([self.demo.pgroute, *args])

    async def _cli(self, *args: str) -> str:
        """Run a pgroute command as the operator would, print it and its output; _Failed
        when it exits non-zero."""
        self.clock.say(f"$ {self._cmd(*args)}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgroute.cli",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._cli_env(),
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace").rstrip()
        if text:
            _say(_indent(text))
        if proc.returncode != 0:
            raise _Failed(f"`pgroute {args[0]}` exited with status {proc.returncode}")
        return text

    def _cli_env(self) -> dict[str, str]:
        """This environment without what would redirect the commands (they read the
        demo's file), with the new version's pg_dump and psql."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PGROUTE_", "HEALTH_CHECK_")) and k not in _REDIRECTING_ENV
        }
        env[VERSION_ENV] = str(self.new)
        root = str(Path(__file__).resolve().parents[2])  # a checkout need not be installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    async def _status(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(f"{self.demo.api_url}/api/status") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def _wait_status(self, predicate: Any, what: str, timeout: float = FOLLOW_TIMEOUT) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def poll() -> dict[str, Any] | None:
            nonlocal last
            last = await self._status()
            return last if predicate(last) else None

        deadline = time.monotonic() + timeout
        while True:
            found = await poll()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise _Failed(
                    f"timed out after {timeout:g} s waiting for {what}: state {last.get('state')}, "
                    f"active {last.get('active')}, replication {last.get('replication')}: {last.get('reason')}"
                )
            await asyncio.sleep(0.1)

    async def _following(self, standby: str) -> dict[str, Any]:
        """Until the other node is active and `standby` follows it with a lag sample."""
        return await self._wait_status(
            lambda s: (
                s["active"] not in (None, standby)
                and s["replication"] == "ok"
                and not s["operation"]
                and s["nodes"][standby]["subscription"] is not None
                and s["nodes"][standby]["lag_bytes"] is not None
            ),
            f"the {standby} to follow",
        )

    async def _switch(self, kind: str, label: str, expect: str) -> None:
        """`pgroute <kind> --yes` under the writers: the stall they saw, and pgroute's."""
        writer = self.writers[-1]
        await writer.wait_acked(50, 60)
        t0 = time.monotonic()
        await self._cli(kind, "--yes", "--api", self.demo.api_url)
        t1 = time.monotonic()
        if await writer.wait_first_acked_after(t1 + SETTLE, timeout=30) is None:
            raise _Failed(f"no write acknowledged within 30 s after the {kind}")
        stall = writer.max_gap(t0, t1)[0]
        st = await self._status()
        event: dict[str, Any] = next((e for e in st["events"] if e["kind"] == kind and e["ended_at"]), {})
        pgroute_ms = (event.get("details") or {}).get("write_stall_ms", "?")
        if st["active"] != expect:
            raise _Failed(f"after the {kind} pgroute routes to {st['active']}, not {expect}")
        self.switches.append(_Switch(label, stall, pgroute_ms, st["active"]))
        self.say(
            f"{label}: the writers' longest wait for a commit {stall * 1000:.0f} ms; "
            f"pgroute's write_stall_ms {pgroute_ms}"
        )

    async def _show_versions(self) -> None:
        served = await self._server_version_through_pgroute()
        self.say(f"the application is on PostgreSQL {served} now (SHOW server_version through pgroute)")

    async def _server_version_through_pgroute(self) -> str:
        conn = await asyncpg.connect(self.demo.database_url, timeout=10)
        try:
            version: str = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        return version.split()[0]

    async def _missing_on_follower(self, dsn: str, acks: list[Ack]) -> list[Ack]:
        """What the following node still lacks once replication had time to bring it."""
        lost: list[Ack] = []

        async def complete() -> bool:
            nonlocal lost
            lost = await missing(dsn, acks)
            return not lost

        with contextlib.suppress(TimeoutError):
            await _wait_async(complete, FOLLOW_TIMEOUT)
        return lost

    async def close(self) -> None:
        """Stop the writers, the API client and pgroute (the servers are main's)."""
        for writer in self.writers:
            await writer.stop()
        if self.http is not None:
            await self.http.close()
        if self.running is not None:
            await self.running.stop()


async def _wait_async(predicate: Any, timeout: float) -> None:
    """Until the coroutine function `predicate` returns true; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout:g} s")
        await asyncio.sleep(0.5)


__all__ = ["choose_versions", "installed_versions", "prepare_upgrade", "upgrade_main"]
