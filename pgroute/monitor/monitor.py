"""The monitor: one probing loop per node, feeding samples to a callback.

Each loop probes every ``interval`` seconds. ``probe_soon(node, delay)`` pulls the
next probe of a node forward: the proxy's passive signal (a failed backend connect)
uses it to probe the active node at once instead of waiting for the next interval.

``confirm(node, count, spacing)`` runs the confirming probes after a failure: one-shot
probes on fresh connections, started ``spacing`` apart and each bounded by the probe
timeout. They overlap when the node hangs, so confirming a hung node takes
``count * spacing + timeout`` rather than ``count * (spacing + timeout)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..model import HealthSample, NodeName
from .probe import Prober

log = logging.getLogger(__name__)


class Monitor:
    def __init__(
        self, probers: dict[NodeName, Prober], interval: float, on_sample: Callable[[HealthSample], Awaitable[None]]
    ) -> None:
        self.probers = probers
        self.interval = interval
        self.on_sample = on_sample
        self._next: dict[NodeName, float] = {}
        self._wake: dict[NodeName, asyncio.Event] = {n: asyncio.Event() for n in probers}
        self._tasks: list[asyncio.Task] = []
        self._confirming: dict[NodeName, list[asyncio.Task]] = {}
        self._closed = False

    def start(self) -> None:
        for node in self.probers:
            self._tasks.append(asyncio.create_task(self._loop(node), name=f"monitor-{node.value}"))

    def probe_soon(self, node: NodeName, delay: float = 0.0) -> None:
        at = asyncio.get_running_loop().time() + delay
        if at < self._next.get(node, float("inf")):
            self._next[node] = at
            self._wake[node].set()

    async def _loop(self, node: NodeName) -> None:
        loop = asyncio.get_running_loop()
        prober, wake = self.probers[node], self._wake[node]
        while not self._closed:
            # While a probe runs, probe_soon() requests land in _next.
            self._next[node] = float("inf")
            try:
                sample = await prober.probe()
                await self.on_sample(sample)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the loop alive whatever a consumer does
                log.exception("monitor loop for %s", node.value)
            self._next[node] = min(self._next[node], loop.time() + self.interval)
            while not self._closed and (remaining := self._next[node] - loop.time()) > 0:
                wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel that lands as the inner wait finishes (CPython gh-86296),
                # and close() would then wait for this loop forever.
                try:
                    async with asyncio.timeout(remaining):
                        await wake.wait()
                except TimeoutError:
                    pass

    def confirm(self, node: NodeName, count: int, spacing: float) -> None:
        self.cancel_confirm(node)

        async def one(k: int) -> None:
            await asyncio.sleep(k * spacing)
            prober = self.probers[node].clone()
            try:
                sample = await prober.probe()
            finally:
                await prober.close()
            await self.on_sample(sample)

        self._confirming[node] = [
            asyncio.create_task(one(k), name=f"confirm-{node.value}-{k}") for k in range(1, count + 1)
        ]

    def cancel_confirm(self, node: NodeName) -> None:
        """Cancel outstanding confirming probes (the node answered). The task that
        delivers the answer is left alone: it is the caller."""
        current = asyncio.current_task()
        for task in self._confirming.pop(node, []):
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        self._closed = True
        for node in list(self._confirming):
            self.cancel_confirm(node)
        for task in self._tasks:
            task.cancel()
        for wake in self._wake.values():
            wake.set()
        if self._tasks:
            # Bounded: a probe stuck in a driver call must not hold up shutdown.
            _, pending = await asyncio.wait(self._tasks, timeout=5.0)
            for task in pending:
                log.warning("monitor task %s did not stop in time", task.get_name())
        self._tasks.clear()
        for prober in self.probers.values():
            await prober.close()
