"""Rejoin: make a returned, fenced node a subscriber of the active node without
losing what it committed that the active node never received.

The divergent commits are written to recovery files *before* anything is applied or
dropped, and a full resync is preceded by a pg_dump of the node it overwrites: every
destructive step has its evidence on disk first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...model import NodeName
from ...pg import catalog
from ...pg.clients import dump_database
from ...pg.connect import DB_ERRORS, close, describe
from .. import divergence
from .. import replication as repl
from .context import Context, Op, OpResult

log = logging.getLogger(__name__)


async def _dump(ctx: Context, node: NodeName, epoch: int) -> Path:
    """pg_dump of a node before a full resync overwrites it."""
    path = ctx.recovery_dir / f"pg_dump-{node.value}-epoch{epoch}-{int(time.time())}.sql"
    return await dump_database(ctx.dsn(node), path)


async def rejoin(
    ctx: Context,
    op: Op,
    node: NodeName,
    epoch: int,
    active: NodeName | None,
    record_conflicts: Callable[[list[dict]], None],
    *,
    resync: bool = False,
) -> OpResult:
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
    if active is None:
        return OpResult(False, active, epoch, "no active node to rejoin to")
    cfg = ctx.config
    node_conn = active_conn = None
    try:
        node_conn = await ctx.connect(node)
        active_conn = await ctx.connect(active)
        await catalog.ensure_distinct(node_conn, active_conn, f"rejoin {node.value} to {active.value}")
        old_slot = ctx.sub(active)  # active's old subscription slot on node
        with op.phase("divergence"):
            applied = await catalog.read_applied_lsn(active_conn)
            divset = await divergence.read_divergent(
                node_conn, old_slot, cfg.replication.publication, applied_lsn=applied
            )
            op.details["applied_lsn"] = applied or "unknown"
            diverged = not divset.empty
            op.details["orphaned_slot"] = "found" if divset.slot_found else "absent"
            op.details["divergent_transactions"] = len(divset.transactions)
            if diverged:
                label = f"divergent-{node.value}-epoch{epoch}-{int(time.time())}"
                # Files first: whatever happens next, the divergent commits are on disk.
                divergence.write_recovery_files(ctx.recovery_dir, divset, None, label)
                report = await divergence.apply_divergent(active_conn, divset)
                jsonl, sql = divergence.write_recovery_files(ctx.recovery_dir, divset, report, label)
                op.details.update(
                    {
                        "recovery_jsonl": str(jsonl),
                        "recovery_sql": str(sql),
                        "divergent_applied": report.applied,
                        "divergent_identical": report.skipped_identical,
                        "conflicts": len(report.conflicts),
                    }
                )
                conflicts = [_conflict_json(c, jsonl) for c in report.conflicts]
                if conflicts:
                    log.warning(
                        "FAILBACK: %d divergent change(s) conflict with rows written on %s "
                        "since failover; both versions kept, see %s",
                        len(conflicts),
                        active.value,
                        jsonl,
                    )
                    record_conflicts(conflicts)
        with op.phase("drop_orphaned_slot"):
            if divset.slot_found:
                await catalog.ensure_distinct(node_conn, active_conn, f"drop slot {old_slot} on {node.value}")
                await repl.drop_slot(node_conn, old_slot)
        with op.phase("subscribe"):
            sub = ctx.sub(node)
            existing = await repl.subscription_info(node_conn, sub)
            retention = await repl.slot_info(active_conn, sub)
            catch_up = not resync and not diverged and divset.slot_found and retention is not None
            conninfo = ctx.publisher_conninfo(active)
            if existing is not None and not resync:
                mode = "already subscribed"
                await repl.subscribe(
                    node_conn, sub, conninfo, cfg.replication.publication, copy_data=False, create_slot=False
                )
            elif catch_up:
                mode = "catch-up from the retention slot"
                await repl.subscribe(
                    node_conn, sub, conninfo, cfg.replication.publication, copy_data=False, create_slot=False
                )
            else:
                mode = "full resync"
                dump = await _dump(ctx, node, epoch)
                op.details["pg_dump"] = str(dump)
                # The dump stays whatever happens; nothing is emptied unless the node
                # being emptied is provably not the one the copy comes from.
                await catalog.ensure_distinct(node_conn, active_conn, f"resync {node.value} from {active.value}")
                if existing is not None:
                    await repl.drop_subscription(node_conn, sub, publisher_reachable=True)
                await repl.drop_slot(active_conn, sub)
                await repl.truncate_published_tables(node_conn, cfg.replication.publication)
                await repl.subscribe(
                    node_conn, sub, conninfo, cfg.replication.publication, copy_data=True, create_slot=True
                )
            op.details["mode"] = mode
            log.info("FAILBACK rejoin of %s: %s", node.value, mode)
        with op.phase("catch_up"):
            await repl.wait_subscription_ready(node_conn, sub, timeout=120.0)
            await repl.wait_caught_up(active_conn, sub, await catalog.current_lsn(active_conn), timeout=60.0)
            await catalog.write_stamp(node_conn, epoch, active.value)
            if cfg.replication.synchronous in ("on", "strict"):
                await repl.set_synchronous(active_conn, sub)
        return OpResult(True, active, epoch, mode)
    except DB_ERRORS as exc:
        return OpResult(False, active, epoch, f"{op.phase_name}: {describe(exc)}")
    finally:
        await close(node_conn)
        await close(active_conn)


def _conflict_json(conflict: divergence.Conflict, path: Path) -> dict[str, Any]:
    return {
        "table": conflict.table,
        "kind": conflict.kind,
        "key": conflict.key,
        "divergent": conflict.divergent,
        "active": conflict.active,
        "reason": conflict.reason,
        "xid": conflict.xid,
        "recovery_file": str(path),
    }
