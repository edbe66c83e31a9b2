"""What every procedure shares: the running operation (``Op``, timed phase by phase),
its result (``OpResult``), and the controller's side of things it may touch
(``Context``: node connections, the Router, the state file).

Procedures never raise for node failures: they return an ``OpResult`` saying which
node is safe to route to (None: none, fail closed) and what they did.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import asyncpg

from ...config import Config
from ...model import Detail, NodeName, Operation
from ...pg.connect import DB_ERRORS, connect, describe, own_pids
from ...pg.dsn import Dsn
from ...pg.naming import subscription_name
from ...pg.passwords import find_password
from ...proxy.router import Backend, Route, Router
from ..state_store import StateFile, Stored

log = logging.getLogger(__name__)


@dataclass
class Op:
    """A running operation: its kind, current phase and the phase timings."""

    kind: Operation
    started_at: float = field(default_factory=time.time)
    phase_name: str = "starting"
    phases: list[tuple[str, float]] = field(default_factory=list)
    details: dict[str, Detail] = field(default_factory=dict)  # JSON-typed (see model.Event)
    # Called as each phase starts (progress listeners; tests kill nodes at a phase).
    on_phase: Callable[[Op], None] | None = None

    @property
    def tag(self) -> str:
        """FAILOVER or FAILBACK (log grep), or SWITCHOVER."""
        return self.kind.tag

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.phase_name = name
        if self.on_phase is not None:
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
    active: NodeName | None  # where it is safe to route now
    epoch: int
    detail: str


class SharedRoute(Protocol):
    """The route every instance of a cluster follows (pgroute.cluster_node implements
    it over etcd; alone there is none). Written only by the leader, fenced to its
    term: a deposed leader's write raises, and the operation stops (fail closed
    locally). The epoch never goes down: ``floor`` is the highest epoch written."""

    @property
    def floor(self) -> int: ...

    async def publish(self, epoch: int, active: NodeName | None, *, paused: bool, reason: str) -> None:
        """Write the route; raises when it is not written (not the leader, store down)."""

    async def barrier(self, epoch: int, reason: str) -> tuple[bool, dict[str, Detail]]:
        """Publish "paused, active none, ``epoch``" and wait until every live member
        applied it or its lease expired: (complete, details for the operation)."""


class Context:
    """What the procedures need from the controller.

    The routing seam: procedures route only through `hold`, `route_to` and
    `barrier`. Alone (``shared`` None) they change the local Router, as always, and
    the barrier is a no-op. In a cluster the shared route is written first (fenced
    to the leader's term) and the local Router follows; a failed write routes this
    instance to no node and raises, so the operation stops."""

    def __init__(
        self,
        config: Config,
        router: Router,
        state_file: StateFile,
        backends: dict[NodeName, Backend],
        is_paused: Callable[[], bool],
        sequences: Callable[[], dict[str, int] | None],
        shared: SharedRoute | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.state_file = state_file
        self.backends = backends
        self.is_paused = is_paused
        self.sequences = sequences
        self.shared = shared

    def dsn(self, node: NodeName) -> Dsn:
        return self.config.node_dsn(node.value)

    def publisher_conninfo(self, publisher: NodeName) -> str:
        """How the other node's server reaches ``publisher`` when it subscribes: the DSN
        pgroute uses, with the password pgroute itself would send (the DSN's, the
        service file's, PGPASSWORD or the password file's), since the subscriber's
        server cannot read pgroute's environment. CREATE SUBSCRIPTION keeps it in
        pg_subscription, which only superusers read."""
        dsn = self.dsn(publisher)
        found = find_password(dsn)
        return dsn.libpq_conninfo(password=found.value if found else None)

    def sub(self, subscriber: NodeName) -> str:
        """Name of the subscription held by ``subscriber`` (= its slot on the publisher)."""
        return subscription_name(self.config.replication.subscription, subscriber)

    async def connect(self, node: NodeName, timeout: float | None = None) -> asyncpg.Connection:
        return await connect(self.dsn(node), timeout or self.config.health.timeout)

    async def try_connect(self, node: NodeName, timeout: float) -> asyncpg.Connection | None:
        """A control connection, or None (logged) when the node cannot be reached."""
        try:
            return await self.connect(node, timeout)
        except DB_ERRORS as exc:
            log.info("%s unreachable: %s", node.value, describe(exc))
            return None

    def own_pids(self, node: NodeName) -> set[int]:
        """pgroute's own open sessions on ``node``: fencing spares exactly these."""
        return own_pids(self.dsn(node))

    @property
    def epoch_floor(self) -> int:
        """The lowest epoch a route may carry now: in a cluster, the highest epoch
        already written (a barrier publishes N+1 before the switch's outcome is
        known; a failure afterwards must not go back to N). Alone: 0."""
        return self.shared.floor if self.shared is not None else 0

    async def route_to(self, node: NodeName | None, epoch: int, reason: str = "") -> None:
        epoch = max(epoch, self.epoch_floor)
        backend = self.backends[node] if node else None
        route = Route(backend, epoch, paused=self.is_paused(), reason=reason)
        await self._publish_shared(route, node)
        self.router.publish(route)

    async def hold(self, epoch: int, reason: str) -> None:
        """New connections wait (paused) and nothing is routed while a switch runs."""
        route = Route(None, max(epoch, self.epoch_floor), paused=True, reason=reason)
        await self._publish_shared(route, None)
        self.router.publish(route)

    async def barrier(self, op: Op, epoch: int, reason: str) -> bool:
        """Before promoting or unfencing a target at ``epoch``: in a cluster, every
        live member has applied "paused at ``epoch``" (its older sessions closed) or
        its lease expired; False when some member did not answer in time (the
        caller aborts). Alone: True at once (this process's own Router is the
        only one, and the procedure already holds it)."""
        if self.shared is None:
            return True
        with op.phase("barrier"):
            self.router.publish(Route(None, epoch, paused=True, reason=reason))
            try:
                complete, details = await self.shared.barrier(epoch, reason)
            except Exception as exc:  # the store failed or this is no longer the leader
                op.details["barrier"] = f"not done: {describe(exc)}"
                self.router.publish(Route(None, epoch, paused=False, reason=f"{reason}: barrier failed"))
                return False
            op.details.update(details)
        return complete

    async def _publish_shared(self, route: Route, node: NodeName | None) -> None:
        if self.shared is None:
            return
        try:
            await self.shared.publish(route.epoch, node, paused=route.paused, reason=route.reason)
        except Exception as exc:
            why = f"cluster route not written ({describe(exc)}): routing to no node"
            log.error("%s", why)
            self.router.publish(Route(None, route.epoch, paused=False, reason=why))
            raise

    def persist(self, epoch: int, active: NodeName | None) -> None:
        self.state_file.save(Stored(epoch, active))

    @property
    def recovery_dir(self) -> Path:
        """Where divergent commits and pre-resync dumps are written."""
        return Path(self.config.state.recovery_dir)
