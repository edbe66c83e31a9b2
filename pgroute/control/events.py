"""The event log: what happened in the control plane, for the API, metrics and alerts.

Events are immutable; ending one replaces it in the log. At most ``maxlen`` are kept.
Listeners (metrics, alerts) are told about every begin and end, and can never break
the control path: a failing listener is logged and skipped.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..model import Detail, Event, NodeName
from ..pg.dsn import mask_dsn

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, maxlen: int = 200) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self._next_id = 1
        self._listeners: list[Callable[[Event], None]] = []

    def add_listener(self, cb: Callable[[Event], None]) -> None:
        self._listeners.append(cb)

    def begin(self, kind: str, reason: str, node: NodeName | None = None) -> Event:
        ev = Event(
            id=self._next_id,
            kind=kind,
            reason=mask_dsn(reason),
            started_at=time.time(),
            details=(("node", node.value),) if node else (),
        )
        self._next_id += 1
        self._events.append(ev)
        self._tell(ev)
        return ev

    def end(
        self,
        ev: Event,
        result: str,
        *,
        epoch: int,
        active: NodeName | None,
        details: Mapping[str, Detail] | None = None,
        phases: tuple[tuple[str, float], ...] | None = None,
        detail: str = "",
    ) -> Event:
        """Close ``ev`` with its result; ``epoch``/``active`` are the state's after it."""
        merged = dict(ev.details)
        merged.update(details or {})
        if detail:
            merged["result"] = detail
        merged["epoch"] = epoch
        if active is not None:
            merged["active"] = active.value
        done = replace(
            ev,
            ended_at=time.time(),
            result=result,
            phases=phases if phases is not None else ev.phases,
            details=tuple((k, mask_dsn(v) if isinstance(v, str) else v) for k, v in merged.items()),
        )
        for i, existing in enumerate(self._events):
            if existing.id == ev.id:
                self._events[i] = done
                break
        self._tell(done)
        return done

    def record(
        self, kind: str, reason: str, *, epoch: int, active: NodeName | None, node: NodeName | None = None
    ) -> Event:
        """An event that begins and ends at once."""
        return self.end(self.begin(kind, reason, node), "ok", epoch=epoch, active=active)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, as JSON."""
        return [e.to_json() for e in reversed(self._events)][:limit]

    def _tell(self, ev: Event) -> None:
        for cb in self._listeners:
            safe_call(cb, ev)


def safe_call(cb: Callable[[Any], None], arg: object) -> None:
    try:
        cb(arg)
    except Exception:  # listeners (metrics, alerts) must never break the control path
        log.exception("listener failed")
