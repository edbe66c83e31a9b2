"""Every SQL action pgroute performs on a node: fencing, stamps, promotion, slots,
publications, subscriptions, lag, synchronous replication, setup and checks.

This module owns the SQL; the controller owns the order in which it runs. Invariants:

- Every action is idempotent: running it again after a crash halfway finishes the
  job or does nothing. "ensure_*" and "drop_*" functions say whether they changed
  anything.
- Every action works on a fenced node. A fenced node has
  ``default_transaction_read_only = on`` in ``postgresql.auto.conf``; control
  connections (:func:`connect`) override it for their own session only, and carry
  ``application_name = 'pgroute…'`` so :func:`terminate_clients` spares them.
- Nothing pgroute-private is written into replicated tables: the epoch stamp lives
  in ``pg_db_role_setting`` (``ALTER DATABASE … SET``), which logical replication
  never copies.
- No password ever reaches a log line or an exception message: DSNs are shown
  masked (``mask_dsn``), libpq conninfo strings through :func:`mask_conninfo`.

Naming rule (shared with the controller): the publication has the configured name
on whichever node publishes; the subscription on the configured mirror is
``<subscription>``, the one on the configured primary (following the mirror after a
failover) is ``<subscription>_rev``. A subscription's slot on its publisher has the
subscription's name, and so has its walsender's ``application_name`` (which is what
``synchronous_standby_names`` matches).

Replication positions are handled as integers (bytes since ``0/0``).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Sequence

import asyncpg

from ..pg.dsn import Dsn, mask_dsn, parse_dsn
from ..errors import NodeUnavailable, PgRouteError

log = logging.getLogger(__name__)

#: application_name of pgroute's own control connections; terminate_clients spares
#: every session whose application_name starts with it.
CONTROL_APPLICATION_NAME = "pgroute"

#: Sampling interval of the polling waits (wait_caught_up, drop_slot, setup).
POLL_INTERVAL = 0.02

class ReplicationSetupError(PgRouteError):
    """setup_replication cannot proceed; the message says what the operator must do."""


@dataclass(frozen=True)
class CheckItem:
    """One line of ``pgroute check``: what was checked, the verdict, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


# --------------------------------------------------------------------------- helpers


def subscription_name(base: str, subscriber: str) -> str:
    """Name of the subscription held by ``subscriber`` ("mirror" or "primary")."""
    who = getattr(subscriber, "value", subscriber)
    if who == "mirror":
        return base
    if who == "primary":
        return base + "_rev"
    raise ValueError(f"subscriber must be 'primary' or 'mirror', not {subscriber!r}")


def lsn_to_int(lsn: str | None) -> int | None:
    """``'16/B374D848'`` -> byte position; None stays None."""
    if lsn is None:
        return None
    hi, _, lo = str(lsn).partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_conninfo(text: str | None) -> str | None:
    """Mask passwords in a libpq keyword/value string and in any URL inside it."""
    if text is None:
        return None
    return mask_dsn(_CONNINFO_PASSWORD.sub(r"\1***", text))


def _ident(name: str) -> str:
    """Quote an SQL identifier (what quote_ident does, always quoting)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """Quote an SQL string literal; the E'' form is right whatever
    standard_conforming_strings says."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _qualified(schema: str, name: str) -> str:
    return f"{_ident(schema)}.{_ident(name)}"


def _as_dsn(dsn: Dsn | str) -> Dsn:
    return dsn if isinstance(dsn, Dsn) else parse_dsn(dsn)


def _conninfo(publisher: Dsn | str) -> str:
    """What CREATE SUBSCRIPTION ... CONNECTION gets: libpq accepts both forms, but a
    Dsn or URL is turned into keyword/value so its password is quoted properly."""
    if isinstance(publisher, Dsn):
        return publisher.libpq_conninfo()
    if publisher.startswith(("postgresql://", "postgres://")):
        return parse_dsn(publisher).libpq_conninfo()
    return publisher


# --------------------------------------------------------------------- connections


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
    parsed = _as_dsn(dsn)
    try:
        return await asyncpg.connect(
            dsn=parsed.url,
            timeout=timeout,
            command_timeout=statement_timeout + 5.0,
            # Control connections run DDL (ALTER SUBSCRIPTION, TRUNCATE ...): no
            # prepared-statement cache that such changes could invalidate.
            statement_cache_size=0,
            server_settings={
                "default_transaction_read_only": "off",
                "application_name": application_name,
                "statement_timeout": str(int(statement_timeout * 1000)),
            },
        )
    except asyncio.TimeoutError:
        raise NodeUnavailable(f"{parsed.masked}: no answer within {timeout:g}s") from None
    except asyncpg.PostgresError as exc:
        # A server-side refusal (no such database, authentication, starting up):
        # keep it as the cause so callers can tell them apart; the server's
        # messages never contain the password.
        raise NodeUnavailable(f"{parsed.masked}: {mask_dsn(str(exc))}") from exc
    except (OSError, asyncpg.InterfaceError) as exc:
        reason = mask_dsn(str(exc)) or type(exc).__name__
        raise NodeUnavailable(f"{parsed.masked}: {reason}") from None


async def current_lsn(conn: asyncpg.Connection) -> int:
    """The node's WAL write position."""
    return await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")


async def _setting(conn: asyncpg.Connection, name: str) -> str:
    return await conn.fetchval("SELECT current_setting($1)", name)


# -------------------------------------------------------------------------- fencing


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
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", signalled
            )
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


# --------------------------------------------------------------------------- stamps

_ACTIVE_VALUES = {"primary", "mirror", "none"}


async def write_stamp(conn: asyncpg.Connection, epoch: int, active: str | None) -> None:
    """Record pgroute's epoch and active node on the node itself, in
    pg_db_role_setting (ALTER DATABASE ... SET): a shared catalog that logical
    replication does not copy, so each node keeps its own stamp. Both values are set
    in one transaction."""
    active_text = "none" if active is None else str(getattr(active, "value", active))
    if active_text not in _ACTIVE_VALUES:
        raise ValueError(f"active must be 'primary', 'mirror' or None, not {active!r}")
    epoch = int(epoch)
    db = await conn.fetchval("SELECT current_database()")
    async with conn.transaction():
        await conn.execute(f"ALTER DATABASE {_ident(db)} SET pgroute.epoch = {_literal(str(epoch))}")
        await conn.execute(f"ALTER DATABASE {_ident(db)} SET pgroute.active = {_literal(active_text)}")


async def read_stamp(conn: asyncpg.Connection) -> tuple[int | None, str | None]:
    """(epoch, active node) stamped on this database; (None, None) when never stamped."""
    config = await conn.fetchval(
        """
        SELECT setconfig FROM pg_db_role_setting
        WHERE setrole = 0
          AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
        """
    )
    values = dict(item.split("=", 1) for item in (config or []) if "=" in item)
    epoch: int | None
    try:
        epoch = int(values["pgroute.epoch"])
    except (KeyError, ValueError):
        epoch = None
    active = values.get("pgroute.active")
    if active not in ("primary", "mirror"):
        active = None
    return epoch, active


# ------------------------------------------------------------------------ sequences


async def sample_sequences(conn: asyncpg.Connection) -> dict[str, int]:
    """'schema.sequence' -> last value handed out (start - increment when never
    called), for every sequence in the database."""
    rows = await conn.fetch(
        """
        SELECT schemaname, sequencename,
               coalesce(last_value, start_value - increment_by) AS value
        FROM pg_sequences
        """
    )
    return {f"{r['schemaname']}.{r['sequencename']}": int(r["value"]) for r in rows}


# Every sequence with the integer columns it feeds: owned by a column (serial and
# bigserial: deptype 'a'; identity: 'i') or used by a column's nextval() default.
_SEQUENCES_SQL = """
WITH feeds AS (
    SELECT d.objid AS seqid, d.refobjid AS relid, d.refobjsubid AS attnum
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    UNION
    SELECT d.refobjid, ad.adrelid, ad.adnum
    FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
    WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
)
SELECT s.seqrelid AS oid, sn.nspname AS seq_schema, sc.relname AS seq_name,
       s.seqincrement AS increment, s.seqstart AS start, s.seqmin AS min, s.seqmax AS max,
       coalesce(array_agg(tn.nspname) FILTER (WHERE a.attname IS NOT NULL), '{}') AS tbl_schemas,
       coalesce(array_agg(tc.relname) FILTER (WHERE a.attname IS NOT NULL), '{}') AS tbl_names,
       coalesce(array_agg(a.attname::text) FILTER (WHERE a.attname IS NOT NULL), '{}') AS columns
FROM pg_sequence s
JOIN pg_class sc ON sc.oid = s.seqrelid
JOIN pg_namespace sn ON sn.oid = sc.relnamespace
LEFT JOIN feeds f ON f.seqid = s.seqrelid
LEFT JOIN pg_class tc ON tc.oid = f.relid AND tc.relkind IN ('r', 'p')
LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = f.attnum AND NOT a.attisdropped
     AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
WHERE sn.nspname NOT IN ('pg_catalog', 'information_schema') AND sn.nspname NOT LIKE 'pg_temp%'
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 2, 3
"""


async def _move_sequences(
    conn: asyncpg.Connection, gap: int, sampled: dict[str, int] | None
) -> tuple[dict[str, int], dict[str, int]]:
    """Move every sequence past what the data and the sample say was handed out.

    target = (furthest of: max(column) over the columns it feeds, the sample) + gap,
    and a sequence is only ever moved forward (greatest(target, current)). So
    re-running changes nothing unless rows were written meanwhile with values
    beyond ``current - gap`` (then it jumps again, which wastes ids but never
    duplicates one). A sequence that feeds no column and has no sample moves only if
    this node never called it (nothing else can be known about it), from its start.
    Descending sequences are handled symmetrically. Returns (moved, unchanged).
    """
    moved: dict[str, int] = {}
    unchanged: dict[str, int] = {}
    for seq in await conn.fetch(_SEQUENCES_SQL):
        name = f"{seq['seq_schema']}.{seq['seq_name']}"
        sign = 1 if seq["increment"] > 0 else -1
        state = await conn.fetchrow(
            f"SELECT last_value, is_called FROM {_qualified(seq['seq_schema'], seq['seq_name'])}"
        )
        # The last value this node handed out (start - increment when none).
        current = state["last_value"] if state["is_called"] else state["last_value"] - seq["increment"]

        known: list[int] = []
        agg = "max" if sign > 0 else "min"
        for schema, table, column in zip(seq["tbl_schemas"], seq["tbl_names"], seq["columns"]):
            value = await conn.fetchval(
                f"SELECT {agg}({_ident(column)}) FROM {_qualified(schema, table)}"
            )
            if value is not None:
                known.append(int(value))
        if sampled and name in sampled:
            known.append(int(sampled[name]))
        if not known:
            if seq["columns"] or not state["is_called"]:
                # Empty tables and no sample: treat the start as the data.
                known.append(seq["start"] - seq["increment"])
            else:
                log.warning(
                    "sequence %s feeds no column and has no sample: left at %d", name, current
                )
                unchanged[name] = current
                continue
        furthest = max(known) if sign > 0 else min(known)
        target = furthest + sign * gap
        target = min(max(target, seq["min"]), seq["max"])
        if sign * target <= sign * current:
            unchanged[name] = current
            continue
        if target in (seq["min"], seq["max"]) and target != furthest + sign * gap:
            log.warning("sequence %s clamped to its limit %d", name, target)
        await conn.execute("SELECT setval($1::oid::regclass, $2::bigint, true)", seq["oid"], target)
        moved[name] = target
    return moved, unchanged


# ------------------------------------------------------------------- subscriptions


async def _subscription_row(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        SELECT oid, subenabled, subslotname, subconninfo, subsynccommit, subpublications
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
        await conn.execute(f"ALTER SUBSCRIPTION {_ident(name)} DISABLE")
    if row["subslotname"] is not None:
        await conn.execute(f"ALTER SUBSCRIPTION {_ident(name)} SET (slot_name = NONE)")
    await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {_ident(name)}")
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
    moved, unchanged = await _move_sequences(conn, sequence_gap, sampled)
    if moved:
        log.info("sequences moved: %s", ", ".join(f"{k}={v}" for k, v in moved.items()))
    return {"subscription_dropped": dropped, "sequences": moved, "unchanged": unchanged}


async def subscription_info(conn: asyncpg.Connection, name: str) -> dict | None:
    """State of a subscription on this (subscriber) node, or None when missing."""
    row = await _subscription_row(conn, name)
    if row is None:
        return None
    worker = await conn.fetchrow(
        """
        SELECT pid, pg_wal_lsn_diff(received_lsn, '0/0')::bigint AS received_lsn,
               pg_wal_lsn_diff(latest_end_lsn, '0/0')::bigint AS latest_end_lsn,
               last_msg_receipt_time
        FROM pg_stat_subscription WHERE subid = $1 AND relid IS NULL
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
    errors = await conn.fetchrow(
        "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subid = $1",
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
        "publications": list(row["subpublications"]),
        "worker_pid": worker["pid"] if worker else None,
        "received_lsn": worker["received_lsn"] if worker else None,
        "latest_end_lsn": worker["latest_end_lsn"] if worker else None,
        "last_msg_receipt_time": worker["last_msg_receipt_time"] if worker else None,
        "tables": table_states,
        "all_ready": all(s == "r" for s in table_states.values()),
        "apply_error_count": errors["apply_error_count"] if errors else 0,
        "sync_error_count": errors["sync_error_count"] if errors else 0,
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
    """
    row = await _subscription_row(conn, name)
    if row is not None and publication not in row["subpublications"]:
        log.warning(
            "subscription %s exists but subscribes to %s, not %s: left as it is",
            name, ", ".join(row["subpublications"]), publication,
        )
    if row is not None:
        if not row["subenabled"]:
            if row["subslotname"] is None:
                # A half-promoted subscription (slot_name = NONE) cannot be enabled;
                # finish dropping it and create it afresh.
                await _detach_and_drop(conn, name)
            else:
                await conn.execute(f"ALTER SUBSCRIPTION {_ident(name)} ENABLE")
                log.info("subscription %s enabled", name)
                return False
        else:
            return False
    options = ", ".join(
        [
            "connect = true",
            "enabled = true",
            f"slot_name = {_literal(name)}",
            f"create_slot = {'true' if create_slot else 'false'}",
            f"copy_data = {'true' if copy_data else 'false'}",
            f"synchronous_commit = {_literal(synchronous_commit)}",
        ]
    )
    conninfo = _conninfo(publisher_conninfo)
    try:
        await conn.execute(
            f"CREATE SUBSCRIPTION {_ident(name)} CONNECTION {_literal(conninfo)} "
            f"PUBLICATION {_ident(publication)} WITH ({options})"
        )
    except asyncpg.DuplicateObjectError:
        return False  # created concurrently
    except asyncpg.PostgresError as exc:
        # The server's message can quote the connection string it failed to use.
        raise type(exc)(mask_conninfo(str(exc))) from None
    log.info(
        "subscription %s created on publication %s (copy_data=%s, create_slot=%s, publisher %s)",
        name, publication, copy_data, create_slot, mask_conninfo(conninfo),
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
        await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {_ident(name)}")
    except asyncpg.ConnectionFailureError as exc:
        if "does not exist" not in str(exc):
            raise type(exc)(mask_conninfo(str(exc))) from None
        log.info("slot %s was already gone from the publisher", name)
        await _detach_and_drop(conn, name)
        return True
    log.info("subscription %s and its slot dropped", name)
    return True


# --------------------------------------------------------------- publications/slots


async def ensure_publication(conn: asyncpg.Connection, publication: str) -> bool:
    """CREATE PUBLICATION ... FOR ALL TABLES if missing. True if created."""
    if await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication):
        return False
    try:
        await conn.execute(f"CREATE PUBLICATION {_ident(publication)} FOR ALL TABLES")
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
                slot, existing["slot_type"], existing["plugin"],
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
        row = await conn.fetchrow(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1", slot
        )
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
            raise asyncio.TimeoutError(f"replication slot {slot} still in use after {timeout:g}s")


async def list_inactive_slots(conn: asyncpg.Connection) -> list[str]:
    return [r["slot_name"] for r in await conn.fetch(
        "SELECT slot_name FROM pg_replication_slots WHERE NOT active ORDER BY slot_name"
    )]


# ------------------------------------------------------------------- lag, catch-up


async def confirmed_lsn(
    publisher_conn: asyncpg.Connection, subscription: str, *, applied: bool = False
) -> int | None:
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
            raise asyncio.TimeoutError(
                f"{subscription} confirmed {int_to_lsn(position) if position is not None else 'nothing'}, "
                f"not {int_to_lsn(target_lsn)}, within {timeout:g}s"
            )
        await asyncio.sleep(POLL_INTERVAL)


# ------------------------------------------------------------ synchronous replication


async def set_synchronous(conn: asyncpg.Connection, standby: str | None) -> None:
    """Make commits on this node wait for ``standby`` (a subscription name = its
    walsender's application_name), or for nobody when None."""
    if standby is None:
        await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:
        value = '"' + standby.replace('"', '""') + '"'
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {_literal(value)}")
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


# ------------------------------------------------------------------------- resync


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
    elif publication and await conn.fetchval(
        "SELECT 1 FROM pg_publication WHERE pubname = $1", publication
    ):
        wanted = await published_tables(conn, publication)
    else:
        wanted = local
    if wanted:
        await conn.execute(f"TRUNCATE TABLE {', '.join(wanted)} CASCADE")
        log.info("truncated %d table(s) for a full resync", len(wanted))
    return wanted


# ------------------------------------------------------------------ setup + checks


def _pg_binary(name: str) -> str:
    """A PostgreSQL client binary: the newest /usr/lib/postgresql/*/bin one (pg_dump
    must not be older than the server), else PATH."""
    def version(path: str) -> float:
        try:
            return float(path.split("/")[-3])
        except ValueError:
            return 0.0

    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version, reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise ReplicationSetupError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")
    return found


def _libpq_env(dsn: Dsn) -> dict[str, str]:
    """Environment for a libpq client: the password goes in PGPASSWORD, never on a
    command line; PGOPTIONS makes the session writable on a fenced node."""
    env = dict(os.environ)
    env.update(
        PGHOST=dsn.host, PGPORT=str(dsn.port), PGUSER=dsn.user, PGDATABASE=dsn.dbname,
        PGAPPNAME=CONTROL_APPLICATION_NAME, PGOPTIONS="-c default_transaction_read_only=off",
        PGCONNECT_TIMEOUT="10",
    )
    env.pop("PGPASSWORD", None)
    if dsn.password:
        env["PGPASSWORD"] = dsn.password
    return env


async def _run(argv: list[str], env: dict[str, str], stdin: bytes | None, timeout: float) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        tool = os.path.basename(argv[0])
        raise ReplicationSetupError(f"{tool} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        message = mask_conninfo(err.decode(errors="replace").strip()) or f"exit status {proc.returncode}"
        raise ReplicationSetupError(f"{os.path.basename(argv[0])} failed: {message}")
    return out


async def copy_schema(src_dsn: Dsn | str, dst_dsn: Dsn | str, *, timeout: float = 120.0) -> bool:
    """Copy the schema (no data, publications or subscriptions) from src to dst with
    pg_dump | psql, in one transaction, only when dst has no user table. True if
    copied."""
    src, dst = _as_dsn(src_dsn), _as_dsn(dst_dsn)
    conn = await connect(dst, 10.0)
    try:
        if await user_tables(conn):
            return False
    finally:
        await conn.close()
    schema = await _run(
        [_pg_binary("pg_dump"), "--schema-only", "--no-publications", "--no-subscriptions"],
        _libpq_env(src), None, timeout,
    )
    await _run(
        [_pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-"],
        _libpq_env(dst), schema, timeout,
    )
    log.info("schema copied from %s to %s", src.masked, dst.masked)
    return True


async def _wait_initial_copy(conn: asyncpg.Connection, subscription: str, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await subscription_info(conn, subscription)
        if info is None:
            raise ReplicationSetupError(f"subscription {subscription} disappeared during the initial copy")
        if info["all_ready"] and info["worker_pid"]:
            return info
        if loop.time() >= deadline:
            pending = {t: s for t, s in info["tables"].items() if s != "r"}
            raise asyncio.TimeoutError(
                f"initial copy of {subscription} not finished within {timeout:g}s: {pending}"
            )
        await asyncio.sleep(0.1)


async def _ensure_database(dsn: Dsn) -> bool:
    """Create the DSN's database (from the server's 'postgres' database) when the
    server says it does not exist. True if created."""
    try:
        conn = await connect(dsn, 10.0)
    except NodeUnavailable as exc:
        if not isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError):
            raise
    else:
        await conn.close()
        return False
    admin = await connect(dsn.with_dbname("postgres"), 10.0)
    try:
        await admin.execute(f"CREATE DATABASE {_ident(dsn.dbname)}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("database %s created on %s", dsn.dbname, dsn.masked)
    return True


async def setup_replication(
    primary_dsn: Dsn | str,
    mirror_dsn: Dsn | str,
    publication: str,
    subscription: str,
    *,
    publisher_conninfo: Dsn | str | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """Create what a primary -> mirror pair needs, idempotently: publication on the
    primary, the schema on an empty mirror, the mirror's subscription with a full
    initial copy; then wait for that copy. Returns the steps, done or skipped.

    ``publisher_conninfo`` is how the mirror reaches the primary when that differs
    from how pgroute does (containers); default: the primary DSN.
    """
    primary, mirror = _as_dsn(primary_dsn), _as_dsn(mirror_dsn)
    steps: list[str] = []
    pconn = await connect(primary, 10.0)
    mconn = None
    try:
        level = await _setting(pconn, "wal_level")
        if level != "logical":
            raise ReplicationSetupError(
                f"wal_level on the primary ({primary.masked}) is {level!r}: set wal_level = logical "
                "in its postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart it"
            )
        steps.append("primary: wal_level = logical")
        if await _ensure_database(mirror):
            steps.append(f"mirror: database {mirror.dbname} created")
        mconn = await connect(mirror, 10.0)
        if await _setting(mconn, "wal_level") != "logical":
            steps.append(
                "mirror: wal_level is not logical (fine for now; set it and restart the mirror "
                "before a failover, so the promoted mirror can publish its changes)"
            )
        if await ensure_publication(pconn, publication):
            steps.append(f"primary: publication {publication} created (FOR ALL TABLES)")
        else:
            steps.append(f"primary: publication {publication} already exists")

        if await copy_schema(primary, mirror):
            steps.append("mirror: schema copied from the primary")
        else:
            steps.append("mirror: has tables already, schema not copied")

        info = await subscription_info(mconn, subscription)
        if info is None:
            busy = [t for t in await user_tables(mconn)
                    if await mconn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})")]
            if busy:
                raise ReplicationSetupError(
                    f"the mirror has rows in {', '.join(busy)} but no subscription {subscription}: "
                    "a full initial copy would conflict with them; empty those tables first"
                )
            slot = await slot_info(pconn, subscription)
            if slot is not None and not slot["active"]:
                # A leftover of an earlier subscription: it would make CREATE
                # SUBSCRIPTION fail, and a full copy makes its contents useless.
                await drop_slot(pconn, subscription)
                steps.append(f"primary: stale slot {subscription} dropped")
            await subscribe(
                mconn, subscription, publisher_conninfo or primary, publication,
                copy_data=True, create_slot=True,
            )
            steps.append(f"mirror: subscription {subscription} created (initial copy of all tables)")
        elif not info["enabled"]:
            await subscribe(mconn, subscription, publisher_conninfo or primary, publication,
                            copy_data=True, create_slot=True)
            steps.append(f"mirror: subscription {subscription} enabled")
        else:
            steps.append(f"mirror: subscription {subscription} already exists")

        info = await _wait_initial_copy(mconn, subscription, timeout)
        steps.append(f"mirror: {len(info['tables'])} table(s) replicated and ready")
        return steps
    finally:
        await pconn.close()
        if mconn is not None:
            await mconn.close()


async def _try_connect(dsn: Dsn, timeout: float) -> tuple[asyncpg.Connection | None, str]:
    try:
        return await connect(dsn, timeout, statement_timeout=max(timeout, 5.0)), "reachable"
    except NodeUnavailable as exc:
        return None, str(exc)


async def check_pair(
    primary_dsn: Dsn | str,
    mirror_dsn: Dsn | str,
    publication: str,
    subscription: str,
    timeout: float,
    *,
    max_lag_bytes: int | None = None,
) -> list[CheckItem]:
    """Verify a primary -> mirror pair; every problem found is one CheckItem with
    ok=False and a fix. Never raises for a node problem."""
    primary, mirror = _as_dsn(primary_dsn), _as_dsn(mirror_dsn)
    items: list[CheckItem] = []
    pconn, pdetail = await _try_connect(primary, timeout)
    mconn, mdetail = await _try_connect(mirror, timeout)
    try:
        nodes = (("primary", primary, pconn, pdetail), ("mirror", mirror, mconn, mdetail))
        for label, dsn, conn, detail in nodes:
            items.append(CheckItem(
                f"{label} reachable", conn is not None,
                f"{dsn.masked}: {detail}" if conn is not None else detail,
                None if conn is not None else f"start the {label} server or fix {label}.dsn",
            ))
        checks = []
        for label, conn in (("primary", pconn), ("mirror", mconn)):
            if conn is not None:
                # On the primary, the mirror's own slot is expected: inactive means
                # the mirror is not consuming, not that the slot is garbage.
                expected = {subscription} if label == "primary" else set()
                checks += [_check_wal_level(label, conn), _check_capacity(label, conn),
                           _check_inactive_slots(label, conn, expected)]
        if pconn is not None:
            checks.append(_check_publication(pconn, publication))
            checks.append(_check_lag(pconn, subscription, max_lag_bytes))
        if mconn is not None:
            checks.append(_check_subscription(mconn, subscription, publication))
        for check in checks:
            try:
                items.extend(await check)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
                name = check.__name__.lstrip("_").replace("check_", "").replace("_", " ")
                items.append(CheckItem(name, False, f"check failed: {mask_conninfo(str(exc))}", None))
    finally:
        for conn in (pconn, mconn):
            if conn is not None:
                await conn.close()
    return items


async def _check_wal_level(label: str, conn: asyncpg.Connection) -> list[CheckItem]:
    level = await _setting(conn, "wal_level")
    why = "to publish" if label == "primary" else "so that a promoted mirror can publish (failback)"
    return [CheckItem(
        f"{label} wal_level", level == "logical", f"wal_level = {level}",
        None if level == "logical"
        else f"ALTER SYSTEM SET wal_level = logical on the {label} and restart it ({why})",
    )]


async def _check_capacity(label: str, conn: asyncpg.Connection) -> list[CheckItem]:
    row = await conn.fetchrow(
        """
        SELECT current_setting('max_replication_slots')::int AS max_slots,
               (SELECT count(*) FROM pg_replication_slots)::int AS slots,
               current_setting('max_wal_senders')::int AS max_senders,
               (SELECT count(*) FROM pg_stat_replication)::int AS senders
        """
    )
    # Room for one more slot and sender: the reverse subscription after a failover,
    # or a table-sync worker's temporary slot during a resync.
    ok = row["max_slots"] - row["slots"] >= 1 and row["max_senders"] - row["senders"] >= 1 \
        and row["max_slots"] >= 2 and row["max_senders"] >= 2
    return [CheckItem(
        f"{label} replication capacity", ok,
        f"slots {row['slots']}/{row['max_slots']}, walsenders {row['senders']}/{row['max_senders']}",
        None if ok else f"raise max_replication_slots / max_wal_senders on the {label} (restart needed)",
    )]


async def _check_inactive_slots(
    label: str, conn: asyncpg.Connection, expected: set[str]
) -> list[CheckItem]:
    rows = await conn.fetch(
        """
        SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
        FROM pg_replication_slots WHERE NOT active ORDER BY slot_name
        """
    )
    if not rows:
        return [CheckItem(f"{label} inactive slots", True, "none", None)]
    names = ", ".join(f"{r['slot_name']} ({r['retained'] or 0} bytes of WAL retained)" for r in rows)
    stale = [r["slot_name"] for r in rows if r["slot_name"] not in expected]
    if stale:
        fix = (f"drop the ones nobody will resume: SELECT pg_drop_replication_slot('{stale[0]}') "
               f"on the {label}")
    else:
        fix = ("the mirror is not consuming its slot: start the mirror or enable its subscription; "
               "do not drop the slot unless the mirror will be fully resynchronised")
    return [CheckItem(f"{label} inactive slots", False, f"holding WAL: {names}", fix)]


async def _check_publication(conn: asyncpg.Connection, publication: str) -> list[CheckItem]:
    row = await conn.fetchrow("SELECT puballtables FROM pg_publication WHERE pubname = $1", publication)
    if row is None:
        return [CheckItem(
            "publication", False, f"publication {publication} does not exist on the primary",
            "pgroute setup-replication (or CREATE PUBLICATION ... FOR ALL TABLES on the primary)",
        )]
    missing = sorted(set(await user_tables(conn)) - set(await published_tables(conn, publication)))
    if missing:
        return [CheckItem(
            "publication", False,
            f"publication {publication} does not cover {', '.join(missing)}",
            f"ALTER PUBLICATION {publication} ADD TABLE ... (or recreate it FOR ALL TABLES)",
        )]
    scope = "all tables" if row["puballtables"] else "every table (listed)"
    return [CheckItem("publication", True, f"publication {publication} covers {scope}", None)]


async def _check_subscription(
    conn: asyncpg.Connection, subscription: str, publication: str
) -> list[CheckItem]:
    info = await subscription_info(conn, subscription)
    if info is None:
        return [CheckItem(
            "subscription", False, f"subscription {subscription} does not exist on the mirror",
            "pgroute setup-replication",
        )]
    problems = []
    fix = None
    if not info["enabled"]:
        problems.append("disabled")
        fix = f"ALTER SUBSCRIPTION {subscription} ENABLE on the mirror"
    elif not info["worker_pid"]:
        problems.append(
            "no apply worker running (publisher unreachable or apply errors: see the mirror's log)"
        )
        fix = "check the mirror's log for the apply worker's error"
    if publication not in info["publications"]:
        problems.append(f"subscribes to {info['publications']}, not {publication}")
        fix = fix or f"ALTER SUBSCRIPTION {subscription} SET PUBLICATION {publication}"
    pending = {t: s for t, s in info["tables"].items() if s != "r"}
    if pending:
        problems.append(f"tables not ready: {pending}")
        fix = fix or "wait for the initial copy; if it does not progress, see the mirror's log"
    if not info["tables"]:
        problems.append("no tables subscribed")
        fix = fix or f"ALTER SUBSCRIPTION {subscription} REFRESH PUBLICATION"
    if info["apply_error_count"] or info["sync_error_count"]:
        problems.append(
            f"{info['apply_error_count']} apply / {info['sync_error_count']} sync error(s) so far"
        )
    if problems:
        return [CheckItem("subscription", False, f"{subscription}: " + "; ".join(problems), fix)]
    return [CheckItem(
        "subscription", True,
        f"{subscription}: enabled, worker {info['worker_pid']}, {len(info['tables'])} table(s) ready", None,
    )]


async def _check_lag(
    conn: asyncpg.Connection, subscription: str, max_lag: int | None
) -> list[CheckItem]:
    lag = await lag_bytes(conn, subscription)
    if lag is None:
        return [CheckItem(
            "replication lag", False,
            f"the primary has no walsender and no slot named {subscription}",
            "pgroute setup-replication",
        )]
    connected = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", subscription
    )
    if not connected:
        return [CheckItem(
            "replication lag", False,
            f"mirror not connected; its slot is {lag} bytes behind",
            "check that the mirror is up and its subscription enabled",
        )]
    ok = max_lag is None or lag <= max_lag
    return [CheckItem(
        "replication lag", ok, f"{lag} bytes behind",
        None if ok else "the mirror is too far behind for an automatic failover: see its apply worker",
    )]


__all__ = [
    "CheckItem", "ReplicationSetupError", "subscription_name", "connect", "current_lsn",
    "terminate_clients", "fence", "unfence", "is_fenced", "write_stamp", "read_stamp",
    "sample_sequences", "promote", "ensure_publication", "ensure_slot", "slot_info", "drop_slot",
    "list_inactive_slots", "subscription_info", "subscribe", "drop_subscription", "lag_bytes",
    "confirmed_lsn", "wait_caught_up", "set_synchronous", "sync_state", "truncate_published_tables",
    "published_tables", "user_tables", "copy_schema", "setup_replication", "check_pair",
    "lsn_to_int", "int_to_lsn", "mask_conninfo",
]
