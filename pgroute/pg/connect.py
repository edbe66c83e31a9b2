"""Control connections to a node, and how their failures are described.

Invariants:
- A control connection is read-write even on a fenced node (it overrides
  ``default_transaction_read_only`` for its own session only), bounded in time twice
  (server ``statement_timeout`` and the driver's ``command_timeout``), and never
  caches prepared statements (control connections run DDL).
- Every failure to reach a node raises ``NodeUnavailable`` with the DSN masked; a
  server-side refusal keeps the server's error as ``__cause__`` so callers can tell
  "reached and refused" from "unreachable".
- ``describe`` turns any exception into one short line without a password.
- pgroute recognises its own sessions on a server by their backend pids, never by a
  name a client could copy: every connection pgroute opens is registered
  (:func:`register_own`) and :func:`own_pids` lists those still open.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

import asyncpg

from ..errors import NodeUnavailable, UnsafeStep
from .dsn import Dsn, mask_dsn, parse_dsn
from .passwords import service_name

log = logging.getLogger(__name__)

#: application_name of pgroute's own control connections.
CONTROL_APPLICATION_NAME = "pgroute"

#: What a step on a node can raise: the driver's errors, the network's, timeouts,
#: NodeUnavailable from connect(), and UnsafeStep from a guard that refused to act.
DB_ERRORS: tuple[type[BaseException], ...] = (
    UnsafeStep,
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    NodeUnavailable,
)


# pgroute's own sessions per server address: pid -> the connection. A pid counts only
# while its connection is open, so a pid the server later reuses for a client's
# session is never mistaken for ours.
_OWN: dict[tuple[str, int], dict[int, weakref.ref[asyncpg.Connection]]] = {}


def register_own(dsn: Dsn, conn: asyncpg.Connection) -> None:
    """Record ``conn`` as one of pgroute's own sessions on ``dsn``'s server."""
    _OWN.setdefault((dsn.host, dsn.port), {})[conn.get_server_pid()] = weakref.ref(conn)


def own_pids(dsn: Dsn) -> set[int]:
    """Backend pids of pgroute's sessions on ``dsn``'s server that are still open."""
    sessions = _OWN.get((dsn.host, dsn.port), {})
    for pid, ref in list(sessions.items()):
        conn = ref()
        if conn is None or conn.is_closed():
            del sessions[pid]
    return set(sessions)


def as_dsn(dsn: Dsn | str) -> Dsn:
    return dsn if isinstance(dsn, Dsn) else parse_dsn(dsn)


def describe(exc: BaseException) -> str:
    """One short, password-free line saying what went wrong."""
    text = str(exc).strip()
    return mask_dsn(text.splitlines()[0] if text else type(exc).__name__)[:300]


async def connect(
    dsn: Dsn | str,
    timeout: float,
    *,
    statement_timeout: float = 30.0,
    application_name: str = CONTROL_APPLICATION_NAME,
) -> asyncpg.Connection:
    """Open a control connection: read-write even on a fenced node, recognisable by
    its application_name, and bounded in time.

    ``statement_timeout`` is enforced twice: by the server (so a statement stuck on a
    lock ends) and by asyncpg's ``command_timeout`` a little later (so a server that
    stopped answering, e.g. SIGSTOPped, cannot hang the controller).
    Raises NodeUnavailable, with the DSN masked, when the node cannot be reached.
    """
    if not application_name.startswith(CONTROL_APPLICATION_NAME):
        raise ValueError("control connections must have an application_name starting with 'pgroute'")
    parsed = as_dsn(dsn)
    try:
        conn = await asyncpg.connect(
            dsn=parsed.url,
            # The password the libpq way when the DSN has none: asyncpg reads
            # PGPASSWORD, PGPASSFILE / ~/.pgpass and a service named in the URL
            # itself, but not PGSERVICE (it looks at it after reading the service
            # file): name the service here, the URL's own wins as in libpq.
            service=service_name(parsed),
            timeout=timeout,
            command_timeout=statement_timeout + 5.0,
            # Control connections run DDL (ALTER SUBSCRIPTION, TRUNCATE ...): no
            # prepared-statement cache that such changes could invalidate.
            statement_cache_size=0,
            server_settings={
                "default_transaction_read_only": "off",
                # pgroute's own commits (the fence, epoch stamps, sequence moves, the
                # subscription steps) never need a standby's confirmation: none of them
                # is replicated by logical replication. Waiting for one would hang
                # them on a node whose synchronous_standby_names still names a standby
                # that is gone, e.g. an old primary back after a failover in
                # synchronous mode (its fence timed out and it never rejoined).
                "synchronous_commit": "local",
                "application_name": application_name,
                "statement_timeout": str(int(statement_timeout * 1000)),
            },
        )
    except TimeoutError:
        raise NodeUnavailable(f"{parsed.masked}: no answer within {timeout:g}s") from None
    except asyncpg.PostgresError as exc:
        # A server-side refusal (no such database, authentication, starting up):
        # keep it as the cause so callers can tell them apart; the server's
        # messages never contain the password.
        raise NodeUnavailable(f"{parsed.masked}: {mask_dsn(str(exc))}") from exc
    except (OSError, asyncpg.InterfaceError) as exc:
        reason = mask_dsn(str(exc)) or type(exc).__name__
        raise NodeUnavailable(f"{parsed.masked}: {reason}") from None
    register_own(parsed, conn)
    return conn


async def close(conn: asyncpg.Connection | None) -> None:
    """Close a connection within 2 s; terminate it when the server does not answer."""
    if conn is not None and not conn.is_closed():
        try:
            await asyncio.wait_for(conn.close(), 2)
        except DB_ERRORS:
            conn.terminate()
