"""Replication between the two nodes: promotion (detach a subscription, move
sequences), subscriptions, publications, slots, lag and catch-up, synchronous
replication, and emptying a subscriber before a full resync.

This module owns the SQL; the procedures own the order in which it runs.
Invariants:

- Every function is idempotent: running it again after a crash halfway finishes the
  job or does nothing. ``ensure_*`` and ``drop_*`` functions say whether they
  changed anything.
- Every function works on a fenced node (control connections are read-write).
- No password ever reaches a log line or an exception message: connection strings
  are shown through ``mask_conninfo``.

Naming of subscriptions and slots: see ``pg.naming``. Positions are integers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg

from ..pg import versions
from ..pg.catalog import current_lsn
from ..pg.dsn import Dsn, mask_conninfo, parse_dsn
from ..pg.naming import int_to_lsn, quote_ident, quote_literal
from .fencing import reload_conf
from .sequences import move_sequences

log = logging.getLogger(__name__)

#: Sampling interval of the polling waits (wait_caught_up, drop_slot).
POLL_INTERVAL = 0.02


def _conninfo(publisher: Dsn | str) -> str:
    """What CREATE SUBSCRIPTION ... CONNECTION gets: libpq accepts both forms, but a
    Dsn or URL is turned into keyword/value so its password is quoted properly."""
    if isinstance(publisher, Dsn):
        return publisher.libpq_conninfo()
    if publisher.startswith(("postgresql://", "postgres://")):
        return parse_dsn(publisher).libpq_conninfo()
    return publisher


async def _subscription_row(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        SELECT oid, subenabled, subslotname, subconninfo, subsynccommit, subpublications,
               substream::text AS substream
        FROM pg_subscription
        WHERE subname = $1
          AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        """,
        name,
    )


async def _detach_and_drop(conn: asyncpg.Connection, name: str) -> bool:
    """Drop a subscription without contacting its publisher: disable it, forget its
    slot (which stays on the publisher, inactive), drop it. Each step is skipped when
    already done, so a crash between steps is harmless."""
    row = await _subscription_row(conn, name)
    if row is None:
        return False
    if row["subenabled"]:
        await conn.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} DISABLE")
    if row["subslotname"] is not None:
        await conn.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} SET (slot_name = NONE)")
    await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {quote_ident(name)}")
    log.info("subscription %s dropped; its slot %s is left on the publisher", name, row["subslotname"])
    return True


async def promote(
    conn: asyncpg.Connection, subscription: str, sequence_gap: int, sampled: dict[str, int] | None
) -> dict:
    """Make the node writable as the new source of truth: drop its subscription
    (without needing the publisher) and move every sequence past the data.

    Returns {"subscription_dropped": bool, "sequences": {name: new last_value} for
    the sequences moved, "unchanged": {name: last_value}}.
    """
    dropped = await _detach_and_drop(conn, subscription)
    moved, unchanged = await move_sequences(conn, sequence_gap, sampled)
    if moved:
        log.info("sequences moved: %s", ", ".join(f"{k}={v}" for k, v in moved.items()))
    return {"subscription_dropped": dropped, "sequences": moved, "unchanged": unchanged}


async def subscription_info(conn: asyncpg.Connection, name: str) -> dict | None:
    """State of a subscription on this (subscriber) node, or None when missing."""
    row = await _subscription_row(conn, name)
    if row is None:
        return None
    major = versions.server_major(conn)
    worker = await conn.fetchrow(
        f"""
        SELECT pid, pg_wal_lsn_diff(received_lsn, '0/0')::bigint AS received_lsn,
               pg_wal_lsn_diff(latest_end_lsn, '0/0')::bigint AS latest_end_lsn,
               last_msg_receipt_time
        FROM pg_stat_subscription st WHERE subid = $1 AND {versions.apply_worker_filter(major, "st")}
        """,
        row["oid"],
    )
    tables = await conn.fetch(
        """
        SELECT format('%I.%I', n.nspname, c.relname) AS name, r.srsubstate::text AS state
        FROM pg_subscription_rel r
        JOIN pg_class c ON c.oid = r.srrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE r.srsubid = $1 ORDER BY 1
        """,
        row["oid"],
    )
    counters: tuple[str, ...] = ("apply_error_count", "sync_error_count")
    if versions.has_conflict_counters(major):
        counters += versions.CONFLICT_COUNTERS
    errors = await conn.fetchrow(
        f"SELECT {', '.join(counters)} FROM pg_stat_subscription_stats WHERE subid = $1",
        row["oid"],
    )
    table_states = {t["name"]: t["state"] for t in tables}
    return {
        "exists": True,
        "name": name,
        "enabled": row["subenabled"],
        "slot_name": row["subslotname"],
        "conninfo": mask_conninfo(row["subconninfo"]),
        "synchronous_commit": row["subsynccommit"],
        "streaming": versions.streaming_mode(row["substream"]),
        "publications": list(row["subpublications"]),
        "worker_pid": worker["pid"] if worker else None,
        "received_lsn": worker["received_lsn"] if worker else None,
        "latest_end_lsn": worker["latest_end_lsn"] if worker else None,
        "last_msg_receipt_time": worker["last_msg_receipt_time"] if worker else None,
        "tables": table_states,
        "all_ready": all(s == "r" for s in table_states.values()),
        "apply_error_count": errors["apply_error_count"] if errors else 0,
        "sync_error_count": errors["sync_error_count"] if errors else 0,
        # PostgreSQL 18+: {counter: count} of pg_stat_subscription_stats' confl_*;
        # None where the server does not count conflicts.
        "conflicts": (
            {c: errors[c] if errors else 0 for c in versions.CONFLICT_COUNTERS}
            if versions.has_conflict_counters(major)
            else None
        ),
    }


async def subscribe(
    conn: asyncpg.Connection,
    name: str,
    publisher_conninfo: Dsn | str,
    publication: str,
    *,
    copy_data: bool,
    create_slot: bool,
    synchronous_commit: str = "on",
) -> bool:
    """Make this node follow ``publication`` through subscription ``name`` (slot
    ``name`` on the publisher). Creates it if missing (the publisher must be
    reachable: CREATE SUBSCRIPTION reads its table list, and creates the slot when
    ``create_slot``); enables it if it exists disabled. True if created.

    ``synchronous_commit = on`` makes the apply worker flush each commit before
    confirming it, which synchronous replication needs (with ``off`` every
    synchronous commit waits for the subscriber's WAL writer, ~200 ms).
    ``streaming`` is always stated (versions.SUBSCRIPTION_STREAMING): its default
    differs between server versions. An existing subscription is left as it is.
    """
    row = await _subscription_row(conn, name)
    if row is not None and publication not in row["subpublications"]:
        log.warning(
            "subscription %s exists but subscribes to %s, not %s: left as it is",
            name,
            ", ".join(row["subpublications"]),
            publication,
        )
    if row is not None:
        if not row["subenabled"]:
            if row["subslotname"] is None:
                # A half-promoted subscription (slot_name = NONE) cannot be enabled;
                # finish dropping it and create it afresh.
                await _detach_and_drop(conn, name)
            else:
                await conn.execute(f"ALTER SUBSCRIPTION {quote_ident(name)} ENABLE")
                log.info("subscription %s enabled", name)
                return False
        else:
            return False
    options = ", ".join(
        [
            "connect = true",
            "enabled = true",
            f"slot_name = {quote_literal(name)}",
            f"create_slot = {'true' if create_slot else 'false'}",
            f"copy_data = {'true' if copy_data else 'false'}",
            f"synchronous_commit = {quote_literal(synchronous_commit)}",
            f"streaming = {versions.SUBSCRIPTION_STREAMING}",
        ]
    )
    conninfo = _conninfo(publisher_conninfo)
    try:
        await conn.execute(
            f"CREATE SUBSCRIPTION {quote_ident(name)} CONNECTION {quote_literal(conninfo)} "
            f"PUBLICATION {quote_ident(publication)} WITH ({options})"
        )
    except asyncpg.DuplicateObjectError:
        return False  # created concurrently
    except asyncpg.PostgresError as exc:
        # The server's message can quote the connection string it failed to use.
        raise type(exc)(mask_conninfo(str(exc))) from None
    log.info(
        "subscription %s created on publication %s (copy_data=%s, create_slot=%s, publisher %s)",
        name,
        publication,
        copy_data,
        create_slot,
        mask_conninfo(conninfo),
    )
    return True


async def drop_subscription(
    conn: asyncpg.Connection,
    name: str,
    *,
    publisher_reachable: bool,
    publisher_conn: asyncpg.Connection | None = None,
) -> bool:
    """Drop subscription ``name``; True if dropped.

    Publisher reachable: DROP SUBSCRIPTION, which also drops the slot there. If the
    slot is already gone, PostgreSQL 15 refuses the whole DROP ("could not drop
    replication slot ... does not exist"); then the subscription is detached from
    its slot and dropped. Publisher unreachable: detached and dropped, the slot is
    left behind (drop_slot later), unless ``publisher_conn`` is given, in which
    case that connection drops the slot after the subscription is gone.
    """
    if await _subscription_row(conn, name) is None:
        return False
    if not publisher_reachable or publisher_conn is not None:
        await _detach_and_drop(conn, name)
        if publisher_conn is not None:
            await drop_slot(publisher_conn, name)
        return True
    try:
        await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {quote_ident(name)}")
    except asyncpg.ConnectionFailureError as exc:
        if "does not exist" not in str(exc):
            raise type(exc)(mask_conninfo(str(exc))) from None
        log.info("slot %s was already gone from the publisher", name)
        await _detach_and_drop(conn, name)
        return True
    log.info("subscription %s and its slot dropped", name)
    return True


async def ensure_publication(conn: asyncpg.Connection, publication: str) -> bool:
    """CREATE PUBLICATION ... FOR ALL TABLES if missing. True if created."""
    if await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication):
        return False
    try:
        await conn.execute(f"CREATE PUBLICATION {quote_ident(publication)} FOR ALL TABLES")
    except asyncpg.DuplicateObjectError:
        return False
    log.info("publication %s created", publication)
    return True


async def ensure_slot(conn: asyncpg.Connection, slot: str) -> bool:
    """Create logical slot ``slot`` (pgoutput) in this database if missing. True if
    created. Changes committed after this returns are retained for whoever later
    subscribes with ``slot_name = slot, create_slot = false, copy_data = false``.

    Creating a logical slot waits for transactions already running to finish.
    """
    existing = await conn.fetchrow(
        "SELECT slot_type, plugin, database FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    if existing is not None:
        if existing["slot_type"] != "logical" or existing["plugin"] != "pgoutput":
            log.warning(
                "slot %s exists but is %s/%s, not a pgoutput logical slot",
                slot,
                existing["slot_type"],
                existing["plugin"],
            )
        return False
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    except asyncpg.DuplicateObjectError:
        return False
    log.info("logical slot %s created", slot)
    return True


async def slot_info(conn: asyncpg.Connection, slot: str) -> dict | None:
    """A replication slot's state; positions as integers; None when missing."""
    row = await conn.fetchrow(
        """
        SELECT slot_type, plugin, database, active, active_pid, wal_status,
               pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint AS confirmed_flush_lsn,
               pg_wal_lsn_diff(restart_lsn, '0/0')::bigint AS restart_lsn,
               pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes
        FROM pg_replication_slots WHERE slot_name = $1
        """,
        slot,
    )
    return None if row is None else dict(row)


async def drop_slot(conn: asyncpg.Connection, slot: str, *, timeout: float = 10.0) -> bool:
    """Drop a slot, terminating the walsender that uses it first. True if dropped.

    A subscriber whose subscription is still enabled reconnects within
    wal_retrieve_retry_interval (5 s by default), so the terminate-then-drop is
    retried until ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await conn.fetchrow("SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1", slot)
        if row is None:
            return False
        if row["active"] and row["active_pid"]:
            await conn.execute("SELECT pg_terminate_backend($1)", row["active_pid"])
            await asyncio.sleep(POLL_INTERVAL)
        else:
            try:
                await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
                log.info("replication slot %s dropped", slot)
                return True
            except asyncpg.UndefinedObjectError:
                return False
            except asyncpg.ObjectInUseError:
                pass  # a walsender grabbed it again between our two statements
        if loop.time() >= deadline:
            raise TimeoutError(f"replication slot {slot} still in use after {timeout:g}s")


async def list_inactive_slots(conn: asyncpg.Connection) -> list[str]:
    return [
        r["slot_name"]
        for r in await conn.fetch("SELECT slot_name FROM pg_replication_slots WHERE NOT active ORDER BY slot_name")
    ]


async def confirmed_lsn(publisher_conn: asyncpg.Connection, subscription: str, *, applied: bool = False) -> int | None:
    """How far the subscriber has confirmed, seen from the publisher: the furthest of
    its walsender's reported position (flush, or replay = applied when ``applied``)
    and its slot's confirmed_flush_lsn. None when neither exists."""
    column = "replay_lsn" if applied else "flush_lsn"
    return await publisher_conn.fetchval(
        f"""
        SELECT greatest(
            (SELECT max(pg_wal_lsn_diff({column}, '0/0')) FROM pg_stat_replication
             WHERE application_name = $1),
            (SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0') FROM pg_replication_slots
             WHERE slot_name = $1))::bigint
        """,
        subscription,
    )


async def lag_bytes(publisher_conn: asyncpg.Connection, subscription: str) -> int | None:
    """Bytes of WAL the subscriber has not confirmed flushing (0 when caught up);
    None when the publisher has neither a walsender nor a slot for it."""
    confirmed = await confirmed_lsn(publisher_conn, subscription)
    if confirmed is None:
        return None
    return max(0, await current_lsn(publisher_conn) - confirmed)


async def wait_caught_up(
    publisher_conn: asyncpg.Connection,
    subscription: str,
    target_lsn: int,
    timeout: float,
    *,
    applied: bool = False,
) -> None:
    """Poll every 20 ms until the subscriber has confirmed ``target_lsn`` (flushed;
    applied only, when ``applied``). Raises asyncio.TimeoutError on timeout.

    Convergence does not wait for a status-interval keepalive: a logical walsender
    that has sent WAL past what its subscriber confirmed pings it as soon as it has
    nothing more to send, and the subscriber answers at once. Measured on PG 15
    (local pair): idle primary 2-5 ms (also after 20 s idle, after DDL only);
    right after a commit 1-3 ms with the subscription's synchronous_commit = on;
    with its default (off) the *flush* position lags the apply by the
    subscriber's WAL writer (wal_writer_delay, 200 ms): ~200 ms idle, ~100 ms
    under load, while ``applied=True`` (pg_stat_replication.replay_lsn) still
    converges in ~3 ms. Hence subscribe() defaults to synchronous_commit = on.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        position = await confirmed_lsn(publisher_conn, subscription, applied=applied)
        if position is not None and position >= target_lsn:
            return
        if loop.time() >= deadline:
            raise TimeoutError(
                f"{subscription} confirmed {int_to_lsn(position) if position is not None else 'nothing'}, "
                f"not {int_to_lsn(target_lsn)}, within {timeout:g}s"
            )
        await asyncio.sleep(POLL_INTERVAL)


async def set_synchronous(conn: asyncpg.Connection, standby: str | None) -> None:
    """Make commits on this node wait for ``standby`` (a subscription name = its
    walsender's application_name), or for nobody when None."""
    if standby is None:
        await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:
        value = '"' + standby.replace('"', '""') + '"'
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {quote_literal(value)}")
    await reload_conf(conn)


async def sync_state(conn: asyncpg.Connection, subscription: str) -> str | None:
    """pg_stat_replication.sync_state of the subscription's walsender (async,
    potential, sync, quorum); None when it is not connected."""
    return await conn.fetchval(
        """
        SELECT sync_state FROM pg_stat_replication WHERE application_name = $1
        ORDER BY flush_lsn DESC NULLS LAST LIMIT 1
        """,
        subscription,
    )


async def user_tables(conn: asyncpg.Connection) -> list[str]:
    """Quoted 'schema.table' of every ordinary or partitioned table outside the
    system schemas and not belonging to an extension."""
    rows = await conn.fetch(
        """
        SELECT format('%I.%I', n.nspname, c.relname) AS name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
          AND n.nspname NOT LIKE 'pg_temp%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1
        """
    )
    return [r["name"] for r in rows]


async def published_tables(conn: asyncpg.Connection, publication: str) -> list[str]:
    """Quoted 'schema.table' of the tables a publication on this node publishes."""
    rows = await conn.fetch(
        "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_publication_tables "
        "WHERE pubname = $1 ORDER BY 1",
        publication,
    )
    return [r["name"] for r in rows]


async def truncate_published_tables(
    conn: asyncpg.Connection, publication: str | None, *, tables: Sequence[str] | None = None
) -> list[str]:
    """Empty a subscriber before a full resync (copy_data = true).

    Which tables: ``tables`` when given (the publisher's list, quoted
    'schema.table', e.g. from published_tables on the publisher) restricted to those
    that exist here; else the tables of ``publication`` if this node has it; else
    every user table. One TRUNCATE ... CASCADE. Returns the names truncated.
    """
    local = await user_tables(conn)
    if tables is not None:
        wanted = [t for t in tables if t in set(local)]
    elif publication and await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication):
        wanted = await published_tables(conn, publication)
    else:
        wanted = local
    if wanted:
        await conn.execute(f"TRUNCATE TABLE {', '.join(wanted)} CASCADE")
        log.info("truncated %d table(s) for a full resync", len(wanted))
    return wanted


async def wait_subscription_ready(conn: asyncpg.Connection, sub: str, timeout: float) -> None:
    """Wait until every table of the subscription finished its initial copy."""
    deadline = time.monotonic() + timeout
    while True:
        info = await subscription_info(conn, sub)
        # 's' (synced, the apply worker takes over) is enough: wait_caught_up then
        # checks that everything up to the publisher's position was applied.
        if info is not None and all(st in ("s", "r") for st in info.get("tables", {}).values()):
            return
        if time.monotonic() > deadline:
            states = info.get("tables") if info else None
            raise TimeoutError(f"subscription {sub} initial copy not finished in {timeout:g}s (table states: {states})")
        await asyncio.sleep(0.1)


async def ensure_synchronous_commit(conn: asyncpg.Connection, sub: str) -> bool:
    """Make subscription ``sub`` on this node report commits as soon as they are
    flushed; True if changed.

    With synchronous_commit = off on a subscription (PostgreSQL's default for
    subscriptions created by hand), the subscriber confirms a commit only after its
    WAL writer runs (~200 ms): synchronous commits on the publisher wait that long,
    and so does a switchover's catch-up."""
    info = await subscription_info(conn, sub)
    if info is None or info.get("synchronous_commit") == "on":
        return False
    await conn.execute(f"ALTER SUBSCRIPTION {quote_ident(sub)} SET (synchronous_commit = on)")
    return True
