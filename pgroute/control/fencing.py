"""Fencing: making a node refuse client writes, and undoing it.

A fenced node has ``default_transaction_read_only = on`` in ``postgresql.auto.conf``
(ALTER SYSTEM) and no client sessions left from before the fence. Control
connections (``pg.connect``) override the default for their own session only, and
carry ``application_name = 'pgroute…'`` so :func:`terminate_clients` spares them.
Subscriptions keep applying on a fenced node (apply workers ignore
``default_transaction_read_only``), so a fenced node can still follow a publisher.

Every function here is idempotent and safe to re-run after a crash halfway.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ..pg.connect import CONTROL_APPLICATION_NAME

log = logging.getLogger(__name__)

#: Sampling interval of the polling waits.
POLL_INTERVAL = 0.02


async def reload_conf(conn: asyncpg.Connection, timeout: float = 5.0) -> None:
    """pg_reload_conf(), and return only once the postmaster has applied it.

    pg_reload_conf() merely signals the postmaster; a session forked before the
    postmaster handles the signal still gets the old defaults. The postmaster
    re-reads the files first and then forwards SIGHUP to every backend, ours
    included, which re-reads them before its next command and moves
    pg_conf_load_time(): once that moved, every new session sees the new values.
    """
    before = await conn.fetchval("SELECT pg_conf_load_time()")
    await conn.execute("SELECT pg_reload_conf()")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await conn.fetchval("SELECT pg_conf_load_time()") <= before:
        if loop.time() >= deadline:
            log.warning("configuration reload not confirmed within %.1fs", timeout)
            return
        await asyncio.sleep(0.005)


async def terminate_clients(conn: asyncpg.Connection, *, wait: float = 5.0) -> int:
    """Terminate every client session of the server (all databases) except ours and
    other pgroute control connections; wait up to ``wait`` seconds for them to be
    gone. Returns how many were signalled.

    One pid at a time, so a session we may not signal (a superuser's, when pgroute's
    role is not superuser) is logged and skipped rather than aborting the sweep.
    """
    rows = await conn.fetch(
        """
        SELECT pid, usename, application_name
        FROM pg_stat_activity
        WHERE backend_type = 'client backend'
          AND pid <> pg_backend_pid()
          AND coalesce(application_name, '') NOT LIKE $1 || '%'
        """,
        CONTROL_APPLICATION_NAME,
    )
    signalled: list[int] = []
    for row in rows:
        try:
            if await conn.fetchval("SELECT pg_terminate_backend($1)", row["pid"]):
                signalled.append(row["pid"])
        except asyncpg.InsufficientPrivilegeError as exc:
            log.warning("cannot terminate backend %s (user %s): %s", row["pid"], row["usename"], exc)
    if signalled:
        # pg_terminate_backend only sends SIGTERM: a session is harmless once its
        # process is gone, so wait for that before reporting the node fenced.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", signalled)
            if not left or loop.time() >= deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)
        if left:
            log.warning("%d terminated session(s) still present after %.1fs", left, wait)
        log.info("terminated %d client session(s)", len(signalled))
    return len(signalled)


async def fence(conn: asyncpg.Connection) -> None:
    """Make the node read-only for every client: new sessions start read-only (the
    server-wide default), and existing sessions, which may be inside a read-write
    transaction or have overridden the default, are terminated.

    Subscriptions keep applying on a fenced node (apply workers ignore
    default_transaction_read_only), so a fenced node can still follow a publisher.
    """
    await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    await reload_conf(conn)
    await terminate_clients(conn)


async def unfence(conn: asyncpg.Connection) -> None:
    """Undo fence: new sessions get read-write transactions again."""
    await conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await reload_conf(conn)
    if await is_fenced(conn):
        log.warning(
            "default_transaction_read_only is still on after ALTER SYSTEM RESET: "
            "it is set in a configuration file pgroute does not manage"
        )


async def is_fenced(conn: asyncpg.Connection) -> bool:
    """Whether new sessions get default_transaction_read_only = on from the
    configuration files (ALTER SYSTEM included). Our own session's value is useless
    here: connect() overrides it."""
    value = await conn.fetchval(
        """
        SELECT setting::boolean FROM pg_file_settings
        WHERE name = 'default_transaction_read_only' AND error IS NULL
        ORDER BY seqno DESC LIMIT 1
        """
    )
    return bool(value)
