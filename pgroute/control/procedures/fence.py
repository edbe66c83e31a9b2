"""Fence and unfence as procedures: one node, one connection, an ``OpResult``."""

from __future__ import annotations

from ...model import NodeName
from ...pg import catalog
from ...pg.connect import DB_ERRORS, close, describe
from .. import fencing
from .context import Context, OpResult


async def fence(ctx: Context, node: NodeName, epoch: int, active: NodeName | None) -> OpResult:
    """Make a returned node read-only, end its client sessions and stamp the epoch."""
    conn = await ctx.try_connect(node, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, active, epoch, f"{node.value} unreachable")
    try:
        await fencing.fence(conn, spare=ctx.own_pids(node))
        await catalog.write_stamp(conn, epoch, active.value if active else "none")
        return OpResult(True, active, epoch, f"{node.value} read-only, sessions terminated, epoch {epoch} stamped")
    except DB_ERRORS as exc:
        return OpResult(False, active, epoch, describe(exc))
    finally:
        await close(conn)


async def unfence(ctx: Context, node: NodeName, epoch: int) -> OpResult:
    conn = await ctx.try_connect(node, ctx.config.health.timeout)
    if conn is None:
        return OpResult(False, node, epoch, f"{node.value} unreachable")
    try:
        await fencing.unfence(conn)
        return OpResult(True, node, epoch, f"{node.value} writable again")
    except DB_ERRORS as exc:
        return OpResult(False, node, epoch, describe(exc))
    finally:
        await close(conn)
