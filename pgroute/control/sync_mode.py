"""Keeps ``synchronous_standby_names`` on the active node as the policy wants it
(``state.synchronous_standby``): one reconciliation at a time, re-applied only when
the wanted value changes, and a failure leaves it to the next reconciliation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..model import NodeName
from ..pg.connect import DB_ERRORS, close, describe
from . import replication as repl
from .procedures import Context, ensure_synchronous_commit
from .state import State, synchronous_standby

log = logging.getLogger(__name__)


class SyncStandbyKeeper:
    def __init__(self, ctx: Context, spawn: Callable[[asyncio.Task[None]], None]) -> None:
        self.ctx = ctx
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._applied: tuple[NodeName | None, str | None] | None = None

    def reconcile(self, state: State) -> None:
        """Start applying what ``state`` wants, unless it is applied or being applied."""
        if self.ctx.config.replication.synchronous == "off" or self._task is not None:
            return
        active = state.active
        standby = synchronous_standby(state)
        wanted = (active, self.ctx.sub(standby) if standby else None)
        if active is None or wanted == self._applied:
            return
        self._task = asyncio.create_task(self._apply(active, standby, wanted))
        self._spawn(self._task)

    async def _apply(
        self, active: NodeName, standby: NodeName | None, wanted: tuple[NodeName | None, str | None]
    ) -> None:
        try:
            if standby is not None:
                await ensure_synchronous_commit(self.ctx, standby)
            conn = await self.ctx.connect(active)
            try:
                await repl.set_synchronous(conn, wanted[1])
            finally:
                await close(conn)
            self._applied = wanted
            log.info(
                "synchronous replication on %s: %s",
                active.value,
                f"waits for {wanted[1]}" if wanted[1] else "asynchronous (standby away)",
            )
        except DB_ERRORS as exc:
            log.warning("could not set synchronous_standby_names on %s: %s", active.value, describe(exc))
        finally:
            self._task = None
