"""The controller's hands on the real nodes: run an operation's procedure, read what
a node says about itself at start (``NodeView``), stamp a node. The Controller talks
to nodes only through this interface, so its unit tests can give it a fake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..model import NodeName, Operation
from ..pg import catalog
from ..pg.connect import DB_ERRORS, close, describe
from . import fencing, procedures
from . import replication as repl
from .procedures import Context, Op, OpResult
from .state import Action
from .state_store import NodeView

log = logging.getLogger(__name__)


class Executor(Protocol):
    async def run(self, op: Op, action: Action, epoch: int, active: NodeName | None) -> OpResult: ...

    async def view(self, node: NodeName) -> NodeView: ...

    async def stamp(self, node: NodeName, epoch: int, active: NodeName | None) -> None: ...


class NodeExecutor:
    """The real Executor: procedures against the configured nodes."""

    def __init__(self, ctx: Context, record_conflicts: Callable[[list[dict[str, Any]]], None]) -> None:
        self.ctx = ctx
        self.record_conflicts = record_conflicts

    async def run(self, op: Op, action: Action, epoch: int, active: NodeName | None) -> OpResult:
        ctx, node = self.ctx, action.target
        kind = op.kind
        if kind is Operation.FAILOVER:
            return await procedures.failover(ctx, op, node, epoch, manual=action.manual, force=action.force)
        if kind is Operation.FENCE:
            return await procedures.fence(ctx, node, epoch, active)
        if kind is Operation.UNFENCE:
            return await procedures.unfence(ctx, node, epoch)
        if kind is Operation.REJOIN:
            return await procedures.rejoin(ctx, op, node, epoch, active, self.record_conflicts, resync=action.force)
        if kind is Operation.SWITCHOVER:
            return await procedures.switchover(ctx, op, node, epoch)
        if kind is Operation.FAILBACK:
            return await procedures.failback(ctx, op, epoch, self.record_conflicts, resync=action.force)
        if kind is Operation.PROMOTE:
            if not await ctx.barrier(op, epoch, f"promoting {node.value}: waiting for every instance"):
                return OpResult(False, None, epoch, f"not every instance applied epoch {epoch}")
            try:
                op.details.update(await procedures.promote_node(ctx, node, epoch))
            except DB_ERRORS as exc:
                return OpResult(False, None, epoch, describe(exc))
            return OpResult(True, node, epoch, f"{node.value} promoted")
        raise ValueError(f"no procedure for {kind.value}")

    async def view(self, node: NodeName) -> NodeView:
        try:
            conn = await self.ctx.connect(node)
        except DB_ERRORS:
            return NodeView(reachable=False)
        try:
            epoch, active = await catalog.read_stamp(conn)
            sub = await repl.subscription_info(conn, self.ctx.sub(node))
            fenced = await fencing.is_fenced(conn)
            identity = await catalog.read_identity(conn)
            return NodeView(True, epoch, active, subscriber=sub is not None, read_only=fenced, identity=identity)
        except DB_ERRORS:
            return NodeView(reachable=False)
        finally:
            await close(conn)

    async def stamp(self, node: NodeName, epoch: int, active: NodeName | None) -> None:
        try:
            conn = await self.ctx.connect(node)
            try:
                await catalog.write_stamp(conn, epoch, active)
            finally:
                await close(conn)
        except DB_ERRORS as exc:
            log.warning("could not stamp %s: %s", node.value, describe(exc))
