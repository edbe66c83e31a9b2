"""The Store: what a pgroute cluster needs from its consensus store, as an interface.

Owns the vocabulary every cluster module speaks (key-value records with their
revisions, leases with a deadline, compare-and-set transactions, watch events), the
typed errors, and the `Store` protocol. `pgroute.cluster.etcd_store` implements it on
etcd v3; a fake can implement it for unit tests of the logic built on it.

Invariants the callers may rely on:
- Reads are linearizable: a `Read` reflects every write acknowledged before the
  read was sent, and carries the store revision it was taken at; a watch started
  from ``read.revision + 1`` sees every later change, none twice, in order.
- A `Lease`'s ``deadline`` is a lower bound on the lease's expiry, on this process's
  monotonic clock: the send time of the request that granted or refreshed it plus
  the TTL the server answered. The server starts counting after it received that
  request, so it cannot expire the lease before ``deadline``; after ``deadline``,
  absent a later successful refresh, it may have.
- Errors are typed: `StoreUnavailable` (no endpoint answered within the call's
  timeout: the outcome of a write is unknown), `CompareFailed` (a transaction's
  compares did not hold: nothing was written), `LeaseExpired` (the lease is gone
  and its keys with it), `Compacted` (a watch asked for history the store no
  longer has: re-read, then watch from the new read's revision + 1).
- A write whose attempt timed out on one endpoint is retried on the next, and the
  timed-out attempt may still be applied later: a put sent to a SIGSTOPped member was
  applied when it resumed, after its retry had succeeded (a second revision with the
  same value). So an unconditional `put` can land twice, the second time over a newer
  value; a compare-and-set cannot (its late copy fails the compare), but its retry
  can fail the compare when the first attempt was applied in time: `CompareFailed.
  current` shows the key as it is, so the caller can recognise its own write, and
  `create_if_absent` with a lease does so itself (a lease id is unique). A key with
  one writer is best written with `put_if` on the revision of that writer's previous
  write.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pgroute.errors import PgRouteError

# --------------------------------------------------------------------------- errors


class StoreError(PgRouteError):
    """Base of every error the Store raises."""


class StoreUnavailable(StoreError):
    """No endpoint answered within the call's timeout. A write's outcome is unknown."""


class CompareFailed(StoreError):
    """A compare-and-set found the key not as expected; nothing was written.

    ``current`` is the key as the transaction saw it (None: absent)."""

    def __init__(self, key: str, current: KeyValue | None) -> None:
        state = "absent" if current is None else f"at mod_revision {current.mod_revision}"
        super().__init__(f"compare failed on {key!r}: the key is {state}")
        self.key = key
        self.current = current


class LeaseExpired(StoreError):
    """The lease no longer exists (expired or revoked): the keys bound to it are gone."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id:x} has expired or was revoked")
        self.lease_id = lease_id


class Compacted(StoreError):
    """A watch asked for revisions the store has compacted away.

    The caller re-reads (`get_prefix`) and watches again from that read's revision + 1."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(f"revision {requested} is compacted (oldest kept: {compact_revision})")
        self.requested = requested
        self.compact_revision = compact_revision


class StoreRequestError(StoreError):
    """The store refused a request as invalid (a bug or a misconfiguration, not an outage)."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored. ``lease`` is 0 when the key is not bound to a lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @property
    def text(self) -> str:
        return self.value.decode()


@dataclass(frozen=True, slots=True)
class Read:
    """The result of a read: the keys found (sorted by key) and the store revision
    the read was taken at."""

    items: tuple[KeyValue, ...]
    revision: int

    @property
    def first(self) -> KeyValue | None:
        """The one key of a single-key read, or None when it is absent."""
        return self.items[0] if self.items else None


def lease_deadline(sent_at: float, ttl: float) -> float:
    """When a lease granted or refreshed by a request sent at ``sent_at`` (monotonic)
    with the server's answer ``ttl`` may first expire. Measured from the send time,
    not the answer: the server may have started counting any time after the send."""
    return sent_at + ttl


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease: its id, the TTL the server granted (seconds), and the monotonic time
    before which it cannot have expired (see `lease_deadline`)."""

    id: int
    ttl: int
    deadline: float

    def remaining(self, now: float) -> float:
        """Seconds left before the lease may expire (negative: it may have)."""
        return self.deadline - now


class CompareTarget(enum.Enum):
    VALUE = "VALUE"
    VERSION = "VERSION"
    CREATE = "CREATE"  # create_revision; 0 for an absent key
    MOD = "MOD"  # mod_revision; 0 for an absent key
    LEASE = "LEASE"


class CompareResult(enum.Enum):
    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: ``target(key) <result> operand``."""

    key: str
    target: CompareTarget
    operand: int | bytes
    result: CompareResult = CompareResult.EQUAL

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key does not exist (its create_revision is 0)."""
        return cls(key, CompareTarget.CREATE, 0)

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        """The key was last written at ``revision`` (0: it is absent)."""
        return cls(key, CompareTarget.MOD, revision)

    @classmethod
    def value_is(cls, key: str, value: bytes | str) -> Compare:
        return cls(key, CompareTarget.VALUE, value.encode() if isinstance(value, str) else value)

    @classmethod
    def lease_is(cls, key: str, lease_id: int) -> Compare:
        return cls(key, CompareTarget.LEASE, lease_id)


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value`` at ``key``, bound to ``lease`` (an id; 0: no lease)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``, or every key under it with ``prefix=True``."""

    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    """Read ``key``, or every key under it with ``prefix=True``, inside a transaction."""

    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Which branch ran, the store revision after it, and one `Read` per `Get` of that
    branch (in order; None for its other operations)."""

    succeeded: bool
    revision: int
    reads: tuple[Read | None, ...]


class EventKind(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change. For a DELETE, ``kv`` has the key, an empty value and the deleting
    revision as ``mod_revision``. ``revision`` is the change's store revision."""

    kind: EventKind
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix`` (etcd's
    range_end for a prefix); b"\\0" (every key) when the prefix is empty or all 0xff."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# --------------------------------------------------------------------------- the interface


class Store(Protocol):
    """What the cluster logic uses. Every call takes an optional ``timeout`` (seconds,
    for the whole call across endpoints; default: the store's) and raises
    `StoreUnavailable` when it runs out."""

    async def get(self, key: str, *, timeout: float | None = None) -> Read: ...

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> Read: ...

    async def put(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        """Write unconditionally; returns the revision of the write."""
        ...

    async def create_if_absent(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        """Write only if the key does not exist; returns the revision of the write,
        raises `CompareFailed` (with the key as it is) otherwise."""
        ...

    async def put_if(
        self,
        key: str,
        value: bytes | str,
        mod_revision: int,
        lease: Lease | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        """Write only if the key's mod_revision is ``mod_revision`` (0: absent)."""
        ...

    async def delete_if(self, key: str, mod_revision: int, *, timeout: float | None = None) -> int:
        """Delete only if the key's mod_revision is ``mod_revision``."""
        ...

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int: ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult: ...

    async def grant(self, ttl: float, *, timeout: float | None = None) -> Lease:
        """A new lease of at least ``ttl`` seconds (rounded up to whole seconds)."""
        ...

    async def keepalive(self, lease: Lease, *, timeout: float | None = None) -> Lease:
        """Refresh the lease; the returned Lease has the new deadline. Raises
        `LeaseExpired` when the lease is gone."""
        ...

    async def revoke(self, lease: Lease, *, timeout: float | None = None) -> None:
        """Drop the lease and its keys now; a lease already gone is not an error."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` on, in order, across
        endpoint failures. Raises `Compacted`, or `StoreUnavailable` when no endpoint
        accepts the watch for a whole timeout."""
        ...

    async def close(self) -> None: ...
