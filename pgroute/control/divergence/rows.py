"""What a decoded change means row by row, shared by the renderer and the
applier so that the recovery SQL and the live replay pick the same target row
and assign the same columns.

Pure functions of a ``Relation`` and a ``Change`` (no I/O). Invariants:

- The target of an UPDATE or DELETE is the old tuple the publisher sent ('K' key
  columns, or 'O' the whole row under REPLICA IDENTITY FULL), else the key
  columns of the new tuple; a change with no usable key raises ValueError rather
  than address every row.
- An unchanged-TOAST value is never assigned, compared or reported: the
  publisher did not send it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pgroute.control.divergence.model import Row
from pgroute.pg.pgoutput import UNCHANGED_TOAST, Change, Relation, Value

__all__ = ["row_dict", "set_indexes", "table_label", "text_of", "where_values"]


def table_label(rel: Relation) -> str:
    """``schema.name`` unquoted, as reports, logs and JSON lines name a table."""
    return f"{rel.schema}.{rel.name}"


def where_values(rel: Relation, change: Change) -> list[tuple[int, Value]]:
    """(column index, value) pairs identifying the target row of an update/delete.

    The old tuple when the publisher sent one ('K': the key columns, 'O': the
    whole row under REPLICA IDENTITY FULL, where every column is flagged key),
    else the key columns of the new tuple (the key did not change)."""
    source = change.old if change.old is not None else change.new
    if source is None:
        raise ValueError(f"{change.kind.value} on {table_label(rel)} has no tuple to key on")
    keys = rel.key_indexes
    if not keys:
        raise ValueError(f"{change.kind.value} on {table_label(rel)}: relation has no key columns")
    pairs = [(i, source[i]) for i in keys if source[i] is not UNCHANGED_TOAST]
    if not pairs:
        raise ValueError(f"{change.kind.value} on {table_label(rel)}: key values not sent")
    return pairs


def set_indexes(rel: Relation, change: Change) -> list[int]:
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


def text_of(value: Value) -> str | None:
    """A sent value as reports and JSON lines show it: text as is, NULL as None,
    a binary-format value (never requested) as hex. An unchanged-TOAST marker
    has no value to show: ValueError (callers leave such columns out)."""
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, str):
        return value
    raise ValueError("an unchanged TOAST value has no text")


def row_dict(rel: Relation, values: Sequence[Value] | None, only_key: bool = False) -> Row | None:
    """Column name -> text of a tuple; unchanged-TOAST columns are left out,
    and with ``only_key`` every column outside the replica identity (a 'K' old
    tuple sends only those)."""
    if values is None:
        return None
    return {
        col.name: text_of(value)
        for col, value in zip(rel.columns, values, strict=True)
        if value is not UNCHANGED_TOAST and not (only_key and not col.key)
    }
