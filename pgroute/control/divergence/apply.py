"""Applying the divergent commits to the node that now takes writes.

``apply_divergent`` replays a DivergentSet onto the active node: one
active-node transaction per divergent transaction, one savepoint per change,
each value parsed by the active column's type from its text under
``SESSION_SETTINGS``. ``_Applier`` holds one run's catalog cache and the
divergent history's view of each row it touched (the before-image for later
changes to the same row).

Invariants:

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
- Sequences owned by columns of tables that received rows only ever move
  forward (setval under a lock that keeps inserters out).

The largest of the divergence modules (under 600 lines): insert, update and
delete share the applier's row lookup, normalization and expected-state
bookkeeping, so they stay one class.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from pgroute.control.divergence.model import (
    ApplyReport,
    Conflict,
    DivergentSet,
    Replaced,
    Row,
    set_local,
)
from pgroute.control.divergence.rows import row_dict, set_indexes, table_label, text_of, where_values
from pgroute.pg.naming import qualified, quote_ident
from pgroute.pg.pgoutput import UNCHANGED_TOAST, Change, ChangeKind, Relation, Transaction, Value

log = logging.getLogger(__name__)

__all__ = ["apply_divergent"]


@dataclass(frozen=True)
class _ActiveTable:
    """A table as the active node has it."""

    oid: int
    qualified: str
    types: dict[str, str]  # column -> cast target type (no typmod)
    primary_key: tuple[str, ...]


class _Unappliable(Exception):
    """A change that cannot be applied; the message becomes the conflict reason."""


# Matches the row fetch_row locked, from its "tableoid:ctid" locator in $n.
_LOCATOR_CONDITION = "tableoid = split_part(${n}::text, ':', 1)::oid AND ctid = split_part(${n}::text, ':', 2)::tid"


class _Mark(enum.Enum):
    # An enum member rather than a bare object(): the type checker can then
    # tell "deleted" apart from a row's texts in ``_Applier.expected``.
    DELETED = "deleted"


# Expected-state marker: the divergent history deleted the row.
_DELETED = _Mark.DELETED

# (schema, table, replica identity key values): one row of the divergent history.
_RowKey = tuple[str, str, tuple[Value, ...]]
# What the divergent history last left in a row: its normalized texts, or deleted.
_Expected = list[Value] | Literal[_Mark.DELETED]


class _Applier:
    """Applies one DivergentSet; holds the per-run catalog cache and the
    divergent history's view of each row it touched (``expected``), which is
    the before-image for later changes to the same row."""

    def __init__(self, conn: asyncpg.Connection, relations: Mapping[int, Relation]) -> None:
        self.conn = conn
        self.relations = relations
        self.tables: dict[tuple[str, str], _ActiveTable | None] = {}
        # (schema, table, key values) -> normalized row texts, or _DELETED
        self.expected: dict[_RowKey, _Expected] = {}
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
            raise _Unappliable(f"table {table_label(rel)} does not exist on the active node")
        missing = [c.name for c in rel.columns if c.name not in found.types]
        if missing:
            raise _Unappliable(f"columns {', '.join(missing)} of {table_label(rel)} do not exist on the active node")
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
        return _ActiveTable(oid, qualified(rel.schema, rel.name), types, tuple(pk or ()))

    # -- row access

    async def normalize(self, tbl: _ActiveTable, names: Sequence[str], values: Sequence[Value]) -> list[Value]:
        """The active node's text for each divergent value (parsed by the
        column's type, printed again), so comparisons ignore spelling
        differences such as 1.0e1 vs 10; UNCHANGED_TOAST stays as is."""
        exprs: list[str] = []
        args: list[Value] = []
        for name, value in zip(names, values, strict=True):
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
        args: list[Value] = []
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
            await set_local(self.conn)
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
                + ", ".join(table_label(r) for r in rels)
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
                exc.active if isinstance(exc, _ConflictWithRow) else None,
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
        key: Row,
        divergent: Row | None,
        active: Row | None,
        reason: str,
    ) -> None:
        table = table_label(rel) if rel is not None else "?"
        self.conflicts.append(Conflict(table, key, divergent, active, kind, reason, tx.xid, tx.commit_lsn))
        log.warning("FAILBACK divergence conflict: %s %s key=%s xid=%s: %s", kind, table, key, tx.xid, reason)

    def _expect_key(self, rel: Relation, values: Sequence[Value]) -> _RowKey:
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
            found = await self.fetch_row(tbl, names, list(zip(names, change.new, strict=True)))
            if found is not None:
                raise _Unappliable(f"{table_label(rel)} has no key and an identical row exists")
        if found is not None:
            active = found[1]
            if _same(active, new):
                self.identical += 1
                return
            self.conflict(
                tx,
                rel,
                "insert",
                {n: text_of(v) for n, v in key.items()},
                row_dict(rel, change.new),
                dict(zip(names, active, strict=True)),
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
            holder = await self._row_by_constraint(tbl, names, change.new, exc.constraint_name)
            raise _ConflictWithRow(
                f"unique constraint {exc.constraint_name} violated: {exc.detail or exc}", holder
            ) from exc
        self.applied += 1
        self.touched[tbl.oid] = tbl.qualified

    async def _row_by_constraint(
        self, tbl: _ActiveTable, names: Sequence[str], values: Sequence[Value], constraint: str | None
    ) -> Row | None:
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
        return dict(zip(names, found[1], strict=True)) if found else None

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
                "the divergent history deleted this row before updating it", dict(zip(names, active, strict=True))
            )
        if before is not None and not _same(active, before):
            raise _ConflictWithRow(
                "the row differs on the active node from the divergent history's before-image",
                dict(zip(names, active, strict=True)),
            )
        sets = set_indexes(rel, change)
        if sets:
            args = [change.new[i] for i in sets] + [ctid]
            assignments = ", ".join(
                f"{quote_ident(names[i])} = ${n + 1}::text::{tbl.types[names[i]]}" for n, i in enumerate(sets)
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
                    table_label(rel),
                    _key_dict(rel, change),
                    dict(zip(names, active, strict=True)),
                    row_dict(rel, change.new),
                    "update",
                    tx.xid,
                    tx.commit_lsn,
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
                "the divergent history already deleted this row", dict(zip(names, active, strict=True))
            )
        if before is not None and not _same(active, before):
            raise _ConflictWithRow(
                "the row differs on the active node from the divergent history's before-image",
                dict(zip(names, active, strict=True)),
            )
        await self.conn.execute(f"DELETE FROM {tbl.qualified} WHERE {_LOCATOR_CONDITION.format(n=1)}", ctid)
        if before is None:
            self.replaced.append(
                Replaced(
                    table_label(rel),
                    _key_dict(rel, change),
                    dict(zip(names, active, strict=True)),
                    None,
                    "delete",
                    tx.xid,
                    tx.commit_lsn,
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
        return [(rel.columns[i].name, v) for i, v in where_values(rel, change)]

    # -- sequences

    async def advance_sequences(self) -> list[tuple[str, int]]:
        moved: list[tuple[str, int]] = []
        for oid, table in self.touched.items():
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
                    await self.conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
                    value = await self.conn.fetchval(
                        f"SELECT setval($1::regclass, m.v) FROM"
                        f" (SELECT max({row['col']})::bigint AS v FROM {table}) AS m,"
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

    def __init__(self, reason: str, active: Row | None) -> None:
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
    # Not strict: ``divergent`` may be a before-image remembered from an earlier
    # change on the row, decoded under an older Relation message (a column added
    # later in the divergent history), so it can be shorter than the active row.
    return all(d is UNCHANGED_TOAST or a == d for a, d in zip(active, divergent, strict=False))


def _key_dict(rel: Relation, change: Change) -> Row:
    try:
        return {rel.columns[i].name: text_of(v) for i, v in where_values(rel, change)}
    except ValueError:
        return {}


def _divergent_dict(rel: Relation, change: Change) -> Row | None:
    if change.new is not None:
        return row_dict(rel, change.new)
    return row_dict(rel, change.old, only_key=change.old_kind == "K")


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
