"""Recovery of divergent commits left on a returning old primary.

At failover the mirror's subscription is dropped with ``slot_name = NONE`` while
the primary is down, so the subscription's slot stays on the old primary. When
that node comes back, the slot's unconsumed changes up to the node's current
WAL position are the *divergent commits*: acknowledged to clients by the old
primary, never received by the mirror. This module owns finding them, writing
them down, and replaying them onto the node that now takes writes.

Invariants:

- The slot is only ever *peeked* (``pg_logical_slot_peek_binary_changes``),
  never consumed: reading twice returns the same set and the slot's
  ``confirmed_flush_lsn`` never moves, so nothing is lost if pgroute crashes
  between reading and applying.
- Nothing divergent is dropped silently. Every change is either applied,
  found already present (identical), or recorded as a conflict with both
  versions of the row. When an UPDATE or DELETE replaces an active-node row
  whose prior state cannot be checked (no before-image), the replaced row is
  recorded too.
- An active-node row that differs from what the divergent history expects is
  never overwritten: that is a conflict for an operator.
- ``apply_divergent`` is safe to re-run: changes already applied come back
  as identical (inserts, updates) or already absent (deletes).
- TRUNCATE is never replayed automatically (it would remove rows written on
  the active node after failover); it is written to the recovery files and
  reported as a conflict.

Values travel as the old primary's text output, produced under fixed session
settings (``SESSION_SETTINGS``) so that the same settings can be used when the
values are parsed again on the active node or by the replay SQL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from pgroute.pg.pgoutput import (
    UNCHANGED_TOAST,
    Change,
    ChangeKind,
    Relation,
    StreamDecoder,
    Transaction,
    TypeInfo,
    Value,
)
from pgroute.errors import PgRouteError
from pgroute.pg.naming import int_to_lsn, lsn_to_int, qualified, quote_ident, quote_literal

log = logging.getLogger(__name__)

__all__ = [
    "SESSION_SETTINGS",
    "ApplyReport",
    "Conflict",
    "DivergenceError",
    "DivergentSet",
    "Replaced",
    "apply_divergent",
    "change_to_sql",
    "read_divergent",
    "sql_value",
    "to_jsonl",
    "to_sql",
    "write_recovery_files",
]

# Output settings under which the divergent values are rendered as text. ISO
# dates and the 'postgres' interval style parse back unambiguously under any
# DateStyle; UTC makes timestamptz text identical wherever it is produced.
SESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
)

_PEEK_SQL = (
    "SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes("
    "$1::name, $2::text::pg_lsn, NULL, "
    "'proto_version', '1', 'publication_names', $3::text)"
)


class DivergenceError(PgRouteError):
    """The divergent commits could not be read (slot unusable, publication missing...)."""


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class DivergentSet:
    """What the old primary committed that the mirror never received.

    ``upto_lsn`` is the WAL position the set was read up to;
    ``confirmed_flush_lsn`` the slot's position when read. That position can be
    behind what the mirror really applied (see ``read_divergent``);
    ``applied_lsn`` is the mirror's own record, when the caller had it, and
    ``already_applied`` counts the peeked transactions it excluded."""

    slot: str
    publication: str
    slot_found: bool
    transactions: tuple[Transaction, ...] = ()
    relations: Mapping[int, Relation] = field(default_factory=dict)
    types: Mapping[int, TypeInfo] = field(default_factory=dict)
    upto_lsn: int | None = None
    confirmed_flush_lsn: int | None = None
    applied_lsn: int | None = None
    already_applied: int = 0

    @property
    def change_count(self) -> int:
        return sum(len(tx.changes) for tx in self.transactions)

    @property
    def empty(self) -> bool:
        return not self.transactions


@dataclass(frozen=True)
class Conflict:
    """A divergent change that was not applied; both versions are kept.

    ``table`` is ``schema.name``; ``key`` the identifying columns of the row;
    ``divergent`` the row as the old primary had it (new tuple, or the old
    tuple of a delete); ``active`` the active node's row (None when missing)."""

    table: str
    key: dict[str, str | None]
    divergent: dict[str, str | None] | None
    active: dict[str, str | None] | None
    kind: str
    reason: str
    xid: int = 0
    commit_lsn: int = 0


@dataclass(frozen=True)
class Replaced:
    """An active-node row an applied UPDATE/DELETE replaced without a
    before-image to check it against (REPLICA IDENTITY DEFAULT sends none), kept
    so a change made on the active node after failover is not lost unseen."""

    table: str
    key: dict[str, str | None]
    before: dict[str, str | None]
    after: dict[str, str | None] | None
    kind: str
    xid: int = 0
    commit_lsn: int = 0


@dataclass(frozen=True)
class ApplyReport:
    applied: int = 0
    skipped_identical: int = 0
    conflicts: tuple[Conflict, ...] = ()
    replaced: tuple[Replaced, ...] = ()
    # xids of divergent transactions only partly applied (some change conflicted)
    partial_transactions: tuple[int, ...] = ()
    # (sequence, new value) for each sequence moved past the replayed rows
    sequences: tuple[tuple[str, int], ...] = ()


# ---------------------------------------------------------------- quoting


def sql_value(value: Value) -> str:
    """SQL text for one decoded column value: NULL for None, else the value as
    a string literal (pg.naming's E'' form, which means the same whatever
    standard_conforming_strings says on the server that replays it).

    Only text values can be replayed: a binary-format value (never requested)
    or an unchanged-TOAST marker (no value was sent) raises ValueError, and so
    does a NUL, which no PostgreSQL text value holds and which would end the
    statement early wherever it is sent as a C string."""
    if value is None:
        return "NULL"
    if not isinstance(value, str):
        raise ValueError(f"cannot render {type(value).__name__} value as a SQL literal")
    if "\x00" in value:
        raise ValueError("text value contains NUL")
    return quote_literal(value)


def _qualified(rel: Relation) -> str:
    return qualified(rel.schema, rel.name)


def _table_label(rel: Relation) -> str:
    return f"{rel.schema}.{rel.name}"


# ---------------------------------------------------------------- reading


async def read_divergent(
    conn: asyncpg.Connection,
    slot: str,
    publication: str,
    *,
    applied_lsn: int | str | None = None,
) -> DivergentSet:
    """Peek every change the slot holds up to ``pg_current_wal_lsn()``.

    ``conn`` is connected to the old primary, in the slot's database. Works on
    a fenced node: peeking a slot is allowed in a read-only transaction
    (verified on PostgreSQL 15 with default_transaction_read_only = on), so the
    read runs in an explicitly read-only transaction. Returns an empty set
    with ``slot_found=False`` when there is no such slot.

    A slot's confirmed_flush_lsn is written to disk only at checkpoints and
    clean shutdowns, so after the old primary was SIGKILLed it comes back at
    an older value and the peek also returns transactions the mirror had
    applied. ``applied_lsn`` removes them: the mirror's
    ``pg_replication_origin_status.remote_lsn`` for the subscription's origin
    (the end LSN of the last remote commit it applied, crash-safe on the
    mirror), read before the subscription is dropped. Transactions whose end
    LSN is at or before it are counted in ``already_applied``, not returned.
    Without it the extra transactions are returned; ``apply_divergent`` then
    finds their rows identical, but an update the mirror received and later
    changed again would be replayed over the newer value (recorded in
    ``ApplyReport.replaced``)."""
    info = await conn.fetchrow(
        "SELECT plugin, slot_type, database = current_database() AS same_db, active,"
        " active_pid, confirmed_flush_lsn::text AS confirmed"
        " FROM pg_replication_slots WHERE slot_name = $1",
        slot,
    )
    if info is None:
        log.info("FAILBACK divergence: no slot %s on this node, nothing to recover", slot)
        return DivergentSet(slot, publication, slot_found=False)
    if info["slot_type"] != "logical" or info["plugin"] != "pgoutput":
        raise DivergenceError(
            f"slot {slot} is {info['slot_type']}/{info['plugin']}, not a pgoutput logical slot"
        )
    if not info["same_db"]:
        raise DivergenceError(f"slot {slot} belongs to another database than this connection's")
    if info["active"]:
        # Someone streams from it: those changes are being consumed right now,
        # and peeking would fail anyway ("is active for PID").
        raise DivergenceError(f"slot {slot} is in use by PID {info['active_pid']}")

    decoder = StreamDecoder()
    try:
        async with conn.transaction(readonly=True):
            await _set_local(conn)
            upto = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            async for row in conn.cursor(_PEEK_SQL, slot, upto, publication, prefetch=500):
                decoder.feed(row["data"])
    except asyncpg.UndefinedObjectError as exc:  # publication or slot vanished
        raise DivergenceError(f"cannot read slot {slot}: {exc}") from exc
    except asyncpg.ObjectInUseError as exc:
        raise DivergenceError(f"slot {slot} became active while reading: {exc}") from exc
    except ValueError as exc:
        raise DivergenceError(f"slot {slot}: undecodable pgoutput stream: {exc}") from exc
    try:
        transactions = decoder.finish()
    except ValueError as exc:
        raise DivergenceError(f"slot {slot}: {exc}") from exc

    confirmed = info["confirmed"]
    applied = lsn_to_int(applied_lsn) if isinstance(applied_lsn, str) else applied_lsn
    skipped = 0
    if applied is not None:
        kept = [tx for tx in transactions if tx.end_lsn > applied]
        skipped = len(transactions) - len(kept)
        transactions = kept
    result = DivergentSet(
        slot=slot,
        publication=publication,
        slot_found=True,
        transactions=tuple(transactions),
        relations=dict(decoder.relations),
        types=dict(decoder.types),
        upto_lsn=lsn_to_int(upto),
        confirmed_flush_lsn=lsn_to_int(confirmed) if confirmed else None,
        applied_lsn=applied,
        already_applied=skipped,
    )
    log.warning(
        "FAILBACK divergence: slot %s holds %d transactions (%d changes) between %s and %s"
        " (%d more already applied on the mirror)",
        slot,
        len(result.transactions),
        result.change_count,
        confirmed,
        upto,
        skipped,
    )
    return result


async def _set_local(conn: asyncpg.Connection) -> None:
    # SET LOCAL: the settings end with the transaction, the pooled session
    # keeps whatever its owner configured.
    for name, value in SESSION_SETTINGS:
        await conn.execute(f"SET LOCAL {name} TO {quote_literal(value)}")


# ---------------------------------------------------------------- rendering


def _relation_of(change: Change, relations: Mapping[int, Relation] | None) -> Relation:
    rel = change.relation
    if rel is None and relations is not None:
        rel = relations.get(change.relation_oid)
    if rel is None:
        raise ValueError(f"no relation known for oid {change.relation_oid}")
    return rel


def _truncated_relations(change: Change, relations: Mapping[int, Relation] | None) -> tuple[Relation, ...]:
    if change.truncate_relations:
        return change.truncate_relations
    rels = []
    for oid in change.truncate_oids:
        rel = relations.get(oid) if relations is not None else None
        if rel is None:
            raise ValueError(f"no relation known for oid {oid}")
        rels.append(rel)
    return tuple(rels)


def _where_values(rel: Relation, change: Change) -> list[tuple[int, Value]]:
    """(column index, value) pairs identifying the target row of an update/delete.

    The old tuple when the publisher sent one ('K': the key columns, 'O': the
    whole row under REPLICA IDENTITY FULL, where every column is flagged key),
    else the key columns of the new tuple (the key did not change)."""
    source = change.old if change.old is not None else change.new
    if source is None:
        raise ValueError(f"{change.kind.value} on {_table_label(rel)} has no tuple to key on")
    keys = rel.key_indexes
    if not keys:
        raise ValueError(f"{change.kind.value} on {_table_label(rel)}: relation has no key columns")
    pairs = [(i, source[i]) for i in keys if source[i] is not UNCHANGED_TOAST]
    if not pairs:
        raise ValueError(f"{change.kind.value} on {_table_label(rel)}: key values not sent")
    return pairs


def _set_indexes(rel: Relation, change: Change) -> list[int]:
    """Columns an update must assign: those sent (not unchanged TOAST), minus
    those known unchanged (key columns when no old key was sent, and columns
    equal to the old tuple). Leaving unchanged columns out keeps the statement
    valid for GENERATED ALWAYS identity keys, which only accept DEFAULT."""
    assert change.new is not None
    known_old: dict[int, Value] = {}
    if change.old_kind == "O" and change.old is not None:
        known_old = dict(enumerate(change.old))
    elif change.old_kind == "K" and change.old is not None:
        known_old = {i: change.old[i] for i in rel.key_indexes}
    out = []
    for i, value in enumerate(change.new):
        if value is UNCHANGED_TOAST:
            continue
        if change.old is None and rel.columns[i].key:
            continue
        if i in known_old and known_old[i] is not UNCHANGED_TOAST and known_old[i] == value:
            continue
        out.append(i)
    return out


def _sql_condition(rel: Relation, pairs: Iterable[tuple[int, Value]]) -> str:
    parts = []
    for i, value in pairs:
        col = quote_ident(rel.columns[i].name)
        parts.append(f"{col} IS NULL" if value is None else f"{col} = {sql_value(value)}")
    return " AND ".join(parts)


def change_to_sql(change: Change, relations: Mapping[int, Relation] | None = None) -> str:
    """One statement (no trailing newline) replaying ``change``."""
    if change.kind is ChangeKind.TRUNCATE:
        rels = _truncated_relations(change, relations)
        stmt = "TRUNCATE " + ", ".join(_qualified(r) for r in rels)
        if change.restart_identity:
            stmt += " RESTART IDENTITY"
        if change.cascade:
            stmt += " CASCADE"
        return stmt + ";"
    rel = _relation_of(change, relations)
    table = _qualified(rel)
    if change.kind is ChangeKind.INSERT:
        assert change.new is not None
        cols = ", ".join(quote_ident(c.name) for c in rel.columns)
        vals = ", ".join(sql_value(v) for v in change.new)
        # OVERRIDING SYSTEM VALUE keeps the original ids of GENERATED ALWAYS
        # identity columns; PostgreSQL accepts it on tables without one too.
        return f"INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({vals});"
    where = _sql_condition(rel, _where_values(rel, change))
    if change.kind is ChangeKind.DELETE:
        return f"DELETE FROM {table} WHERE {where};"
    new = change.new
    assert new is not None  # an update always carries its new tuple
    sets = _set_indexes(rel, change)
    if not sets:
        return f"-- update of {_table_label(rel)} WHERE {where} changed no column"
    assignments = ", ".join(f"{quote_ident(rel.columns[i].name)} = {sql_value(new[i])}" for i in sets)
    return f"UPDATE {table} SET {assignments} WHERE {where};"


def to_sql(txs: Iterable[Transaction], relations: Mapping[int, Relation] | None = None) -> str:
    """Replayable SQL: the session settings, then BEGIN ... COMMIT per transaction."""
    txs = list(txs)
    lines = [
        f"-- pgroute divergent commits: {len(txs)} transactions",
        "-- values are text as the old primary printed them under these settings:",
    ]
    lines += [f"SET {name} TO {quote_literal(value)};" for name, value in SESSION_SETTINGS]
    for tx in txs:
        lines.append("")
        lines.append(
            f"BEGIN; -- xid {tx.xid}, commit {int_to_lsn(tx.commit_lsn)} at {tx.commit_time.isoformat()}"
        )
        for change in tx.changes:
            lines.append(change_to_sql(change, relations))
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def _row_dict(rel: Relation, values: Sequence[Value] | None, only_key: bool = False) -> dict | None:
    if values is None:
        return None
    out: dict[str, str | None] = {}
    for col, value in zip(rel.columns, values):
        if value is UNCHANGED_TOAST or (only_key and not col.key):
            continue
        out[col.name] = value.hex() if isinstance(value, bytes) else value  # type: ignore[union-attr]
    return out


def _change_json(tx: Transaction, change: Change, relations: Mapping[int, Relation] | None) -> dict:
    base = {
        "xid": tx.xid,
        "commit_lsn": int_to_lsn(tx.commit_lsn),
        "commit_time": tx.commit_time.isoformat(),
        "kind": change.kind.value,
    }
    if change.kind is ChangeKind.TRUNCATE:
        rels = _truncated_relations(change, relations)
        base.update(
            schema=rels[0].schema,
            table=rels[0].name,
            tables=[_table_label(r) for r in rels],
            cascade=change.cascade,
            restart_identity=change.restart_identity,
        )
        return base
    rel = _relation_of(change, relations)
    base.update(
        schema=rel.schema,
        table=rel.name,
        new=_row_dict(rel, change.new),
        old=_row_dict(rel, change.old, only_key=change.old_kind == "K"),
        old_kind=change.old_kind,
    )
    if change.new is not None:
        untouched = [c.name for c, v in zip(rel.columns, change.new) if v is UNCHANGED_TOAST]
        if untouched:
            base["unchanged_toast"] = untouched
    return base


def to_jsonl(
    txs: Iterable[Transaction],
    relations: Mapping[int, Relation] | None = None,
    report: "ApplyReport | None" = None,
) -> str:
    """One JSON object per change; with a report, then one line per conflict
    (``"conflict": true``) and per replaced active row (``"replaced": true``)."""
    lines = [
        json.dumps(_change_json(tx, ch, relations), ensure_ascii=False, sort_keys=True)
        for tx in txs
        for ch in tx.changes
    ]
    if report is not None:
        for c in report.conflicts:
            lines.append(
                json.dumps(
                    {
                        "conflict": True,
                        "table": c.table,
                        "kind": c.kind,
                        "key": c.key,
                        "divergent": c.divergent,
                        "active": c.active,
                        "reason": c.reason,
                        "xid": c.xid,
                        "commit_lsn": int_to_lsn(c.commit_lsn),
                    },
                    ensure_ascii=False,
                    sort_keys=True,
                )
            )
        for r in report.replaced:
            lines.append(
                json.dumps(
                    {
                        "replaced": True,
                        "table": r.table,
                        "kind": r.kind,
                        "key": r.key,
                        "before": r.before,
                        "after": r.after,
                        "xid": r.xid,
                        "commit_lsn": int_to_lsn(r.commit_lsn),
                    },
                    ensure_ascii=False,
                    sort_keys=True,
                )
            )
    return "".join(line + "\n" for line in lines)


_LABEL_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def write_recovery_files(
    directory: str | os.PathLike[str],
    divset: DivergentSet,
    report: ApplyReport | None,
    label: str,
) -> tuple[Path, Path]:
    """Write ``<label>.jsonl`` and ``<label>.sql`` into ``directory``.

    Each file is written to a temporary name, fsynced and renamed, so a file
    with the final name is always complete. Returns (jsonl path, sql path)."""
    if not _LABEL_RE.match(label) or label in (".", ".."):
        raise ValueError(f"recovery label must be a plain file name, got {label!r}")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    jsonl_path = target / f"{label}.jsonl"
    sql_path = target / f"{label}.sql"
    _atomic_write(jsonl_path, to_jsonl(divset.transactions, divset.relations, report))
    _atomic_write(sql_path, to_sql(divset.transactions, divset.relations))
    log.warning(
        "FAILBACK divergence: %d transactions written to %s and %s",
        len(divset.transactions),
        jsonl_path,
        sql_path,
    )
    return jsonl_path, sql_path


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------- applying


@dataclass(frozen=True)
class _ActiveTable:
    """A table as the active node has it."""

    oid: int
    qualified: str
    types: dict[str, str]          # column -> cast target type (no typmod)
    primary_key: tuple[str, ...]


class _Unappliable(Exception):
    """A change that cannot be applied; the message becomes the conflict reason."""


# Matches the row fetch_row locked, from its "tableoid:ctid" locator in $n.
_LOCATOR_CONDITION = (
    "tableoid = split_part(${n}::text, ':', 1)::oid"
    " AND ctid = split_part(${n}::text, ':', 2)::tid"
)

_DELETED = object()  # expected-state marker: the divergent history deleted the row


class _Applier:
    """Applies one DivergentSet; holds the per-run catalog cache and the
    divergent history's view of each row it touched (``expected``), which is
    the before-image for later changes to the same row."""

    def __init__(self, conn: asyncpg.Connection, relations: Mapping[int, Relation]) -> None:
        self.conn = conn
        self.relations = relations
        self.tables: dict[tuple[str, str], _ActiveTable | None] = {}
        # (schema, table, key values) -> normalized row texts, or _DELETED
        self.expected: dict[tuple, object] = {}
        self.applied = 0
        self.identical = 0
        self.conflicts: list[Conflict] = []
        self.replaced: list[Replaced] = []
        self.partial: list[int] = []
        self.touched: dict[int, str] = {}  # active table oid -> qualified name

    # -- catalog

    async def table(self, rel: Relation) -> _ActiveTable:
        key = (rel.schema, rel.name)
        if key not in self.tables:
            self.tables[key] = await self._load_table(rel)
        found = self.tables[key]
        if found is None:
            raise _Unappliable(f"table {_table_label(rel)} does not exist on the active node")
        missing = [c.name for c in rel.columns if c.name not in found.types]
        if missing:
            raise _Unappliable(
                f"columns {', '.join(missing)} of {_table_label(rel)} do not exist on the active node"
            )
        return found

    async def _load_table(self, rel: Relation) -> _ActiveTable | None:
        rows = await self.conn.fetch(
            "SELECT c.oid, a.attname,"
            " quote_ident(tn.nspname) || '.' || quote_ident(t.typname) AS typ"
            " FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " JOIN pg_namespace tn ON tn.oid = t.typnamespace"
            " WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            rel.schema,
            rel.name,
        )
        if not rows:
            return None
        oid = rows[0]["oid"]
        # Cast targets drop the typmod on purpose: an explicit cast to
        # varchar(3) truncates silently, an assignment to the column errors.
        types = {r["attname"]: r["typ"] for r in rows}
        pk = await self.conn.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.ord)"
            " FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = $1 AND i.indisprimary",
            oid,
        )
        return _ActiveTable(oid, _qualified(rel), types, tuple(pk or ()))

    # -- row access

    async def normalize(self, tbl: _ActiveTable, names: Sequence[str], values: Sequence[Value]) -> list:
        """The active node's text for each divergent value (parsed by the
        column's type, printed again), so comparisons ignore spelling
        differences such as 1.0e1 vs 10; UNCHANGED_TOAST stays as is."""
        exprs, args = [], []
        for name, value in zip(names, values):
            if value is UNCHANGED_TOAST:
                exprs.append("NULL")
                continue
            args.append(value)
            exprs.append(f"${len(args)}::text::{tbl.types[name]}::text")
        row = await self.conn.fetchrow("SELECT " + ", ".join(exprs), *args) if exprs else None
        out = list(row) if row is not None else []
        return [UNCHANGED_TOAST if v is UNCHANGED_TOAST else out[i] for i, v in enumerate(values)]

    async def fetch_row(
        self, tbl: _ActiveTable, names: Sequence[str], cond: Sequence[tuple[str, Value]]
    ) -> tuple[str, list[str | None]] | None:
        """(row locator, column texts) of the first active row matching
        ``cond``, locked FOR UPDATE so it stays put until the change is done.

        The locator is "tableoid:ctid": ctid alone is only unique within one
        partition, and a partitioned root can be published."""
        args: list = []
        parts = []
        for name, value in cond:
            if value is None:
                parts.append(f"{quote_ident(name)} IS NULL")
            else:
                args.append(value)
                parts.append(f"{quote_ident(name)} = ${len(args)}::text::{tbl.types[name]}")
        cols = ", ".join(f"{quote_ident(n)}::text" for n in names)
        row = await self.conn.fetchrow(
            f"SELECT tableoid::oid::text || ':' || ctid::text, {cols} FROM {tbl.qualified}"
            f" WHERE {' AND '.join(parts) or 'true'} LIMIT 1 FOR UPDATE",
            *args,
        )
        if row is None:
            return None
        return row[0], list(row[1:])

    # -- one change

    async def apply_transaction(self, tx: Transaction) -> None:
        before = len(self.conflicts)
        async with self.conn.transaction():
            await _set_local(self.conn)
            for change in tx.changes:
                await self.apply_change(tx, change)
        if len(self.conflicts) > before and len(self.conflicts) - before < len(tx.changes):
            self.partial.append(tx.xid)

    async def apply_change(self, tx: Transaction, change: Change) -> None:
        rel = change.relation or self.relations.get(change.relation_oid)
        if change.kind is ChangeKind.TRUNCATE:
            rels = change.truncate_relations or tuple(
                r for r in (self.relations.get(o) for o in change.truncate_oids) if r is not None
            )
            self.conflict(
                tx,
                rels[0] if rels else None,
                "truncate",
                {},
                None,
                None,
                "TRUNCATE of "
                + ", ".join(_table_label(r) for r in rels)
                + " not replayed: it would remove rows written on the active node after failover",
            )
            return
        if rel is None:
            raise ValueError(f"change on relation {change.relation_oid} has no resolved relation")
        try:
            # A savepoint per change: a failed change leaves the rest of its
            # transaction applicable.
            async with self.conn.transaction():
                if change.kind is ChangeKind.INSERT:
                    await self.insert(tx, rel, change)
                elif change.kind is ChangeKind.UPDATE:
                    await self.update(tx, rel, change)
                else:
                    await self.delete(tx, rel, change)
        except _Unappliable as exc:
            self.conflict(
                tx,
                rel,
                change.kind.value,
                _key_dict(rel, change),
                _divergent_dict(rel, change),
                getattr(exc, "active", None),
                str(exc),
            )
        except asyncpg.PostgresError as exc:
            detail = f" ({exc.detail})" if getattr(exc, "detail", None) else ""
            self.conflict(
                tx,
                rel,
                change.kind.value,
                _key_dict(rel, change),
                _divergent_dict(rel, change),
                None,
                f"{type(exc).__name__}: {exc}{detail}",
            )

    def conflict(
        self,
        tx: Transaction,
        rel: Relation | None,
        kind: str,
        key: dict,
        divergent: dict | None,
        active: dict | None,
        reason: str,
    ) -> None:
        table = _table_label(rel) if rel is not None else "?"
        self.conflicts.append(
            Conflict(table, key, divergent, active, kind, reason, tx.xid, tx.commit_lsn)
        )
        log.warning(
            "FAILBACK divergence conflict: %s %s key=%s xid=%s: %s", kind, table, key, tx.xid, reason
        )

    def _expect_key(self, rel: Relation, values: Sequence[Value]) -> tuple:
        return (rel.schema, rel.name, tuple(values[i] for i in rel.key_indexes))

    async def insert(self, tx: Transaction, rel: Relation, change: Change) -> None:
        assert change.new is not None
        tbl = await self.table(rel)
        names = rel.column_names
        new = await self.normalize(tbl, names, change.new)
        # Prefer the active table's primary key (the brief's notion of "same
        # row"); fall back to the replica identity columns.
        key_names = [n for n in tbl.primary_key if n in names] if tbl.primary_key else []
        if not key_names or len(key_names) != len(tbl.primary_key):
            key_names = [rel.columns[i].name for i in rel.key_indexes]
        index = {n: i for i, n in enumerate(names)}
        key = {n: change.new[index[n]] for n in key_names}
        self.expected[self._expect_key(rel, change.new)] = new
        if key_names:
            found = await self.fetch_row(tbl, names, list(key.items()))
        else:
            # No key at all: an identical row is the only evidence of "already
            # here", and may be a legitimate duplicate; let an operator decide.
            found = await self.fetch_row(tbl, names, list(zip(names, change.new)))
            if found is not None:
                raise _Unappliable(f"{_table_label(rel)} has no key and an identical row exists")
        if found is not None:
            active = found[1]
            if _same(active, new):
                self.identical += 1
                return
            self.conflict(
                tx, rel, "insert", key, _row_dict(rel, change.new), dict(zip(names, active)),
                "a row with this key exists on the active node with different values",
            )
            return
        args = list(change.new)
        placeholders = ", ".join(f"${i + 1}::text::{tbl.types[n]}" for i, n in enumerate(names))
        try:
            # Its own savepoint, so the row holding the other unique value can
            # still be looked up after the failure.
            async with self.conn.transaction():
                await self.conn.execute(
                    f"INSERT INTO {tbl.qualified} ({', '.join(quote_ident(n) for n in names)})"
                    f" OVERRIDING SYSTEM VALUE VALUES ({placeholders})",
                    *args,
                )
        except asyncpg.UniqueViolationError as exc:
            # Another unique constraint (the key itself was checked above), or
            # a concurrent insert of the same key.
            active = await self._row_by_constraint(tbl, names, change.new, exc.constraint_name)
            raise _ConflictWithRow(
                f"unique constraint {exc.constraint_name} violated: {exc.detail or exc}", active
            ) from exc
        self.applied += 1
        self.touched[tbl.oid] = tbl.qualified

    async def _row_by_constraint(
        self, tbl: _ActiveTable, names: Sequence[str], values: Sequence[Value], constraint: str | None
    ) -> dict | None:
        """The active row holding the divergent row's values of a violated
        unique constraint (or unique index), when its columns are plain."""
        if not constraint:
            return None
        cols = await self.conn.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.ord)"
            " FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid"
            " CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)"
            " LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = $1 AND ic.relname = $2",
            tbl.oid,
            constraint,
        )
        index = {n: i for i, n in enumerate(names)}
        if not cols or any(c is None or c not in index for c in cols):
            return None  # expression index, or a column the divergent row lacks
        found = await self.fetch_row(tbl, names, [(c, values[index[c]]) for c in cols])
        return dict(zip(names, found[1])) if found else None

    async def update(self, tx: Transaction, rel: Relation, change: Change) -> None:
        assert change.new is not None
        tbl = await self.table(rel)
        names = rel.column_names
        new = await self.normalize(tbl, names, change.new)
        where = self._target(tbl, rel, change)
        old_key = self._expect_key(rel, change.old if change.old is not None else change.new)
        new_key = self._expect_key(rel, change.new)
        before = self.expected.get(old_key)
        if before is None and change.old_kind == "O" and change.old is not None:
            before = await self.normalize(tbl, names, change.old)
        self.expected.pop(old_key, None)
        self.expected[new_key] = new

        found = await self.fetch_row(tbl, names, where)
        if found is None:
            if change.old is not None:
                # A key-changing update may already have been applied (re-run).
                moved = await self.fetch_row(
                    tbl, names, [(rel.columns[i].name, change.new[i]) for i in rel.key_indexes]
                )
                if moved is not None and _same(moved[1], new):
                    self.identical += 1
                    return
            raise _Unappliable(_missing_reason(rel, tbl, "update"))
        ctid, active = found
        if _same(active, new):
            self.identical += 1
            return
        if before is _DELETED:
            raise _ConflictWithRow(
                "the divergent history deleted this row before updating it", dict(zip(names, active))
            )
        if before is not None and not _same(active, before):
            raise _ConflictWithRow(
                "the row differs on the active node from the divergent history's before-image",
                dict(zip(names, active)),
            )
        sets = _set_indexes(rel, change)
        if sets:
            args = [change.new[i] for i in sets] + [ctid]
            assignments = ", ".join(
                f"{quote_ident(names[i])} = ${n + 1}::text::{tbl.types[names[i]]}"
                for n, i in enumerate(sets)
            )
            status = await self.conn.execute(
                f"UPDATE {tbl.qualified} SET {assignments} WHERE {_LOCATOR_CONDITION.format(n=len(args))}",
                *args,
            )
            if status != "UPDATE 1":
                raise _Unappliable(f"update touched no row ({status})")
        if before is None:
            self.replaced.append(
                Replaced(
                    _table_label(rel), _key_dict(rel, change), dict(zip(names, active)),
                    _row_dict(rel, change.new), "update", tx.xid, tx.commit_lsn,
                )
            )
        self.applied += 1
        self.touched[tbl.oid] = tbl.qualified

    async def delete(self, tx: Transaction, rel: Relation, change: Change) -> None:
        assert change.old is not None
        tbl = await self.table(rel)
        names = rel.column_names
        where = self._target(tbl, rel, change)
        key = self._expect_key(rel, change.old)
        before = self.expected.get(key)
        if before is None and change.old_kind == "O":
            before = await self.normalize(tbl, names, change.old)
        self.expected[key] = _DELETED
        found = await self.fetch_row(tbl, names, where)
        if found is None and rel.replica_identity == "f" and not tbl.primary_key:
            # Matched on the whole old row: "absent" may be "changed".
            raise _Unappliable(_missing_reason(rel, tbl, "delete"))
        if found is None:
            # Already absent: deleted on the active node too, or applied by an
            # earlier run. Either way the row is gone, which is what the
            # divergent commit wanted; counting it as a conflict would make
            # every re-run report conflicts.
            self.identical += 1
            return
        ctid, active = found
        if before is _DELETED:
            raise _ConflictWithRow(
                "the divergent history already deleted this row", dict(zip(names, active))
            )
        if before is not None and not _same(active, before):
            raise _ConflictWithRow(
                "the row differs on the active node from the divergent history's before-image",
                dict(zip(names, active)),
            )
        await self.conn.execute(
            f"DELETE FROM {tbl.qualified} WHERE {_LOCATOR_CONDITION.format(n=1)}", ctid
        )
        if before is None:
            self.replaced.append(
                Replaced(
                    _table_label(rel), _key_dict(rel, change), dict(zip(names, active)),
                    None, "delete", tx.xid, tx.commit_lsn,
                )
            )
        self.applied += 1

    def _target(self, tbl: _ActiveTable, rel: Relation, change: Change) -> list[tuple[str, Value]]:
        """Column/value conditions finding the row an update or delete targets.

        Under REPLICA IDENTITY FULL the identity is the whole old row, which
        would make a row changed on the active node look missing; when the
        active table has a primary key, find the row by it instead and let the
        before-image comparison tell "changed" from "missing"."""
        if rel.replica_identity == "f" and change.old is not None and tbl.primary_key:
            index = {c.name: i for i, c in enumerate(rel.columns)}
            if all(n in index and change.old[index[n]] is not UNCHANGED_TOAST for n in tbl.primary_key):
                return [(n, change.old[index[n]]) for n in tbl.primary_key]
        return [(rel.columns[i].name, v) for i, v in _where_values(rel, change)]

    # -- sequences

    async def advance_sequences(self) -> list[tuple[str, int]]:
        moved: list[tuple[str, int]] = []
        for oid, qualified in self.touched.items():
            owned = await self.conn.fetch(
                "SELECT s.oid::regclass::text AS seq, quote_ident(a.attname) AS col"
                " FROM pg_depend d"
                " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
                " JOIN pg_sequence q ON q.seqrelid = s.oid AND q.seqincrement > 0"
                " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
                " WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass"
                " AND d.refobjid = $1 AND d.deptype IN ('a', 'i')",
                oid,
            )
            for row in owned:
                async with self.conn.transaction():
                    # Block inserters on the table (they take ROW EXCLUSIVE
                    # before calling nextval) so last_value cannot move between
                    # reading it and setval: setval must never go backwards.
                    await self.conn.execute("SET LOCAL lock_timeout = '10s'")
                    await self.conn.execute(f"LOCK TABLE {qualified} IN SHARE ROW EXCLUSIVE MODE")
                    value = await self.conn.fetchval(
                        f"SELECT setval($1::regclass, m.v) FROM"
                        f" (SELECT max({row['col']})::bigint AS v FROM {qualified}) AS m,"
                        f" {row['seq']} AS s"
                        f" WHERE m.v > s.last_value OR (m.v = s.last_value AND NOT s.is_called)",
                        row["seq"],
                    )
                if value is not None:
                    moved.append((row["seq"], value))
                    log.info("FAILBACK divergence: sequence %s advanced to %d", row["seq"], value)
        return moved


class _ConflictWithRow(_Unappliable):
    """_Unappliable that knows the active node's row."""

    def __init__(self, reason: str, active: dict | None) -> None:
        super().__init__(reason)
        self.active = active


def _missing_reason(rel: Relation, tbl: _ActiveTable, kind: str) -> str:
    if rel.replica_identity == "f" and not tbl.primary_key:
        return (
            f"no row on the active node equals the old row the {kind} targets"
            " (REPLICA IDENTITY FULL without a primary key: a changed row looks missing)"
        )
    return f"the row to {kind} does not exist on the active node"


def _same(active: Sequence[str | None], divergent: Sequence[object]) -> bool:
    """Equal on every column the divergent side knows (unchanged TOAST is unknown)."""
    return all(d is UNCHANGED_TOAST or a == d for a, d in zip(active, divergent))


def _key_dict(rel: Relation, change: Change) -> dict:
    try:
        return {rel.columns[i].name: v for i, v in _where_values(rel, change)}
    except ValueError:
        return {}


def _divergent_dict(rel: Relation, change: Change) -> dict | None:
    if change.new is not None:
        return _row_dict(rel, change.new)
    return _row_dict(rel, change.old, only_key=change.old_kind == "K")


async def apply_divergent(active_conn: asyncpg.Connection, divset: DivergentSet) -> ApplyReport:
    """Replay ``divset`` onto the active node, one active-node transaction per
    divergent transaction, one savepoint per change.

    Outcomes per change: applied; skipped as identical (the row already has
    the divergent values, or a deleted row is already absent); or a conflict
    (kept in the report, never applied): an insert whose key exists with other
    values or that violates another unique constraint, an update whose target
    is missing or changed differently, a delete of a changed row, any error
    the change raises, and every TRUNCATE. Afterwards each sequence owned by a
    column of a table that received rows is moved to at least max(column)."""
    applier = _Applier(active_conn, divset.relations)
    for tx in divset.transactions:
        await applier.apply_transaction(tx)
    sequences = await applier.advance_sequences()
    report = ApplyReport(
        applied=applier.applied,
        skipped_identical=applier.identical,
        conflicts=tuple(applier.conflicts),
        replaced=tuple(applier.replaced),
        partial_transactions=tuple(applier.partial),
        sequences=tuple(sequences),
    )
    log.warning(
        "FAILBACK divergence applied: %d applied, %d already present, %d conflicts, %d rows replaced",
        report.applied,
        report.skipped_identical,
        len(report.conflicts),
        len(report.replaced),
    )
    return report
