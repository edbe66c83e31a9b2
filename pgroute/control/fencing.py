"""Fencing: closing a node to client writes, and opening it again.

A fenced node's database has ``CONNECTION LIMIT 0`` (no non-superuser session can
start: no setting, startup option or driver flag gets around it), the server has
``default_transaction_read_only = on`` in ``postgresql.auto.conf`` (superuser
sessions start read-only), and no client session from before the fence is left.
Superusers can still log in and write: no fence PostgreSQL offers stops them (the
README's Limits section says so, and ``pgroute check`` warns about them).

pgroute's own sessions are told apart by backend pid (``pg.connect.own_pids``),
never by a name. Logical-replication apply workers keep applying on a fenced node.
Every function here is idempotent and safe to re-run after a crash halfway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

import asyncpg

from ..pg.naming import quote_ident, quote_literal

log = logging.getLogger(__name__)

#: Where fence() keeps the database's connection limit for unfence() to restore.
SAVED_CONNLIMIT = "pgroute.connlimit_before_fence"

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


async def terminate_clients(conn: asyncpg.Connection, *, spare: Collection[int] = (), wait: float = 5.0) -> int:
    """Terminate every client session of the server (all databases) except this one
    and the ``spare`` pids (pgroute's own sessions, see ``pg.connect.own_pids``); wait
    up to ``wait`` seconds for them to be gone. Returns how many were signalled.

    Sessions are told apart by pid only: an application_name is the client's to
    choose, so a client calling itself "pgroute-..." is terminated like any other.
    One pid at a time, so a session we may not signal is logged and skipped rather
    than aborting the sweep.
    """
    rows = await conn.fetch(
        """
        SELECT pid, usename
        FROM pg_stat_activity
        WHERE backend_type = 'client backend'
          AND pid <> pg_backend_pid()
          AND NOT (pid = ANY($1::int[]))
        """,
        list(spare),
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


async def _database(conn: asyncpg.Connection) -> tuple[str, int]:
    row = await conn.fetchrow("SELECT datname, datconnlimit FROM pg_database WHERE datname = current_database()")
    return row["datname"], row["datconnlimit"]


async def fence(conn: asyncpg.Connection, *, spare: Collection[int] = ()) -> None:
    """Close the node to client writes, in an order that is safe to re-run:

    1. ``CONNECTION LIMIT 0`` on the database: no session of a non-superuser role
       can start, whatever its settings, startup options or driver flags (the
       operator's limit is kept in ``pgroute.connlimit_before_fence`` first);
    2. ``default_transaction_read_only = on`` server-wide: superuser sessions, which
       no limit stops, start read-only by default (they can still turn it off);
    3. ``synchronous_standby_names`` reset: a fenced node takes no client writes, and
       its apply worker (synchronous_commit = on, see replication.subscribe) and
       pgroute's steps must not wait for a standby it had while it was active (an
       old primary back after a failover in synchronous mode never caught up);
       sync_mode sets it again on whichever node is active;
    4. every client session from before the fence is terminated (``spare``: pgroute's own).

    Logical-replication apply workers keep applying (they are background workers
    of a superuser-owned subscription): a fenced node can follow a publisher.
    """
    db, limit = await _database(conn)
    if limit != 0:
        # Only when open: a re-run after a crash must not save our own 0.
        await conn.execute(f"ALTER DATABASE {quote_ident(db)} SET {SAVED_CONNLIMIT} = {quote_literal(str(limit))}")
        await conn.execute(f"ALTER DATABASE {quote_ident(db)} CONNECTION LIMIT 0")
    await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    await reload_conf(conn)
    await terminate_clients(conn, spare=spare)


async def unfence(conn: asyncpg.Connection) -> None:
    """Undo fence: the operator's connection limit comes back (unlimited when none was
    kept), new sessions get read-write transactions again."""
    db, limit = await _database(conn)
    saved = await conn.fetchval(
        "SELECT split_part(c, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) c"
        " WHERE s.setrole = 0 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND c LIKE $1 || '=%'",
        SAVED_CONNLIMIT,
    )
    if limit == 0:
        restore = int(saved) if saved is not None and saved.lstrip("-").isdigit() else -1
        await conn.execute(f"ALTER DATABASE {quote_ident(db)} CONNECTION LIMIT {restore}")
    if saved is not None:
        await conn.execute(f"ALTER DATABASE {quote_ident(db)} RESET {SAVED_CONNLIMIT}")
    await conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await reload_conf(conn)
    _, read_only = await fence_state(conn)
    if read_only:
        log.warning(
            "default_transaction_read_only is still on after ALTER SYSTEM RESET: "
            "it is set in a configuration file pgroute does not manage"
        )


async def fence_state(conn: asyncpg.Connection) -> tuple[bool, bool]:
    """(closed to non-superuser logins, new sessions read-only by the configuration
    files). Our own session's read-only setting is useless here: connect() overrides it."""
    _, limit = await _database(conn)
    value = await conn.fetchval(
        """
        SELECT setting::boolean FROM pg_file_settings
        WHERE name = 'default_transaction_read_only' AND error IS NULL
        ORDER BY seqno DESC LIMIT 1
        """
    )
    return limit == 0, bool(value)


async def is_fenced(conn: asyncpg.Connection) -> bool:
    """Whether any part of the fence is in force."""
    return any(await fence_state(conn))
