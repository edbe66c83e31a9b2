"""`watching`: a Store watch as an async context manager that always closes it.

Owns one thing: ending a watch's stream (its HTTP connection, for `EtcdStore`) when
the consumer stops, is cancelled or fails, instead of when the garbage collector
gets to the abandoned generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .store import Store, WatchEvent


@asynccontextmanager
async def watching(store: Store, prefix: str, start_revision: int) -> AsyncIterator[AsyncIterator[WatchEvent]]:
    """``async with watching(store, prefix, rev) as events: async for e in events: ...``"""
    events = store.watch_prefix(prefix, start_revision)
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
