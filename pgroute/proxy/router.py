"""The Router: the one object the control path changes and the data path reads.

It owns the current route (an immutable ``Route`` snapshot: target backend, epoch,
paused flag, reason), the registry of live sessions, and the proxy's counters.
Invariants:

- A new session is routed only to ``route.backend`` of a snapshot that is not paused.
- ``None`` backend means fail closed: no node is routable, clients get 57P03 with
  ``route.reason``.
- Sessions remember the epoch they were routed under; ``close_sessions`` ends every
  session of older epochs (fencing at failover), and ``register`` closes one that
  arrives with an older epoch than the current route's.

The data path never imports the control path: the controller calls ``publish`` and
``close_sessions``, and listens to backend connect failures through
``add_failure_listener`` (the passive health signal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str  # "primary" or "mirror"
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    backend: Backend | None
    epoch: int
    paused: bool = False
    reason: str = ""

    @property
    def routable(self) -> bool:
        return self.backend is not None and not self.paused


class Session(Protocol):
    epoch: int
    backend_name: str

    def close(self, reason: str) -> None: ...


@dataclass
class ProxyStats:
    """Counters for the API and metrics. Plain ints: updated on the event loop only."""

    connections_current: int = 0
    connections_total: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    # Bytes of piped sessions as they flow, of spliced sessions when they end.
    bytes_client_to_server: int = 0
    bytes_server_to_client: int = 0
    waiting: int = 0  # connections waiting on a paused router
    spliced_total: int = 0  # sessions handed to the kernel (proxy/spliced.py)
    # The open spliced sessions' bytes, read from the kernel on demand.
    live_bytes: Callable[[], tuple[int, int]] | None = None

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def bytes_proxied(self) -> tuple[int, int]:
        """(client to server, server to client) bytes so far, open sessions included."""
        c2s, s2c = self.bytes_client_to_server, self.bytes_server_to_client
        if self.live_bytes is not None:
            live_c2s, live_s2c = self.live_bytes()
            c2s += live_c2s
            s2c += live_s2c
        return c2s, s2c


class Router:
    def __init__(self, route: Route) -> None:
        self._route = route
        # asyncio.Event binds to a loop only when first awaited (3.10+).
        self._changed = asyncio.Event()
        self._sessions: set[Session] = set()
        self._failure_listeners: list[Callable[[str, str], None]] = []
        self.stats = ProxyStats()

    # -- read side (data path) -------------------------------------------------
    @property
    def route(self) -> Route:
        return self._route

    async def wait_routable(self, timeout: float) -> Route:
        """Return the route a new session may use. While paused, wait up to
        ``timeout`` for a routable one; return the last snapshot either way (the
        caller checks ``routable``)."""
        route = self._route
        if route.routable or not route.paused:
            return route
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.stats.waiting += 1
        try:
            while not route.routable and route.paused:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):  # not wait_for: gh-86296
                        await self._changed.wait()
                except TimeoutError:
                    pass
                route = self._route
        finally:
            self.stats.waiting -= 1
        return route

    async def wait_changed(self, since: Route, timeout: float) -> Route:
        """The current route once it differs from ``since``, or after ``timeout``
        seconds whatever it is (the caller compares)."""
        if self._route == since:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: gh-86296
                    await self._changed.wait()
            except TimeoutError:
                pass
        return self._route

    # -- sessions ----------------------------------------------------------------
    def register(self, session: Session) -> bool:
        """Track a session for fencing. A session routed under an epoch older than the
        current route's is closed instead (it was connecting while a switch fenced
        that epoch, so ``close_sessions`` could not see it); returns False then."""
        if session.epoch < self._route.epoch:
            session.close(f"epoch changed to {self._route.epoch} while connecting")
            return False
        self._sessions.add(session)
        return True

    def unregister(self, session: Session) -> None:
        self._sessions.discard(session)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def close_sessions(
        self, *, before_epoch: int | None = None, backend: str | None = None, reason: str = "closed by pgroute"
    ) -> int:
        """Close sessions routed under an epoch older than ``before_epoch`` and/or to
        ``backend`` (both None: every session). Returns how many were closed."""
        victims = [
            s
            for s in list(self._sessions)
            if (before_epoch is None or s.epoch < before_epoch) and (backend is None or s.backend_name == backend)
        ]
        for s in victims:
            s.close(reason)
        if victims:
            log.info("closed %d session(s): %s", len(victims), reason)
        return len(victims)

    # -- write side (control path) ----------------------------------------------------
    def publish(self, route: Route) -> None:
        """Replace the route snapshot and wake connections waiting on a pause."""
        old, self._route = self._route, route
        if old != route:
            log.info(
                "route: %s epoch=%d paused=%s%s",
                route.backend.name if route.backend else "none",
                route.epoch,
                route.paused,
                f" ({route.reason})" if route.reason else "",
            )
        self._changed.set()
        self._changed = asyncio.Event()

    def pause(self, reason: str = "paused") -> None:
        r = self._route
        self.publish(Route(r.backend, r.epoch, True, reason))

    def resume(self) -> None:
        r = self._route
        self.publish(Route(r.backend, r.epoch, False, "" if r.backend else r.reason))

    # -- passive health signal -----------------------------------------------------------
    def add_failure_listener(self, listener: Callable[[str, str], None]) -> None:
        self._failure_listeners.append(listener)

    def remove_failure_listener(self, listener: Callable[[str, str], None]) -> None:
        """Stop calling ``listener`` (a closed controller: in a cluster, each new term
        builds a new one on the same Router)."""
        if listener in self._failure_listeners:
            self._failure_listeners.remove(listener)

    def report_backend_failure(self, backend: str, error: str) -> None:
        for listener in self._failure_listeners:
            try:
                listener(backend, error)
            except Exception:  # a listener bug must not break the data path
                log.exception("backend failure listener failed")
