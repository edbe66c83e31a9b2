"""A primary and a mirror subscribed to it with logical replication.

Owns the default schema (the seed's ``chrispar`` example), `create_pair` and the
waits on a pair (initial table copy done, mirror caught up). Invariant: a
`create_pair` that fails destroys whatever it started before raising.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pgroute.errors import LocalClusterError
from pgroute.pg.naming import quote_ident, quote_literal
from pgroute.pg.versions import SUBSCRIPTION_STREAMING

from .binaries import PgBinaries, find_version
from .cluster import LocalCluster
from .processes import check_reachable, give_to_server

log = logging.getLogger(__name__)

DEFAULT_SCHEMA = """\
CREATE TABLE usuarios (
    id serial PRIMARY KEY,
    nombre text,
    email text UNIQUE
);
CREATE TABLE empleados (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    nombre text,
    usuario_id int
);
CREATE TABLE pedidos (
    id bigserial PRIMARY KEY,
    usuario_id int,
    total numeric,
    creado timestamptz DEFAULT now()
);
-- Owned by no column: promotion must move it too, not only serial/identity ones.
CREATE SEQUENCE folio_seq;
"""
"""The seed's "chrispar" example. Every table has a primary key, which logical
replication needs to replicate UPDATE and DELETE."""


@dataclasses.dataclass(eq=False)
class LocalPair:
    """A primary and a mirror subscribed to it with logical replication."""

    primary: LocalCluster
    mirror: LocalCluster
    dbname: str
    publication: str
    subscription: str

    def primary_dsn(self) -> str:
        """DSN of the pair's database on the primary."""
        return self.primary.dsn(self.dbname)

    def mirror_dsn(self) -> str:
        """DSN of the pair's database on the mirror."""
        return self.mirror.dsn(self.dbname)

    def wait_tables_ready(self, timeout: float = 30) -> None:
        """Wait until the subscription's initial table copy is done (all tables 'r')."""
        _wait_for(
            self.mirror,
            "SELECT count(*) FILTER (WHERE srsubstate <> 'r') = 0 FROM pg_subscription_rel",
            self.dbname,
            timeout,
            "the initial table copy",
        )

    def wait_synced(self, timeout: float = 30) -> None:
        """Wait until the mirror confirmed everything up to the primary's current
        WAL position (the subscription's slot on the primary, named like the
        subscription, reports a confirmed_flush_lsn at least that far)."""
        target = self.primary.sql("SELECT pg_current_wal_lsn()", self.dbname)
        slot = quote_literal(self.subscription)
        try:
            _wait_for(
                self.primary,
                f"SELECT coalesce(bool_and(confirmed_flush_lsn >= '{target}'), false) "
                f"FROM pg_replication_slots WHERE slot_name = {slot}",
                self.dbname,
                timeout,
                f"the mirror to confirm WAL {target}",
            )
        except LocalClusterError as exc:
            state = self.primary.sql(
                f"SELECT active, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = {slot}",
                self.dbname,
            )
            raise LocalClusterError(f"{exc}; slot (active|confirmed_flush_lsn): {state or 'missing'}") from None

    def destroy(self) -> None:
        """Destroy both servers (mirror first: its apply worker would otherwise
        log reconnect errors against the dying primary); never raises."""
        self.mirror.destroy()
        self.primary.destroy()


def _wait_for(cluster: LocalCluster, query: str, dbname: str, timeout: float, what: str) -> None:
    """Poll `query` on `cluster` until it returns true (psql's ``t``)."""
    deadline = time.monotonic() + timeout
    while cluster.sql(query, dbname) != "t":
        if time.monotonic() > deadline:
            raise LocalClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _binaries(version: int | None) -> PgBinaries | None:
    return None if version is None else find_version(version)


def create_pair(
    base_dir: Path | str,
    *,
    dbname: str = "chrispar",
    publication: str = "chrispar_pub",
    subscription: str = "chrispar_sub",
    schema_sql: str | None = DEFAULT_SCHEMA,
    seed_sql: str | None = None,
    settings: dict[str, str] | None = None,
    fast: bool = True,
    primary_version: int | None = None,
    mirror_version: int | None = None,
) -> LocalPair:
    """Start a primary (base_dir/primary) and a mirror (base_dir/mirror) on free
    ports, create `dbname` and the schema on both (logical replication copies no
    DDL), the seed on the primary, then publication and subscription; return once
    the initial copy is done and the mirror is caught up. On failure, destroys
    whatever it started before raising.

    `primary_version` / `mirror_version` choose each node's PostgreSQL major version
    (binaries.find_version: never another); None: the default binaries
    (``PGROUTE_PG_VERSION``, else the search). Different versions make a mixed pair."""
    base = Path(base_dir).absolute()
    check_reachable(base)
    if not base.exists():
        base.mkdir(parents=True)
        base.chmod(0o755)
        give_to_server(base)
    started = time.monotonic()
    pair = LocalPair(
        primary=LocalCluster(
            base / "primary", name="primary", settings=settings, fast=fast, binaries=_binaries(primary_version)
        ),
        mirror=LocalCluster(
            base / "mirror", name="mirror", settings=settings, fast=fast, binaries=_binaries(mirror_version)
        ),
        dbname=dbname,
        publication=publication,
        subscription=subscription,
    )
    try:

        def prepare(cluster: LocalCluster) -> None:
            cluster.init().start()
            cluster.sql(f"CREATE DATABASE {quote_ident(dbname)}")
            if schema_sql:
                cluster.sql(schema_sql, dbname)

        # initdb and CREATE DATABASE dominate the cost: both nodes in parallel.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(prepare, (pair.primary, pair.mirror)))
        if seed_sql:
            pair.primary.sql(seed_sql, dbname)
        pair.primary.sql(f"CREATE PUBLICATION {quote_ident(publication)} FOR ALL TABLES", dbname)
        conninfo = quote_literal(pair.primary_dsn())
        pair.mirror.sql(
            f"CREATE SUBSCRIPTION {quote_ident(subscription)} CONNECTION {conninfo} "
            f"PUBLICATION {quote_ident(publication)} WITH (streaming = {SUBSCRIPTION_STREAMING})",
            dbname,
        )
        pair.wait_tables_ready()
        pair.wait_synced()
    except BaseException:
        pair.destroy()
        raise
    log.info(
        "pair ready in %.2fs: primary port %d, mirror port %d",
        time.monotonic() - started,
        pair.primary.port,
        pair.mirror.port,
    )
    return pair
