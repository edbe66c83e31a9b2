"""One probe of one node -> one HealthSample. A probe never raises.

A probe runs a real query (a hung server accepts TCP and answers nothing, so a TCP
connect proves nothing), bounded as a whole by ``timeout``. The prober keeps one
connection per node between probes (cheap and fast) and drops it on any failure, so
the next probe reconnects from scratch.

Besides up/down, a sample carries the facts the state machine needs: whether the
node is fenced (read-only), whether it is a subscriber (and enabled), its WAL
position, the pgroute epoch stamped on it, and, seen from this node as publisher,
the lag and sync state of the other node's subscription.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from ..pg.dsn import Dsn, mask_dsn
from ..model import HealthSample, NodeName

log = logging.getLogger(__name__)

# One round trip. $1: this node's own subscription name; $2: the other node's
# subscription (= its slot and walsender application_name on this node).
PROBE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('default_transaction_read_only') = 'on' AS read_only,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END AS wal_lsn,
       (SELECT s.setconfig FROM pg_db_role_setting s
          JOIN pg_database d ON d.oid = s.setdatabase
         WHERE s.setrole = 0 AND d.datname = current_database()) AS dbconfig,
       (SELECT subenabled FROM pg_subscription
         WHERE subname = $1
           AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))
           AS sub_enabled,
       (SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
          FROM pg_replication_slots WHERE slot_name = $2) AS slot_lag,
       r.sync_state,
       (pg_current_wal_lsn() - r.flush_lsn)::bigint AS flush_lag,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (SELECT sync_state, flush_lsn, replay_lag FROM pg_stat_replication
                      WHERE application_name = $2 LIMIT 1) r ON true
"""

SEQUENCES_SQL = """
SELECT format('%I.%I', schemaname, sequencename) AS name,
       COALESCE(last_value, start_value - increment_by)::bigint AS value
  FROM pg_sequences
"""


def parse_stamp(dbconfig: list[str] | None) -> tuple[int | None, str | None]:
    """Read pgroute.epoch / pgroute.active from a pg_db_role_setting.setconfig array."""
    epoch: int | None = None
    active: str | None = None
    for item in dbconfig or ():
        key, _, value = item.partition("=")
        if key == "pgroute.epoch":
            try:
                epoch = int(value)
            except ValueError:
                epoch = None
        elif key == "pgroute.active":
            active = value
    return epoch, active


class Prober:
    """Probes one node; keeps a connection between probes."""

    def __init__(self, node: NodeName, dsn: Dsn, timeout: float, own_subscription: str,
                 peer_subscription: str) -> None:
        self.node = node
        self.dsn = dsn
        self.timeout = timeout
        self.own_subscription = own_subscription
        self.peer_subscription = peer_subscription
        self._conn: asyncpg.Connection | None = None

    def clone(self) -> "Prober":
        """A prober of the same node with its own connection (for one-shot probes)."""
        return Prober(self.node, self.dsn, self.timeout, self.own_subscription, self.peer_subscription)

    async def probe(self) -> HealthSample:
        start = time.monotonic()
        try:
            # asyncio.timeout rather than wait_for: see Monitor._loop (gh-86296).
            async with asyncio.timeout(self.timeout):
                sample = await self._probe(start)
        except TimeoutError:
            self._drop()
            return self._failed(start, f"no answer within {self.timeout:g}s")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._drop()
            return self._failed(start, _describe(exc))
        except Exception as exc:  # a probe never raises
            log.exception("probe of %s failed unexpectedly", self.node.value)
            self._drop()
            return self._failed(start, _describe(exc))
        return sample

    async def _probe(self, start: float) -> HealthSample:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.dsn.url, timeout=self.timeout,
                server_settings={"application_name": "pgroute-probe"})
        conn = self._conn
        row = await conn.fetchrow(PROBE_SQL, self.own_subscription, self.peer_subscription)
        seq_rows = await conn.fetch(SEQUENCES_SQL)
        epoch, active = parse_stamp(row["dbconfig"])
        lag = row["flush_lag"] if row["flush_lag"] is not None else row["slot_lag"]
        return HealthSample(
            node=self.node, ok=True, at=time.time(), latency=time.monotonic() - start,
            in_recovery=row["in_recovery"], read_only=row["read_only"], wal_lsn=row["wal_lsn"],
            epoch_stamp=epoch, active_stamp=active,
            subscription=self.own_subscription if row["sub_enabled"] is not None else None,
            subscription_enabled=row["sub_enabled"],
            publisher_lag_bytes=max(lag, 0) if lag is not None else None,
            sync_state=row["sync_state"], publisher_lag_seconds=row["replay_lag"],
            sequences=tuple((r["name"], r["value"]) for r in seq_rows),
        )

    def _failed(self, start: float, error: str) -> HealthSample:
        return HealthSample(node=self.node, ok=False, at=time.time(),
                            latency=time.monotonic() - start, error=error)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            # terminate(), not close(): close() would wait on a hung server.
            conn.terminate()

    async def close(self) -> None:
        self._drop()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return mask_dsn(text.splitlines()[0])[:300]
