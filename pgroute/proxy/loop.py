"""Event loop selection for processes that run the proxy.

Owns one decision: use uvloop when it is importable (its transports copy bytes with
far less Python overhead, which is most of the proxy's cost), else the standard
asyncio loop. Call ``install_event_loop_policy`` before the first loop is created.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


def install_event_loop_policy(prefer_uvloop: bool = True) -> str:
    """Install the event loop policy and return its name: "uvloop" or "asyncio"."""
    if prefer_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using the asyncio event loop")
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
    asyncio.set_event_loop_policy(None)
    return "asyncio"
