"""Rendering the divergent commits as recovery files: replayable SQL and one
JSON object per change (plus, after an apply, one per conflict and per replaced
active row), written atomically.

Invariants:

- The SQL file starts with ``SESSION_SETTINGS`` and then replays each divergent
  transaction as BEGIN ... COMMIT in commit order; values are the old primary's
  text under those settings, as literals in pg.naming's E'' form, so the file
  means the same whatever the replaying server's standard_conforming_strings.
- Every identifier is quoted (mixed-case names, keywords); an UPDATE assigns
  only the columns it changed and never an unchanged-TOAST column.
- A file with its final name is always complete (temporary name, fsync,
  rename); a label is a plain file name, never a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from pgroute.control.divergence.model import SESSION_SETTINGS, ApplyReport, DivergentSet
from pgroute.control.divergence.rows import row_dict, set_indexes, table_label, where_values
from pgroute.pg.naming import int_to_lsn, qualified, quote_ident, quote_literal
from pgroute.pg.pgoutput import UNCHANGED_TOAST, Change, ChangeKind, Relation, Transaction, Value

log = logging.getLogger(__name__)

__all__ = ["change_to_sql", "sql_value", "to_jsonl", "to_sql", "write_recovery_files"]


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
        stmt = "TRUNCATE " + ", ".join(qualified(r.schema, r.name) for r in rels)
        if change.restart_identity:
            stmt += " RESTART IDENTITY"
        if change.cascade:
            stmt += " CASCADE"
        return stmt + ";"
    rel = _relation_of(change, relations)
    table = qualified(rel.schema, rel.name)
    if change.kind is ChangeKind.INSERT:
        assert change.new is not None
        cols = ", ".join(quote_ident(c.name) for c in rel.columns)
        vals = ", ".join(sql_value(v) for v in change.new)
        # OVERRIDING SYSTEM VALUE keeps the original ids of GENERATED ALWAYS
        # identity columns; PostgreSQL accepts it on tables without one too.
        return f"INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({vals});"
    where = _sql_condition(rel, where_values(rel, change))
    if change.kind is ChangeKind.DELETE:
        return f"DELETE FROM {table} WHERE {where};"
    new = change.new
    assert new is not None  # an update always carries its new tuple
    sets = set_indexes(rel, change)
    if not sets:
        return f"-- update of {table_label(rel)} WHERE {where} changed no column"
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
        lines.append(f"BEGIN; -- xid {tx.xid}, commit {int_to_lsn(tx.commit_lsn)} at {tx.commit_time.isoformat()}")
        for change in tx.changes:
            lines.append(change_to_sql(change, relations))
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def _change_json(tx: Transaction, change: Change, relations: Mapping[int, Relation] | None) -> dict[str, object]:
    base: dict[str, object] = {
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
            tables=[table_label(r) for r in rels],
            cascade=change.cascade,
            restart_identity=change.restart_identity,
        )
        return base
    rel = _relation_of(change, relations)
    base.update(
        schema=rel.schema,
        table=rel.name,
        new=row_dict(rel, change.new),
        old=row_dict(rel, change.old, only_key=change.old_kind == "K"),
        old_kind=change.old_kind,
    )
    if change.new is not None:
        untouched = [c.name for c, v in zip(rel.columns, change.new, strict=True) if v is UNCHANGED_TOAST]
        if untouched:
            base["unchanged_toast"] = untouched
    return base


def to_jsonl(
    txs: Iterable[Transaction],
    relations: Mapping[int, Relation] | None = None,
    report: ApplyReport | None = None,
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
