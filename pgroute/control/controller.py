"""The controller: feeds observations to the state machine and carries out its decisions.

It owns the current ``State`` (replaced, never mutated), the event log, the route
the Router publishes outside of switches, and the running operation. Long operations
(failover, fence, rejoin, switchover) run as tasks and report back as ``Finished``
observations, so probes keep flowing while a switch runs. Every decision's reason is
logged once; failover-related ones carry FAILOVER or FAILBACK.

This is the ``ControlPlane`` the HTTP API talks to: ``status()``, ``events()``,
``request()``, and listener hooks for metrics and alerts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Awaitable, Callable

from ..config import Config
from ..pg.dsn import mask_dsn
from ..errors import ActionRefused, PgRouteError
from ..model import Event, HealthSample, NodeName
from ..monitor.monitor import Monitor
from ..monitor.probe import Prober
from ..proxy.router import Backend, Route, Router
from . import actions, replication as repl
from .state import (Act, Action, Decision, Finished, Observation, Phase, Policy, Probed,
                    Requested, Standby, State, synchronous_standby, transition)
from .state_store import NodeView, Resolution, StateFile, resolve_start

log = logging.getLogger(__name__)

OPERATION_KINDS = {Act.FAILOVER: "failover", Act.SWITCHOVER: "switchover", Act.FAILBACK: "failback",
                   Act.FENCE: "fence", Act.REJOIN: "rejoin", Act.UNFENCE: "unfence"}
TAGS = {"failover": "FAILOVER", "failback": "FAILBACK", "switchover": "SWITCHOVER",
        "fence": "FAILOVER", "rejoin": "FAILBACK", "unfence": "FAILOVER"}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


class Controller:
    def __init__(self, config: Config, router: Router, *, state_file: StateFile | None = None) -> None:
        self.config = config
        self.router = router
        self.state_file = state_file or StateFile(config.state.path)
        self.backends = {n: Backend(n.value, config.node_dsn(n.value).host, config.node_dsn(n.value).port)
                         for n in NodeName}
        h = config.health
        self.policy = Policy(auto_failover=h.auto_failover, auto_failback=h.auto_failback,
                             max_retries=h.max_retries, max_lag_bytes=h.max_lag_bytes,
                             synchronous=config.replication.synchronous, failback_delay=h.failback_delay)
        self.state = State(active=None, epoch=0, phase=Phase.NO_ROUTABLE_NODE, policy=self.policy,
                           reason="starting")
        self.samples: dict[NodeName, HealthSample] = {}
        self._good_sequences: dict[NodeName, tuple[tuple[str, int], ...]] = {}
        self._events: collections.deque[Event] = collections.deque(maxlen=200)
        self._next_event_id = 1
        self._event_listeners: list[Callable[[Event], None]] = []
        self._sample_listeners: list[Callable[[HealthSample], None]] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._pending: dict[str, asyncio.Future] = {}
        self.operation: actions.Op | None = None
        self.conflicts: list[dict] = []
        self._last_passive = 0.0
        self._sync_task: asyncio.Task | None = None
        self._sync_applied: tuple[NodeName | None, str | None] | None = None
        self.ctx = actions.Context(config, router, self.state_file, self.backends,
                                   is_paused=lambda: self.state.paused, sequences=self._sequences)
        probers = {
            n: Prober(n, config.node_dsn(n.value), h.timeout,
                      own_subscription=self.ctx.sub(n), peer_subscription=self.ctx.sub(n.other))
            for n in NodeName
        }
        self.monitor = Monitor(probers, h.interval, self.on_sample)
        router.add_failure_listener(self._on_backend_failure)

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Decide where to route (highest epoch wins, fail closed when unsure), then monitor."""
        resolution = await self._resolve()
        log.info("start: %s", resolution.reason)
        self.state = replace(self.state, active=resolution.active, epoch=resolution.epoch,
                             phase=Phase.ACTIVE_HEALTHY if resolution.active else Phase.NO_ROUTABLE_NODE,
                             reason=resolution.reason)
        if resolution.active is not None:
            await self._finish_interrupted_promotion(resolution.active)
        self._sync_route()
        self.monitor.start()

    async def _resolve(self) -> Resolution:
        try:
            stored = self.state_file.load()
        except (ValueError, OSError) as exc:
            # A corrupt file is not a fresh start: fail closed until an operator resolves.
            return Resolution(None, 0, f"state file {self.state_file.path} unreadable: {exc}")
        views = {}
        for node in NodeName:
            views[node] = await self._view(node)
        res = resolve_start(stored, views)
        if res.active is not None and stored != actions.Stored(res.epoch, res.active):
            self.state_file.save(actions.Stored(res.epoch, res.active))
        return res

    async def _view(self, node: NodeName) -> NodeView:
        try:
            conn = await self.ctx.connect(node)
        except actions.DB_ERRORS:
            return NodeView(reachable=False)
        try:
            epoch, active = await repl.read_stamp(conn)
            sub = await repl.subscription_info(conn, self.ctx.sub(node))
            fenced = await repl.is_fenced(conn)
            return NodeView(True, epoch, active, subscriber=sub is not None, read_only=fenced)
        except actions.DB_ERRORS:
            return NodeView(reachable=False)
        finally:
            await actions._close(conn)

    async def _finish_interrupted_promotion(self, node: NodeName) -> None:
        """The winning node may still hold its subscription if pgroute stopped halfway
        through promoting it: finish the (idempotent) promotion before routing."""
        view = await self._view(node)
        if view.reachable and view.subscriber:
            log.warning("FAILOVER: %s is stamped active but still subscribed: finishing its promotion",
                        node.value)
            try:
                await actions.promote_node(self.ctx, node, self.state.epoch)
            except actions.DB_ERRORS as exc:
                self.state = replace(self.state, phase=Phase.NO_ROUTABLE_NODE,
                                     reason=f"could not finish promoting {node.value}: {actions._err(exc)}")
        elif view.reachable and view.epoch is None:
            await self._stamp(node)

    async def _stamp(self, node: NodeName) -> None:
        try:
            conn = await self.ctx.connect(node)
            try:
                await repl.write_stamp(conn, self.state.epoch, self.state.active.value if self.state.active else "none")
            finally:
                await actions._close(conn)
        except actions.DB_ERRORS as exc:
            log.warning("could not stamp %s: %s", node.value, actions._err(exc))

    async def close(self) -> None:
        await self.monitor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: shutdown must not hang on a task stuck in a driver call.
            _, pending = await asyncio.wait(list(self._tasks), timeout=5.0)
            for task in pending:
                log.warning("task %s did not stop in time", task.get_name())

    # -- observations ---------------------------------------------------------------------------
    async def on_sample(self, sample: HealthSample) -> None:
        self.samples[sample.node] = sample
        if sample.ok:
            self.monitor.cancel_confirm(sample.node)
        if sample.ok and sample.sequences is not None:
            self._good_sequences[sample.node] = sample.sequences
        for cb in self._sample_listeners:
            _safe(cb, sample)
        await self._feed(Probed(sample, time.time()))

    def _on_backend_failure(self, backend: str, error: str) -> None:
        # Passive signal: the proxy could not reach the active node. Probe it now rather
        # than at the next interval, at most once per retry_interval.
        now = time.monotonic()
        node = NodeName(backend)
        if node is self.state.active and self.state.failures == 0 and \
                now - self._last_passive >= self.config.health.retry_interval:
            self._last_passive = now
            log.info("proxy could not reach %s (%s): probing it now", backend, mask_dsn(error))
            self.monitor.probe_soon(node, 0.0)

    async def _feed(self, obs: Observation) -> Decision:
        async with self._lock:
            decision = transition(self.state, obs)
            self.state = decision.state
            if decision.reason:
                log.info("%s", decision.reason)
            refusal = next((a for a in decision.actions if a.kind is Act.REFUSE), None)
            if refusal is None:
                for action in decision.actions:
                    self._execute(action, decision.reason)
            if not self.state.busy:
                self._sync_route()
                self._sync_replication_mode()
            return decision

    def _sync_route(self) -> None:
        """Outside of switches the route follows the state: the active node, or none."""
        s = self.state
        if s.phase is Phase.NO_ROUTABLE_NODE or s.active is None:
            route = Route(None, s.epoch, paused=s.paused, reason=s.reason or "no routable node")
        else:
            route = Route(self.backends[s.active], s.epoch, paused=s.paused,
                          reason="paused by operator" if s.paused else "")
        if route != self.router.route:
            self.router.publish(route)

    def _sync_replication_mode(self) -> None:
        """Keep synchronous_standby_names on the active node as the policy wants it."""
        if self.config.replication.synchronous == "off" or self._sync_task is not None:
            return
        active = self.state.active
        standby = synchronous_standby(self.state)
        wanted = (active, self.ctx.sub(standby) if standby else None)
        if active is None or wanted == self._sync_applied:
            return

        async def apply() -> None:
            try:
                if wanted[1]:
                    await actions.ensure_synchronous_commit(self.ctx, standby)
                conn = await self.ctx.connect(active)
                try:
                    await repl.set_synchronous(conn, wanted[1])
                finally:
                    await actions._close(conn)
                self._sync_applied = wanted
                log.info("synchronous replication on %s: %s", active.value,
                         f"waits for {wanted[1]}" if wanted[1] else "asynchronous (standby away)")
            except actions.DB_ERRORS as exc:
                log.warning("could not set synchronous_standby_names on %s: %s", active.value,
                            actions._err(exc))
            finally:
                self._sync_task = None

        self._sync_task = asyncio.create_task(apply())
        self._tasks.add(self._sync_task)
        self._sync_task.add_done_callback(self._tasks.discard)

    def _execute(self, action: Action, reason: str) -> None:
        if action.kind is Act.CONFIRM_PROBE:
            self.monitor.confirm(action.node, int(action.detail or self.config.health.max_retries),
                                 self.config.health.retry_interval)
        elif action.kind is Act.EVENT:
            ev = self._begin_event(action.detail, reason, node=action.node)
            self._end_event(ev, "ok")
        elif action.kind in (Act.PAUSE, Act.RESUME):
            ev = self._begin_event(action.kind.value, reason)
            self._end_event(ev, "ok")
        elif action.kind in OPERATION_KINDS:
            self._start_operation(action, reason)

    def _start_operation(self, action: Action, reason: str) -> None:
        kind = OPERATION_KINDS[action.kind]
        op = actions.Op(kind=kind, tag=TAGS[kind], on_phase=self._on_phase)
        event = self._begin_event(kind, reason, node=action.node)
        if kind not in ("fence", "unfence"):
            self.operation = op
        fut = self._pending.pop(kind, None)
        task = asyncio.create_task(self._run_operation(op, action, event, fut), name=f"op-{kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_operation(self, op: actions.Op, action: Action, event: Event,
                             fut: asyncio.Future | None) -> None:
        epoch, active = self.state.epoch, self.state.active
        try:
            result = await self._dispatch(op, action, epoch, active)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one catch-all per operation: say what happened, fail closed
            log.exception("%s %s crashed", op.tag, op.kind)
            result = actions.OpResult(False, None if op.kind in ("failover", "switchover", "failback") else active,
                                      epoch, f"internal error: {actions._err(exc)}")
            if op.kind in ("failover", "switchover", "failback"):
                self.ctx.route_to(None, epoch, result.detail)
        level = logging.INFO if result.ok else logging.ERROR
        log.log(level, "%s %s %s: %s (%s)", op.tag, op.kind, "completed" if result.ok else "failed",
                result.detail, ", ".join(f"{n} {t:.3f}s" for n, t in op.phases))
        await self._feed(Finished(op.kind, result.ok, time.time(), node=action.node,
                                  active=result.active, epoch=result.epoch, detail=result.detail))
        # After the state took the result, so the event carries the new epoch.
        event = self._end_event(event, "ok" if result.ok else "failed", op=op, detail=result.detail)
        if self.operation is op:
            self.operation = None
        for node in NodeName:        # samples from before the switch are stale now
            self.monitor.probe_soon(node, 0.0)
        if fut is not None and not fut.done():
            fut.set_result(event)

    async def _dispatch(self, op: actions.Op, action: Action, epoch: int,
                        active: NodeName | None) -> actions.OpResult:
        if action.kind is Act.FAILOVER:
            return await actions.failover(self.ctx, op, action.node, epoch, manual=action.manual,
                                          force=action.force)
        if action.kind is Act.FENCE:
            return await actions.fence(self.ctx, action.node, epoch, active)
        if action.kind is Act.UNFENCE:
            return await actions.unfence(self.ctx, action.node, epoch)
        if action.kind is Act.REJOIN:
            return await actions.rejoin(self.ctx, op, action.node, epoch, active, self._record_conflicts,
                                        resync=action.force)
        if action.kind is Act.SWITCHOVER:
            return await actions.switchover(self.ctx, op, action.node, epoch)
        if action.kind is Act.FAILBACK:
            return await actions.failback(self.ctx, op, epoch, self._record_conflicts, resync=action.force)
        raise PgRouteError(f"no procedure for {action.kind}")

    def _record_conflicts(self, conflicts: list[dict]) -> None:
        self.conflicts.extend(conflicts)
        del self.conflicts[:-200]

    def _on_phase(self, op: actions.Op) -> None:
        pass  # status() reads op.phase_name; kept as a hook for progress listeners

    def _sequences(self) -> dict[str, int] | None:
        """Sequence values last seen on the active node while it answered: unowned
        sequences of the promoted node move past them (logical replication does not
        carry sequences)."""
        active = self.state.active
        return dict(self._good_sequences[active]) if active in self._good_sequences else None

    # -- requests (API) ----------------------------------------------------------------------------
    async def request(self, kind: str, *, force: bool = False, resync: bool = False) -> dict:
        fut: asyncio.Future | None = None
        if kind in ("failover", "switchover", "failback", "rejoin"):
            fut = asyncio.get_running_loop().create_future()
            self._pending[kind] = fut
        decision = await self._feed(Requested(kind, time.time(), force=force or resync))
        refusal = next((a for a in decision.actions if a.kind is Act.REFUSE), None)
        if refusal is not None:
            self._pending.pop(kind, None)
            raise ActionRefused(refusal.detail)
        if fut is None or not any(a.kind in OPERATION_KINDS for a in decision.actions):
            self._pending.pop(kind, None)
            return {"result": "ok", "reason": decision.reason or kind, "kind": kind}
        event: Event = await fut
        if event.result != "ok":
            raise PgRouteError(f"{kind} failed: {dict(event.details).get('result', event.reason)}")
        return event.to_json()

    async def resolve(self, active: NodeName | None) -> dict:
        """Operator override when pgroute fails closed at start: declare the active node."""
        async with self._lock:
            if self.state.busy:
                raise ActionRefused("an operation is running")
            if self.state.phase is not Phase.NO_ROUTABLE_NODE:
                raise ActionRefused(f"pgroute routes to {self.state.active.value if self.state.active else 'none'} "
                                    "and is not failing closed; use switchover or failover")
            views = [await self._view(node) for node in NodeName]
            # Above every epoch known anywhere, so this decision wins at the next start.
            epoch = max([self.state.epoch] + [v.epoch for v in views if v.epoch is not None]) + 1
            self.state_file.save(actions.Stored(epoch, active))
        for node in NodeName:
            conn = None
            try:
                conn = await self.ctx.connect(node)
                await repl.write_stamp(conn, epoch, active.value if active else "none")
            except actions.DB_ERRORS as exc:
                log.warning("resolve: could not stamp %s: %s", node.value, actions._err(exc))
            finally:
                await actions._close(conn)
        self.state = replace(self.state, epoch=epoch)
        if active is not None:
            await self._finish_interrupted_promotion(active)
        await self._feed(Finished("resolve", True, time.time(), active=active, epoch=epoch))
        ev = self._begin_event("resolve", f"operator declared {active.value if active else 'no node'} active, epoch {epoch}")
        return self._end_event(ev, "ok").to_json()

    # -- events ----------------------------------------------------------------------------------
    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        self._event_listeners.append(cb)

    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None:
        self._sample_listeners.append(cb)

    def _begin_event(self, kind: str, reason: str, node: NodeName | None = None) -> Event:
        ev = Event(id=self._next_event_id, kind=kind, reason=mask_dsn(reason), started_at=time.time(),
                   details=(("node", node.value),) if node else ())
        self._next_event_id += 1
        self._events.append(ev)
        for cb in self._event_listeners:
            _safe(cb, ev)
        return ev

    def _end_event(self, ev: Event, result: str, op: actions.Op | None = None, detail: str = "") -> Event:
        details = dict(ev.details)
        if op is not None:
            details.update(op.details)
        if detail:
            details["result"] = mask_dsn(detail)
        details["epoch"] = str(self.state.epoch)
        if self.state.active is not None:
            details["active"] = self.state.active.value
        done = replace(ev, ended_at=time.time(), result=result,
                       phases=tuple(op.phases) if op else ev.phases,
                       details=tuple((k, mask_dsn(str(v))) for k, v in details.items()))
        for i, existing in enumerate(self._events):
            if existing.id == ev.id:
                self._events[i] = done
                break
        for cb in self._event_listeners:
            _safe(cb, done)
        return done

    def events(self, limit: int = 50) -> list[dict]:
        return [e.to_json() for e in reversed(self._events)][:limit]

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict:
        s = self.state
        stats = self.router.stats
        route = self.router.route
        nodes = {n.value: self._node_status(n) for n in NodeName}
        op = self.operation
        return {
            "state": self._state_name(),
            "reason": mask_dsn(s.reason),
            # During a switch new connections wait (not refused): report the node
            # holding the role until the switch routes elsewhere.
            "active": (route.backend.name if route.backend
                       else s.active.value if s.busy and s.active and route.paused else None),
            "epoch": s.epoch,
            "paused": route.paused,
            "auto_failover": self.policy.auto_failover,
            "auto_failback": self.policy.auto_failback,
            "synchronous": self.config.replication.synchronous,
            "replication": self._replication_health(),
            "nodes": nodes,
            "connections": {"current": stats.connections_current, "total": stats.connections_total,
                            "waiting": stats.waiting, "rejected": dict(stats.rejected)},
            "detection_bound_seconds": round(self.config.health.detection_bound, 3),
            "operation": None if op is None else {"kind": op.kind, "phase": op.phase_name,
                                                   "started_at": op.started_at},
            "conflicts": list(self.conflicts[-50:]),
            "events": self.events(50),
        }

    def _state_name(self) -> str:
        s = self.state
        if s.phase is Phase.NO_ROUTABLE_NODE or s.active is None:
            return "no_routable_node"
        if s.phase is Phase.FAILING_OVER:
            return "failing_over"
        if s.phase is Phase.SWITCHING:
            return "switching"
        if s.paused:
            return "paused"
        prefix = f"{s.active.value}_active"
        if s.phase is Phase.ACTIVE_SUSPECT:
            return f"{s.active.value}_suspect"
        if s.phase is Phase.ACTIVE_DOWN:
            return f"{s.active.value}_down"
        other = s.active.other.value
        if s.standby is Standby.DOWN:
            return f"{prefix}_{other}_down"
        if s.standby in (Standby.FENCED, Standby.UNFENCED):
            return f"{prefix}_{other}_fenced"
        if s.standby is Standby.REJOINING:
            return f"{prefix}_{other}_rejoining"
        return prefix

    def _replication_health(self) -> str:
        s = self.state
        if s.active is None or s.standby in (Standby.DOWN, Standby.UNKNOWN, Standby.FENCED,
                                             Standby.UNFENCED, Standby.REJOINING):
            return "none"
        if s.standby is Standby.NOT_FOLLOWING:
            return "broken"
        if s.lag_bytes is not None and s.lag_bytes > self.policy.max_lag_bytes:
            return "lagging"
        return "ok"

    def _node_status(self, node: NodeName) -> dict:
        s = self.state
        sample = self.samples.get(node)
        dsn = self.config.node_dsn(node.value)
        if node is s.active:
            role = "active" if s.phase is not Phase.ACTIVE_DOWN else "down"
        elif sample is not None and not sample.ok:
            role = "down"
        elif s.active is not None and s.standby in (Standby.FENCED, Standby.UNFENCED, Standby.REJOINING):
            role = "fenced"
        elif s.active is not None and s.standby in (Standby.FOLLOWING, Standby.NOT_FOLLOWING):
            role = "standby"
        else:
            role = "unknown"
        active_sample = self.samples.get(s.active) if s.active else None
        lag = lag_s = None
        if node is not s.active and active_sample is not None and active_sample.ok:
            lag, lag_s = active_sample.publisher_lag_bytes, active_sample.publisher_lag_seconds
        return {
            "role": role,
            "up": None if sample is None else sample.ok,
            "host": dsn.host,
            "port": dsn.port,
            "last_probe": _iso(sample.at) if sample else None,
            "latency_ms": round(sample.latency * 1000, 3) if sample else None,
            "error": mask_dsn(sample.error) if sample and sample.error else None,
            "read_only": sample.read_only if sample else None,
            "lag_bytes": lag,
            "lag_seconds": lag_s,
            "subscription": ({"name": sample.subscription, "enabled": bool(sample.subscription_enabled)}
                             if sample and sample.subscription else None),
        }


def _safe(cb: Callable, arg) -> None:
    try:
        cb(arg)
    except Exception:  # listeners (metrics, alerts) must never break the control path
        log.exception("listener failed")
