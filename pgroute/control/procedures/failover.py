"""Failover: fence the old active node (when it answers), let the target catch up
(when the old node is up), promote the target, persist and route.

Ordering invariants (each step idempotent, safe to re-run after a crash halfway):
- The node being promoted is stamped with the new epoch *before* its subscription
  is dropped: a restart that finds the newest stamp on a node still holding a
  subscription re-runs the promotion (``promote_node``) before routing to it.
- The state file is written (atomically) before the Router points at the new node.
- Before any write reaches a promoted node, it holds a publication and a slot for
  the other node's future subscription, so nothing written after the switch is lost
  to the node that comes back.
- An abort stamps and persists a *higher* epoch on the node that stays active, so a
  restart never prefers a half-promoted target over the node that kept the writes.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ...model import Detail, NodeName
from ...pg import catalog
from ...pg.connect import DB_ERRORS, close, describe
from ...pg.naming import int_to_lsn
from .. import fencing
from .. import replication as repl
from .context import Context, Op, OpResult

log = logging.getLogger(__name__)


async def failover(ctx: Context, op: Op, target: NodeName, epoch: int, *, manual: bool, force: bool) -> OpResult:
    """Promote ``target`` and route to it. The old active node is fenced first."""
    old = target.other
    new_epoch = epoch + 1
    cfg = ctx.config
    old_conn = None
    try:
        with op.phase("fence"):
            await ctx.hold(epoch, f"FAILOVER to {target.value} in progress")
            closed = ctx.router.close_sessions(backend=old.value, reason="FAILOVER: old active node fenced")
            op.details["sessions_closed"] = closed
            # Automatic: the node was just declared down (a hung one accepts TCP and
            # never answers), so one short attempt, not a full probe timeout, on the
            # critical path. Manual: the node is expected up and must be fenced.
            fence_timeout = cfg.health.timeout if manual else min(cfg.health.timeout, 0.5)
            old_conn = await ctx.try_connect(old, fence_timeout)
            old_lsn = None
            if old_conn is not None:
                try:
                    await asyncio.wait_for(fencing.fence(old_conn, spare=ctx.own_pids(old)), cfg.health.timeout)
                    old_lsn = await catalog.current_lsn(old_conn)
                    op.details["old_active_fenced"] = "yes"
                except DB_ERRORS as exc:
                    op.details["old_active_fenced"] = f"no: {describe(exc)}"
                    await close(old_conn)
                    old_conn = None
            else:
                op.details["old_active_fenced"] = "no: unreachable"

        if old_conn is not None and old_lsn is not None:
            # The old active node is up and now read-only: wait until the target has
            # applied everything it acknowledged, so a manual failover loses nothing.
            with op.phase("catch_up"):
                try:
                    await repl.wait_caught_up(
                        old_conn, ctx.sub(target), old_lsn, timeout=max(cfg.health.timeout * 2, 10.0)
                    )
                    op.details["caught_up_to"] = int_to_lsn(old_lsn)
                except DB_ERRORS as exc:
                    if not force:
                        epoch = await abort_to(
                            ctx, old, old_conn, epoch, f"{target.value} did not catch up: {describe(exc)}"
                        )
                        return OpResult(
                            False,
                            old,
                            epoch,
                            f"{target.value} did not catch up with {old.value} "
                            f"({describe(exc)}); {old.value} unfenced and still active",
                        )
                    op.details["caught_up_to"] = f"forced without catch-up ({describe(exc)})"

        # A cluster's other instances have closed their sessions at the old epoch
        # (or are gone) before anything is promoted; alone this is a no-op.
        if not await ctx.barrier(op, new_epoch, f"FAILOVER to {target.value}: waiting for every instance"):
            why = f"not every instance applied epoch {new_epoch} ({op.details.get('barrier', '')})"
            if old_conn is not None:
                epoch = await abort_to(ctx, old, old_conn, epoch, why)
                return OpResult(False, old, epoch, f"{why}; {old.value} unfenced and still active")
            await ctx.route_to(None, epoch, f"FAILOVER to {target.value} aborted: {why}")
            return OpResult(False, None, epoch, f"{why}; routing to no node")

        with op.phase("promote"):
            try:
                report = await promote_node(ctx, target, new_epoch, old_conn)
            except DB_ERRORS as exc:
                if old_conn is not None:
                    epoch = await abort_to(ctx, old, old_conn, epoch, f"promotion failed: {describe(exc)}")
                    return OpResult(
                        False,
                        old,
                        epoch,
                        f"promotion of {target.value} failed ({describe(exc)}); {old.value} unfenced and still active",
                    )
                await ctx.route_to(None, epoch, f"FAILOVER to {target.value} failed: {describe(exc)}")
                return OpResult(
                    False, None, epoch, f"promotion of {target.value} failed: {describe(exc)}; routing to no node"
                )
            op.details.update(report)
            if old_conn is not None:
                try:
                    await catalog.write_stamp(old_conn, new_epoch, target.value)
                except DB_ERRORS as exc:
                    log.warning("FAILOVER could not stamp %s: %s", old.value, describe(exc))

        with op.phase("route"):
            ctx.persist(new_epoch, target)
            await ctx.route_to(target, new_epoch)
            ctx.router.close_sessions(before_epoch=new_epoch, reason="FAILOVER: epoch changed")
        return OpResult(
            True,
            target,
            new_epoch,
            f"epoch {new_epoch}; old active {old.value} {'fenced' if old_conn is not None else 'unreachable'}",
        )
    finally:
        await close(old_conn)


async def promote_node(
    ctx: Context, target: NodeName, new_epoch: int, other: asyncpg.Connection | None = None
) -> dict[str, Detail]:
    """Stamp, detach, move sequences, open the reverse publication + slot, unfence.
    Every step is idempotent; raises on node errors. ``other``: a connection to the
    other node when it answers, to prove the subscription dropped is not its own."""
    cfg = ctx.config
    conn = await ctx.connect(target)
    try:
        if other is not None:
            await catalog.ensure_distinct(conn, other, f"promote {target.value}")
        await catalog.write_stamp(conn, new_epoch, target.value)
        await catalog.record_applied_lsn(conn, ctx.sub(target))
        report = await repl.promote(conn, ctx.sub(target), cfg.replication.sequence_gap, ctx.sequences())
        await repl.ensure_publication(conn, cfg.replication.publication)
        slot = ctx.sub(target.other)
        created = await repl.ensure_slot(conn, slot)
        strict = cfg.replication.synchronous == "strict"
        # Synchronous 'on' drops back to asynchronous while no standby follows;
        # 'strict' keeps waiting for the returning node (writes block until it rejoins).
        await repl.set_synchronous(conn, slot if strict else None)
        await fencing.unfence(conn)
        return {
            "subscription_dropped": bool(report.get("subscription_dropped")),
            "sequences_moved": len(report.get("sequences", {})),
            "retention_slot": f"{slot} ({'created' if created else 'existed'})",
        }
    finally:
        await close(conn)


async def abort_to(
    ctx: Context, node: NodeName, conn: asyncpg.Connection, epoch: int, why: str, *, kind: str = "FAILOVER"
) -> int:
    """Undo the fence of a node that stays active and route back to it.

    The target may already carry the new epoch's stamp: the abort is a decision of
    its own, with a higher epoch stamped on ``node`` and persisted, so that a restart
    can never prefer the half-promoted target over the node that kept taking writes.
    Returns the epoch now in force. ``kind`` starts the log lines (the operation's
    word: FAILOVER, SWITCHOVER)."""
    log.warning("%s aborted: %s; routing back to %s", kind, why, node.value)
    abort_epoch = epoch + 2
    try:
        await catalog.write_stamp(conn, abort_epoch, node.value)
        ctx.persist(abort_epoch, node)
        await fencing.unfence(conn)
    except DB_ERRORS as exc:
        log.error("%s abort could not restore %s: %s", kind, node.value, describe(exc))
        await ctx.route_to(None, epoch, f"{kind.lower()} aborted and {node.value} could not be unfenced")
        return epoch
    await ctx.route_to(node, abort_epoch)
    return abort_epoch
