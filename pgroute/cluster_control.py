"""The API's view of a cluster instance, and the leader's routes in etcd.

Owns `ClusterControl` (the ``ControlPlane`` of pgroute/api/http.py in a cluster:
status with the ``cluster`` section, operator commands run by the leader's
controller or forwarded to the leader's API, the peers' failsafe confirmations),
`EtcdSharedRoute` (the leader's `SharedRoute`: the route record in etcd, fenced to
one term, and the barrier) and `ClusterStateFile` (what a new leader's controller
starts from). Split from pgroute/cluster_node.py, which wires the instance.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp

from .api.http import FORWARDED_HEADER, forwarded
from .cluster.barrier import barrier
from .cluster.etcd_store import EtcdStore
from .cluster.keys import Keys
from .cluster.leader import NotLeader
from .cluster.route import Route as SharedRecord
from .cluster.route import RouteSeen, RouteWriter
from .control.controller import Controller
from .control.state_store import StateFile, Stored
from .errors import ActionRefused, PgRouteError
from .model import Detail, Event, HealthSample, NodeName

if TYPE_CHECKING:
    from .cluster_node import ClusterNode

log = logging.getLogger(__name__)

#: Bound on a command forwarded to the leader (a failback with a resync takes long).
FORWARD_TIMEOUT = 600.0


class EtcdSharedRoute:
    """The leader's `SharedRoute`: the route record in etcd, fenced to one term."""

    def __init__(self, store: EtcdStore, keys: Keys, writer: RouteWriter, barrier_timeout: float) -> None:
        self._store = store
        self._keys = keys
        self._writer = writer
        self._barrier_timeout = barrier_timeout
        seen = writer.current
        self._floor = seen.route.epoch if seen is not None and seen.route is not None else 0
        self._revoked: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def revoke(self, why: str) -> None:
        """No more writes through this object (the term ended)."""
        self._revoked = why

    @property
    def floor(self) -> int:
        return self._floor

    async def publish(self, epoch: int, active: NodeName | None, *, paused: bool, reason: str) -> None:
        if self._revoked is not None:
            raise NotLeader(self._revoked)
        epoch = max(epoch, self._floor)
        held = None
        lsn = None
        seen = self._writer.current
        if active is None and paused and seen is not None and seen.route is not None:
            held = seen.route.holding()  # a hold stands for the route it holds
            lsn = seen.route.active_lsn
        await self._writer.write(
            SharedRecord(
                epoch=epoch,
                active=active,
                paused=paused,
                reason=reason,
                active_lsn=lsn,
                held_active=held[0] if held else None,
                held_epoch=held[1] if held else 0,
            )
        )
        self._floor = epoch

    def saved(self, stored: Stored) -> None:
        """The controller saved its state (every few seconds, with the active node's
        WAL position): keep that position in the route record too, so that a new
        leader finding the active node down can measure the standby's lag against it
        as a restarted single instance does with its state file."""
        if stored.active_lsn is None or self._revoked is not None:
            return
        task = asyncio.create_task(self._record_lsn(stored), name="cluster-route-lsn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_lsn(self, stored: Stored) -> None:
        seen = self._writer.current
        route = seen.route if seen is not None else None
        if route is None or (route.epoch, route.active) != (stored.epoch, stored.active) or route.is_hold:
            return
        if route.active_lsn == stored.active_lsn:
            return
        try:
            await self._writer.write_if(route, replace(route, active_lsn=stored.active_lsn), timeout=5.0)
        except Exception as exc:  # the next save tries again; a deposed leader's write fails here
            log.info("route: the active node's WAL position not recorded: %s", exc)

    async def barrier(self, epoch: int, reason: str) -> tuple[bool, dict[str, Detail]]:
        await self.publish(epoch, None, paused=True, reason=reason)
        result = await barrier(self._store, self._keys, epoch, self._barrier_timeout)
        details: dict[str, Detail] = {"barrier": result.describe()}
        for name, took in result.acked.items():
            details[f"barrier_ack_{name}_s"] = round(took, 3)
        for name, took in result.expired.items():
            details[f"barrier_expired_{name}_s"] = round(took, 3)
        return result.complete, details


class ClusterStateFile(StateFile):
    """The controller's stored state in a cluster: the etcd route as read when this
    instance became the leader. A switch's hold ("paused at N+1, no node") claims
    the route it held, at that route's epoch, as a single instance's state file
    would still say (the nodes' stamps win over it when a promotion got that far;
    the epoch floor keeps every new route above N+1); a hold without one is no
    claim. Saves still go to the local state file, a record for people; after the
    first cluster start nothing reads it."""

    def __init__(self, path: str, seen: RouteSeen, on_save: Callable[[Stored], None] | None = None) -> None:
        super().__init__(path)
        route = seen.route
        self._on_save = on_save
        self._stored: Stored | None = None
        if route is not None and route.is_hold:
            held = route.holding()
            self._stored = Stored(held[1], held[0], route.active_lsn) if held is not None else None
        elif route is not None:
            self._stored = Stored(route.epoch, route.active, route.active_lsn)

    def save(self, stored: Stored) -> None:
        super().save(stored)
        if self._on_save is not None:
            self._on_save(stored)

    def load(self) -> Stored | None:
        return self._stored


class ClusterControl:
    """The API's ControlPlane in a cluster: the current controller's status with the
    ``cluster`` section; commands run by the leader's controller, forwarded to its API
    from a follower (once: a forwarded command that reaches a follower is refused,
    409 naming the leader)."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node
        self._event_listeners: list[Callable[[Event], None]] = []
        self._sample_listeners: list[Callable[[HealthSample], None]] = []

    def attach(self, controller: Controller) -> None:
        for e in self._event_listeners:
            controller.add_event_listener(e)
        for s in self._sample_listeners:
            controller.add_sample_listener(s)

    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        self._event_listeners.append(cb)
        self._node.controller.add_event_listener(cb)

    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None:
        self._sample_listeners.append(cb)
        self._node.controller.add_sample_listener(cb)

    def status(self) -> dict[str, Any]:
        node = self._node
        status = node.controller.status()
        if not node.leading:
            # A follower's controller does not run: the route is the one it follows.
            route = node.router.route
            status["active"] = route.backend.name if route.backend is not None else None
            status["epoch"] = route.epoch
            status["paused"] = route.paused
            status["state"] = "following" if route.backend is not None else "no_routable_node"
            status["reason"] = route.reason
        status["cluster"] = node.cluster_status()
        return status

    def failsafe_confirm(self, body: Any) -> tuple[int, dict[str, Any]]:
        """A peer's failsafe confirmation request: (HTTP status, answer)."""
        return self._node.failsafe.confirm(body)

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._node.controller.events(limit)

    def _leader_api(self) -> str:
        """The leader's API URL to forward to; ActionRefused when there is none to
        use (no leader known, no API address, or this request was forwarded here
        already: a stale view must not bounce it back)."""
        leader = self._node.election.current_leader()
        if leader is None:
            raise ActionRefused("not the leader, and no leader elected yet: retry in a few seconds")
        if forwarded.get() or not leader.api:
            raise ActionRefused(f"not the leader: use {leader.api or leader.name}")
        return leader.api

    async def request(self, kind: str, *, force: bool = False, resync: bool = False) -> dict[str, Any]:
        node = self._node
        if node.leading:
            return await node.controller.request(kind, force=force, resync=resync)
        body = {k: True for k, v in (("force", force), ("resync", resync)) if v}
        return await self._forward(f"/api/{kind}", body)

    async def resolve(self, active: NodeName | None) -> dict[str, Any]:
        node = self._node
        if node.leading:
            return await node.controller.resolve(active)
        return await self._forward("/api/resolve", {"active": active.value if active else None})

    async def _forward(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The command, run by the leader: its finished event, or its refusal (409)
        or failure as this instance's own."""
        api = self._leader_api()
        headers = {FORWARDED_HEADER: self._node.name}
        token = self._node.config.api.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        log.info("forwarding %s to the leader at %s", path, api)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)) as session,
                session.post(api.rstrip("/") + path, json=body, headers=headers) as resp,
            ):
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PgRouteError(f"the leader at {api} did not answer: {exc or type(exc).__name__}") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = {"error": text[:200]}
        if status == 200 and isinstance(data, dict):
            return data
        error = str(data.get("error", text[:200])) if isinstance(data, dict) else text[:200]
        if status == 409:
            raise ActionRefused(error)
        raise PgRouteError(f"leader at {api}: {error}")
