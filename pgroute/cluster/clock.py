"""The clock the cluster logic reads and sleeps on, so that tests can drive time.

Owns the `Clock` protocol (``now()``: monotonic seconds; ``sleep(seconds)``), the
real one (`MONOTONIC`: ``time.monotonic`` and ``asyncio.sleep``, the clock
`EtcdStore` stamps its lease deadlines with), a `ManualClock` that moves only when a
test advances it, and `wait_event`, a wait on an asyncio Event bounded on a Clock.

Invariants: ``now()`` never goes backwards; a ``sleep(d)`` started at ``t`` returns
no earlier than ``now() >= t + d`` on its clock. A ManualClock wakes its sleepers in
order of their wake-up times, each with the clock set to that time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` (the clock of `Lease.deadline` from EtcdStore)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


MONOTONIC = MonotonicClock()


class ManualClock:
    """A clock for tests: time stands still until `advance` moves it.

    ``await clock.advance(2.0)`` moves time to each pending wake-up in turn (waking
    those sleepers and letting the event loop run what they start), then to the end."""

    def __init__(self, start: float = 1000.0, settle_rounds: int = 100) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._settle_rounds = settle_rounds

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    async def settle(self) -> None:
        """Let every task that can run without time passing run (a bounded number of
        event-loop rounds: the fakes here never wait on anything else)."""
        for _ in range(self._settle_rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers in order on the way."""
        end = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            when, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self._now = max(self._now, end)
        await self.settle()


async def wait_event(event: asyncio.Event, clock: Clock, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass on ``clock``; True if set."""
    if event.is_set():
        return True
    if timeout <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    timer = asyncio.ensure_future(clock.sleep(timeout))
    try:
        await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        timer.cancel()
    return event.is_set()
