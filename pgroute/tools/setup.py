"""``pgroute setup-replication``: create what a primary -> mirror pair needs, with no
daemon running. An operator tool: it may use the control plane's SQL, and nothing in
the daemon imports it.

Idempotent: every step is skipped when already done, so it can be re-run after a
failure halfway.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ..control.replication import (
    drop_slot,
    ensure_publication,
    slot_info,
    subscribe,
    subscription_info,
    user_tables,
)
from ..errors import NodeUnavailable, PgRouteError
from ..pg.catalog import read_identity, setting
from ..pg.clients import libpq_env, pg_binary, run
from ..pg.connect import as_dsn, connect
from ..pg.dsn import Dsn
from ..pg.naming import quote_ident

log = logging.getLogger(__name__)


class ReplicationSetupError(PgRouteError):
    """setup_replication cannot proceed; the message says what the operator must do."""


async def copy_schema(src_dsn: Dsn | str, dst_dsn: Dsn | str, *, timeout: float = 120.0) -> bool:
    """Copy the schema (no data, publications or subscriptions) from src to dst with
    pg_dump | psql, in one transaction, only when dst has no user table. True if
    copied."""
    src, dst = as_dsn(src_dsn), as_dsn(dst_dsn)
    conn = await connect(dst, 10.0)
    try:
        if await user_tables(conn):
            return False
    finally:
        await conn.close()
    schema = await run(
        [pg_binary("pg_dump"), "--schema-only", "--no-publications", "--no-subscriptions"],
        libpq_env(src),
        None,
        timeout,
    )
    await run(
        [pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-"],
        libpq_env(dst),
        schema,
        timeout,
    )
    log.info("schema copied from %s to %s", src.masked, dst.masked)
    return True


async def _wait_initial_copy(conn: asyncpg.Connection, subscription: str, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await subscription_info(conn, subscription)
        if info is None:
            raise ReplicationSetupError(f"subscription {subscription} disappeared during the initial copy")
        if info["all_ready"] and info["worker_pid"]:
            return info
        if loop.time() >= deadline:
            pending = {t: s for t, s in info["tables"].items() if s != "r"}
            raise TimeoutError(f"initial copy of {subscription} not finished within {timeout:g}s: {pending}")
        await asyncio.sleep(0.1)


async def _ensure_database(dsn: Dsn) -> bool:
    """Create the DSN's database (from the server's 'postgres' database) when the
    server says it does not exist. True if created."""
    try:
        conn = await connect(dsn, 10.0)
    except NodeUnavailable as exc:
        if not isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError):
            raise
    else:
        await conn.close()
        return False
    admin = await connect(dsn.with_dbname("postgres"), 10.0)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(dsn.dbname)}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("database %s created on %s", dsn.dbname, dsn.masked)
    return True


async def setup_replication(
    primary_dsn: Dsn | str,
    mirror_dsn: Dsn | str,
    publication: str,
    subscription: str,
    *,
    publisher_conninfo: Dsn | str | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """Create what a primary -> mirror pair needs, idempotently: publication on the
    primary, the schema on an empty mirror, the mirror's subscription with a full
    initial copy; then wait for that copy. Returns the steps, done or skipped.

    ``publisher_conninfo`` is how the mirror reaches the primary when that differs
    from how pgroute does (containers); default: the primary DSN.
    """
    primary, mirror = as_dsn(primary_dsn), as_dsn(mirror_dsn)
    steps: list[str] = []
    pconn = await connect(primary, 10.0)
    mconn = None
    try:
        level = await setting(pconn, "wal_level")
        if level != "logical":
            raise ReplicationSetupError(
                f"wal_level on the primary ({primary.masked}) is {level!r}: set wal_level = logical "
                "in its postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart it"
            )
        steps.append("primary: wal_level = logical")
        if await _ensure_database(mirror):
            steps.append(f"mirror: database {mirror.dbname} created")
        mconn = await connect(mirror, 10.0)
        p_id, m_id = await read_identity(pconn), await read_identity(mconn)
        if p_id.same_database(m_id):
            raise ReplicationSetupError(
                f"primary.dsn ({primary.masked}) and mirror.dsn ({mirror.masked}) reach the same {p_id}: "
                "point mirror.dsn at the mirror server; nothing was changed"
            )
        if await setting(mconn, "wal_level") != "logical":
            steps.append(
                "mirror: wal_level is not logical (fine for now; set it and restart the mirror "
                "before a failover, so the promoted mirror can publish its changes)"
            )
        if await ensure_publication(pconn, publication):
            steps.append(f"primary: publication {publication} created (FOR ALL TABLES)")
        else:
            steps.append(f"primary: publication {publication} already exists")

        if await copy_schema(primary, mirror):
            steps.append("mirror: schema copied from the primary")
        else:
            steps.append("mirror: has tables already, schema not copied")

        info = await subscription_info(mconn, subscription)
        if info is None:
            busy = [t for t in await user_tables(mconn) if await mconn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})")]
            if busy:
                raise ReplicationSetupError(
                    f"the mirror has rows in {', '.join(busy)} but no subscription {subscription}: "
                    "a full initial copy would conflict with them; empty those tables first"
                )
            slot = await slot_info(pconn, subscription)
            if slot is not None and not slot["active"]:
                # A leftover of an earlier subscription: it would make CREATE
                # SUBSCRIPTION fail, and a full copy makes its contents useless.
                await drop_slot(pconn, subscription)
                steps.append(f"primary: stale slot {subscription} dropped")
            await subscribe(
                mconn,
                subscription,
                publisher_conninfo or primary,
                publication,
                copy_data=True,
                create_slot=True,
            )
            steps.append(f"mirror: subscription {subscription} created (initial copy of all tables)")
        elif not info["enabled"]:
            await subscribe(
                mconn, subscription, publisher_conninfo or primary, publication, copy_data=True, create_slot=True
            )
            steps.append(f"mirror: subscription {subscription} enabled")
        else:
            steps.append(f"mirror: subscription {subscription} already exists")

        info = await _wait_initial_copy(mconn, subscription, timeout)
        steps.append(f"mirror: {len(info['tables'])} table(s) replicated and ready")
        return steps
    finally:
        await pconn.close()
        if mconn is not None:
            await mconn.close()
