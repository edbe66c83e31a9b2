"""An in-memory `Store` for unit tests of the logic built on it (leader election, ...).

Owns a fake etcd: `MemoryServer` holds the keys, the revision counter, the leases
(expiring on an injectable `Clock`) and the change history; each `MemoryStore` is one
client of it (one pgroute instance) with its own reachability, so a test can cut one
instance off (`down()`), hang its calls until their timeout (`down(hang=True)`), or
take the whole server away (`MemoryServer.down()`).

It follows etcd where the cluster logic depends on it:
- one revision per write transaction (every change in it carries that revision); a
  transaction or delete that changes nothing does not move the revision;
- compares on an absent key see zeros (create/mod revision, version, lease), and a
  VALUE compare on it fails;
- a lease's keys are deleted, in one revision, when it is revoked or expires; it
  expires no earlier than the time of the last grant/refresh plus its TTL (whole
  seconds, rounded up), and the `Lease.deadline` a client gets is stamped with the
  clock at the *start* of its call, like EtcdStore's send time;
- watches deliver every change from a revision on, in order, once; history before
  `compact()` is `Compacted`.
Where it differs: a put with a lease that is gone raises `LeaseExpired` (etcd answers
"requested lease not found", an `EtcdError`); calls are answered at once when reachable
(no latency, no late replays of timed-out calls).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .clock import MONOTONIC, Clock, wait_event
from .store import (
    Compacted,
    Compare,
    CompareFailed,
    CompareResult,
    CompareTarget,
    Delete,
    EventKind,
    Get,
    KeyValue,
    Lease,
    LeaseExpired,
    Op,
    Put,
    Read,
    StoreRequestError,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
    lease_deadline,
)

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _LeaseState:
    ttl: int
    expires_at: float
    keys: set[str]


class MemoryServer:
    """The shared state: what a 3-member etcd holds, in one object. One event loop."""

    def __init__(self, clock: Clock = MONOTONIC, timeout: float = 3.0) -> None:
        self.clock = clock
        self.timeout = timeout
        self.revision = 1  # an empty etcd is at revision 1
        self.compact_revision = 0
        self._kvs: dict[str, KeyValue] = {}
        self._leases: dict[int, _LeaseState] = {}
        self._lease_ids = itertools.count(0x694D7A1E00000001)
        self.history: list[WatchEvent] = []
        self._available = True
        self._hang = False
        self._changed = asyncio.Event()  # replaced after each set: a broadcast
        self._expiry_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- fault injection

    def client(self, timeout: float | None = None) -> MemoryStore:
        return MemoryStore(self, timeout)

    def down(self, *, hang: bool = False) -> None:
        """Every client's calls fail (at once, or after their timeout with ``hang``)."""
        self._available = False
        self._hang = hang
        self.notify()

    def up(self) -> None:
        self._available = True
        self.notify()

    def reachable(self) -> tuple[bool, bool]:
        return self._available, self._hang

    # ----------------------------------------------------------------- inspection

    def lease_ids(self) -> set[int]:
        self.expire()
        return set(self._leases)

    def lease_expiry(self, lease_id: int) -> float | None:
        """When the server expires the lease unless refreshed (None: it is gone)."""
        state = self._leases.get(lease_id)
        return state.expires_at if state else None

    def compact(self, revision: int) -> None:
        self.compact_revision = max(self.compact_revision, revision)
        self.history = [e for e in self.history if e.revision >= revision]

    # ----------------------------------------------------------------- change broadcast

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next change (a write, an expiry, reachability)."""
        return self._changed

    # ----------------------------------------------------------------- state

    def expire(self) -> None:
        """Expire every lease whose time has come (each in its own revision)."""
        now = self.clock.now()
        for lease_id in sorted(i for i, s in self._leases.items() if s.expires_at <= now):
            log.debug("memory store: lease %x expired", lease_id)
            self.drop_lease(lease_id)

    def drop_lease(self, lease_id: int) -> None:
        state = self._leases.pop(lease_id, None)
        if state is None:
            return
        present = sorted(k for k in state.keys if k in self._kvs and self._kvs[k].lease == lease_id)
        if present:
            self._commit([Delete(k) for k in present])
        self.notify()

    def grant(self, ttl: float) -> int:
        lease_id = next(self._lease_ids)
        whole = math.ceil(ttl)
        self._leases[lease_id] = _LeaseState(whole, self.clock.now() + whole, set())
        self._ensure_expiry_task()
        self.notify()
        return lease_id

    def refresh(self, lease_id: int) -> int:
        state = self._leases.get(lease_id)
        if state is None:
            raise LeaseExpired(lease_id)
        state.expires_at = self.clock.now() + state.ttl
        self.notify()
        return state.ttl

    def range(self, key: str, prefix: bool) -> Read:
        if prefix:
            items = tuple(kv for k, kv in sorted(self._kvs.items()) if k.startswith(key))
        else:
            found = self._kvs.get(key)
            items = (found,) if found else ()
        return Read(items, self.revision)

    def holds(self, compare: Compare) -> bool:
        kv = self._kvs.get(compare.key)
        if kv is None:
            if compare.target is CompareTarget.VALUE:
                return False
            kv = KeyValue(compare.key, b"", 0, 0, 0, 0)
        actual: int | bytes
        if compare.target is CompareTarget.VALUE:
            actual = kv.value
        elif compare.target is CompareTarget.VERSION:
            actual = kv.version
        elif compare.target is CompareTarget.CREATE:
            actual = kv.create_revision
        elif compare.target is CompareTarget.MOD:
            actual = kv.mod_revision
        else:
            actual = kv.lease
        operand = compare.operand
        if type(actual) is not type(operand):
            raise StoreRequestError(f"compare of {compare.target.value} with a {type(operand).__name__}")
        if compare.result is CompareResult.EQUAL:
            return actual == operand
        if compare.result is CompareResult.NOT_EQUAL:
            return actual != operand
        if compare.result is CompareResult.GREATER:
            return actual > operand  # type: ignore[operator]
        return actual < operand  # type: ignore[operator]

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> TxnResult:
        self.expire()
        succeeded = all(self.holds(c) for c in compares)
        ops = success if succeeded else failure
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseExpired(op.lease)
        reads = self._commit(ops)
        return TxnResult(succeeded, self.revision, reads)

    def _commit(self, ops: Sequence[Op]) -> tuple[Read | None, ...]:
        """Apply ``ops`` in order as one revision (if anything changes)."""
        revision = self.revision + 1
        events: list[WatchEvent] = []
        reads: list[Read | None] = []
        for op in ops:
            if isinstance(op, Get):
                reads.append(replace(self.range(op.key, op.prefix), revision=self.revision))
                continue
            reads.append(None)
            if isinstance(op, Put):
                old = self._kvs.get(op.key)
                if old is not None and old.lease and old.lease != op.lease and old.lease in self._leases:
                    self._leases[old.lease].keys.discard(op.key)
                kv = KeyValue(
                    op.key,
                    op.value,
                    old.create_revision if old else revision,
                    revision,
                    (old.version if old else 0) + 1,
                    op.lease,
                )
                self._kvs[op.key] = kv
                if op.lease:
                    self._leases[op.lease].keys.add(op.key)
                events.append(WatchEvent(EventKind.PUT, kv))
            else:
                doomed = [k for k in self._kvs if (k.startswith(op.key) if op.prefix else k == op.key)]
                for key in sorted(doomed):
                    old = self._kvs.pop(key)
                    if old.lease in self._leases:
                        self._leases[old.lease].keys.discard(key)
                    events.append(WatchEvent(EventKind.DELETE, KeyValue(key, b"", 0, revision, 0, 0)))
        if events:
            self.revision = revision
            self.history.extend(events)
            self.notify()
        return tuple(reads)

    # ----------------------------------------------------------------- expiry in the background

    def _ensure_expiry_task(self) -> None:
        if self._expiry_task is None or self._expiry_task.done():
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever())

    async def _expire_forever(self) -> None:
        """Expire leases on time even when no client calls (a follower waiting on a
        watch must see the leader's key go)."""
        while True:
            changed = self._changed
            self.expire()
            if not self._leases:
                self._expiry_task = None
                return
            soonest = min(s.expires_at for s in self._leases.values())
            await wait_event(changed, self.clock, soonest - self.clock.now())

    async def close(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.wait([self._expiry_task])
            self._expiry_task = None


class MemoryStore:
    """One client of a `MemoryServer`: the `Store` protocol, with its own reachability."""

    def __init__(self, server: MemoryServer, timeout: float | None = None) -> None:
        self.server = server
        self.timeout = server.timeout if timeout is None else timeout
        self._available = True
        self._hang = False
        self._closed = False

    # ----------------------------------------------------------------- fault injection

    def down(self, *, hang: bool = False) -> None:
        """Cut this client off: calls fail at once, or (``hang``) after their timeout."""
        self._available = False
        self._hang = hang
        self.server.notify()

    def up(self) -> None:
        self._available = True
        self.server.notify()

    def _reachable(self) -> tuple[bool, bool]:
        """(reachable, hang when not)."""
        if self._closed:
            return False, False
        server_up, server_hang = self.server.reachable()
        if not self._available:
            return False, self._hang
        if not server_up:
            return False, server_hang
        return True, False

    async def _enter(self, timeout: float | None) -> float:
        """Wait until the server is reachable (or fail as configured); the call's start
        time on the server clock."""
        clock = self.server.clock
        started = clock.now()
        limit = self.timeout if timeout is None else timeout
        await asyncio.sleep(0)  # a call is a suspension point, as over the network
        while True:
            reachable, hang = self._reachable()
            if reachable:
                return started
            left = started + limit - clock.now()
            if not hang or left <= 0:
                raise StoreUnavailable(f"memory store: unreachable (call of {limit:g}s)")
            await wait_event(self.server.changed, clock, left)

    # ----------------------------------------------------------------- reads

    async def get(self, key: str, *, timeout: float | None = None) -> Read:
        await self._enter(timeout)
        self.server.expire()
        return self.server.range(key, False)

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> Read:
        await self._enter(timeout)
        self.server.expire()
        return self.server.range(prefix, True)

    # ----------------------------------------------------------------- writes

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        await self._enter(timeout)
        return self.server.txn(compares, success, failure)

    async def put(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        result = await self.txn((), [Put(key, _bytes(value), lease.id if lease else 0)], timeout=timeout)
        return result.revision

    async def create_if_absent(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        return await self._put_if(Compare.absent(key), key, value, lease, timeout)

    async def put_if(
        self,
        key: str,
        value: bytes | str,
        mod_revision: int,
        lease: Lease | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        return await self._put_if(Compare.mod_revision(key, mod_revision), key, value, lease, timeout)

    async def _put_if(
        self, compare: Compare, key: str, value: bytes | str, lease: Lease | None, timeout: float | None
    ) -> int:
        put = Put(key, _bytes(value), lease.id if lease else 0)
        result = await self.txn([compare], [put], [Get(key)], timeout=timeout)
        if not result.succeeded:
            read = result.reads[0]
            raise CompareFailed(key, read.first if read else None)
        return result.revision

    async def delete_if(self, key: str, mod_revision: int, *, timeout: float | None = None) -> int:
        result = await self.txn([Compare.mod_revision(key, mod_revision)], [Delete(key)], [Get(key)], timeout=timeout)
        if not result.succeeded:
            read = result.reads[0]
            raise CompareFailed(key, read.first if read else None)
        return result.revision

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        result = await self.txn((), [Delete(key, prefix)], timeout=timeout)
        return result.revision

    # ----------------------------------------------------------------- leases

    async def grant(self, ttl: float, *, timeout: float | None = None) -> Lease:
        if not ttl > 0 or math.isnan(ttl):
            raise ValueError(f"lease TTL must be positive, not {ttl!r}")
        sent = await self._enter(timeout)
        lease_id = self.server.grant(ttl)
        whole = math.ceil(ttl)
        return Lease(lease_id, whole, lease_deadline(sent, whole))

    async def keepalive(self, lease: Lease, *, timeout: float | None = None) -> Lease:
        sent = await self._enter(timeout)
        self.server.expire()
        ttl = self.server.refresh(lease.id)
        return Lease(lease.id, ttl, lease_deadline(sent, ttl))

    async def revoke(self, lease: Lease, *, timeout: float | None = None) -> None:
        await self._enter(timeout)
        self.server.expire()
        self.server.drop_lease(lease.id)

    # ----------------------------------------------------------------- watch

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        server = self.server
        next_revision = start_revision if start_revision > 0 else server.revision + 1
        unreachable_since: float | None = None
        while True:
            changed = server.changed
            if next_revision < server.compact_revision:
                raise Compacted(next_revision, server.compact_revision)
            reachable, _ = self._reachable()
            if reachable:
                unreachable_since = None
                pending = [e for e in server.history if e.revision >= next_revision and e.kv.key.startswith(prefix)]
                for event in pending:
                    next_revision = event.revision + 1
                    yield event
                if pending:
                    continue
                await changed.wait()
                continue
            # Like EtcdStore: a watch no member serves for a whole timeout gives up.
            now = server.clock.now()
            if unreachable_since is None:
                unreachable_since = now
            left = unreachable_since + self.timeout - now
            if left <= 0:
                raise StoreUnavailable("memory store: no member served the watch")
            await wait_event(changed, server.clock, left)

    async def close(self) -> None:
        self._closed = True
        self.server.notify()


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


if TYPE_CHECKING:

    def _is_a_store(store: MemoryStore) -> Store:
        return store  # mypy checks that MemoryStore implements the Store protocol
