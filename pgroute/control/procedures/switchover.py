"""Switchover (planned, both nodes up, nothing lost) and failback (rejoin the
configured primary if needed, then switch over to it).

The write stall is bounded by: drain window, fence, catch-up of the target, promote.
Until the route phase the old node holds every commit, so any failure before it
aborts back to the old node (``abort_to``); after it the target is routed to even if
the old node fails while being resubscribed (it rejoins when back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ...model import NodeName
from ...pg import catalog
from ...pg.connect import DB_ERRORS, close, describe
from .. import fencing
from .. import replication as repl
from .context import Context, Op, OpResult
from .failover import abort_to, promote_node
from .rejoin import rejoin

log = logging.getLogger(__name__)


async def ensure_synchronous_commit(ctx: Context, node: NodeName) -> None:
    """Make ``node``'s subscription confirm commits as soon as they are flushed (see
    ``replication.ensure_synchronous_commit``): fast catch-up, fast synchronous commits."""
    conn = await ctx.connect(node)
    try:
        if await repl.ensure_synchronous_commit(conn, ctx.sub(node)):
            log.info("subscription %s on %s: synchronous_commit set to on", ctx.sub(node), node.value)
    finally:
        await close(conn)


DRAIN_WINDOW = 0.2  # seconds in-flight sessions get before they are closed


async def switchover(ctx: Context, op: Op, target: NodeName, epoch: int) -> OpResult:
    """Planned move of the active role to ``target`` (both up, target subscribed)."""
    cfg = ctx.config
    old = target.other
    new_epoch = epoch + 1
    old_conn = None
    try:
        await ensure_synchronous_commit(ctx, target)  # fast catch-up below
        old_conn = await ctx.connect(old)
        t_hold = time.monotonic()
        with op.phase("drain"):
            await ctx.hold(epoch, f"switchover to {target.value} in progress")
            deadline = time.monotonic() + DRAIN_WINDOW
            while ctx.router.session_count and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded 10 ms poll; the Router has no "sessions gone" event
                await asyncio.sleep(0.01)
        with op.phase("fence"):
            # Writes stop here: open sessions could still commit during the drain.
            t_stop = time.monotonic()
            op.details["sessions_closed"] = ctx.router.close_sessions(
                backend=old.value, reason=f"{op.tag}: switching to {target.value}"
            )
            await fencing.fence(old_conn, spare=ctx.own_pids(old))
            lsn = await catalog.current_lsn(old_conn)
        with op.phase("catch_up"):
            try:
                await repl.wait_caught_up(old_conn, ctx.sub(target), lsn, timeout=10.0)
            except DB_ERRORS as exc:
                epoch = await abort_to(
                    ctx, old, old_conn, epoch, f"{target.value} did not catch up: {describe(exc)}", kind="SWITCHOVER"
                )
                return OpResult(
                    False, old, epoch, f"{target.value} did not catch up ({describe(exc)}); {old.value} still active"
                )
        if not await ctx.barrier(op, new_epoch, f"{op.tag} to {target.value}: waiting for every instance"):
            why = f"not every instance applied epoch {new_epoch} ({op.details.get('barrier', '')})"
            epoch = await abort_to(ctx, old, old_conn, epoch, why, kind="SWITCHOVER")
            return OpResult(False, old, epoch, f"{why}; {old.value} still active")
        with op.phase("promote"):
            try:
                op.details.update(await promote_node(ctx, target, new_epoch, old_conn))
            except DB_ERRORS as exc:
                epoch = await abort_to(
                    ctx, old, old_conn, epoch, f"promotion failed: {describe(exc)}", kind="SWITCHOVER"
                )
                return OpResult(
                    False, old, epoch, f"promotion of {target.value} failed ({describe(exc)}); {old.value} still active"
                )
        # From here on the target holds every acknowledged commit and is promoted:
        # route to it even if the old node fails below (it will rejoin later).
        with op.phase("route"):
            ctx.persist(new_epoch, target)
            await ctx.route_to(target, new_epoch)
            ctx.router.close_sessions(before_epoch=new_epoch, reason=f"{op.tag}: epoch changed")
            now = time.monotonic()
            stall = now - t_stop
            op.details["write_stall_ms"] = round(stall * 1000)
            op.details["new_connections_held_ms"] = round((now - t_hold) * 1000)
        with op.phase("resubscribe"):
            try:
                # First: the old node still waits for the standby whose subscription
                # the promotion just detached, so any commit here (the stamp) would
                # block until the statement timeout in synchronous mode.
                await repl.set_synchronous(old_conn, None)
                await catalog.write_stamp(old_conn, new_epoch, target.value)
                await repl.drop_slot(old_conn, ctx.sub(target))
                await repl.subscribe(
                    old_conn,
                    ctx.sub(old),
                    ctx.publisher_conninfo(target),
                    cfg.replication.publication,
                    copy_data=False,
                    create_slot=False,
                )
                if cfg.replication.synchronous in ("on", "strict"):
                    tconn = await ctx.connect(target)
                    try:
                        await repl.set_synchronous(tconn, ctx.sub(old))
                    finally:
                        await close(tconn)
                op.details["old_active"] = f"{old.value} follows {target.value}"
            except DB_ERRORS as exc:
                op.details["old_active"] = f"{old.value} not resubscribed: {describe(exc)} (it rejoins when back)"
        return OpResult(
            True, target, new_epoch, f"epoch {new_epoch}; write stall {stall * 1000:.0f} ms; {op.details['old_active']}"
        )
    except DB_ERRORS as exc:
        # Before the route phase: old is still the one with every commit.
        if old_conn is not None and not old_conn.is_closed():
            epoch = await abort_to(ctx, old, old_conn, epoch, describe(exc), kind="SWITCHOVER")
            return OpResult(False, old, epoch, f"{op.phase_name}: {describe(exc)}; {old.value} still active")
        await ctx.route_to(old, epoch)
        return OpResult(False, old, epoch, f"{op.phase_name}: {describe(exc)}; routing to {old.value}")
    finally:
        await close(old_conn)


async def failback(
    ctx: Context, op: Op, epoch: int, record_conflicts: Callable[[list[dict]], None], *, resync: bool = False
) -> OpResult:
    """Rejoin the configured primary if needed, then switch over to it."""
    primary = NodeName.PRIMARY
    conn = await ctx.try_connect(primary, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, NodeName.MIRROR, epoch, "primary unreachable")
    try:
        info = await repl.subscription_info(conn, ctx.sub(primary))
    finally:
        await close(conn)
    if info is None or not info.get("enabled") or resync:
        result = await rejoin(ctx, op, primary, epoch, NodeName.MIRROR, record_conflicts, resync=resync)
        if not result.ok:
            return OpResult(False, NodeName.MIRROR, epoch, f"rejoin failed: {result.detail}")
        op.details["rejoin"] = result.detail
    return await switchover(ctx, op, primary, epoch)
