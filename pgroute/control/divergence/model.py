"""The values the three divergence jobs (read, render, apply) hand each other,
and the fixed session settings under which divergent values travel as text.

Values travel as the old primary's text output, produced under
``SESSION_SETTINGS`` so that the same settings can be used when the values are
parsed again on the active node (``apply``) or by the replay SQL (``render``).
Both the read and the apply transaction adopt them with ``set_local``; the
recovery SQL file starts with them.

Everything here is frozen: a DivergentSet read once can be rendered and applied
any number of times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from pgroute.errors import PgRouteError
from pgroute.pg.naming import quote_literal
from pgroute.pg.pgoutput import Relation, Transaction, TypeInfo

__all__ = [
    "SESSION_SETTINGS",
    "ApplyReport",
    "Conflict",
    "DivergenceError",
    "DivergentSet",
    "Replaced",
    "Row",
    "set_local",
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

# A row as reports and recovery files show it: column name -> text (None for NULL).
Row = dict[str, str | None]


class DivergenceError(PgRouteError):
    """The divergent commits could not be read (slot unusable, publication missing...)."""


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
    key: Row
    divergent: Row | None
    active: Row | None
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
    key: Row
    before: Row
    after: Row | None
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


async def set_local(conn: asyncpg.Connection) -> None:
    """Adopt SESSION_SETTINGS for the rest of the current transaction."""
    # SET LOCAL: the settings end with the transaction, the pooled session
    # keeps whatever its owner configured.
    for name, value in SESSION_SETTINGS:
        await conn.execute(f"SET LOCAL {name} TO {quote_literal(value)}")
