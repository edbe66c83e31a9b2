"""Reading the divergent commits: peek the orphaned subscription slot on a
returning old primary and decode its pgoutput changes into a DivergentSet.

At failover the mirror's subscription is dropped with ``slot_name = NONE`` while
the primary is down, so the subscription's slot stays on the old primary. When
that node comes back, the slot's unconsumed changes up to the node's current
WAL position are the *divergent commits*: acknowledged to clients by the old
primary, never received by the mirror.

Invariants:

- The slot is only ever *peeked* (``pg_logical_slot_peek_binary_changes``),
  never consumed: reading twice returns the same set and the slot's
  ``confirmed_flush_lsn`` never moves, so nothing is lost if pgroute crashes
  between reading and applying.
- The read runs in a read-only transaction under ``SESSION_SETTINGS``, so it
  works on a fenced node and every value is text in one known format.
- Every failure to read (no pgoutput slot, slot in use, publication missing,
  undecodable stream) is a ``DivergenceError``; a missing slot is not an error
  but an empty set with ``slot_found=False``.
"""

from __future__ import annotations

import logging

import asyncpg

from pgroute.control.divergence.model import DivergenceError, DivergentSet, set_local
from pgroute.pg.naming import lsn_to_int
from pgroute.pg.pgoutput import StreamDecoder
from pgroute.pg.versions import PGOUTPUT_PROTO_VERSION

log = logging.getLogger(__name__)

__all__ = ["read_divergent"]

# proto_version: versions.PGOUTPUT_PROTO_VERSION (1, spoken by every supported
# server; the higher ones only add streaming and two-phase messages, which a peek
# without those options never returns). Without the 'messages' option pgoutput sends
# no logical messages (M); Origin (O) appears for changes a node applied from a
# subscription of its own, Type (Y) for columns of non-built-in types.
_PEEK_SQL = (
    "SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes("
    "$1::name, $2::text::pg_lsn, NULL, "
    f"'proto_version', '{PGOUTPUT_PROTO_VERSION}', 'publication_names', $3::text)"
)


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
        raise DivergenceError(f"slot {slot} is {info['slot_type']}/{info['plugin']}, not a pgoutput logical slot")
    if not info["same_db"]:
        raise DivergenceError(f"slot {slot} belongs to another database than this connection's")
    if info["active"]:
        # Someone streams from it: those changes are being consumed right now,
        # and peeking would fail anyway ("is active for PID").
        raise DivergenceError(f"slot {slot} is in use by PID {info['active_pid']}")

    decoder = StreamDecoder()
    try:
        async with conn.transaction(readonly=True):
            await set_local(conn)
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
