"""The catalog facts that both the probe and the control plane read, one reader each:
pgroute's epoch stamp, the applied-LSN record, sequence samples, WAL positions,
and the one-round-trip snapshot of a node that the probe takes.

Stamps live in ``pg_db_role_setting`` (``ALTER DATABASE … SET pgroute.*``): a shared
catalog that logical replication never copies, so each node keeps its own stamp and
nothing pgroute-private is written into replicated tables.

Sequences are named with :func:`naming.qualified` everywhere (samples, moves,
reports), so a sample always finds the sequence it was taken from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import asyncpg

from ..errors import UnsafeStep
from . import versions
from .naming import int_to_lsn, qualified, quote_ident, quote_literal

STAMP_EPOCH = "pgroute.epoch"
STAMP_ACTIVE = "pgroute.active"
APPLIED_LSN_SETTING = "pgroute.applied_lsn"
_ACTIVE_VALUES = {"primary", "mirror", "none"}

# The database-wide settings of the current database (NULL when none were set).
_DB_SETTINGS_SQL = """
SELECT s.setconfig FROM pg_db_role_setting s
  JOIN pg_database d ON d.oid = s.setdatabase
 WHERE s.setrole = 0 AND d.datname = current_database()
"""


# ----------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ServerIdentity:
    """Which database a connection reached, as the server says: two DSNs naming one
    server (``127.0.0.1`` and ``localhost``, a proxy, a DNS alias) give one identity."""

    system_identifier: int  # pg_control_system(): unique per initdb
    database_oid: int
    database: str

    def same_database(self, other: ServerIdentity) -> bool:
        return (self.system_identifier, self.database_oid) == (other.system_identifier, other.database_oid)

    def __str__(self) -> str:
        return f"database {self.database} (oid {self.database_oid}) of system {self.system_identifier}"


async def read_identity(conn: asyncpg.Connection) -> ServerIdentity:
    row = await conn.fetchrow(
        "SELECT (SELECT system_identifier FROM pg_control_system()) AS sysid, d.oid, d.datname"
        " FROM pg_database d WHERE d.datname = current_database()"
    )
    return ServerIdentity(int(row["sysid"]), int(row["oid"]), row["datname"])


async def ensure_distinct(changed: asyncpg.Connection, source: asyncpg.Connection, what: str) -> None:
    """Right before a destructive step on ``changed`` (truncate, resync, dropping a
    subscription or slot): raise UnsafeStep unless it is another database than
    ``source`` (the node the data comes from, the active node)."""
    mine, theirs = await read_identity(changed), await read_identity(source)
    if mine.same_database(theirs):
        raise UnsafeStep(f"refusing to {what}: the node it changes is the source itself ({mine})")


# ----------------------------------------------------------------------- settings


def _db_settings(setconfig: list[str] | None) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (setconfig or ()) if "=" in item)


async def setting(conn: asyncpg.Connection, name: str) -> str:
    """current_setting(name) as this session sees it."""
    value: str = await conn.fetchval("SELECT current_setting($1)", name)
    return value


async def _set_database_setting(conn: asyncpg.Connection, name: str, value: str) -> None:
    db = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE {quote_ident(db)} SET {name} = {quote_literal(value)}")


# ------------------------------------------------------------------------- stamps


def parse_stamp(setconfig: list[str] | None) -> tuple[int | None, str | None]:
    """(epoch, active) from a ``pg_db_role_setting.setconfig`` array; active is
    'primary' or 'mirror', None when the stamp says 'none' or is missing or garbled,
    epoch None when missing or not an integer."""
    values = _db_settings(setconfig)
    try:
        epoch: int | None = int(values[STAMP_EPOCH])
    except (KeyError, ValueError):
        epoch = None
    active = values.get(STAMP_ACTIVE)
    return epoch, active if active in ("primary", "mirror") else None


async def read_stamp(conn: asyncpg.Connection) -> tuple[int | None, str | None]:
    """(epoch, active node) stamped on this database; (None, None) when never stamped."""
    return parse_stamp(await conn.fetchval(_DB_SETTINGS_SQL))


async def write_stamp(conn: asyncpg.Connection, epoch: int, active: object) -> None:
    """Record pgroute's epoch and active node ('primary', 'mirror', a NodeName, or
    None for no node) on the node itself; both values are set in one transaction."""
    active_text = "none" if active is None else str(getattr(active, "value", active))
    if active_text not in _ACTIVE_VALUES:
        raise ValueError(f"active must be 'primary', 'mirror' or None, not {active!r}")
    async with conn.transaction():
        await _set_database_setting(conn, STAMP_EPOCH, str(int(epoch)))
        await _set_database_setting(conn, STAMP_ACTIVE, active_text)


# --------------------------------------------------------------------- applied LSN

_ORIGIN_LSN_SQL = """
SELECT (s.remote_lsn - '0/0'::pg_lsn)::bigint
  FROM pg_replication_origin_status s
  JOIN pg_subscription sub ON s.external_id = 'pg_' || sub.oid
 WHERE sub.subname = $1
"""


async def record_applied_lsn(conn: asyncpg.Connection, subscription: str) -> None:
    """Keep, on the node being promoted, the last publisher LSN it applied.

    The publisher's slot position (confirmed_flush_lsn) is only written to disk at
    checkpoints: after a crash the old primary's slot may point before commits the
    mirror did apply. The mirror's replication origin is WAL-logged with each commit,
    so it is exact; rejoin uses it to tell divergent commits from applied ones. Read
    before the subscription (and its origin) is dropped; a re-run after the drop
    finds no origin and keeps the value already stored."""
    lsn = await conn.fetchval(_ORIGIN_LSN_SQL, subscription)
    if lsn is not None:
        await _set_database_setting(conn, APPLIED_LSN_SETTING, int_to_lsn(lsn))


async def read_applied_lsn(conn: asyncpg.Connection) -> str | None:
    """The LSN recorded by :func:`record_applied_lsn`, as text; None when none."""
    return _db_settings(await conn.fetchval(_DB_SETTINGS_SQL)).get(APPLIED_LSN_SETTING)


# ---------------------------------------------------------------- WAL, sequences


async def current_lsn(conn: asyncpg.Connection) -> int:
    """The node's WAL write position."""
    value: int = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
    return value


# Which integer column each sequence feeds: owned by the column (serial, bigserial:
# deptype 'a'; identity: 'i'), or drawn by the column's DEFAULT (nextval('s'), owned
# or not). One definition for the sample (which sequences feed no column) and for
# the move at promotion (max() over every column a sequence feeds).
SEQUENCE_FEEDS_SQL = """
WITH deps AS (
    SELECT d.objid AS seqid, d.refobjid AS relid, d.refobjsubid AS attnum
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    UNION
    SELECT d.refobjid, ad.adrelid, ad.adnum
    FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
    WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
)
SELECT deps.seqid, tn.nspname AS tbl_schema, tc.relname AS tbl_name, a.attname::text AS col
  FROM deps
  JOIN pg_class tc ON tc.oid = deps.relid AND tc.relkind IN ('r', 'p')
  JOIN pg_namespace tn ON tn.oid = tc.relnamespace
  JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = deps.attnum AND NOT a.attisdropped
       AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
"""

_SEQUENCE_SAMPLE_SQL = f"""
SELECT n.nspname, c.relname,
       coalesce(s.last_value, s.start_value - s.increment_by)::bigint AS value,
       EXISTS (SELECT 1 FROM ({SEQUENCE_FEEDS_SQL}) f WHERE f.seqid = c.oid) AS fed
  FROM pg_sequences s
  JOIN pg_namespace n ON n.nspname = s.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename
"""


@dataclass(frozen=True)
class SequenceSample:
    values: dict[str, int]  # qualified name -> last value handed out
    unfed: frozenset[str]  # the sequences no integer column draws from


async def sample_sequences(conn: asyncpg.Connection) -> SequenceSample:
    """Qualified sequence name -> last value handed out (start - increment when never
    called), for every sequence in the database, and which of them feed no column."""
    rows = await conn.fetch(_SEQUENCE_SAMPLE_SQL)
    names = {(r["nspname"], r["relname"]): qualified(r["nspname"], r["relname"]) for r in rows}
    return SequenceSample(
        values={names[(r["nspname"], r["relname"])]: int(r["value"]) for r in rows},
        unfed=frozenset(names[(r["nspname"], r["relname"])] for r in rows if not r["fed"]),
    )


# ------------------------------------------------------------------ node snapshot


# One round trip. $1: this node's own subscription name; $2: the other node's
# subscription (= its slot and walsender application_name on this node). Which
# pg_stat_subscription row is the apply worker, and whether the server counts
# conflicts, depend on the server's version (pg.versions).
@functools.cache
def node_facts_sql(major: int) -> str:
    """The probe's query for a server of this major version."""
    return f"""
SELECT current_setting('default_transaction_read_only') = 'on' AS default_read_only,
       (SELECT datconnlimit = 0 FROM pg_database WHERE datname = current_database()) AS closed,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END AS wal_lsn,
       ({_DB_SETTINGS_SQL}) AS dbconfig,
       (SELECT subenabled FROM pg_subscription
         WHERE subname = $1
           AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))
           AS sub_enabled,
       w.pid AS worker_pid,
       (w.received_lsn - '0/0'::pg_lsn)::bigint AS received_lsn,
       (SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats
         WHERE subname = $1) AS apply_errors,
       (SELECT {versions.missing_rows_sql(major, "ss")} FROM pg_stat_subscription_stats ss
         WHERE ss.subname = $1) AS missing_rows,
       (SELECT (o.remote_lsn - '0/0'::pg_lsn)::bigint
          FROM pg_replication_origin_status o JOIN pg_subscription sub ON o.external_id = 'pg_' || sub.oid
         WHERE sub.subname = $1) AS applied_lsn,
       (SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
          FROM pg_replication_slots WHERE slot_name = $2) AS slot_lag,
       r.sync_state,
       (pg_current_wal_lsn() - r.flush_lsn)::bigint AS flush_lag,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (SELECT sync_state, flush_lsn, replay_lag FROM pg_stat_replication
                      WHERE application_name = $2 LIMIT 1) r ON true
  LEFT JOIN LATERAL (SELECT st.pid, st.received_lsn FROM pg_stat_subscription st
                       JOIN pg_subscription sub ON sub.oid = st.subid
                      WHERE sub.subname = $1 AND {versions.apply_worker_filter(major, "st")}
                      LIMIT 1) w ON true
"""


@dataclass(frozen=True)
class NodeFacts:
    """What one probe reads from a node."""

    read_only: bool  # any part of the fence is in force (read-only default, or closed to logins)
    fenced: bool  # the whole fence is in force
    wal_lsn: int | None  # pg_current_wal_lsn() as an integer
    epoch: int | None  # pgroute epoch stamped on the node
    active: str | None  # node stamped active with that epoch
    subscription_enabled: bool | None  # own subscription: None when it does not exist
    peer_lag_bytes: int | None  # the other node's subscription lag, seen from here
    peer_sync_state: str | None  # its walsender's sync_state
    peer_lag_seconds: float | None  # its walsender's replay_lag
    sequences: SequenceSample
    worker_running: bool = False  # own subscription's apply worker
    received_lsn: int | None = None  # its last received publisher position
    applied_lsn: int | None = None  # its replication origin: last publisher commit applied
    apply_errors: int | None = None  # apply + table sync errors counted by the server
    worker_pid: int | None = None  # own subscription's leader apply worker
    # Replicated updates/deletes that found no row here (PostgreSQL 18+ counts them;
    # None before): the server skips them and goes on, so this node lacks rows.
    missing_rows: int | None = None


async def read_node_facts(conn: asyncpg.Connection, own_subscription: str, peer_subscription: str) -> NodeFacts:
    sql = node_facts_sql(versions.server_major(conn))
    row = await conn.fetchrow(sql, own_subscription, peer_subscription)
    epoch, active = parse_stamp(row["dbconfig"])
    lag = row["flush_lag"] if row["flush_lag"] is not None else row["slot_lag"]
    return NodeFacts(
        read_only=bool(row["default_read_only"] or row["closed"]),
        fenced=bool(row["default_read_only"] and row["closed"]),
        wal_lsn=row["wal_lsn"],
        epoch=epoch,
        active=active,
        subscription_enabled=row["sub_enabled"],
        peer_lag_bytes=max(lag, 0) if lag is not None else None,
        peer_sync_state=row["sync_state"],
        peer_lag_seconds=row["replay_lag"],
        sequences=await sample_sequences(conn),
        worker_running=row["worker_pid"] is not None,
        received_lsn=row["received_lsn"],
        applied_lsn=row["applied_lsn"],
        apply_errors=row["apply_errors"],
        worker_pid=row["worker_pid"],
        missing_rows=row["missing_rows"],
    )


# ------------------------------------------------------------------ table shapes


async def tables_without_replica_identity(conn: asyncpg.Connection, tables: list[str]) -> list[str]:
    """Of ``tables`` (quoted 'schema.table'), those an UPDATE or DELETE cannot be
    published for: replica identity DEFAULT with no primary key, or NOTHING (the
    publisher then refuses the statement: "does not have a replica identity")."""
    if not tables:
        return []
    rows = await conn.fetch(
        """
        SELECT format('%I.%I', n.nspname, c.relname) AS name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE format('%I.%I', n.nspname, c.relname) = ANY($1::text[]) AND c.relkind = 'r'
          AND (c.relreplident = 'n'
               OR (c.relreplident = 'd'
                   AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
        ORDER BY 1
        """,
        tables,
    )
    return [r["name"] for r in rows]


async def table_columns(conn: asyncpg.Connection, tables: list[str]) -> dict[str, dict[str, tuple[str, bool]]]:
    """{quoted table: {column: (type as format_type shows it, NOT NULL)}} for those
    of ``tables`` that exist on this node (dropped and system columns left out)."""
    rows = await conn.fetch(
        """
        SELECT format('%I.%I', n.nspname, c.relname) AS tbl, a.attname AS col,
               format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE format('%I.%I', n.nspname, c.relname) = ANY($1::text[]) AND c.relkind IN ('r', 'p')
        ORDER BY 1, a.attnum
        """,
        tables,
    )
    shapes: dict[str, dict[str, tuple[str, bool]]] = {}
    for r in rows:
        shapes.setdefault(r["tbl"], {})[r["col"]] = (r["type"], r["notnull"])
    return shapes


def column_differences(
    primary: dict[str, dict[str, tuple[str, bool]]], mirror: dict[str, dict[str, tuple[str, bool]]]
) -> list[str]:
    """What a failover onto the mirror would change for the applications, one line
    per table or column: missing tables and columns, other types, other NOT NULL."""
    out = []
    for table, columns in sorted(primary.items()):
        theirs = mirror.get(table)
        if theirs is None:
            out.append(f"{table} is missing on the mirror")
            continue
        for col, (type_, notnull) in columns.items():
            if col not in theirs:
                out.append(f"{table}.{col} is missing on the mirror")
                continue
            m_type, m_notnull = theirs[col]
            if m_type != type_:
                out.append(f"{table}.{col} is {type_} on the primary, {m_type} on the mirror")
            if m_notnull != notnull:
                p_null = "NOT NULL" if notnull else "nullable"
                m_null = "NOT NULL" if m_notnull else "nullable"
                out.append(f"{table}.{col} is {p_null} on the primary, {m_null} on the mirror")
        out += [f"{table}.{col} exists only on the mirror" for col in theirs if col not in columns]
    return out
