"""The switch procedures the controller runs: failover, fence, rejoin, switchover.

Each procedure is a sequence of small idempotent steps (see replication.py), timed
phase by phase through ``Op.phase`` and safe to re-run after a crash halfway:

- The node being promoted is stamped with the new epoch *before* its subscription
  is dropped: a restart that finds the newest stamp on a node still holding a
  subscription re-runs the promotion (``finish_promotion``) before routing to it.
- The state file is written (atomically) before the Router points at the new node.
- Before any write reaches a promoted node, it holds a publication and a slot for
  the other node's future subscription, so nothing written after the switch is lost
  to the node that comes back.

Procedures never raise for node failures: they return an ``OpResult`` saying which
node is safe to route to (None: none, fail closed) and what they did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import asyncpg

from ..config import Config
from ..pg.dsn import Dsn, mask_dsn
from ..errors import NodeUnavailable, PgRouteError
from ..model import NodeName
from ..proxy.router import Backend, Route, Router
from . import replication as repl
from .state_store import StateFile, Stored

log = logging.getLogger(__name__)

DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
             NodeUnavailable)


@dataclass
class Op:
    """A running operation: its kind, current phase and the phase timings."""

    kind: str
    tag: str                     # FAILOVER or FAILBACK (log grep), or SWITCHOVER
    started_at: float = field(default_factory=time.time)
    phase_name: str = "starting"
    phases: list[tuple[str, float]] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    on_phase: Callable[["Op"], None] | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.phase_name = name
        if self.on_phase:
            self.on_phase(self)
        log.info("%s phase %s started", self.tag, name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0
            self.phases.append((name, took))
            log.info("%s phase %s took %.3fs", self.tag, name, took)


@dataclass(frozen=True)
class OpResult:
    ok: bool
    active: NodeName | None     # where it is safe to route now
    epoch: int
    detail: str


class Context:
    """What the procedures need from the controller."""

    def __init__(self, config: Config, router: Router, state_file: StateFile,
                 backends: dict[NodeName, Backend], is_paused: Callable[[], bool],
                 sequences: Callable[[], dict[str, int] | None]) -> None:
        self.config = config
        self.router = router
        self.state_file = state_file
        self.backends = backends
        self.is_paused = is_paused
        self.sequences = sequences

    def dsn(self, node: NodeName) -> Dsn:
        return self.config.node_dsn(node.value)

    def sub(self, subscriber: NodeName) -> str:
        """Name of the subscription held by ``subscriber`` (= its slot on the publisher)."""
        return repl.subscription_name(self.config.replication.subscription, subscriber.value)

    async def connect(self, node: NodeName, timeout: float | None = None) -> asyncpg.Connection:
        return await repl.connect(self.dsn(node), timeout or self.config.health.timeout)

    def route_to(self, node: NodeName | None, epoch: int, reason: str = "") -> None:
        backend = self.backends[node] if node else None
        self.router.publish(Route(backend, epoch, paused=self.is_paused(), reason=reason))

    def hold(self, epoch: int, reason: str) -> None:
        """New connections wait (paused) and nothing is routed while a switch runs."""
        self.router.publish(Route(None, epoch, paused=True, reason=reason))

    def persist(self, epoch: int, active: NodeName | None) -> None:
        self.state_file.save(Stored(epoch, active))


async def _close(conn: asyncpg.Connection | None) -> None:
    if conn is not None and not conn.is_closed():
        try:
            await asyncio.wait_for(conn.close(), 2)
        except DB_ERRORS:
            conn.terminate()


def _err(exc: BaseException) -> str:
    return mask_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:300]


async def _try_connect(ctx: Context, node: NodeName, timeout: float) -> asyncpg.Connection | None:
    try:
        return await ctx.connect(node, timeout)
    except DB_ERRORS as exc:
        log.info("%s unreachable: %s", node.value, _err(exc))
        return None


# -- failover ---------------------------------------------------------------------------

async def failover(ctx: Context, op: Op, target: NodeName, epoch: int, *, manual: bool,
                   force: bool) -> OpResult:
    """Promote ``target`` and route to it. The old active node is fenced first."""
    old = target.other
    new_epoch = epoch + 1
    cfg = ctx.config
    old_conn = None
    try:
        with op.phase("fence"):
            ctx.hold(epoch, f"FAILOVER to {target.value} in progress")
            closed = ctx.router.close_sessions(backend=old.value, reason="FAILOVER: old active node fenced")
            op.details["sessions_closed"] = str(closed)
            # Automatic: the node was just declared down (a hung one accepts TCP and
            # never answers), so one short attempt, not a full probe timeout, on the
            # critical path. Manual: the node is expected up and must be fenced.
            fence_timeout = cfg.health.timeout if manual else min(cfg.health.timeout, 0.5)
            old_conn = await _try_connect(ctx, old, fence_timeout)
            old_lsn = None
            if old_conn is not None:
                try:
                    await asyncio.wait_for(repl.fence(old_conn), cfg.health.timeout)
                    old_lsn = await repl.current_lsn(old_conn)
                    op.details["old_active_fenced"] = "yes"
                except DB_ERRORS as exc:
                    op.details["old_active_fenced"] = f"no: {_err(exc)}"
                    await _close(old_conn)
                    old_conn = None
            else:
                op.details["old_active_fenced"] = "no: unreachable"

        if old_conn is not None and old_lsn is not None:
            # The old active node is up and now read-only: wait until the target has
            # applied everything it acknowledged, so a manual failover loses nothing.
            with op.phase("catch_up"):
                try:
                    await repl.wait_caught_up(old_conn, ctx.sub(target), old_lsn,
                                              timeout=max(cfg.health.timeout * 2, 10.0))
                    op.details["caught_up_to"] = _lsn(old_lsn)
                except DB_ERRORS as exc:
                    if not force:
                        epoch = await _abort_to(ctx, old, old_conn, epoch,
                                                f"{target.value} did not catch up: {_err(exc)}")
                        return OpResult(False, old, epoch,
                                        f"{target.value} did not catch up with {old.value} "
                                        f"({_err(exc)}); {old.value} unfenced and still active")
                    op.details["caught_up_to"] = f"forced without catch-up ({_err(exc)})"

        with op.phase("promote"):
            try:
                report = await promote_node(ctx, target, new_epoch)
            except DB_ERRORS as exc:
                if old_conn is not None:
                    epoch = await _abort_to(ctx, old, old_conn, epoch, f"promotion failed: {_err(exc)}")
                    return OpResult(False, old, epoch, f"promotion of {target.value} failed "
                                    f"({_err(exc)}); {old.value} unfenced and still active")
                ctx.route_to(None, epoch, f"FAILOVER to {target.value} failed: {_err(exc)}")
                return OpResult(False, None, epoch, f"promotion of {target.value} failed: "
                                f"{_err(exc)}; routing to no node")
            op.details.update(report)
            if old_conn is not None:
                try:
                    await repl.write_stamp(old_conn, new_epoch, target.value)
                except DB_ERRORS as exc:
                    log.warning("FAILOVER could not stamp %s: %s", old.value, _err(exc))

        with op.phase("route"):
            ctx.persist(new_epoch, target)
            ctx.route_to(target, new_epoch)
            ctx.router.close_sessions(before_epoch=new_epoch, reason="FAILOVER: epoch changed")
        return OpResult(True, target, new_epoch,
                        f"epoch {new_epoch}; old active {old.value} "
                        f"{'fenced' if old_conn is not None else 'unreachable'}")
    finally:
        await _close(old_conn)


async def promote_node(ctx: Context, target: NodeName, new_epoch: int) -> dict[str, str]:
    """Stamp, detach, move sequences, open the reverse publication + slot, unfence.
    Every step is idempotent; raises on node errors."""
    cfg = ctx.config
    conn = await ctx.connect(target)
    try:
        await repl.write_stamp(conn, new_epoch, target.value)
        await _record_applied_lsn(conn, ctx.sub(target))
        report = await repl.promote(conn, ctx.sub(target), cfg.replication.sequence_gap, ctx.sequences())
        await repl.ensure_publication(conn, cfg.replication.publication)
        slot = ctx.sub(target.other)
        created = await repl.ensure_slot(conn, slot)
        strict = cfg.replication.synchronous == "strict"
        # Synchronous 'on' drops back to asynchronous while no standby follows;
        # 'strict' keeps waiting for the returning node (writes block until it rejoins).
        await repl.set_synchronous(conn, slot if strict else None)
        await repl.unfence(conn)
        return {
            "subscription_dropped": str(report.get("subscription_dropped")),
            "sequences_moved": str(len(report.get("sequences", {}))),
            "retention_slot": f"{slot} ({'created' if created else 'existed'})",
        }
    finally:
        await _close(conn)


APPLIED_LSN_SETTING = "pgroute.applied_lsn"

_ORIGIN_LSN_SQL = """
SELECT (s.remote_lsn - '0/0'::pg_lsn)::bigint
  FROM pg_replication_origin_status s
  JOIN pg_subscription sub ON s.external_id = 'pg_' || sub.oid
 WHERE sub.subname = $1
"""


async def _record_applied_lsn(conn: asyncpg.Connection, sub: str) -> None:
    """Keep, on the node being promoted, the last publisher LSN it applied.

    The publisher's slot position (confirmed_flush_lsn) is only written to disk at
    checkpoints: after a crash the old primary's slot may point before commits the
    mirror did apply. The mirror's replication origin is WAL-logged with each commit,
    so it is exact; rejoin uses it to tell divergent commits from applied ones. Read
    before the subscription (and its origin) is dropped; a re-run after the drop
    finds no origin and keeps the value already stored."""
    lsn = await conn.fetchval(_ORIGIN_LSN_SQL, sub)
    if lsn is None:
        return
    db = await conn.fetchval("SELECT current_database()")
    ident = '"' + db.replace('"', '""') + '"'
    await conn.execute(f"ALTER DATABASE {ident} SET {APPLIED_LSN_SETTING} = '{_lsn(lsn)}'")


async def read_applied_lsn(conn: asyncpg.Connection) -> str | None:
    row = await conn.fetchval(
        "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE s.setrole = 0 AND d.datname = current_database()")
    for item in row or ():
        key, _, value = item.partition("=")
        if key == APPLIED_LSN_SETTING:
            return value
    return None


async def _abort_to(ctx: Context, node: NodeName, conn: asyncpg.Connection, epoch: int, why: str) -> int:
    """Undo the fence of a node that stays active and route back to it.

    The target may already carry the new epoch's stamp: the abort is a decision of
    its own, with a higher epoch stamped on ``node`` and persisted, so that a restart
    can never prefer the half-promoted target over the node that kept taking writes.
    Returns the epoch now in force."""
    log.warning("FAILOVER aborted: %s; routing back to %s", why, node.value)
    abort_epoch = epoch + 2
    try:
        await repl.write_stamp(conn, abort_epoch, node.value)
        ctx.persist(abort_epoch, node)
        await repl.unfence(conn)
    except DB_ERRORS as exc:
        log.error("FAILOVER abort could not restore %s: %s", node.value, _err(exc))
        ctx.route_to(None, epoch, f"failover aborted and {node.value} could not be unfenced")
        return epoch
    ctx.route_to(node, abort_epoch)
    return abort_epoch


# -- fence ------------------------------------------------------------------------------------

async def fence(ctx: Context, node: NodeName, epoch: int, active: NodeName | None) -> OpResult:
    """Make a returned node read-only, end its client sessions and stamp the epoch."""
    conn = await _try_connect(ctx, node, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, active, epoch, f"{node.value} unreachable")
    try:
        await repl.fence(conn)
        await repl.write_stamp(conn, epoch, active.value if active else "none")
        return OpResult(True, active, epoch, f"{node.value} read-only, sessions terminated, epoch {epoch} stamped")
    except DB_ERRORS as exc:
        return OpResult(False, active, epoch, _err(exc))
    finally:
        await _close(conn)


# -- rejoin ---------------------------------------------------------------------------------

async def rejoin(ctx: Context, op: Op, node: NodeName, epoch: int, active: NodeName | None,
                 record_conflicts: Callable[[list[dict]], None], *, resync: bool = False) -> OpResult:
    """Make the returned, fenced ``node`` a subscriber of ``active`` without losing
    what it committed that ``active`` never received.

    1. divergence: peek the orphaned slot of active's old subscription on ``node``;
       write the divergent commits to recovery files and apply them to ``active``
       (colliding rows are recorded as conflicts, never overwritten).
    2. drop that slot (it would hold WAL forever).
    3. subscribe: from the retention slot created at failover when nothing diverged
       (catch-up, no copy), else a full resync (pg_dump of ``node`` first, truncate,
       initial copy). ``node`` stays fenced and unrouted throughout.
    """
    from . import divergence

    if active is None:
        return OpResult(False, active, epoch, "no active node to rejoin to")
    cfg = ctx.config
    node_conn = active_conn = None
    try:
        node_conn = await ctx.connect(node)
        active_conn = await ctx.connect(active)
        old_slot = ctx.sub(active)          # active's old subscription slot on node
        with op.phase("divergence"):
            applied = await read_applied_lsn(active_conn)
            divset = await divergence.read_divergent(node_conn, old_slot, cfg.replication.publication,
                                                     applied_lsn=applied)
            op.details["applied_lsn"] = applied or "unknown"
            diverged = not divset.empty
            op.details["orphaned_slot"] = "found" if divset.slot_found else "absent"
            op.details["divergent_transactions"] = str(len(divset.transactions))
            if diverged:
                label = f"divergent-{node.value}-epoch{epoch}-{int(time.time())}"
                # Files first: whatever happens next, the divergent commits are on disk.
                divergence.write_recovery_files(recovery_dir(cfg), divset, None, label)
                report = await divergence.apply_divergent(active_conn, divset)
                jsonl, sql = divergence.write_recovery_files(recovery_dir(cfg), divset, report, label)
                op.details.update({"recovery_jsonl": str(jsonl), "recovery_sql": str(sql),
                                   "divergent_applied": str(report.applied),
                                   "divergent_identical": str(report.skipped_identical),
                                   "conflicts": str(len(report.conflicts))})
                conflicts = [_conflict_json(c, jsonl) for c in report.conflicts]
                if conflicts:
                    log.warning("FAILBACK: %d divergent change(s) conflict with rows written on %s "
                                "since failover; both versions kept, see %s", len(conflicts),
                                active.value, jsonl)
                    record_conflicts(conflicts)
        with op.phase("drop_orphaned_slot"):
            if divset.slot_found:
                await repl.drop_slot(node_conn, old_slot)
        with op.phase("subscribe"):
            sub = ctx.sub(node)
            existing = await repl.subscription_info(node_conn, sub)
            retention = await repl.slot_info(active_conn, sub)
            catch_up = (not resync and not diverged and divset.slot_found and retention is not None)
            conninfo = ctx.dsn(active).libpq_conninfo()
            if existing is not None and not resync:
                mode = "already subscribed"
                await repl.subscribe(node_conn, sub, conninfo, cfg.replication.publication,
                                     copy_data=False, create_slot=False)
            elif catch_up:
                mode = "catch-up from the retention slot"
                await repl.subscribe(node_conn, sub, conninfo, cfg.replication.publication,
                                     copy_data=False, create_slot=False)
            else:
                mode = "full resync"
                dump = await _dump(ctx, node, epoch)
                op.details["pg_dump"] = str(dump)
                if existing is not None:
                    await repl.drop_subscription(node_conn, sub, publisher_reachable=True)
                await repl.drop_slot(active_conn, sub)
                await repl.truncate_published_tables(node_conn, cfg.replication.publication)
                await repl.subscribe(node_conn, sub, conninfo, cfg.replication.publication,
                                     copy_data=True, create_slot=True)
            op.details["mode"] = mode
            log.info("FAILBACK rejoin of %s: %s", node.value, mode)
        with op.phase("catch_up"):
            await _wait_subscription_ready(node_conn, sub, timeout=120.0)
            await repl.wait_caught_up(active_conn, sub, await repl.current_lsn(active_conn), timeout=60.0)
            await repl.write_stamp(node_conn, epoch, active.value)
            if cfg.replication.synchronous in ("on", "strict"):
                await repl.set_synchronous(active_conn, sub)
        return OpResult(True, active, epoch, mode)
    except DB_ERRORS as exc:
        return OpResult(False, active, epoch, f"{op.phase_name}: {_err(exc)}")
    finally:
        await _close(node_conn)
        await _close(active_conn)


def _conflict_json(conflict, path) -> dict:
    return {"table": conflict.table, "kind": conflict.kind, "key": conflict.key,
            "divergent": conflict.divergent, "active": conflict.active,
            "reason": conflict.reason, "xid": conflict.xid, "recovery_file": str(path)}


async def _wait_subscription_ready(conn: asyncpg.Connection, sub: str, timeout: float) -> None:
    """Wait until every table of the subscription finished its initial copy."""
    deadline = time.monotonic() + timeout
    while True:
        info = await repl.subscription_info(conn, sub)
        # 's' (synced, the apply worker takes over) is enough: wait_caught_up then
        # checks that everything up to the publisher's position was applied.
        if info is not None and all(st in ("s", "r") for st in info.get("tables", {}).values()):
            return
        if time.monotonic() > deadline:
            states = info.get("tables") if info else None
            raise asyncio.TimeoutError(f"subscription {sub} initial copy not finished in {timeout:g}s "
                                       f"(table states: {states})")
        await asyncio.sleep(0.1)


async def _dump(ctx: Context, node: NodeName, epoch: int) -> Path:
    """pg_dump of a node before a full resync overwrites it."""
    directory = recovery_dir(ctx.config)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"pg_dump-{node.value}-epoch{epoch}-{int(time.time())}.sql"
    dsn = ctx.dsn(node)
    env = {"PGPASSWORD": dsn.password} if dsn.password else {}
    import os
    proc = await asyncio.create_subprocess_exec(
        repl._pg_binary("pg_dump"), "-h", dsn.host, "-p", str(dsn.port), "-U", dsn.user,
        "-d", dsn.dbname, "-f", str(path), "--no-password",
        env={**os.environ, **env}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"pg_dump of {node.value} failed: {mask_dsn(err.decode(errors='replace').strip())}")
    return path


async def ensure_synchronous_commit(ctx: Context, node: NodeName) -> None:
    """Make ``node``'s subscription report commits as soon as they are flushed.

    With synchronous_commit = off on a subscription (PostgreSQL's default for
    subscriptions created by hand), the subscriber confirms a commit only after its
    WAL writer runs (~200 ms): synchronous commits on the publisher wait that long,
    and so does a switchover's catch-up."""
    sub = ctx.sub(node)
    conn = await ctx.connect(node)
    try:
        info = await repl.subscription_info(conn, sub)
        if info is not None and info.get("synchronous_commit") != "on":
            await conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (synchronous_commit = on)')
            log.info("subscription %s on %s: synchronous_commit set to on", sub, node.value)
    finally:
        await _close(conn)


# -- switchover and failback -------------------------------------------------------------------

DRAIN_WINDOW = 0.2   # seconds in-flight sessions get before they are closed


async def switchover(ctx: Context, op: Op, target: NodeName, epoch: int) -> OpResult:
    """Planned move of the active role to ``target`` (both up, target subscribed)."""
    cfg = ctx.config
    old = target.other
    new_epoch = epoch + 1
    old_conn = None
    try:
        await ensure_synchronous_commit(ctx, target)   # fast catch-up below
        old_conn = await ctx.connect(old)
        t_hold = time.monotonic()
        with op.phase("drain"):
            ctx.hold(epoch, f"switchover to {target.value} in progress")
            deadline = time.monotonic() + DRAIN_WINDOW
            while ctx.router.session_count and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        with op.phase("fence"):
            # Writes stop here: open sessions could still commit during the drain.
            t_stop = time.monotonic()
            op.details["sessions_closed"] = str(
                ctx.router.close_sessions(backend=old.value, reason=f"{op.tag}: switching to {target.value}"))
            await repl.fence(old_conn)
            lsn = await repl.current_lsn(old_conn)
        with op.phase("catch_up"):
            try:
                await repl.wait_caught_up(old_conn, ctx.sub(target), lsn, timeout=10.0)
            except DB_ERRORS as exc:
                epoch = await _abort_to(ctx, old, old_conn, epoch, f"{target.value} did not catch up: {_err(exc)}")
                return OpResult(False, old, epoch, f"{target.value} did not catch up ({_err(exc)}); "
                                f"{old.value} still active")
        with op.phase("promote"):
            try:
                op.details.update(await promote_node(ctx, target, new_epoch))
            except DB_ERRORS as exc:
                epoch = await _abort_to(ctx, old, old_conn, epoch, f"promotion failed: {_err(exc)}")
                return OpResult(False, old, epoch, f"promotion of {target.value} failed ({_err(exc)}); "
                                f"{old.value} still active")
        # From here on the target holds every acknowledged commit and is promoted:
        # route to it even if the old node fails below (it will rejoin later).
        with op.phase("route"):
            ctx.persist(new_epoch, target)
            ctx.route_to(target, new_epoch)
            ctx.router.close_sessions(before_epoch=new_epoch, reason=f"{op.tag}: epoch changed")
            now = time.monotonic()
            stall = now - t_stop
            op.details["write_stall_ms"] = f"{stall * 1000:.0f}"
            op.details["new_connections_held_ms"] = f"{(now - t_hold) * 1000:.0f}"
        with op.phase("resubscribe"):
            try:
                await repl.write_stamp(old_conn, new_epoch, target.value)
                await repl.drop_slot(old_conn, ctx.sub(target))
                await repl.set_synchronous(old_conn, None)
                await repl.subscribe(old_conn, ctx.sub(old), ctx.dsn(target).libpq_conninfo(),
                                     cfg.replication.publication, copy_data=False, create_slot=False)
                if cfg.replication.synchronous in ("on", "strict"):
                    tconn = await ctx.connect(target)
                    try:
                        await repl.set_synchronous(tconn, ctx.sub(old))
                    finally:
                        await _close(tconn)
                op.details["old_active"] = f"{old.value} follows {target.value}"
            except DB_ERRORS as exc:
                op.details["old_active"] = f"{old.value} not resubscribed: {_err(exc)} (it rejoins when back)"
        return OpResult(True, target, new_epoch,
                        f"epoch {new_epoch}; write stall {stall * 1000:.0f} ms; {op.details['old_active']}")
    except DB_ERRORS as exc:
        # Before the route phase: old is still the one with every commit.
        if old_conn is not None and not old_conn.is_closed():
            epoch = await _abort_to(ctx, old, old_conn, epoch, _err(exc))
            return OpResult(False, old, epoch, f"{op.phase_name}: {_err(exc)}; {old.value} still active")
        ctx.route_to(old, epoch)
        return OpResult(False, old, epoch, f"{op.phase_name}: {_err(exc)}; routing to {old.value}")
    finally:
        await _close(old_conn)


async def failback(ctx: Context, op: Op, epoch: int, record_conflicts: Callable[[list[dict]], None],
                   *, resync: bool = False) -> OpResult:
    """Rejoin the configured primary if needed, then switch over to it."""
    primary = NodeName.PRIMARY
    conn = await _try_connect(ctx, primary, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, NodeName.MIRROR, epoch, "primary unreachable")
    try:
        info = await repl.subscription_info(conn, ctx.sub(primary))
    finally:
        await _close(conn)
    if info is None or not info.get("enabled") or resync:
        result = await rejoin(ctx, op, primary, epoch, NodeName.MIRROR, record_conflicts, resync=resync)
        if not result.ok:
            return OpResult(False, NodeName.MIRROR, epoch, f"rejoin failed: {result.detail}")
        op.details["rejoin"] = result.detail
    return await switchover(ctx, op, primary, epoch)


async def unfence(ctx: Context, node: NodeName, epoch: int) -> OpResult:
    conn = await _try_connect(ctx, node, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, node, epoch, f"{node.value} unreachable")
    try:
        await repl.unfence(conn)
        return OpResult(True, node, epoch, f"{node.value} writable again")
    except DB_ERRORS as exc:
        return OpResult(False, node, epoch, _err(exc))
    finally:
        await _close(conn)


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def recovery_dir(config: Config) -> Path:
    return Path(config.state.recovery_dir)


class OperationError(PgRouteError):
    """An operation failed; the message says what pgroute did about it."""
