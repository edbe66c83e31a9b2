"""``pgroute setup-replication``: create what a primary -> mirror pair needs, with no
daemon running. An operator tool: it may use the control plane's SQL, and nothing in
the daemon imports it.

Idempotent: every step is skipped when already done, so it can be re-run after a
failure halfway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from ..control.replication import (
    drop_slot,
    drop_subscription,
    ensure_publication,
    published_tables,
    slot_info,
    subscribe,
    subscription_info,
    user_tables,
)
from ..errors import NodeUnavailable, PgRouteError
from ..pg.catalog import read_identity, setting, tables_without_replica_identity
from ..pg.clients import plan_copy
from ..pg.connect import as_dsn, connect, describe
from ..pg.dsn import Dsn, mask_conninfo, parse_dsn
from ..pg.naming import quote_ident, quote_literal
from ..pg.passwords import find_password
from ..pg.versions import SUBSCRIPTION_STREAMING

log = logging.getLogger(__name__)


class ReplicationSetupError(PgRouteError):
    """setup_replication cannot proceed; the message says what the operator must do."""


class SameDatabaseError(ReplicationSetupError):
    """primary.dsn and mirror.dsn reach one database: a configuration error."""


_SCHEMA_DUMP = ["--schema-only", "--no-publications", "--no-subscriptions"]
_PSQL_SCRIPT = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-"]


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
    # pg_dump and psql chosen for both servers' versions (a mixed pair: pg_dump at
    # least as new as src, its output made loadable on an older dst).
    plan = await plan_copy(src, dst)
    schema = await plan.dump(src, _SCHEMA_DUMP, timeout)
    await plan.load(dst, schema, _PSQL_SCRIPT, timeout)
    log.info("schema copied from %s to %s (%s)", src.masked, dst.masked, plan.describe())
    return True


async def drop_copied_schema(src_dsn: Dsn | str, dst_dsn: Dsn | str, *, timeout: float = 120.0) -> None:
    """Undo :func:`copy_schema` on dst: the DROP statements pg_dump --clean writes for
    src's schema (exactly the objects the copy created), in one transaction."""
    src, dst = as_dsn(src_dsn), as_dsn(dst_dsn)
    plan = await plan_copy(src, dst)
    script = await plan.dump(src, [*_SCHEMA_DUMP, "--clean", "--if-exists"], timeout)
    # pg_dump --clean writes every DROP first (one statement a line), then the
    # CREATEs; keep the settings at the top and the DROPs. Not DROP EXTENSION: the
    # copy says CREATE EXTENSION IF NOT EXISTS, so the mirror may have had it before.
    drops = []
    for line in script.decode().splitlines():
        if line.startswith("CREATE ") or (line.startswith("ALTER ") and " DROP " not in line):
            break
        if line.startswith(("SET ", "SELECT pg_catalog.set_config", "DROP ", "ALTER ")) and not line.startswith(
            "DROP EXTENSION"
        ):
            drops.append(line)
    await plan.load(dst, "\n".join(drops).encode() + b"\n", _PSQL_SCRIPT, timeout)
    log.info("schema copied from %s removed from %s", src.masked, dst.masked)


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
    """Create the DSN's database (from the server's 'postgres' database). True if
    created, False if it already existed."""
    admin = await connect(dsn.with_dbname("postgres"), 10.0)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(dsn.dbname)}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("database %s created on %s", dsn.dbname, dsn.masked)
    return True


async def _database_exists(dsn: Dsn) -> bool:
    """Whether the DSN's database exists (the server is reached through it, or
    refuses it as unknown); any other failure to connect is raised."""
    try:
        conn = await connect(dsn, 10.0)
    except NodeUnavailable as exc:
        if isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError):
            return False
        raise
    await conn.close()
    return True


def _auth_failure(message: str) -> bool:
    """Whether a libpq error (as the subscriber's server reports it) is a refused
    login rather than an unreachable publisher."""
    text = message.lower()
    return any(s in text for s in ("password", "authentication failed", "no pg_hba.conf entry", "fe_sendauth"))


async def _try_subscription_conninfo(mconn: asyncpg.Connection, conninfo: str) -> str | None:
    """Have the mirror's server open ``conninfo`` as its subscription would, and
    undo it: CREATE SUBSCRIPTION without a slot (connect = true logs in to the
    publisher and reads its tables) inside a transaction that is rolled back.
    None when it worked, else the server's error (masked).

    The probe subscribes to a publication named like itself, which does not exist:
    subscribing to the real one would make the mirror's server look up every
    published table locally, and the schema copy that creates them comes later
    (a publication created beforehand, or the new mirror of a managed pair, failed
    with "relation ... does not exist")."""
    probe = f"pgroute_probe_{mconn.get_server_pid()}"
    tx = mconn.transaction()
    await tx.start()
    try:
        await mconn.execute(
            f"CREATE SUBSCRIPTION {quote_ident(probe)} CONNECTION {quote_literal(conninfo)} "
            f"PUBLICATION {quote_ident(probe)} "
            "WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE, copy_data = false, "
            f"streaming = {SUBSCRIPTION_STREAMING})"
        )
    except asyncpg.PostgresError as exc:
        return mask_conninfo(str(exc)) or type(exc).__name__
    finally:
        await tx.rollback()
    return None


async def _subscription_conninfo(
    mconn: asyncpg.Connection, publisher: Dsn | str, publication: str
) -> tuple[str, str | None]:
    """The conninfo the mirror's subscription will use, tried from the mirror's server
    before anything is created, and a note for the operator when it carries a password
    pgroute found outside the DSN. Raises ReplicationSetupError when the mirror's
    server cannot use it.

    The subscription's connection is opened by the mirror's *server*, which knows
    nothing of pgroute's environment: with no password in the DSN, the conninfo
    first goes without one (the publisher may trust the mirror, or the mirror's OS
    user may have its own passfile); when the publisher then asks for a password,
    the one pgroute itself uses for that host/port/database/user (PGPASSWORD, a
    service file, a passfile) goes into the conninfo, which PostgreSQL keeps in
    pg_subscription (readable by superusers only), as it would a DSN's password."""
    if not isinstance(publisher, Dsn):
        publisher = parse_dsn(publisher) if publisher.startswith(("postgresql://", "postgres://")) else publisher
    if not isinstance(publisher, Dsn):
        error = await _try_subscription_conninfo(mconn, publisher)
        if error is not None:
            raise ReplicationSetupError(f"the mirror's server cannot use the publisher conninfo: {error}")
        return publisher, None
    conninfo = publisher.libpq_conninfo()
    error = await _try_subscription_conninfo(mconn, conninfo)
    if error is None:
        return conninfo, None
    where = f"{publisher.host}:{publisher.port}/{publisher.dbname} as {publisher.user}"
    if not _auth_failure(error):
        raise ReplicationSetupError(
            f"the mirror's server cannot reach the primary at {where} for the subscription ({error}); "
            "the mirror must reach the primary at primary.dsn's address; nothing was changed"
        )
    found = None if publisher.password else find_password(publisher)
    if found is not None:
        with_password = publisher.libpq_conninfo(password=found.value)
        error = await _try_subscription_conninfo(mconn, with_password)
        if error is None:
            return with_password, (
                f"mirror: the subscription's connection string carries the password pgroute found in "
                f"{found.source} for {where} (kept in pg_subscription, readable by superusers only)"
            )
    raise ReplicationSetupError(
        f"the mirror's server cannot log in to the primary at {where} for the subscription ({error}); "
        "nothing was changed. The mirror's server opens that connection itself, not pgroute: "
        "give it a password that works, either in primary.dsn, PGPASSWORD, a service file or a passfile "
        "pgroute reads (pgroute then puts it in the subscription's connection string), or in a passfile "
        "of the OS user running the mirror's server (~/.pgpass of that user, a line "
        f"{publisher.host}:{publisher.port}:{publisher.dbname}:{publisher.user}:<password>)"
    )


@dataclass
class _Undo:
    """What this run created, to remove again when a later step fails, so that a
    failed setup-replication leaves both nodes as they were."""

    database: bool = False
    publication: bool = False
    schema: bool = False
    subscription: bool = False
    done: list[str] = field(default_factory=list)


async def _undo(undo: _Undo, primary: Dsn, mirror: Dsn, publication: str, subscription: str) -> list[str]:
    """Remove what ``undo`` records, each step on its own so one failure does not
    stop the others; the names of what was removed."""
    removed: list[str] = []
    if undo.subscription:
        try:
            pconn = await connect(primary, 10.0)
            mconn = await connect(mirror, 10.0)
            try:
                await drop_subscription(mconn, subscription, publisher_reachable=True, publisher_conn=pconn)
                removed.append(f"subscription {subscription} and its slot")
            finally:
                await mconn.close()
                await pconn.close()
        except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not remove subscription %s: %s", subscription, mask_conninfo(str(exc)))
    if undo.schema and not undo.database:
        try:
            await drop_copied_schema(primary, mirror)
            removed.append("the schema copied to the mirror")
        except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not remove the schema copied to the mirror: %s", mask_conninfo(str(exc)))
    if undo.database:
        try:
            admin = await connect(mirror.with_dbname("postgres"), 10.0)
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(mirror.dbname)} WITH (FORCE)")
                removed.append(f"database {mirror.dbname} on the mirror")
            finally:
                await admin.close()
        except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not drop database %s on the mirror: %s", mirror.dbname, mask_conninfo(str(exc)))
    if undo.publication:
        try:
            pconn = await connect(primary, 10.0)
            try:
                await pconn.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(publication)}")
                removed.append(f"publication {publication}")
            finally:
                await pconn.close()
        except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not drop publication %s: %s", publication, mask_conninfo(str(exc)))
    return removed


async def setup_replication(
    primary_dsn: Dsn | str,
    mirror_dsn: Dsn | str,
    publication: str,
    subscription: str,
    *,
    publisher_conninfo: Dsn | str | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """Create what a primary -> mirror pair needs, idempotently: the mirror's
    database, the publication on the primary, the schema on an empty mirror, the
    mirror's subscription with a full initial copy; then wait for that copy. Returns
    the steps, done or skipped; warnings start with "warning: ".

    Everything that can be checked is checked before the first change (wal_level,
    distinct nodes, rows on the mirror, the subscription's connection tried from the
    mirror's server); when a later step fails, what this run created is removed
    again, so a failed run leaves both nodes as they were.

    ``publisher_conninfo`` is how the mirror reaches the primary when that differs
    from how pgroute does (containers); default: the primary DSN.
    """
    primary, mirror = as_dsn(primary_dsn), as_dsn(mirror_dsn)
    steps: list[str] = []
    undo = _Undo()
    pconn = await connect(primary, 10.0)
    mconn = None
    try:
        # ---- checks: nothing changes on either node before all of them pass
        level = await setting(pconn, "wal_level")
        if level != "logical":
            raise ReplicationSetupError(
                f"wal_level on the primary ({primary.masked}) is {level!r}: set wal_level = logical "
                "in its postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart it"
            )
        steps.append("primary: wal_level = logical")
        exists = await _database_exists(mirror)
        # A mirror database that does not exist yet: checks from its server's
        # 'postgres' database (it cannot be the primary's database, nor hold rows).
        mconn = await connect(mirror if exists else mirror.with_dbname("postgres"), 10.0)
        info = None
        if exists:
            p_id, m_id = await read_identity(pconn), await read_identity(mconn)
            if p_id.same_database(m_id):
                raise SameDatabaseError(
                    f"primary.dsn ({primary.masked}) and mirror.dsn ({mirror.masked}) reach the same {p_id}: "
                    "point mirror.dsn at the mirror server; nothing was changed"
                )
            if await setting(mconn, "wal_level") != "logical":
                steps.append(
                    "mirror: wal_level is not logical (fine for now; set it and restart the mirror "
                    "before a failover, so the promoted mirror can publish its changes)"
                )
            info = await subscription_info(mconn, subscription)
            if info is None:
                busy = [
                    t for t in await user_tables(mconn) if await mconn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})")
                ]
                if busy:
                    raise ReplicationSetupError(
                        f"the mirror has rows in {', '.join(busy)} but no subscription {subscription}: "
                        "a full initial copy would conflict with them; empty those tables first; nothing was changed"
                    )
        creating = info is None or (not info["enabled"] and info["slot_name"] is None)
        conninfo: Dsn | str = publisher_conninfo or primary
        if creating:
            conninfo, note = await _subscription_conninfo(mconn, conninfo, publication)
            if note:
                steps.append(note)
        has_pub = await pconn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication)
        tables = await published_tables(pconn, publication) if has_pub else await user_tables(pconn)
        unkeyed = await tables_without_replica_identity(pconn, tables)
        if unkeyed:
            steps.append(
                f"warning: {', '.join(unkeyed)} have no primary key or replica identity: the first UPDATE or "
                "DELETE on them on the primary will fail once they are published; add a primary key "
                "(or ALTER TABLE ... REPLICA IDENTITY FULL)"
            )

        # ---- changes, each recorded so that a failure further on removes it again
        if not exists:
            await mconn.close()
            mconn = None
            if await _ensure_database(mirror):
                undo.database = True
                steps.append(f"mirror: database {mirror.dbname} created")
            mconn = await connect(mirror, 10.0)
        if await ensure_publication(pconn, publication):
            undo.publication = True
            steps.append(f"primary: publication {publication} created (FOR ALL TABLES)")
        else:
            steps.append(f"primary: publication {publication} already exists")

        if await copy_schema(primary, mirror):
            undo.schema = True
            steps.append("mirror: schema copied from the primary")
        else:
            steps.append("mirror: has tables already, schema not copied")

        if creating:
            slot = await slot_info(pconn, subscription)
            if slot is not None and not slot["active"]:
                # A leftover of an earlier subscription: it would make CREATE
                # SUBSCRIPTION fail, and a full copy makes its contents useless.
                await drop_slot(pconn, subscription)
                steps.append(f"primary: stale slot {subscription} dropped")
            undo.subscription = await subscribe(
                mconn, subscription, conninfo, publication, copy_data=True, create_slot=True
            )
            steps.append(f"mirror: subscription {subscription} created (initial copy of all tables)")
        elif info is not None and not info["enabled"]:
            await subscribe(mconn, subscription, conninfo, publication, copy_data=True, create_slot=True)
            steps.append(f"mirror: subscription {subscription} enabled")
        else:
            steps.append(f"mirror: subscription {subscription} already exists")

        info = await _wait_initial_copy(mconn, subscription, timeout)
        steps.append(f"mirror: {len(info['tables'])} table(s) replicated and ready")
        return steps
    except BaseException as exc:
        if not any((undo.database, undo.publication, undo.schema, undo.subscription)):
            raise
        if mconn is not None:
            await mconn.close()
            mconn = None
        removed = await _undo(undo, primary, mirror, publication, subscription)
        if isinstance(exc, Exception):
            what = "; removed what this run had created: " + ", ".join(removed) if removed else ""
            raise ReplicationSetupError(f"{describe(exc)}{what}") from exc
        raise
    finally:
        await pconn.close()
        if mconn is not None:
            await mconn.close()
