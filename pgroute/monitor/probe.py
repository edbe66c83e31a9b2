"""One probe of one node -> one HealthSample. A probe never raises.

A probe runs a real query (a hung server accepts TCP and answers nothing, so a TCP
connect proves nothing), bounded as a whole by ``timeout``. The prober keeps one
connection per node between probes (cheap and fast) and drops it on any failure, so
the next probe reconnects from scratch.

Besides up/down, a sample carries the facts the state machine needs: whether the
node is fenced (read-only), whether it is a subscriber (and enabled), its WAL
position, its sequences, the replicated changes its subscription skipped for want of
the row (PostgreSQL 18+), and, seen from this node as publisher, the lag and sync
state of the other node's subscription (read by ``pg.catalog.read_node_facts``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

import asyncpg

from ..model import HealthSample, NodeName
from ..pg.catalog import read_node_facts
from ..pg.connect import describe, register_own
from ..pg.dsn import Dsn

log = logging.getLogger(__name__)

#: Errors of pgroute's own process (out of file descriptors, memory or buffers): the
#: probe never reached the node, so they never count against it.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class Prober:
    """Probes one node; keeps a connection between probes."""

    def __init__(self, node: NodeName, dsn: Dsn, timeout: float, own_subscription: str, peer_subscription: str) -> None:
        self.node = node
        self.dsn = dsn
        self.timeout = timeout
        self.own_subscription = own_subscription
        self.peer_subscription = peer_subscription
        self._conn: asyncpg.Connection | None = None

    def clone(self) -> Prober:
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
        except asyncpg.PostgresError as exc:
            # The server answered: authentication, permissions, no such database, too
            # many connections, starting up or shutting down. Alive, not usable.
            self._drop()
            return self._failed(start, describe(exc), reached=True)
        except OSError as exc:
            self._drop()
            return self._failed(start, describe(exc), local=exc.errno in LOCAL_ERRNOS)
        except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            # InternalClientError: asyncpg's report of a connection the server dropped
            # while the driver was between states (seen right after a kill -9): the
            # node's doing, not pgroute's.
            self._drop()
            return self._failed(start, describe(exc))
        except Exception as exc:  # a probe never raises; pgroute's own failure is not the node's
            log.exception("probe of %s failed unexpectedly", self.node.value)
            self._drop()
            return self._failed(start, describe(exc), local=True)
        return sample

    async def _probe(self, start: float) -> HealthSample:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.dsn.url, timeout=self.timeout, server_settings={"application_name": "pgroute-probe"}
            )
            register_own(self.dsn, self._conn)
        facts = await read_node_facts(self._conn, self.own_subscription, self.peer_subscription)
        return HealthSample(
            node=self.node,
            ok=True,
            at=time.time(),
            latency=time.monotonic() - start,
            reached=True,
            read_only=facts.read_only,
            fenced=facts.fenced,
            wal_lsn=facts.wal_lsn,
            subscription=self.own_subscription if facts.subscription_enabled is not None else None,
            subscription_enabled=facts.subscription_enabled,
            publisher_lag_bytes=facts.peer_lag_bytes,
            sync_state=facts.peer_sync_state,
            publisher_lag_seconds=facts.peer_lag_seconds,
            sequences=tuple(facts.sequences.values.items()),
            unfed_sequences=facts.sequences.unfed,
            worker_running=facts.worker_running if facts.subscription_enabled is not None else None,
            received_lsn=facts.received_lsn,
            applied_lsn=facts.applied_lsn,
            apply_errors=facts.apply_errors,
            missing_rows=facts.missing_rows,
        )

    def _failed(self, start: float, error: str, *, reached: bool = False, local: bool = False) -> HealthSample:
        return HealthSample(
            node=self.node,
            ok=False,
            at=time.time(),
            latency=time.monotonic() - start,
            error=error,
            reached=reached,
            local=local,
        )

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            # terminate(), not close(): close() would wait on a hung server.
            conn.terminate()

    async def close(self) -> None:
        self._drop()
