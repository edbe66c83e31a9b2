"""The controller: feed an observation to the state machine, carry out the decision,
publish the route. It owns the current ``State`` (replaced, never mutated, and only
ever by ``transition``), the running operation, and the route the Router publishes
outside of switches.

Long operations (failover, fence, rejoin, switchover) run as tasks and report back as
``Finished`` observations, so probes keep flowing while a switch runs. Every
decision's reason is logged once; failover-related ones carry FAILOVER or FAILBACK.
A procedure that crashes is reported as a failed operation that routes nowhere
(fail closed) for the operations that move the active role.

This is the ``ControlPlane`` the HTTP API talks to: ``status()``, ``events()``,
``request()``, ``resolve()``, and listener hooks for metrics and alerts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..config import Config
from ..errors import ActionRefused, ConfigError, PgRouteError
from ..model import Event, HealthSample, NodeName, Operation
from ..monitor.monitor import Monitor
from ..monitor.probe import Prober
from ..pg.connect import describe
from ..pg.dsn import mask_dsn
from ..proxy.router import Backend, Route, Router
from .events import EventLog, safe_call
from .executor import Executor, NodeExecutor
from .procedures import Context, Op, OpResult
from .procedures.context import SharedRoute
from .sequences import SequenceHistory
from .state import (
    Act,
    Action,
    Decision,
    Finished,
    Observation,
    Phase,
    Policy,
    Probed,
    Requested,
    Started,
    State,
    transition,
)
from .state_store import NodeView, Resolution, StateFile, Stored, resolve_start
from .status import StatusInputs, build_status
from .sync_mode import SyncStandbyKeeper

log = logging.getLogger(__name__)

#: Seconds between two warnings about probes failing inside pgroute.
LOCAL_WARNING_EVERY = 60.0
#: Seconds between two writes of the active node's WAL position to the state file.
LSN_PERSIST_EVERY = 5.0


def check_distinct(config: Config, views: Mapping[NodeName, NodeView]) -> None:
    """Refuse two DSNs that reach one database (same system identifier and database
    oid, whatever the host names say): pgroute would fence it, resync it against
    itself and empty it."""
    p, m = views[NodeName.PRIMARY].identity, views[NodeName.MIRROR].identity
    if p is not None and m is not None and p.same_database(m):
        raise ConfigError(
            "mirror.dsn",
            f"primary.dsn ({config.node_dsn('primary').masked}) and mirror.dsn "
            f"({config.node_dsn('mirror').masked}) reach the same {p}: the mirror must be another server",
        )


class Controller:
    def __init__(
        self,
        config: Config,
        router: Router,
        *,
        state_file: StateFile | None = None,
        executor: Executor | None = None,
        monitor: Monitor | None = None,
        shared: SharedRoute | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.state_file = state_file or StateFile(config.state.path)
        self.backends = {
            n: Backend(n.value, config.node_dsn(n.value).host, config.node_dsn(n.value).port) for n in NodeName
        }
        h = config.health
        self.policy = Policy(
            auto_failover=h.auto_failover,
            auto_failback=h.auto_failback,
            max_retries=h.max_retries,
            max_lag_bytes=h.max_lag_bytes,
            synchronous=config.replication.synchronous,
            failback_delay=h.failback_delay,
        )
        self.state = State(active=None, epoch=0, phase=Phase.NO_ROUTABLE_NODE, policy=self.policy, reason="starting")
        self.samples: dict[NodeName, HealthSample] = {}
        self.sequence_history: dict[NodeName, SequenceHistory] = {}
        self._last_local_warning = -LOCAL_WARNING_EVERY
        self._lsn_saved_at = -LSN_PERSIST_EVERY
        self._lsn_saved_for: tuple[int, NodeName | None] | None = None  # the route last saved with a position
        self.event_log = EventLog()
        self._sample_listeners: list[Callable[[HealthSample], None]] = []
        self._phase_listeners: list[Callable[[Op], None]] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: dict[Operation, asyncio.Future[Event]] = {}
        self.operation: Op | None = None
        self.conflicts: list[dict[str, Any]] = []
        self._last_passive = 0.0
        # "<operation>:<phase>": SIGKILL this process when that phase starts (tests only).
        self._crash_at = os.environ.get("PGROUTE_FAULT_CRASH_AT", "")
        self.ctx = Context(
            config,
            router,
            self.state_file,
            self.backends,
            is_paused=lambda: self.state.paused,
            sequences=self._sequences,
            shared=shared,
        )
        self.executor: Executor = executor or NodeExecutor(self.ctx, self._record_conflicts)
        self.sync_keeper = SyncStandbyKeeper(self.ctx, self._keep)
        if monitor is None:
            probers = {
                n: Prober(
                    n,
                    config.node_dsn(n.value),
                    h.timeout,
                    own_subscription=self.ctx.sub(n),
                    peer_subscription=self.ctx.sub(n.other),
                )
                for n in NodeName
            }
            monitor = Monitor(probers, h.interval, self.on_sample)
        self.monitor = monitor
        router.add_failure_listener(self._on_backend_failure)

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Decide where to route (highest epoch wins, fail closed when unsure), then monitor.

        Raises ConfigError when both DSNs reach one database: pgroute would fence,
        truncate and resubscribe the live database against itself."""
        resolution, stored = await self._resolve_start()
        # In a cluster the shared route may already be past every stamp (a barrier
        # published epoch N+1 and its leader died): never go back below it.
        resolution = replace(resolution, epoch=max(resolution.epoch, self.ctx.epoch_floor))
        view = await self.executor.view(resolution.active) if resolution.active else None
        decision = await self._feed(
            Started(
                resolution.active,
                resolution.epoch,
                resolution.reason,
                time.time(),
                unfinished_promotion=bool(view and view.reachable and view.subscriber),
                unstamped=bool(view and view.reachable and view.epoch is None),
                fenced_winner=resolution.unfence,
                active_lsn=stored.active_lsn if stored is not None and stored.active == resolution.active else None,
            )
        )
        # A promotion to finish runs before anything is routed or probed.
        await self._wait_operations(decision)
        self.monitor.start()

    async def _resolve_start(self) -> tuple[Resolution, Stored | None]:
        views = {node: await self.executor.view(node) for node in NodeName}
        check_distinct(self.config, views)
        try:
            stored = self.state_file.load()
        except (ValueError, OSError) as exc:
            # A corrupt file is not a fresh start: fail closed until an operator resolves.
            # Both kinds of message already name the file.
            return Resolution(None, 0, f"state file unreadable: {exc}"), None
        res = resolve_start(stored, views)
        if res.active is not None and (stored is None or (stored.epoch, stored.active) != (res.epoch, res.active)):
            self.state_file.save(Stored(res.epoch, res.active))
        return res, stored

    async def close(self) -> None:
        self.router.remove_failure_listener(self._on_backend_failure)
        # A command waiting for its operation gets an answer: this controller will
        # not finish it (in a cluster, it stopped leading; a forwarding follower
        # would otherwise wait its whole forward timeout).
        waiting, self._pending = self._pending, {}
        for kind, fut in waiting.items():
            if not fut.done():
                fut.set_exception(PgRouteError(f"{kind.value} interrupted: this pgroute stopped deciding"))
        await self.monitor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: shutdown must not hang on a task stuck in a driver call.
            _, pending = await asyncio.wait(list(self._tasks), timeout=5.0)
            for task in pending:
                log.warning("task %s did not stop in time", task.get_name())

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- observations ---------------------------------------------------------------------------
    async def on_sample(self, sample: HealthSample) -> None:
        self.samples[sample.node] = sample
        if sample.reached:
            self.monitor.cancel_confirm(sample.node)  # alive: no need to confirm anything
        if sample.local:
            now = time.monotonic()
            if now - self._last_local_warning >= LOCAL_WARNING_EVERY:
                self._last_local_warning = now
                log.warning(
                    "probe of %s failed inside pgroute (%s): not counted against the node; "
                    "raise pgroute's open-files limit or lower proxy.max_client_connections",
                    sample.node.value,
                    sample.error,
                )
        if sample.ok and sample.sequences is not None:
            self.sequence_history[sample.node] = self.sequence_history.get(sample.node, SequenceHistory()).add(
                sample.at, dict(sample.sequences), sample.unfed_sequences
            )
        for cb in self._sample_listeners:
            safe_call(cb, sample)
        await self._feed(Probed(sample, time.time()))
        self._persist_active_lsn(sample)

    def _persist_active_lsn(self, sample: HealthSample) -> None:
        """Keep the active node's WAL position in the state file, at most every
        ``LSN_PERSIST_EVERY`` seconds: after a restart with the active node down it
        is what the standby's position is measured against."""
        s = self.state
        if not sample.ok or s.active is None or sample.node is not s.active or sample.wal_lsn is None or s.busy:
            return
        if s.phase is Phase.NO_ROUTABLE_NODE:
            return  # failing closed: the file keeps what it said
        now = time.monotonic()
        # The first position of a new route is saved at once: until then a restart (or,
        # in a cluster, a new leader) with the active node down cannot tell the
        # standby's lag, and refuses to fail over (the partition test hit that window).
        if (s.epoch, s.active) == self._lsn_saved_for and now - self._lsn_saved_at < LSN_PERSIST_EVERY:
            return
        self._lsn_saved_at = now
        self._lsn_saved_for = (s.epoch, s.active)
        try:
            self.state_file.save(Stored(s.epoch, s.active, active_lsn=sample.wal_lsn))
        except OSError as exc:
            log.warning("could not record %s's WAL position in %s: %s", s.active.value, self.state_file.path, exc)

    def _on_backend_failure(self, backend: str, error: str) -> None:
        # Passive signal: the proxy could not reach the active node. Probe it now rather
        # than at the next interval, at most once per retry_interval.
        self._probe_on_signal(NodeName(backend), f"proxy could not reach {backend} ({mask_dsn(error)})")

    def on_member_signal(self, member: str, node: NodeName, epoch: int, error: str) -> bool:
        """Cluster: ``member``'s proxy could not connect to ``node`` while routing at
        ``epoch`` (pgroute/cluster/passive.py). Probe it now when it is this
        controller's active node at this very epoch; True when a probe was asked for.
        The signal decides nothing: a failover still needs this controller's own
        failed and confirming probes."""
        if epoch != self.state.epoch:
            return False
        return self._probe_on_signal(node, f"member {member} could not reach {node.value} ({mask_dsn(error)})")

    def _probe_on_signal(self, node: NodeName, why: str) -> bool:
        now = time.monotonic()
        if (
            node is self.state.active
            and self.state.failures == 0
            and now - self._last_passive >= self.config.health.retry_interval
        ):
            self._last_passive = now
            log.info("%s: probing it now", why)
            self.monitor.probe_soon(node, 0.0)
            return True
        return False

    async def _feed(self, obs: Observation) -> Decision:
        async with self._lock:
            return self._decide(obs)

    def _decide(self, obs: Observation) -> Decision:
        """feed -> decide -> execute -> publish; the caller holds the lock."""
        decision = transition(self.state, obs)
        self.state = decision.state
        if decision.reason:
            log.info("%s", decision.reason)
        if not any(a.kind is Act.REFUSE for a in decision.actions):
            for action in decision.actions:
                self._execute(action, decision.reason)
        if not self.state.busy:
            self._publish_route()
            self.sync_keeper.reconcile(self.state)
        return decision

    def _publish_route(self) -> None:
        """Outside of switches the route follows the state: the active node, or none."""
        s = self.state
        if s.phase is Phase.NO_ROUTABLE_NODE or s.active is None:
            route = Route(None, s.epoch, paused=s.paused, reason=s.reason or "no routable node")
        else:
            route = Route(
                self.backends[s.active], s.epoch, paused=s.paused, reason="paused by operator" if s.paused else ""
            )
        if route != self.router.route:
            self.router.publish(route)
            if self.ctx.shared is not None:
                self._keep(asyncio.create_task(self._publish_shared(route, s.active), name="publish-route"))

    async def _publish_shared(self, route: Route, active: NodeName | None) -> None:
        """The cluster's copy of a route published outside of a switch (start,
        pause, resume, failing closed). Not written (deposed, store down): this
        instance routes to no node; the next leader resolves the route anew."""
        shared = self.ctx.shared
        assert shared is not None
        try:
            await shared.publish(
                max(route.epoch, shared.floor),
                active if route.backend else None,
                paused=route.paused,
                reason=route.reason,
            )
        except Exception as exc:
            why = f"cluster route not written ({describe(exc)}): routing to no node"
            log.error("%s", why)
            self.router.publish(Route(None, route.epoch, paused=False, reason=why))

    def _execute(self, action: Action, reason: str) -> None:
        s = self.state
        if action.kind is Act.CONFIRM_PROBE:
            self.monitor.confirm(
                action.target, int(action.detail or self.config.health.max_retries), self.config.health.retry_interval
            )
        elif action.kind is Act.EVENT:
            self.event_log.record(action.detail, reason, epoch=s.epoch, active=s.active, node=action.node)
        elif action.kind in (Act.PAUSE, Act.RESUME):
            self.event_log.record(action.kind.value, reason, epoch=s.epoch, active=s.active)
        elif action.kind is Act.STAMP:
            self._keep(asyncio.create_task(self.executor.stamp(action.target, s.epoch, s.active), name="stamp"))
        elif action.kind.operation is not None:
            self._start_operation(action.kind.operation, action, reason)

    def _start_operation(self, kind: Operation, action: Action, reason: str) -> None:
        op = Op(kind=kind, on_phase=self._on_phase)
        event = self.event_log.begin(kind.value, reason, node=action.node)
        if kind not in (Operation.FENCE, Operation.UNFENCE):
            self.operation = op
        fut = self._pending.pop(kind, None)
        self._keep(asyncio.create_task(self._run_operation(op, action, event, fut), name=f"op-{kind.value}"))

    async def _wait_operations(self, decision: Decision) -> None:
        """Wait for the operations a decision started (at start-up and resolve)."""
        started = {f"op-{a.kind.value}" for a in decision.actions if a.kind.operation is not None}
        tasks = [t for t in self._tasks if t.get_name() in started]
        if tasks:
            await asyncio.wait(tasks)

    async def _run_operation(self, op: Op, action: Action, event: Event, fut: asyncio.Future[Event] | None) -> None:
        epoch, active = self.state.epoch, self.state.active
        try:
            result = await self.executor.run(op, action, epoch, active)
        except asyncio.CancelledError:
            # The controller is closing (in a cluster: it stopped leading). The command
            # waiting for this operation gets an answer; a forwarding follower would
            # otherwise wait its whole forward timeout.
            if fut is not None and not fut.done():
                fut.set_exception(PgRouteError(f"{op.kind.value} interrupted: this pgroute stopped deciding"))
            raise
        except Exception as exc:  # one catch-all per operation: say what happened, fail closed
            log.exception("%s %s crashed", op.tag, op.kind.value)
            moves = op.kind.moves_role or op.kind is Operation.PROMOTE
            result = OpResult(False, None if moves else active, epoch, f"internal error: {describe(exc)}")
            if moves:
                try:
                    await self.ctx.route_to(None, epoch, result.detail)
                except Exception as publish_exc:  # the local Router routes nowhere already
                    log.error("%s could not publish the failed route: %s", op.tag, describe(publish_exc))
        level = logging.INFO if result.ok else logging.ERROR
        log.log(
            level,
            "%s %s %s: %s (%s)",
            op.tag,
            op.kind.value,
            "completed" if result.ok else "failed",
            result.detail,
            ", ".join(f"{n} {t:.3f}s" for n, t in op.phases),
        )
        await self._feed(
            Finished(
                op.kind,
                result.ok,
                time.time(),
                node=action.node,
                active=result.active,
                epoch=max(result.epoch, self.ctx.epoch_floor),
                detail=result.detail,
            )
        )
        # After the state took the result, so the event carries the new epoch.
        s = self.state
        event = self.event_log.end(
            event,
            "ok" if result.ok else "failed",
            epoch=s.epoch,
            active=s.active,
            details=op.details,
            phases=tuple(op.phases),
            detail=result.detail,
        )
        if self.operation is op:
            self.operation = None
        for node in NodeName:  # samples from before the switch are stale now
            self.monitor.probe_soon(node, 0.0)
        if fut is not None and not fut.done():
            fut.set_result(event)

    def _record_conflicts(self, conflicts: list[dict[str, Any]]) -> None:
        self.conflicts.extend(conflicts)
        del self.conflicts[:-200]

    def _on_phase(self, op: Op) -> None:
        if self._crash_at == f"{op.kind.value}:{op.phase_name}":
            # Fault injection (tests/integration/test_crash_points.py): die like kill -9
            # at this phase boundary, with nothing cleaned up.
            log.warning("PGROUTE_FAULT_CRASH_AT=%s: killing pgroute", self._crash_at)
            os.kill(os.getpid(), signal.SIGKILL)
        for cb in self._phase_listeners:
            safe_call(cb, op)

    def _sequences(self) -> dict[str, int] | None:
        """Sequence values last seen on the active node while it answered, moved on by
        the draws measured since: the promoted node's sequences move past them
        (logical replication does not carry sequences)."""
        active = self.state.active
        history = self.sequence_history.get(active) if active else None
        return history.projected(time.time()) if history else None

    # -- requests (API) ----------------------------------------------------------------------------
    async def request(self, kind: Operation | str, *, force: bool = False, resync: bool = False) -> dict[str, Any]:
        kind = Operation(kind)
        fut: asyncio.Future[Event] | None = None
        if kind.moves_role or kind is Operation.REJOIN:
            fut = asyncio.get_running_loop().create_future()
            self._pending[kind] = fut
        decision = await self._feed(Requested(kind, time.time(), force=force or resync))
        refusal = next((a for a in decision.actions if a.kind is Act.REFUSE), None)
        if refusal is not None:
            self._pending.pop(kind, None)
            raise ActionRefused(refusal.detail)
        if fut is None or not any(a.kind.operation is not None for a in decision.actions):
            self._pending.pop(kind, None)
            return {"result": "ok", "reason": decision.reason or kind.value, "kind": kind.value}
        event: Event = await fut
        if event.result != "ok":
            raise PgRouteError(f"{kind.value} failed: {dict(event.details).get('result', event.reason)}")
        return event.to_json()

    async def resolve(self, active: NodeName | None) -> dict[str, Any]:
        """Operator override when pgroute fails closed at start: declare the active node."""
        async with self._lock:
            decision = self._decide(Requested(Operation.RESOLVE, time.time()))
            refusal = next((a for a in decision.actions if a.kind is Act.REFUSE), None)
            if refusal is not None:
                raise ActionRefused(refusal.detail)
            views = {node: await self.executor.view(node) for node in NodeName}
            # Above every epoch known anywhere, so this decision wins at the next start.
            epoch = max([self.state.epoch] + [v.epoch for v in views.values() if v.epoch is not None]) + 1
            self.state_file.save(Stored(epoch, active))
            for node in NodeName:
                await self.executor.stamp(node, epoch, active)
            view = views[active] if active is not None else None
            decision = self._decide(
                Started(
                    active,
                    epoch,
                    "operator resolved",
                    time.time(),
                    by_operator=True,
                    unfinished_promotion=bool(view and view.reachable and view.subscriber),
                )
            )
        await self._wait_operations(decision)
        s = self.state
        ev = self.event_log.record(
            "resolve",
            f"operator declared {active.value if active else 'no node'} active, epoch {epoch}",
            epoch=s.epoch,
            active=s.active,
        )
        return ev.to_json()

    # -- listeners, events, status ----------------------------------------------------------------
    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        self.event_log.add_listener(cb)

    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None:
        self._sample_listeners.append(cb)

    def add_phase_listener(self, cb: Callable[[Op], None]) -> None:
        """Called as each phase of an operation starts."""
        self._phase_listeners.append(cb)

    def remove_phase_listener(self, cb: Callable[[Op], None]) -> None:
        self._phase_listeners.remove(cb)

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.event_log.recent(limit)

    def status(self) -> dict[str, Any]:
        op = self.operation
        return build_status(
            StatusInputs(
                state=self.state,
                samples=dict(self.samples),
                route=self.router.route,
                stats=self.router.stats,
                addresses={n: (b.host, b.port) for n, b in self.backends.items()},
                synchronous=self.config.replication.synchronous,
                detection_bound=self.config.health.detection_bound,
                operation=None
                if op is None
                else {"kind": op.kind.value, "phase": op.phase_name, "started_at": op.started_at},
                conflicts=self.conflicts,
                unowned_sequences=(
                    self.sequence_history[self.state.active].exposure()
                    if self.state.active in self.sequence_history
                    else ()
                ),
                events=self.events(50),
            )
        )
