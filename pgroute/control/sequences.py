"""Moving sequences past the data when a node is promoted.

Logical replication does not carry sequences: a promoted mirror's sequences still
hold whatever it last drew itself. Before it takes writes, every sequence is moved
past what was handed out on the old active node, as far as pgroute can know it:
the largest value in any integer column the sequence feeds (owned by the column, or
drawn by its DEFAULT), and the last value sampled on the old active node by the
probe (projected forward by the draw rate measured between samples, for sequences
no column draws from: ``SequenceHistory``); plus ``replication.sequence_gap``. Sequences are only ever moved forward, so
re-running a move after a crash never hands out an id twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from ..pg.catalog import SEQUENCE_FEEDS_SQL
from ..pg.naming import qualified, quote_ident

log = logging.getLogger(__name__)


# Every sequence with the integer columns it feeds (pg.catalog.SEQUENCE_FEEDS_SQL).
_SEQUENCES_SQL = f"""
SELECT s.seqrelid AS oid, sn.nspname AS seq_schema, sc.relname AS seq_name,
       s.seqincrement AS increment, s.seqstart AS start, s.seqmin AS min, s.seqmax AS max,
       coalesce(array_agg(f.tbl_schema) FILTER (WHERE f.col IS NOT NULL), '{{}}') AS tbl_schemas,
       coalesce(array_agg(f.tbl_name) FILTER (WHERE f.col IS NOT NULL), '{{}}') AS tbl_names,
       coalesce(array_agg(f.col) FILTER (WHERE f.col IS NOT NULL), '{{}}') AS columns
FROM pg_sequence s
JOIN pg_class sc ON sc.oid = s.seqrelid
JOIN pg_namespace sn ON sn.oid = sc.relnamespace
LEFT JOIN ({SEQUENCE_FEEDS_SQL}) f ON f.seqid = s.seqrelid
WHERE sn.nspname NOT IN ('pg_catalog', 'information_schema') AND sn.nspname NOT LIKE 'pg_temp%'
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 2, 3
"""

#: How many samples of the active node's sequences are kept to measure draw rates.
HISTORY = 10
#: Safety factor on the draws extrapolated since the last sample.
RATE_SAFETY = 2.0


@dataclass(frozen=True)
class SequenceHistory:
    """The last samples of one node's sequences, and what they say about draws since.

    A sequence that no column draws from leaves no trace in the data: after the node
    that handed out its values dies, the last sample is all pgroute knows, and
    values drawn between that sample and the death would be handed out twice. So
    the move at promotion starts from a *projection*: the last sample plus the
    fastest draw rate seen between recent samples, times the time since the last
    sample, times ``RATE_SAFETY``. Pure: the controller feeds it samples.
    """

    samples: tuple[tuple[float, Mapping[str, int]], ...] = ()
    unfed: frozenset[str] = frozenset()

    def add(self, at: float, values: Mapping[str, int], unfed: frozenset[str]) -> SequenceHistory:
        kept = (*self.samples, (at, dict(values)))[-HISTORY:]
        return SequenceHistory(kept, unfed)

    def rates(self) -> dict[str, float]:
        """Per sequence, the fastest draw rate (values per second, signed) between two
        consecutive samples."""
        fastest: dict[str, float] = {}
        for (t0, v0), (t1, v1) in zip(self.samples, self.samples[1:], strict=False):
            if t1 <= t0:
                continue
            for name, value in v1.items():
                if name in v0:
                    rate = (value - v0[name]) / (t1 - t0)
                    if abs(rate) > abs(fastest.get(name, 0.0)):
                        fastest[name] = rate
        return fastest

    def projected(self, now: float) -> dict[str, int] | None:
        """The last sample of each sequence, moved on by the draws that may have
        happened since; None when nothing was sampled."""
        if not self.samples:
            return None
        at, last = self.samples[-1]
        rates = self.rates()
        elapsed = max(0.0, now - at)
        return {
            name: value + math.ceil(rates.get(name, 0.0) * elapsed * RATE_SAFETY)
            if rates.get(name, 0.0) >= 0
            else value + math.floor(rates[name] * elapsed * RATE_SAFETY)
            for name, value in last.items()
        }

    def exposure(self) -> list[dict[str, object]]:
        """The sequences no column draws from, with their draw rate: what /api/status
        shows, since their move at promotion rests on samples and rates alone."""
        rates = self.rates()
        return [{"name": name, "rate_per_second": round(rates.get(name, 0.0), 3)} for name in sorted(self.unfed)]


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
