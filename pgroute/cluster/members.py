"""Member records at ``<prefix>/members/<name>``: which instances are alive, and what
each has applied.

Owns `MemberRecord` (name, the epoch whose route the instance has applied and whose
older sessions it has closed, paused, proxy and API addresses, start and update
times, and a free ``health`` dict for passive signals), its JSON encoding with
validation, `Membership` (this instance's record, bound to its own lease and kept
alive) and `Members` (everyone's records, read).

Invariants:
- A record exists only while its owner's lease does: present = alive. The lease is
  refreshed every third of its TTL; `Membership.lease` carries the deadline before
  which the store cannot have dropped it.
- One writer per record: the owner writes with `put_if` on the mod_revision of its
  own previous write (an unconditional put retried across members can land twice,
  the late copy over a newer value; see store.py). A compare that fails on a record
  still bound to the owner's lease found one of the owner's own writes (an attempt
  that landed after its call timed out): the owner adopts that revision and writes
  again. A record bound to another lease, or none, is not the owner's: it stops.
- One instance per name: `Membership.start()` refuses a name whose record is bound
  to a live lease that is not its own (`NameInUse`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from .keys import Keys, check_name
from .records import MAX_EPOCH, CorruptRecord, dump_object, is_int, is_time, load_object
from .records import field as record_field
from .store import CompareFailed, KeyValue, Lease, LeaseExpired, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One instance as it reports itself. ``epoch``: the route epoch it has applied
    (and closed the older epoch's sessions for); ``proxy``/``api``: ``host:port``;
    ``started_at``/``updated_at``: wall time; ``health``: passive signals, free-form
    JSON (read-only); ``id``: this process's incarnation (new at each start);
    ``gen``: the roster generation it has acknowledged (see pgroute/cluster/roster.py)."""

    name: str
    epoch: int
    paused: bool = False
    proxy: str = ""
    api: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    health: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""
    gen: int = 0

    def __post_init__(self) -> None:
        check_name(self.name)
        if not is_int(self.epoch, MAX_EPOCH):
            raise ValueError(f"epoch {self.epoch!r} is not an integer 0..{MAX_EPOCH}")
        if not is_int(self.gen, MAX_EPOCH):
            raise ValueError(f"gen {self.gen!r} is not an integer 0..{MAX_EPOCH}")
        for name in ("started_at", "updated_at"):
            if not is_time(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a time")
        object.__setattr__(self, "health", MappingProxyType(dict(self.health)))


def encode_member(record: MemberRecord) -> bytes:
    return dump_object(
        {
            "name": record.name,
            "epoch": record.epoch,
            "paused": record.paused,
            "proxy": record.proxy,
            "api": record.api,
            "started_at": record.started_at,
            "updated_at": record.updated_at,
            "health": dict(record.health),
            "id": record.id,
            "gen": record.gen,
        }
    )


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def decode_member(key: str, value: bytes, name: str | None = None) -> MemberRecord:
    """The record stored at ``key`` (whose name, when given, it must carry), or
    CorruptRecord naming the key. Unknown fields are ignored."""
    data = load_object(key, value)
    stored_name = record_field(key, data, "name", _is_str, "a string")
    if name is not None and stored_name != name:
        raise CorruptRecord(key, f"name {stored_name!r} is not the key's ({name!r})")
    epoch = record_field(key, data, "epoch", lambda v: is_int(v, MAX_EPOCH), f"an integer 0..{MAX_EPOCH}")
    paused = record_field(key, data, "paused", lambda v: isinstance(v, bool), "true or false")
    proxy = record_field(key, data, "proxy", _is_str, "a string", "")
    api = record_field(key, data, "api", _is_str, "a string", "")
    started_at = record_field(key, data, "started_at", is_time, "a time", 0.0)
    updated_at = record_field(key, data, "updated_at", is_time, "a time", 0.0)
    health = record_field(key, data, "health", lambda v: isinstance(v, dict), "an object", {})
    ident = record_field(key, data, "id", _is_str, "a string", "")
    gen = record_field(key, data, "gen", lambda v: is_int(v, MAX_EPOCH), f"an integer 0..{MAX_EPOCH}", 0)
    try:
        return MemberRecord(
            stored_name, epoch, paused, proxy, api, float(started_at), float(updated_at), health, ident, gen
        )
    except ValueError as exc:  # a name that is not a valid instance name
        raise CorruptRecord(key, str(exc)) from None


@dataclass(frozen=True, slots=True)
class Member:
    """A member record as read: the record, its mod_revision and its lease id."""

    record: MemberRecord
    mod_revision: int
    lease: int

    @property
    def name(self) -> str:
        return self.record.name


def member_of(keys: Keys, kv: KeyValue) -> Member | None:
    """The member a key under the members prefix holds (None for a key that is not a
    member key); CorruptRecord when it does not decode."""
    name = keys.member_name(kv.key)
    if name is None:
        return None
    return Member(decode_member(kv.key, kv.value, name), kv.mod_revision, kv.lease)


class NameInUse(StoreError):
    """Another live instance already has this name's member record."""

    def __init__(self, key: str, current: KeyValue | None) -> None:
        holder = ""
        if current is not None:
            try:
                record = decode_member(key, current.value)
                holder = f" (proxy {record.proxy or '?'}, api {record.api or '?'}, started at {record.started_at:.0f})"
            except CorruptRecord:
                holder = " (unreadable record)"
        lease = f"lease {current.lease:x}" if current is not None else "a live lease"
        super().__init__(
            f"instance name in use: {key} is held by another running instance under {lease}{holder}; "
            "give each instance its own [cluster] name"
        )
        self.key = key
        self.current = current


class MembershipLost(StoreError):
    """This instance's record is gone (its lease expired) or is no longer its own."""


class Members:
    """Everyone's member records, read from the store."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    async def list(self, *, timeout: float | None = None) -> tuple[Member, ...]:
        """The live members (a record exists only while its lease does), by name.
        A corrupt record raises CorruptRecord naming its key."""
        read = await self._store.get_prefix(self._keys.members, timeout=timeout)
        found = (member_of(self._keys, kv) for kv in read.items)
        return tuple(m for m in found if m is not None)

    async def get(self, name: str, *, timeout: float | None = None) -> Member | None:
        kv = (await self._store.get(self._keys.member(name), timeout=timeout)).first
        return member_of(self._keys, kv) if kv is not None else None

    async def check_name_free(self, name: str, *, timeout: float | None = None) -> None:
        """NameInUse when a live instance holds ``name`` (for `pgroute check`, and
        `Membership.start`)."""
        key = self._keys.member(name)
        kv = (await self._store.get(key, timeout=timeout)).first
        if kv is not None:
            raise NameInUse(key, kv)


class Membership:
    """This instance's member record. `start()` grants a lease and creates the
    record, then a task keeps the lease alive; `update()` rewrites the record
    (applied epoch, paused, health); `close()` stops and revokes (the record
    vanishes at once), `close(revoke=False)` only stops (it vanishes when the lease
    expires: what a crash looks like to the others).

    When the lease is lost (the store says it expired, or its deadline passed with
    no refresh), `lost` is set and ``on_lost`` called; the record is gone or about
    to be, and `start()` may be called again after `close()`."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        name: str,
        ttl: float,
        *,
        proxy: str = "",
        api: str = "",
        epoch: int = 0,
        instance_id: str = "",
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._keys = keys
        self.key = keys.member(name)
        self.ttl = ttl
        self._record = MemberRecord(name, epoch, proxy=proxy, api=api, id=instance_id)
        self._on_lost = on_lost
        self._clock = clock
        self._lease: Lease | None = None
        self._revision = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def record(self) -> MemberRecord:
        """The record as last written."""
        return self._record

    @property
    def lease(self) -> Lease | None:
        return self._lease

    async def start(self, *, timeout: float | None = None) -> MemberRecord:
        """Grant the lease and create the record; NameInUse when another live
        instance has it (the lease granted here is revoked)."""
        if self._task is not None:
            raise RuntimeError(f"member {self.name}: already started")
        self.lost.clear()
        lease = await self._store.grant(self.ttl, timeout=timeout)
        now = time.time()
        record = replace(self._record, started_at=now, updated_at=now)
        try:
            revision = await self._store.create_if_absent(self.key, encode_member(record), lease, timeout=timeout)
        except CompareFailed as exc:
            await self._revoke(lease)
            raise NameInUse(self.key, exc.current) from None
        except BaseException:
            await self._revoke(lease)
            raise
        self._lease, self._revision, self._record = lease, revision, record
        self._task = asyncio.create_task(self._keep_alive(), name=f"member-{self.name}-keepalive")
        log.info("member %s: registered (lease %x, ttl %ds, epoch %d)", self.name, lease.id, lease.ttl, record.epoch)
        return record

    async def update(
        self,
        *,
        epoch: int | None = None,
        paused: bool | None = None,
        health: Mapping[str, Any] | None = None,
        gen: int | None = None,
        timeout: float | None = None,
    ) -> MemberRecord:
        """Rewrite the record with the fields given. Raises MembershipLost when the
        record is gone or not this instance's, StoreUnavailable when the store did
        not answer (the outcome is unknown; the next update settles it)."""
        async with self._lock:
            lease = self._lease
            if lease is None or self.lost.is_set():
                raise MembershipLost(f"member {self.name}: not registered (start() first, or the lease was lost)")
            changes: dict[str, Any] = {"updated_at": time.time()}
            if epoch is not None:
                changes["epoch"] = epoch
            if paused is not None:
                changes["paused"] = paused
            if health is not None:
                changes["health"] = health
            if gen is not None:
                changes["gen"] = gen
            record = replace(self._record, **changes)
            payload = encode_member(record)
            for _ in range(2):
                try:
                    self._revision = await self._store.put_if(self.key, payload, self._revision, lease, timeout=timeout)
                    break
                except CompareFailed as exc:
                    current = exc.current
                    if current is None or current.lease != lease.id:
                        self._mark_lost("the record is gone" if current is None else "the record is another lease's")
                        raise MembershipLost(f"member {self.name}: {exc}") from None
                    if current.value == payload:  # this very write, applied by an earlier attempt
                        self._revision = current.mod_revision
                        break
                    # One of this instance's earlier writes landed after its call gave
                    # up: write over it.
                    self._revision = current.mod_revision
            else:
                raise MembershipLost(f"member {self.name}: the record keeps changing under this instance")
            self._record = record
            return record

    async def close(self, *, revoke: bool = True, timeout: float | None = None) -> None:
        """Stop keeping the lease alive; with ``revoke``, drop it (and the record)
        now. A store that does not answer is logged: the lease expires anyway."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        lease, self._lease = self._lease, None
        if lease is not None and revoke:
            await self._revoke(lease, timeout)

    async def _revoke(self, lease: Lease, timeout: float | None = None) -> None:
        try:
            await self._store.revoke(lease, timeout=timeout)
        except StoreError as exc:
            log.warning("member %s: could not revoke lease %x (%s); it expires by itself", self.name, lease.id, exc)

    def _mark_lost(self, why: str) -> None:
        if self.lost.is_set():
            return
        log.error("member %s: membership lost: %s", self.name, why)
        self.lost.set()
        if self._on_lost is not None:
            try:
                self._on_lost(why)
            except Exception:
                log.exception("member %s: the on_lost callback failed", self.name)

    async def _keep_alive(self) -> None:
        """Refresh the lease every ttl/3; after a failure, retry sooner (ttl/15) while
        the deadline lasts. Once the store says the lease is gone, or its deadline
        passes unrefreshed (it may still exist: the deadline is a lower bound, and
        losing it is the safe assumption), membership is lost and the loop ends."""
        assert self._lease is not None
        interval = self._lease.ttl / 3
        delay = interval
        while True:
            lease = self._lease
            if lease is None:
                return
            remaining = lease.remaining(self._clock())
            if remaining <= 0:
                self._mark_lost(f"lease {lease.id:x} passed its deadline without a refresh")
                return
            await asyncio.sleep(min(delay, remaining / 2))
            try:
                self._lease = await self._store.keepalive(lease, timeout=max(0.5, lease.remaining(self._clock())))
                delay = interval
                continue
            except LeaseExpired:
                self._mark_lost(f"lease {lease.id:x} expired")
                return
            except StoreUnavailable as exc:
                log.warning("member %s: lease keep-alive failed (%s); retrying", self.name, exc)
            except StoreError as exc:
                log.error("member %s: lease keep-alive refused (%s); retrying", self.name, exc)
            except Exception:  # one catch-all: the loop that keeps this instance a member
                log.exception("member %s: keep-alive loop failed; retrying", self.name)
            delay = interval / 5
