"""Passive health signals between the members of a cluster (issue 14 item 7): a
member's proxy that cannot connect to the active node says so in its member record,
and the leader probes that node at once instead of at its next interval.

Owns the signal's shape in a member record's ``health`` (the ``"unreachable"``
entry, `Unreachable`), the member's side (`SignalBook`: what its record should say
and when to write it) and the leader's side (`SignalJudge`: which members' signals
ask for a probe), both pure (clocks passed in); and `SignalReporter`, the task that
keeps a member's record saying what its book says.

Invariants, and why a signal cannot cause a switch by itself:
- A signal only makes the leader probe the active node sooner. A failover still
  needs the leader's own failed probe and its confirming probes (the controller's
  transition function), so a wrong, stale or forged signal costs one probe.
- A signal counts only for the node and route epoch it names, both the leader's
  current ones: a signal from before a switch, or about the other node, is ignored.
- Each signal acts once: the leader remembers, per member, the newest signal it has
  acted on and ignores any that is not newer.
- A member writes at most once per ``every`` seconds however many connects fail
  (a flood of clients must not become a flood of etcd writes); its signal clears
  once no connect has failed for ``quiet`` seconds, or when the route moves.
- The error text is the caller's to mask (no DSN, no password reaches the record);
  it is cut to `MAX_ERROR` characters here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..model import NodeName
from .members import Membership, MembershipLost
from .records import MAX_EPOCH, is_int, is_time
from .store import StoreError

log = logging.getLogger(__name__)

#: The key of the signal in a member record's ``health``.
UNREACHABLE = "unreachable"
#: Longest error text kept in a record.
MAX_ERROR = 160


@dataclass(frozen=True, slots=True)
class Unreachable:
    """This member's proxy could not connect to ``node`` while routing at ``epoch``:
    ``count`` failed connects from ``since`` to ``at`` (wall times), the latest
    failing with ``error``."""

    node: NodeName
    epoch: int
    since: float
    at: float
    count: int
    error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node.value,
            "epoch": self.epoch,
            "since": round(self.since, 3),
            "at": round(self.at, 3),
            "count": self.count,
            "error": self.error,
        }

    @property
    def order(self) -> tuple[int, float, int]:
        """Newer signals of one member compare greater."""
        return (self.epoch, self.at, self.count)


def signal_of(health: Mapping[str, Any]) -> Unreachable | None:
    """The signal a member record's ``health`` carries; None when there is none or
    it does not parse (a member of another version: no signal is the safe reading,
    it only delays a probe to the next interval)."""
    raw = health.get(UNREACHABLE)
    if not isinstance(raw, dict):
        return None
    try:
        node = NodeName(raw["node"])
        epoch, since, at, count, error = raw["epoch"], raw["since"], raw["at"], raw["count"], raw["error"]
    except (KeyError, ValueError, TypeError):
        return None
    if not (is_int(epoch, MAX_EPOCH) and is_time(since) and is_time(at) and is_int(count, 2**53)):
        return None
    if not isinstance(error, str):
        return None
    return Unreachable(node, epoch, float(since), float(at), count, error[:MAX_ERROR])


def with_signal(health: Mapping[str, Any], signal: Unreachable | None) -> dict[str, Any]:
    """``health`` with its signal replaced (None: removed), the rest kept."""
    out = {k: v for k, v in health.items() if k != UNREACHABLE}
    if signal is not None:
        out[UNREACHABLE] = signal.to_json()
    return out


class SignalBook:
    """A member's side: the failed connects its proxy reports, turned into the
    signal its record should carry, and when to write it.

    ``failed()`` is called for every failed connect to the routed node (cheap, no
    I/O); ``moved()`` when the route changes. The writer asks ``due(now)`` how long
    until it should write (None: nothing to write until the next failure), then
    ``wanted(now)`` what, and reports ``written()`` or ``attempted()``. ``now`` is
    a monotonic clock; ``wall`` times go in the record."""

    def __init__(self, every: float, quiet: float) -> None:
        if quiet <= every:
            raise ValueError(f"quiet ({quiet}s) must be longer than every ({every}s)")
        self.every = every
        self.quiet = quiet
        self._signal: Unreachable | None = None
        self._last_failure = 0.0  # monotonic time of the signal's latest failure
        self._written: Unreachable | None = None
        self._attempted_at: float | None = None  # monotonic time of the last write attempt

    @property
    def written_signal(self) -> Unreachable | None:
        return self._written

    def failed(self, node: NodeName, epoch: int, error: str, *, now: float, wall: float) -> None:
        error = error[:MAX_ERROR]
        s = self._signal
        if s is not None and s.node is node and s.epoch == epoch and now - self._last_failure < self.quiet:
            self._signal = replace(s, at=wall, count=s.count + 1, error=error)
        else:
            self._signal = Unreachable(node, epoch, since=wall, at=wall, count=1, error=error)
        self._last_failure = now

    def moved(self, epoch: int, active: NodeName | None) -> None:
        """The route is now (epoch, active): a signal about anything else is over."""
        s = self._signal
        if s is not None and (s.epoch != epoch or s.node is not active):
            self._signal = None

    def wanted(self, now: float) -> Unreachable | None:
        """What the record should say now: the signal, unless it has gone quiet."""
        s = self._signal
        if s is not None and now - self._last_failure >= self.quiet:
            self._signal = s = None
        return s

    def due(self, now: float) -> float | None:
        """Seconds until the next write (0: now), None when the record says what it
        should and nothing will change without a new failure."""
        wanted = self.wanted(now)
        if wanted == self._written:
            if wanted is None:
                return None
            return max(0.0, self._last_failure + self.quiet - now)  # when it goes quiet
        if self._attempted_at is None:
            return 0.0
        return max(0.0, self._attempted_at + self.every - now)

    def attempted(self, now: float) -> None:
        """A write was tried (whatever its outcome): the next waits ``every``."""
        self._attempted_at = now

    def written(self, signal: Unreachable | None, now: float) -> None:
        self._written = signal
        self._attempted_at = now

    def forget_written(self) -> None:
        """The record was created anew (empty health): it says nothing yet."""
        self._written = None


class SignalJudge:
    """The leader's side: given every member's signal, the members whose signal asks
    for a probe of the active node now."""

    def __init__(self, own_name: str) -> None:
        self._own = own_name
        self._acted: dict[str, tuple[int, float, int]] = {}

    def to_probe(
        self, signals: Iterable[tuple[str, Unreachable | None]], epoch: int, active: NodeName | None
    ) -> list[tuple[str, Unreachable]]:
        """The (member, signal) pairs that are about ``active`` at ``epoch`` and newer
        than the last one acted on for that member; they count as acted on from now.
        The leader's own record is skipped (its controller hears its proxy directly)."""
        fresh: list[tuple[str, Unreachable]] = []
        seen: set[str] = set()
        for name, signal in signals:
            seen.add(name)
            if name == self._own or signal is None or active is None:
                continue
            if signal.node is not active or signal.epoch != epoch:
                continue
            last = self._acted.get(name)
            if last is not None and signal.order <= last:
                continue
            self._acted[name] = signal.order
            fresh.append((name, signal))
        for gone in set(self._acted) - seen:  # a member that left: forget it
            del self._acted[gone]
        return fresh


class SignalReporter:
    """A member's reporter: ``failed()`` for each failed connect to the routed node
    (the caller masks the error), ``moved()`` when the route changes; ``run()`` (a
    task of its owner's, cancelled to stop) writes the book's signal into the member
    record that ``membership()`` returns (None: none to write to now, e.g. cut off
    from etcd), at most once per the book's ``every``."""

    def __init__(self, book: SignalBook, membership: Callable[[], Membership | None], *, timeout: float) -> None:
        self.book = book
        self._membership = membership
        self._timeout = timeout
        self._wanted = asyncio.Event()
        self._written_to: Membership | None = None  # the record the book's "written" is about

    def failed(self, node: NodeName, epoch: int, error: str) -> None:
        self.book.failed(node, epoch, error, now=time.monotonic(), wall=time.time())
        self._wanted.set()

    def moved(self, epoch: int, active: NodeName | None) -> None:
        self.book.moved(epoch, active)
        self._wanted.set()

    async def run(self) -> None:
        book = self.book
        while True:
            self._wanted.clear()  # before looking: a failure from now on wakes the wait
            membership = self._membership()
            if membership is not self._written_to:  # another record: it says nothing yet
                book.forget_written()
                self._written_to = membership
            if membership is None:
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            delay = book.due(now)
            if delay is None or (delay > 0 and book.wanted(now) == book.written_signal):
                # Up to date: wait for a failure, or for the signal to go quiet.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 if delay is None else min(delay, 1.0)):
                        await self._wanted.wait()
                continue
            if delay > 0:  # rate-limited, however many failures arrive meanwhile
                await asyncio.sleep(delay)
                continue
            await self._write(membership, book.wanted(now))

    async def _write(self, membership: Membership, signal: Unreachable | None) -> None:
        before = self.book.written_signal
        try:
            await membership.update(health=with_signal(membership.record.health, signal), timeout=self._timeout)
        except (StoreError, MembershipLost) as exc:
            self.book.attempted(time.monotonic())
            log.warning("member %s: could not write its health signal: %s", membership.name, exc)
            return
        except Exception:  # the loop must survive
            self.book.attempted(time.monotonic())
            log.exception("member %s: health signal not written", membership.name)
            return
        self.book.written(signal, time.monotonic())
        if signal is not None and (before is None or before.since != signal.since):
            log.warning(
                "member %s: its proxy cannot connect to %s (epoch %d): told the leader",
                membership.name,
                signal.node.value,
                signal.epoch,
            )
        elif signal is None and before is not None:
            log.info("member %s: connects to %s no longer fail; signal cleared", membership.name, before.node.value)
