"""Handshake guards: the rate-limited refusal log and the watch on SSL/GSS negotiations.

Owns two small mechanisms the server applies to clients that are not (yet) sessions:

- ``RateLimitedLog``: a refusal is logged at most once per reason per ``interval``,
  with the number not logged since; a flood of refused sockets must not become a
  flood of log lines (the metric counts every one).
- ``watch_encryption``: pgroute never terminates TLS, so a client that sent an
  SSLRequest or GSSENCRequest (or opened with a TLS ClientHello: direct TLS) is
  handed over to the server end to end right after it. Its negotiation is still part
  of the handshake that ``startup_timeout`` bounds: once the client's budget is
  spent, the client must have sent more than its request (or ClientHello) and the
  server more than its one-byte answers (``S``/``G``/``N``: a TLS ServerHello, or
  after ``N`` an authentication request). Otherwise the session is dropped. The
  check reads the kernel's per-socket byte counts (``TCP_INFO``), so it costs
  nothing per packet and works for spliced and piped sessions alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .protocols import ClientProtocol
from .spliced import SplicedSession, bytes_received

# The most a server answers to a client's requests before the negotiation proper:
# one byte each, GSSENCRequest then SSLRequest at most.
ENCRYPTION_ANSWERS = 2


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, what: str, interval: float = 5.0) -> None:
        self._log = logger
        self._what = what
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # reason -> (logged at, not logged since)

    def note(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        last, unlogged = self._last.get(reason, (-self.interval, 0))
        if now - last < self.interval:
            self._last[reason] = (last, unlogged + 1)
            return
        self._last[reason] = (now, 0)
        more = f" (and {unlogged} more since the last line)" if unlogged else ""
        self._log.warning("%s: %s: %s%s", self._what, reason, detail, more)


Guarded = ClientProtocol | SplicedSession


def watch_encryption(
    session: Guarded, request_len: int, budget: float, on_stalled: Callable[[Guarded], None]
) -> asyncio.TimerHandle:
    """Check the session's negotiation after ``budget`` seconds; ``on_stalled`` when it
    is not under way (the session is still open then)."""
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, budget), _check, session, request_len, on_stalled)


def negotiation_under_way(client_sock: Any, backend_sock: Any, request_len: int) -> bool:
    return bytes_received(client_sock) > request_len and bytes_received(backend_sock) > ENCRYPTION_ANSWERS


def _check(session: Guarded, request_len: int, on_stalled: Callable[[Guarded], None]) -> None:
    if session.closed:
        return
    if isinstance(session, SplicedSession):
        client_sock, backend_sock = session.client, session.backend
    else:
        peer = session.peer
        if session.transport is None or peer is None or peer.transport is None:
            return
        client_sock = session.transport.get_extra_info("socket")
        backend_sock = peer.transport.get_extra_info("socket")
    if not negotiation_under_way(client_sock, backend_sock, request_len):
        on_stalled(session)
