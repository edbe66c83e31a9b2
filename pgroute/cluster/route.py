"""The route record at ``<prefix>/route``: where every instance of a cluster routes.

Owns the record (`Route`: active node, epoch, paused, reason, the active node's last
WAL position as the state file keeps it, when and by which leader it was written),
its JSON encoding with validation, `RouteWriter` (the only way the leader writes it),
`import_state_file` (the first cluster start) and `RouteWatcher` (every instance
follows it).

Invariants, and why they make the route safe to follow:
- A write is a compare-and-set on the mod_revision the writer last read or wrote,
  plus the caller's guards (the leader key still held by this leader's lease): a
  writer that missed someone else's write, or a deposed leader, writes nothing.
- The epoch never goes down: `RouteWriter` refuses, before any I/O, a route whose
  epoch is below the last one it read or wrote (and the compare-and-set makes that
  the stored one).
- A record that does not decode is `CorruptRecord` naming the key, never "no route":
  an absent route means a first start, an unreadable one means nobody can tell.
- `RouteWatcher` delivers the routes it sees in store order, each once; after the
  store compacted the history it missed, it re-reads and delivers the current route
  (the intermediate ones are gone, the newest is what matters). It never ends on a
  store outage: it keeps retrying and says since when it has been cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pgroute.model import NodeName

from .keys import Keys
from .records import MAX_EPOCH, MAX_LSN, CorruptRecord, dump_object, field, is_int, is_time, load_object
from .store import (
    Compacted,
    Compare,
    CompareFailed,
    EventKind,
    Get,
    KeyValue,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
)
from .watching import watching

log = logging.getLogger(__name__)

_NODES = {n.value for n in NodeName}


@dataclass(frozen=True, slots=True)
class Route:
    """Where the cluster routes. ``active`` None: to no node (failed closed or
    mid-switch); ``paused``: new connections wait. ``updated_at`` is wall time
    (for people; no decision reads it), ``leader`` the name of the instance that
    wrote it. A switch's hold ("paused, no node") keeps the route it holds in
    ``held_active``/``held_epoch``: what a single instance's state file still says
    at that moment, and what a successor's start-up resolution starts from."""

    epoch: int
    active: NodeName | None
    paused: bool = False
    reason: str = ""
    active_lsn: int | None = None
    updated_at: float = 0.0
    leader: str = ""
    held_active: NodeName | None = None
    held_epoch: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.epoch, MAX_EPOCH):
            raise ValueError(f"epoch {self.epoch!r} is not an integer 0..{MAX_EPOCH}")
        if self.active_lsn is not None and not is_int(self.active_lsn, MAX_LSN):
            raise ValueError(f"active_lsn {self.active_lsn!r} is not a WAL position")
        if not is_time(self.updated_at):
            raise ValueError(f"updated_at {self.updated_at!r} is not a time")
        if not is_int(self.held_epoch, MAX_EPOCH):
            raise ValueError(f"held_epoch {self.held_epoch!r} is not an integer 0..{MAX_EPOCH}")

    @property
    def is_hold(self) -> bool:
        """A switch's "paused, no node" while it waits at the barrier."""
        return self.active is None and self.paused

    def holding(self) -> tuple[NodeName, int] | None:
        """The route a hold (or this route itself, when it routes) stands for."""
        if self.active is not None:
            return self.active, self.epoch
        if self.held_active is not None:
            return self.held_active, self.held_epoch
        return None


def encode_route(route: Route) -> bytes:
    data = {
        "epoch": route.epoch,
        "active": route.active.value if route.active else None,
        "paused": route.paused,
        "reason": route.reason,
        "active_lsn": route.active_lsn,
        "updated_at": route.updated_at,
        "leader": route.leader,
    }
    if route.held_active is not None:
        data |= {"held_active": route.held_active.value, "held_epoch": route.held_epoch}
    return dump_object(data)


def decode_route(key: str, value: bytes) -> Route:
    """The route stored at ``key``, or CorruptRecord naming the key. Fields this
    version does not know are ignored (a later version may add some)."""
    data = load_object(key, value)
    epoch = field(key, data, "epoch", lambda v: is_int(v, MAX_EPOCH), f"an integer 0..{MAX_EPOCH}")
    active = field(key, data, "active", lambda v: v is None or v in _NODES, "a node or null")
    paused = field(key, data, "paused", lambda v: isinstance(v, bool), "true or false")
    reason = field(key, data, "reason", lambda v: isinstance(v, str), "a string", "")
    lsn = field(key, data, "active_lsn", lambda v: v is None or is_int(v, MAX_LSN), "a WAL position", None)
    updated_at = field(key, data, "updated_at", is_time, "a time", 0.0)
    leader = field(key, data, "leader", lambda v: isinstance(v, str), "a string", "")
    held = field(key, data, "held_active", lambda v: v is None or v in _NODES, "a node or null", None)
    held_epoch = field(key, data, "held_epoch", lambda v: is_int(v, MAX_EPOCH), f"an integer 0..{MAX_EPOCH}", 0)
    return Route(
        epoch=epoch,
        active=NodeName(active) if active else None,
        paused=paused,
        reason=reason,
        active_lsn=lsn,
        updated_at=float(updated_at),
        leader=leader,
        held_active=NodeName(held) if held else None,
        held_epoch=held_epoch,
    )


@dataclass(frozen=True, slots=True)
class RouteSeen:
    """The route as read or watched: the record (None when the key is absent or
    corrupt), the mod_revision it was written at (0: absent), the store revision it
    was observed at, and ``problem`` (the CorruptRecord message) when it does not
    decode. A follower with no route, or a corrupt one, routes to no node."""

    route: Route | None
    mod_revision: int
    revision: int
    problem: str | None = None


def route_seen(key: str, kv: KeyValue | None, revision: int) -> RouteSeen:
    """What a reader makes of the route key as found (a corrupt record is reported,
    not raised: a follower keeps following and fails closed meanwhile)."""
    if kv is None:
        return RouteSeen(None, 0, revision)
    try:
        return RouteSeen(decode_route(key, kv.value), kv.mod_revision, revision)
    except CorruptRecord as exc:
        return RouteSeen(None, kv.mod_revision, revision, str(exc))


class RouteChanged(ValueError):
    """`RouteWriter.write_if` found another route than the one expected."""


class EpochRegression(ValueError):
    """A route whose epoch is below the one already stored: refused before any write."""


class RouteWriter:
    """The leader's writer of the route: compare-and-set on the mod_revision it last
    read or wrote, plus ``guards`` (for instance `Compare.lease_is(keys.leader,
    lease.id)`: the write fails once this instance no longer holds the leader key).

    Call `read()` first (and again after a `CompareFailed` on the route: the writer
    does not adopt someone else's write on its own). One writer per task: calls are
    serialized."""

    def __init__(self, store: Store, keys: Keys, leader: str, guards: Sequence[Compare] = ()) -> None:
        self._store = store
        self._keys = keys
        self.leader = leader
        self.guards = tuple(guards)
        self._seen: RouteSeen | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> RouteSeen | None:
        """The route as this writer last read or wrote it (None before `read()`)."""
        return self._seen

    async def read(self, *, timeout: float | None = None) -> RouteSeen:
        """Read the route and remember its mod_revision. A corrupt record raises
        CorruptRecord: the leader must not overwrite what it cannot read: an operator
        repairs or deletes the record."""
        async with self._lock:
            read = await self._store.get(self._keys.route, timeout=timeout)
            kv = read.first
            route = decode_route(self._keys.route, kv.value) if kv is not None else None
            self._seen = RouteSeen(route, kv.mod_revision if kv else 0, read.revision)
            return self._seen

    async def write(
        self, route: Route, *, guards: Sequence[Compare] | None = None, timeout: float | None = None
    ) -> RouteSeen:
        """Write ``route`` (``leader`` and ``updated_at`` filled in) if the route is
        still at the mod_revision this writer knows and every guard holds. Raises
        EpochRegression (nothing sent), CompareFailed (nothing written: the route
        moved, ``key`` is the route's; or a guard failed, ``key`` is the guard's),
        StoreUnavailable (outcome unknown: `read()` tells)."""
        return await self.write_if(None, route, guards=guards, timeout=timeout)

    async def write_if(
        self,
        expected: Route | None,
        route: Route,
        *,
        guards: Sequence[Compare] | None = None,
        timeout: float | None = None,
    ) -> RouteSeen:
        """`write`, but only while the route this writer last read or wrote is
        ``expected`` (None: any), checked under the writer's lock; RouteChanged (nothing
        sent) otherwise. For a write derived from the current route (a new WAL
        position) that must not undo a write made meanwhile (a pause)."""
        async with self._lock:
            seen = self._seen
            if expected is not None and (seen is None or seen.route != expected):
                raise RouteChanged("the route changed since it was read: not written")
            if seen is None:
                raise RuntimeError("RouteWriter.write before read(): the route's revision is unknown")
            if seen.route is not None and route.epoch < seen.route.epoch:
                raise EpochRegression(
                    f"refusing to write route epoch {route.epoch}: the route is already at epoch {seen.route.epoch}"
                )
            stamped = Route(
                epoch=route.epoch,
                active=route.active,
                paused=route.paused,
                reason=route.reason,
                active_lsn=route.active_lsn,
                updated_at=time.time(),
                leader=self.leader,
                held_active=route.held_active,
                held_epoch=route.held_epoch,
            )
            payload = encode_route(stamped)
            checks = (
                Compare.mod_revision(self._keys.route, seen.mod_revision),
                *(self.guards if guards is None else guards),
            )
            revision = await _put_guarded(self._store, self._keys.route, payload, checks, timeout)
            self._seen = RouteSeen(stamped, revision, revision)
            log.info(
                "route: epoch %d, active %s%s written by %s (revision %d): %s",
                stamped.epoch,
                stamped.active.value if stamped.active else "none",
                ", paused" if stamped.paused else "",
                self.leader,
                revision,
                stamped.reason,
            )
            return self._seen


async def _put_guarded(
    store: Store, key: str, payload: bytes, compares: Sequence[Compare], timeout: float | None
) -> int:
    """Put ``payload`` at ``key`` if every compare holds (the first one is on ``key``
    itself); the revision written. On failure, CompareFailed names the key whose
    compare failed. A retried attempt that finds this very payload already in place
    (its first attempt was applied in time, see store.py) counts as written: the
    payload carries the writer's name and a wall-clock time, so nobody else wrote
    the same bytes."""
    others = [c.key for c in compares[1:]]
    result = await store.txn(compares, [Put(key, payload)], [Get(key), *(Get(k) for k in others)], timeout=timeout)
    if result.succeeded:
        return result.revision
    reads = result.reads
    current = reads[0].first if reads[0] else None
    if current is not None and current.value == payload:
        return current.mod_revision
    if (current.mod_revision if current else 0) != _expected_revision(compares[0]):
        raise CompareFailed(key, current)
    # The key is as expected: a guard failed. Name the first guard's key (with one
    # guard, the usual case, that is exact).
    guard = others[0] if others else key
    read = reads[1] if len(reads) > 1 else None
    raise CompareFailed(guard, read.first if read else None)


def _expected_revision(compare: Compare) -> int:
    operand = compare.operand
    return operand if isinstance(operand, int) else -1


# --------------------------------------------------------------------------- state file import


class StoredState(Protocol):
    """What the state file holds (pgroute.control.state_store.Stored)."""

    @property
    def epoch(self) -> int: ...

    @property
    def active(self) -> NodeName | None: ...

    @property
    def active_lsn(self) -> int | None: ...


class StateSource(Protocol):
    """A state file (pgroute.control.state_store.StateFile): `load()` is None when
    there is none and raises ValueError when it is corrupt."""

    path: Path

    def load(self) -> StoredState | None: ...


@dataclass(frozen=True, slots=True)
class ImportResult:
    """The route after `import_state_file`, and whether this call wrote it."""

    seen: RouteSeen
    imported: bool


async def import_state_file(
    store: Store,
    keys: Keys,
    state: StateSource,
    *,
    leader: str = "",
    guards: Sequence[Compare] = (),
    timeout: float | None = None,
) -> ImportResult:
    """The first cluster start: when the route key is absent, create it from the
    state file (compare: absent, plus ``guards``); when it exists, keep etcd's and
    leave the file unread. No route and no state file: nothing is written (the
    leader resolves the start from the nodes' stamps). A corrupt route raises
    CorruptRecord, a corrupt state file ValueError: neither is a fresh start.
    Two instances importing at once: one writes, the other gets its route."""
    read = await store.get(keys.route, timeout=timeout)
    if read.first is not None:
        seen = RouteSeen(decode_route(keys.route, read.first.value), read.first.mod_revision, read.revision)
        log.info("route: etcd has epoch %d, state file %s not imported", _epoch(seen), state.path)
        return ImportResult(seen, False)
    stored = state.load()
    if stored is None:
        log.info("route: neither etcd nor state file %s has one", state.path)
        return ImportResult(RouteSeen(None, 0, read.revision), False)
    route = Route(
        epoch=stored.epoch,
        active=stored.active,
        paused=False,
        reason=f"imported from state file {state.path}",
        active_lsn=stored.active_lsn,
        updated_at=time.time(),
        leader=leader,
    )
    payload = encode_route(route)
    try:
        revision = await _put_guarded(store, keys.route, payload, (Compare.absent(keys.route), *guards), timeout)
    except CompareFailed as exc:
        if exc.key != keys.route or exc.current is None:
            raise
        theirs = RouteSeen(
            decode_route(keys.route, exc.current.value), exc.current.mod_revision, exc.current.mod_revision
        )
        log.info("route: another instance created it first (epoch %d); state file not imported", _epoch(theirs))
        return ImportResult(theirs, False)
    log.info("route: imported epoch %d, active %s from state file %s", route.epoch, route.active, state.path)
    return ImportResult(RouteSeen(route, revision, revision), True)


def _epoch(seen: RouteSeen) -> int:
    return seen.route.epoch if seen.route else -1


# --------------------------------------------------------------------------- watcher


class RouteUpdates:
    """One consumer's queue of the routes a `RouteWatcher` delivers (unbounded: routes
    change a few times per switch)."""

    def __init__(self, registry: list[asyncio.Queue[RouteSeen]]) -> None:
        self.queue: asyncio.Queue[RouteSeen] = asyncio.Queue()
        self._registry = registry
        registry.append(self.queue)

    def __aiter__(self) -> RouteUpdates:
        return self

    async def __anext__(self) -> RouteSeen:
        return await self.queue.get()

    def close(self) -> None:
        """Stop receiving routes."""
        if self.queue in self._registry:
            self._registry.remove(self.queue)


class RouteWatcher:
    """Follows the route: `start()` reads it, then a task watches it. Each new route
    goes, in order, to ``on_route`` (called in the watcher's task; it must not block)
    and to every `updates()` iterator. `latest` is the last route seen.

    ``retry`` is the pause after the store gave up (every member unreachable for a
    whole store timeout) before trying again; `lost_since` says since when (monotonic)
    the watcher has been cut off, None while it is connected."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        on_route: Callable[[RouteSeen], None] | None = None,
        *,
        retry: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._keys = keys
        self._on_route = on_route
        self._retry = retry
        self._clock = clock
        self._latest: RouteSeen | None = None
        self._queues: list[asyncio.Queue[RouteSeen]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.lost_since: float | None = None

    @property
    def latest(self) -> RouteSeen | None:
        return self._latest

    async def start(self, *, timeout: float | None = None) -> RouteSeen:
        """Read the route (StoreUnavailable if that fails: nothing started), deliver
        it, and watch from the read's revision + 1."""
        if self._task is not None:
            raise RuntimeError("RouteWatcher already started")
        read = await self._store.get(self._keys.route, timeout=timeout)
        seen = route_seen(self._keys.route, read.first, read.revision)
        await self._deliver(seen)
        self._task = asyncio.create_task(self._run(read.revision + 1), name="route-watcher")
        return seen

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def updates(self) -> RouteUpdates:
        """Every route delivered from now on, in order (the one in `latest` first,
        when there is one), to ``async for``. Registered when called, not at the
        first iteration; `close()` it when done."""
        updates = RouteUpdates(self._queues)
        if self._latest is not None:
            updates.queue.put_nowait(self._latest)
        return updates

    async def wait_for(self, predicate: Callable[[RouteSeen], bool], timeout: float) -> RouteSeen:
        """The first route (the latest included) for which ``predicate`` holds;
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._latest is not None and predicate(self._latest))
            assert self._latest is not None
            return self._latest

    async def _deliver(self, seen: RouteSeen) -> None:
        self._latest = seen
        if seen.problem:
            log.error("route: %s: following no route until it is rewritten", seen.problem)
        if self._on_route is not None:
            try:
                self._on_route(seen)
            except Exception:
                log.exception("route: the on_route callback failed")
        for queue in self._queues:
            queue.put_nowait(seen)
        async with self._changed:
            self._changed.notify_all()

    async def _reread(self) -> int:
        """Read the route again (after compaction or an outage); deliver it if it
        changed. Returns the revision to watch from."""
        read = await self._store.get(self._keys.route)
        seen = route_seen(self._keys.route, read.first, read.revision)
        latest = self._latest
        if latest is None or seen.mod_revision != latest.mod_revision:
            await self._deliver(seen)
        return read.revision + 1

    async def _run(self, start: int) -> None:
        next_revision = start
        reread = False
        while True:
            try:
                if reread:
                    next_revision = await self._reread()
                    reread = False
                elif self.lost_since is not None:
                    # Cut off: a read says when the store answers again (the watch
                    # itself may stay quiet for a long time).
                    await self._store.get(self._keys.route)
                    self.lost_since = None
                async with watching(self._store, self._keys.route, next_revision) as events:
                    async for event in events:
                        self.lost_since = None
                        next_revision = event.revision + 1
                        if event.kv.key != self._keys.route:
                            continue  # a key that merely starts with the route's name
                        if event.kind is EventKind.DELETE:
                            await self._deliver(RouteSeen(None, 0, event.revision))
                        else:
                            await self._deliver(route_seen(self._keys.route, event.kv, event.revision))
            except Compacted as exc:
                log.warning("route: %s: re-reading the route", exc)
                reread = True
            except StoreUnavailable as exc:
                if self.lost_since is None:
                    self.lost_since = self._clock()
                log.warning("route: watch lost the store (%s); retrying", exc)
                await asyncio.sleep(self._retry)
            except StoreError as exc:
                log.error("route: watch failed (%s); retrying", exc)
                await asyncio.sleep(self._retry)
            except Exception:  # the loop must survive anything: followers depend on it
                log.exception("route: watcher loop failed; retrying")
                await asyncio.sleep(self._retry)
