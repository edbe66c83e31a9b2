"""Leader election on the Store, with Patroni's lease discipline.

Owns the ``<prefix>/leader`` key: campaigning for it, holding it (renewing the lease
it is bound to), giving it up, and telling the rest of the process when this
instance may act as the leader (`is_leader`, `on_elected`, `on_lost`) and who the
leader is (`current_leader`). It decides nothing else: the caller runs its
controller between `on_elected` and `on_lost`, and fences its writes with
`Term.fence`.

The safety argument, in a few lines:
- The key is created only if absent (create_revision == 0), bound to this instance's
  lease, so at most one instance holds it at a time; it disappears when the lease
  expires or is revoked. Its create_revision numbers the leadership: the `Term`.
- `Lease.deadline` is a lower bound on when the server may expire the lease (the
  send time of the last successful grant/refresh plus its TTL, on this clock). The
  holder acts only while ``now < deadline - margin``: a timer steps it down at that
  instant, whether or not a renewal is still waiting for an answer, and
  `is_leader()` compares with the clock at each call. So it has stopped acting
  before any other instance can create the key.
- Renewal: every ``loop_wait`` a keep-alive, each attempt bounded by
  ``retry_timeout`` and by the acting deadline; ``loop_wait + 2 * retry_timeout <=
  ttl`` and ``margin <= retry_timeout`` leave room, before stepping down, for one
  full attempt and a retry of ``retry_timeout - margin``. After a renewal the key
  itself is read: deleted or re-created by someone else, the holder steps down at
  once (the watch on the key does it too).
- Every write the leader makes on behalf of a term adds ``term.fence`` (the leader
  key's create_revision equals the term's) to its transaction: a deposed leader's
  late write fails the compare, whatever its clock believed.
- A new term always has a new lease: after losing, the old lease is revoked (best
  effort, until it is gone or has most likely expired) before campaigning again, so a
  leadership that ended is never silently resumed.
- A clean `close()` revokes the lease: the key is deleted now, the followers, who
  watch it, campaign at once instead of waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pgroute.errors import PgRouteError

from .clock import MONOTONIC, Clock, wait_event
from .keys import Keys, check_name
from .store import (
    Compare,
    CompareFailed,
    CompareTarget,
    EventKind,
    KeyValue,
    Lease,
    LeaseExpired,
    Read,
    Store,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)

log = logging.getLogger(__name__)

_EPSILON = 1e-9  # ttl/3 + 2 * ttl/3 may exceed ttl by a rounding error


class NotLeader(PgRouteError):
    """An action that needs the leadership was asked of an instance that does not hold it."""


@dataclass(frozen=True, slots=True)
class Term:
    """One leadership of one instance: the leader key's create_revision (``number``),
    the lease the key is bound to, and the holder's name."""

    key: str
    number: int
    lease_id: int
    name: str

    @property
    def fence(self) -> Compare:
        """Add to a transaction so that it only applies while this term lasts."""
        return Compare(self.key, CompareTarget.CREATE, self.number)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads, as the leader key says: name, API address (may be empty), the term
    (the key's create_revision) and since when (the leader's wall clock, ISO 8601)."""

    name: str
    api: str
    term: int
    since: str


def leader_record(name: str, api: str, since: str) -> bytes:
    return json.dumps({"name": name, "api": api, "since": since}, sort_keys=True).encode()


def parse_leader(kv: KeyValue) -> LeaderInfo:
    """The leader key's value; a value that is not our JSON is taken as a bare name
    (an operator's ``etcdctl put``), never as a reason to fail."""
    try:
        data = json.loads(kv.value)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return LeaderInfo(kv.value.decode(errors="replace"), "", kv.create_revision, "")
    return LeaderInfo(
        str(data.get("name", "")), str(data.get("api", "")), kv.create_revision, str(data.get("since", ""))
    )


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


OnElected = Callable[[Term], None]
OnLost = Callable[[Term, str], None]


class LeaderElection:
    """Campaign for, hold and give up the leader key. Use from one event loop:
    `start()`, then `close()` (which revokes the lease unless ``release=False``)."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        name: str,
        ttl: float,
        *,
        api: str = "",
        loop_wait: float | None = None,
        retry_timeout: float | None = None,
        margin: float | None = None,
        on_elected: OnElected | None = None,
        on_lost: OnLost | None = None,
        may_campaign: Callable[[], Awaitable[str | None]] | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.ttl = float(ttl)
        self.loop_wait = self.ttl / 3 if loop_wait is None else float(loop_wait)
        self.retry_timeout = self.ttl / 3 if retry_timeout is None else float(retry_timeout)
        self.margin = min(1.0, self.retry_timeout / 2) if margin is None else float(margin)
        if not self.ttl > 0 or not self.loop_wait > 0 or not self.retry_timeout > 0:
            raise ValueError("ttl, loop_wait and retry_timeout must be positive")
        if self.loop_wait + 2 * self.retry_timeout > self.ttl + _EPSILON:
            raise ValueError(
                f"loop_wait + 2 * retry_timeout must not exceed ttl: {self.loop_wait:g} + 2 * "
                f"{self.retry_timeout:g} > {self.ttl:g} (a leader could not retry a failed renewal "
                "before its lease may expire)"
            )
        if not 0 < self.margin <= self.retry_timeout:
            raise ValueError(f"margin must be positive and at most retry_timeout ({self.retry_timeout:g}s)")
        self.name = check_name(name)
        self.api = api
        self._store = store
        self._keys = keys
        self._clock = clock
        self._on_elected = on_elected
        self._on_lost = on_lost
        # Asked before each attempt to take a vacant key: a reason not to (this
        # instance may not lead yet, pgroute/cluster/roster.py), or None.
        self._may_campaign = may_campaign
        self._barred: str | None = None
        self._pause = min(0.5, self.loop_wait / 4)  # between attempts after a store error

        self._term: Term | None = None
        self._lease: Lease | None = None
        self._last_deadline: float | None = None
        self._acting_until = 0.0
        self._since = ""
        self._lost = asyncio.Event()
        self._stale: list[Lease] = []  # leases of ended terms or lost races, to revoke
        self._pending: Lease | None = None  # granted for a campaign whose outcome is not known yet
        # What the watch (or a read) last saw of the leader key, at which revision.
        self._observed: KeyValue | None = None
        self._observed_revision = 0
        self._deleted_at = 0  # the latest revision at which the key was seen absent
        self._key_changed = asyncio.Event()  # replaced after each set: a broadcast
        self._main: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    # ----------------------------------------------------------------- the caller's view

    def is_leader(self) -> bool:
        """True while this instance holds the key and its lease cannot have expired
        (with the margin), checked against the clock now."""
        return self._term is not None and self._clock.now() < self._acting_until

    @property
    def term(self) -> Term | None:
        """The current term while `is_leader()`, else None."""
        return self._term if self.is_leader() else None

    def fence(self) -> Compare:
        """The compare that fences a write to the current term; `NotLeader` if none."""
        term = self.term
        if term is None:
            raise NotLeader(f"{self.name} is not the leader")
        return term.fence

    @property
    def acting_until(self) -> float | None:
        """While leader: the clock time at which it stops acting unless renewed."""
        return self._acting_until if self._term is not None else None

    @property
    def lease_deadline(self) -> float | None:
        """While leader: the deadline of its lease (see `Lease.deadline`)."""
        return self._lease.deadline if self._term is not None and self._lease is not None else None

    @property
    def last_lease_deadline(self) -> float | None:
        """The deadline of the last lease this instance held as the leader, also after
        it lost it (status and tests: it stopped acting before this)."""
        return self._last_deadline

    def current_leader(self) -> LeaderInfo | None:
        """The leader as last seen (this instance's own record while it leads)."""
        term = self.term
        if term is not None:
            return LeaderInfo(self.name, self.api, term.number, self._since)
        observed = self._observed
        return parse_leader(observed) if observed is not None else None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start campaigning (and watching the leader key). Needs a running loop."""
        if self._main is not None:
            raise RuntimeError("leader election already started")
        if self._closed:
            raise RuntimeError("leader election closed")
        loop = asyncio.get_running_loop()
        self._watch = loop.create_task(self._watch_key(), name=f"leader-watch-{self.name}")
        self._main = loop.create_task(self._run(), name=f"leader-election-{self.name}")

    async def close(self, *, release: bool = True) -> None:
        """Stop: step down (firing `on_lost`), stop campaigning and, with ``release``,
        revoke the lease so that another instance takes over now. ``release=False``
        leaves the lease to expire, as a crashed process would (for tests)."""
        if self._closed:
            return
        self._closed = True
        if self._term is not None:
            self._step_down(self._term, "stopped")
        tasks = {t for t in (self._main, self._watch) if t is not None}
        # Cancel until they end: Python 3.11's asyncio.wait_for (in the store's watch)
        # can swallow a cancellation that races with its result; the loops also stop
        # on ``_closed``.
        while tasks:
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=0.5)
            if tasks:
                log.info("leader election %s: %d task(s) still running after cancel; again", self.name, len(tasks))
        if self._pending is not None:  # cancelled while creating the key: it may exist
            self._stale.append(self._pending)
            self._pending = None
        if release:
            await self._release_stale(give_up=True)

    # ----------------------------------------------------------------- campaign

    async def _run(self) -> None:
        while not self._closed:
            try:
                won = await self._campaign()
                if won is not None:
                    await self._hold(*won)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any bug in one round
                log.exception("leader election %s: unexpected error; campaigning again", self.name)
                await self._clock.sleep(self.loop_wait)

    async def _campaign(self) -> tuple[Term, Lease] | None:
        """One round: the leader key is read; absent, this instance tries to create
        it. Returns the new term, or None after waiting (bounded) for a vacancy."""
        key = self._keys.leader
        if not await self._release_stale():
            await self._clock.sleep(self._pause)
            return None
        try:
            read = await self._store.get(key, timeout=self.retry_timeout)
        except StoreError as exc:
            log.info("leader election %s: cannot read the leader key: %s", self.name, exc)
            await self._clock.sleep(self._pause)
            return None
        self._observe_read(read)
        if read.first is not None:
            await self._wait_vacant(read.revision, self.loop_wait)
            return None
        if self._may_campaign is not None:
            barred = await self._may_campaign()
            if barred is not None:
                if barred != self._barred:
                    log.warning("leader election %s: not campaigning: %s", self.name, barred)
                self._barred = barred
                await self._clock.sleep(self.loop_wait)
                return None
            self._barred = None
        try:
            lease = await self._store.grant(self.ttl, timeout=self.retry_timeout)
        except StoreError as exc:
            log.info("leader election %s: cannot get a lease: %s", self.name, exc)
            await self._clock.sleep(self._pause)
            return None
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        self._pending = lease
        try:
            revision = await self._store.create_if_absent(
                key, leader_record(self.name, self.api, since), lease, timeout=self.retry_timeout
            )
        except CompareFailed as exc:  # another instance was faster
            self._stale.append(lease)
            if exc.current is not None:
                log.info("leader election %s: %s took the leader key first", self.name, parse_leader(exc.current).name)
            return None
        except StoreError as exc:  # the key may or may not be ours: revoking settles it
            log.info("leader election %s: campaign failed: %s", self.name, exc)
            self._stale.append(lease)
            await self._clock.sleep(self._pause)
            return None
        finally:
            if not _cancelling():  # cancelled mid-call: close() revokes the lease
                self._pending = None
        if self._clock.now() >= lease.deadline - self.margin:
            # Won, but too late to act on this lease: give the key back and retry.
            log.warning("leader election %s: took the leader key too late to act on it; releasing it", self.name)
            self._stale.append(lease)
            return None
        if self._closed:  # close() ran while the key was being created: hand it back
            self._stale.append(lease)
            return None
        self._since = since
        return Term(key, revision, lease.id, self.name), lease

    async def _wait_vacant(self, after: int, timeout: float) -> None:
        """Until the key is seen absent at a revision later than ``after``, or ``timeout``."""
        end = self._clock.now() + timeout
        while self._deleted_at <= after:
            changed = self._key_changed
            left = end - self._clock.now()
            if left <= 0 or not await wait_event(changed, self._clock, left):
                return

    async def _release_stale(self, *, give_up: bool = False) -> bool:
        """Revoke the leases of ended terms and lost races; True when none is left.
        One that cannot be revoked is forgotten once it has most likely expired."""
        for lease in list(self._stale):
            try:
                await self._store.revoke(lease, timeout=self.retry_timeout)
            except StoreUnavailable as exc:
                # Forgetting a lease that still lives costs liveness only: its key, if
                # any, holds an ended term that nobody acts on, and blocks campaigns
                # until the server expires it (ttl after the last refresh it received,
                # which was sent before lease.deadline - ttl + retry_timeout, unless a
                # hung member replays it later: see store.py).
                if give_up or self._clock.now() > lease.deadline + self.retry_timeout:
                    log.info("leader election %s: lease %x left to expire: %s", self.name, lease.id, exc)
                    self._stale.remove(lease)
                else:
                    log.info("leader election %s: cannot revoke lease %x yet: %s", self.name, lease.id, exc)
                continue
            except StoreError as exc:
                log.warning("leader election %s: revoking lease %x: %s", self.name, lease.id, exc)
            self._stale.remove(lease)
        return not self._stale

    # ----------------------------------------------------------------- holding

    async def _hold(self, term: Term, lease: Lease) -> None:
        """Lead until the term ends (`_step_down` sets ``_lost``)."""
        self._term = term
        self._lease = lease
        self._last_deadline = lease.deadline
        self._acting_until = lease.deadline - self.margin
        self._lost = asyncio.Event()
        loop = asyncio.get_running_loop()
        timer = loop.create_task(self._deadline_timer(term), name=f"leader-deadline-{self.name}")
        renewer = loop.create_task(self._renew(term), name=f"leader-renew-{self.name}")
        log.info(
            "leader election %s: elected, term %d, acting until the lease deadline less %gs (%.1fs from now)",
            self.name,
            term.number,
            self.margin,
            self._acting_until - self._clock.now(),
        )
        try:
            self._notify_elected(term)
            await self._lost.wait()
        finally:
            timer.cancel()
            renewer.cancel()
            await asyncio.wait([timer, renewer])

    async def _deadline_timer(self, term: Term) -> None:
        """Step down at ``deadline - margin`` unless a renewal moved it: this fires
        even while a renewal waits for an answer that will not come."""
        while self._term is term:
            left = self._acting_until - self._clock.now()
            if left <= 0:
                self._step_down(term, f"lease not renewed: stopped acting {self.margin:g}s before it may expire")
                return
            await self._clock.sleep(left)

    async def _renew(self, term: Term) -> None:
        lease = self._lease
        assert lease is not None
        next_at = lease.deadline - lease.ttl + self.loop_wait  # send time of the grant + loop_wait
        while self._term is term:
            await self._clock.sleep(next_at - self._clock.now())
            while True:
                left = self._acting_until - self._clock.now()
                if left <= 0:
                    return  # the deadline timer steps down
                try:
                    lease = await self._store.keepalive(lease, timeout=min(self.retry_timeout, left))
                except LeaseExpired:
                    self._step_down(term, "the lease expired (the store says it is gone)")
                    return
                except StoreError as exc:
                    log.warning("leader election %s: lease renewal failed: %s", self.name, exc)
                    await self._clock.sleep(min(self._pause, max(self._acting_until - self._clock.now(), 0)))
                    continue
                break
            if self._term is not term:
                return
            self._lease = lease
            self._last_deadline = lease.deadline
            self._acting_until = max(self._acting_until, lease.deadline - self.margin)
            next_at = lease.deadline - lease.ttl + self.loop_wait
            # The lease lives; is the key still ours? (Deleted by an operator, say.)
            try:
                read = await self._store.get(term.key, timeout=min(self.retry_timeout, self.loop_wait))
            except StoreError as exc:
                log.info("leader election %s: cannot read the leader key after renewing: %s", self.name, exc)
                continue
            self._observe_read(read)

    def _step_down(self, term: Term, reason: str) -> None:
        """End ``term`` (idempotent): stop acting now, tell the caller, revoke later."""
        if self._term is not term:
            return
        self._term = None
        if self._lease is not None:
            self._stale.append(self._lease)
        self._lease = None
        self._acting_until = 0.0
        log.warning("leader election %s: no longer the leader (term %d): %s", self.name, term.number, reason)
        if self._on_lost is not None:
            try:
                self._on_lost(term, reason)
            except Exception:
                log.exception("leader election %s: on_lost callback failed", self.name)
        self._lost.set()

    def _notify_elected(self, term: Term) -> None:
        if self._on_elected is not None:
            try:
                self._on_elected(term)
            except Exception:
                log.exception("leader election %s: on_elected callback failed", self.name)

    # ----------------------------------------------------------------- watching the key

    async def _watch_key(self) -> None:
        """Follow the leader key: who leads (for `current_leader`), when it is
        deleted (followers campaign at once), and whether it is still ours."""
        key = self._keys.leader
        while not self._closed:
            try:
                read = await self._store.get(key, timeout=self.retry_timeout)
                self._observe_read(read)
                async for event in self._store.watch_prefix(key, read.revision + 1):
                    if self._closed:
                        return
                    if event.kv.key == key:
                        self._observe_event(event)
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # unreachable, or Compacted: read again
                log.info("leader election %s: watch on the leader key ended: %s", self.name, exc)
            except Exception:
                log.exception("leader election %s: watch on the leader key failed", self.name)
            await self._clock.sleep(self._pause)

    def _observe_read(self, read: Read) -> None:
        if read.revision < self._observed_revision:
            return  # older than what the watch already delivered
        self._seen(read.first, read.revision)

    def _observe_event(self, event: WatchEvent) -> None:
        self._seen(None if event.kind is EventKind.DELETE else event.kv, event.revision)

    def _seen(self, kv: KeyValue | None, revision: int) -> None:
        before = self._observed
        self._observed = kv
        self._observed_revision = max(self._observed_revision, revision)
        if kv is None:
            self._deleted_at = max(self._deleted_at, revision)
        if (before is None) != (kv is None) or (
            kv is not None and before is not None and kv.create_revision != before.create_revision
        ):
            who = parse_leader(kv).name if kv is not None else "nobody"
            log.info("leader election %s: leader key at revision %d: %s", self.name, revision, who)
        term = self._term
        if term is not None and revision >= term.number and (kv is None or kv.create_revision != term.number):
            self._step_down(term, "the leader key was deleted" if kv is None else "the leader key was replaced")
        changed, self._key_changed = self._key_changed, asyncio.Event()
        changed.set()
