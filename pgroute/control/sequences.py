"""Moving sequences past the data when a node is promoted.

Logical replication does not carry sequences: a promoted mirror's sequences still
hold whatever it last drew itself. Before it takes writes, every sequence is moved
past what was handed out on the old active node, as far as pgroute can know it:
the largest value in any integer column the sequence feeds (owned by the column, or
drawn by its DEFAULT), and the last value sampled on the old active node by the
probe; plus ``replication.sequence_gap``. Sequences are only ever moved forward, so
re-running a move after a crash never hands out an id twice.
"""

from __future__ import annotations

import logging

import asyncpg

from ..pg.naming import qualified, quote_ident

log = logging.getLogger(__name__)


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


async def move_sequences(
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
        name = qualified(seq["seq_schema"], seq["seq_name"])
        sign = 1 if seq["increment"] > 0 else -1
        state = await conn.fetchrow(f"SELECT last_value, is_called FROM {name}")
        # The last value this node handed out (start - increment when none).
        current = state["last_value"] if state["is_called"] else state["last_value"] - seq["increment"]

        known: list[int] = []
        agg = "max" if sign > 0 else "min"
        for schema, table, column in zip(seq["tbl_schemas"], seq["tbl_names"], seq["columns"], strict=True):
            value = await conn.fetchval(f"SELECT {agg}({quote_ident(column)}) FROM {qualified(schema, table)}")
            if value is not None:
                known.append(int(value))
        if sampled and name in sampled:
            known.append(int(sampled[name]))
        if not known:
            if seq["columns"] or not state["is_called"]:
                # Empty tables and no sample: treat the start as the data.
                known.append(seq["start"] - seq["increment"])
            else:
                log.warning("sequence %s feeds no column and has no sample: left at %d", name, current)
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
