"""The PostgreSQL server-version facts pgroute relies on, in one place.

pgroute runs against PostgreSQL 15 and later (tested on 15, 16 and 18). What differs
between those versions and matters to pgroute is decided here, keyed on the server's
major version as the connection reported it at login (``server_version``: no query),
so that no SQL names a column an older server lacks:

- ``pg_stat_subscription``: 16 adds ``leader_pid``; a parallel apply worker (16+) is a
  row with ``relid`` NULL like the leader apply worker, told apart only by its
  ``leader_pid``. :func:`apply_worker_filter` selects the leader on every version.
- ``pg_stat_subscription_stats``: 18 adds the ``confl_*`` conflict counters
  (:data:`CONFLICT_COUNTERS`). ``confl_update_missing`` and ``confl_delete_missing``
  count replicated updates and deletes that found no row: the server logs them and
  goes on, so they are the one sign that a follower lacks rows its source has.
- ``pg_subscription.substream``: boolean on 15, ``"char"`` (``f``/``t``/``p``) on 16+;
  :func:`streaming_mode` reads both. ``CREATE SUBSCRIPTION``'s default for
  ``streaming`` is ``off`` before 18 and ``parallel`` on 18, so every subscription
  pgroute creates states :data:`SUBSCRIPTION_STREAMING` itself.
- ``initdb`` enables data checksums by default from 18 only; the local servers choose
  explicitly (``pgroute.local.cluster``).
- The pgoutput protocol: version 1 is what every supported server speaks and all the
  divergence reader needs (``pgroute.pg.pgoutput``).

The same on 15, 16 and 18 (checked there): the functions pgroute calls, as it calls
them (18's pg_create_logical_replication_slot and pg_logical_emit_message take one
more argument, with a default), the pg_stat_replication, pg_replication_slots and
pg_subscription columns pgroute reads, and pg_stat_activity's 'client backend'.
"""

from __future__ import annotations

import asyncpg

#: ``streaming`` of every subscription pgroute creates. ``on`` (all of 15, 16 and 18
#: accept it, and it means the same on each): a transaction larger than the
#: publisher's logical_decoding_work_mem reaches the subscriber while it runs, which
#: spools it and applies it at commit in its one apply worker. So the apply order,
#: the apply errors and the worker pgroute watches are the same on every version,
#: and at a large commit only the apply is left to wait for (a switchover's
#: catch-up, a synchronous commit). Measured, 300,000-row insert over a 1 MB
#: logical_decoding_work_mem, commit to applied on the mirror: off 1.8-2.8 s, on
#: 1.0-1.1 s (15 and 18), parallel 0.03 s (18). Not ``off`` (15-17's default): the
#: subscriber gets nothing of a large transaction until it commits. Not ``parallel``
#: (18's default, 16+ only): a 15 subscriber refuses it, so pgroute would behave
#: differently per version, applying uncommitted transactions in extra workers; a
#: subscription an operator sets to parallel is handled (apply_worker_filter).
SUBSCRIPTION_STREAMING = "on"

#: ``pgoutput`` proto_version pgroute requests when it peeks a slot. 2-4 add only
#: in-progress streaming and two-phase messages, which a peek without the
#: ``streaming``/``two_phase`` options never produces; 1 is accepted by every version.
PGOUTPUT_PROTO_VERSION = 1

#: pg_stat_subscription_stats conflict counters, PostgreSQL 18.
CONFLICT_COUNTERS: tuple[str, ...] = (
    "confl_insert_exists",
    "confl_update_origin_differs",
    "confl_update_exists",
    "confl_update_missing",
    "confl_delete_origin_differs",
    "confl_delete_missing",
    "confl_multiple_unique_conflicts",
)

#: The conflicts after which the server goes on applying with a row skipped: the
#: follower lacked a row its source updated or deleted.
MISSING_ROW_COUNTERS: tuple[str, ...] = ("confl_update_missing", "confl_delete_missing")


def server_major(conn: asyncpg.Connection) -> int:
    """The major version of the server ``conn`` reached (from its ``server_version``
    at login; no round trip)."""
    return int(conn.get_server_version().major)


def has_leader_pid(major: int) -> bool:
    """pg_stat_subscription.leader_pid exists (16+: parallel apply workers)."""
    return major >= 16


def has_conflict_counters(major: int) -> bool:
    """pg_stat_subscription_stats has the confl_* counters (18+)."""
    return major >= 18


def apply_worker_filter(major: int, alias: str) -> str:
    """SQL condition on pg_stat_subscription row ``alias`` that holds only for a
    subscription's leader apply worker: not a table synchronization worker (relid
    set) and, from 16, not a parallel apply worker (leader_pid set)."""
    condition = f"{alias}.relid IS NULL"
    if has_leader_pid(major):
        condition += f" AND {alias}.leader_pid IS NULL"
    return condition


def missing_rows_sql(major: int, alias: str) -> str:
    """SQL expression over pg_stat_subscription_stats row ``alias``: replicated updates
    and deletes that found no row, or NULL where the server does not count them."""
    if not has_conflict_counters(major):
        return "NULL::bigint"
    return "(" + " + ".join(f"{alias}.{c}" for c in MISSING_ROW_COUNTERS) + ")::bigint"


_STREAMING_MODES = {"false": "off", "f": "off", "true": "on", "t": "on", "p": "parallel"}


def streaming_mode(substream: object) -> str:
    """``pg_subscription.substream`` as the ``streaming`` option's value: 'off', 'on'
    or 'parallel'. Takes the column as asyncpg returns it (bool on 15, a one-letter
    str on 16+) or as text (psql's ``t``/``f``, ``substream::text``)."""
    if isinstance(substream, bool):
        return "on" if substream else "off"
    text = substream.decode() if isinstance(substream, bytes) else str(substream)
    try:
        return _STREAMING_MODES[text]
    except KeyError:
        raise ValueError(f"unknown pg_subscription.substream value {substream!r}") from None
