"""``pgroute check``: verify a primary -> mirror pair without a daemon. Every problem
found is one ``CheckItem`` with ok=False and a fix. An operator tool: it may use the
control plane's SQL, and nothing in the daemon imports it.

It is also the check to run before a planned switch (a switchover, the last step of
an upgrade through a mixed pair): logical replication carries no DDL, no large
objects and no sequences, so the items ``schema`` (DDL run on one node only),
``large objects`` and ``sequences`` say what a switch would leave behind, and
``versions`` / ``client programs`` what a pair of two PostgreSQL versions needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ..control.replication import lag_bytes, published_tables, subscription_info, user_tables
from ..errors import NodeUnavailable
from ..pg.catalog import (
    column_differences,
    read_identity,
    sample_sequences,
    setting,
    table_columns,
    tables_without_replica_identity,
)
from ..pg.clients import ClientProgramError, ServerInfo, install_hint, plan_dump, server_info
from ..pg.connect import as_dsn, connect
from ..pg.dsn import Dsn, mask_conninfo


@dataclass(frozen=True)
class CheckItem:
    """One line of ``pgroute check``: what was checked, the verdict, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warning: bool = False  # ok, but worth an operator's attention (does not fail check)
    notes: tuple[str, ...] = ()  # more lines under the item, shown whatever the verdict


#: The name of the item that says both DSNs reach one database; when it fails,
#: check_pair returns nothing after it (every other verdict would be about one
#: database seen twice) and the CLI reports it as the configuration error it is.
SAME_DATABASE_ITEM = "distinct nodes"


def _unreachable_fix(label: str, exc: NodeUnavailable) -> str:
    """The fix for a node that could not be reached, after what the server said."""
    cause = exc.__cause__
    if isinstance(cause, asyncpg.InvalidCatalogNameError):
        if label == "mirror":
            return "pgroute setup-replication (it creates the mirror's database)"
        return "create the database on the primary, or fix the database name in primary.dsn"
    if isinstance(cause, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)) or (
        "password" in str(exc).lower()
    ):
        return (
            f"fix the credentials for the {label}: the user and password in {label}.dsn, or PGPASSWORD, "
            "PGPASSFILE / ~/.pgpass or PGSERVICE, and the server's pg_hba.conf"
        )
    if isinstance(cause, asyncpg.PostgresError):
        return f"the {label} server refused the connection: see the message above and its log"
    return f"start the {label} server or fix the host and port in {label}.dsn"


async def _try_connect(dsn: Dsn, timeout: float) -> tuple[asyncpg.Connection | None, str, NodeUnavailable | None]:
    try:
        return await connect(dsn, timeout, statement_timeout=max(timeout, 5.0)), "reachable", None
    except NodeUnavailable as exc:
        return None, str(exc), exc


async def check_pair(
    primary_dsn: Dsn | str,
    mirror_dsn: Dsn | str,
    publication: str,
    subscription: str,
    timeout: float,
    *,
    max_lag_bytes: int | None = None,
) -> list[CheckItem]:
    """Verify a primary -> mirror pair; every problem found is one CheckItem with
    ok=False and a fix. Never raises for a node problem."""
    primary, mirror = as_dsn(primary_dsn), as_dsn(mirror_dsn)
    items: list[CheckItem] = []
    pconn, pdetail, perror = await _try_connect(primary, timeout)
    mconn, mdetail, merror = await _try_connect(mirror, timeout)
    try:
        nodes = (("primary", primary, pconn, pdetail, perror), ("mirror", mirror, mconn, mdetail, merror))
        for label, dsn, conn, detail, error in nodes:
            items.append(
                CheckItem(
                    f"{label} reachable",
                    conn is not None,
                    f"{dsn.masked}: {detail}" if conn is not None else detail,
                    None if error is None else _unreachable_fix(label, error),
                )
            )
        if pconn is not None and mconn is not None:
            distinct = await _check_distinct(pconn, mconn)
            items.append(distinct)
            if not distinct.ok:
                return items
        checks = []
        for label, conn in (("primary", pconn), ("mirror", mconn)):
            if conn is not None:
                checks.append(_check_roles(label, conn))
                # On the primary, the mirror's own slot is expected: inactive means
                # the mirror is not consuming, not that the slot is garbage.
                expected = {subscription} if label == "primary" else set()
                checks += [
                    _check_wal_level(label, conn),
                    _check_capacity(label, conn),
                    _check_inactive_slots(label, conn, expected),
                ]
        if pconn is not None:
            checks.append(_check_publication(pconn, publication))
            checks.append(_check_replica_identity(pconn, publication))
            checks.append(_check_lag(pconn, subscription, max_lag_bytes))
        if pconn is not None and mconn is not None:
            checks.append(_check_versions(pconn, mconn))
            checks.append(_check_schema(pconn, mconn, publication))
            checks.append(_check_sequences(pconn, mconn))
            checks.append(_check_large_objects(pconn, mconn))
        if mconn is not None:
            checks.append(_check_subscription(mconn, subscription, publication))
        for check in checks:
            try:
                items.extend(await check)
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                name = getattr(check, "__name__", "check").lstrip("_").replace("check_", "").replace("_", " ")
                items.append(CheckItem(name, False, f"check failed: {mask_conninfo(str(exc))}", None))
    finally:
        for conn in (pconn, mconn):
            if conn is not None:
                await conn.close()
    return items


async def _check_distinct(pconn: asyncpg.Connection, mconn: asyncpg.Connection) -> CheckItem:
    """Two DSNs naming one server (127.0.0.1 and localhost, an alias, a proxy) would
    make pgroute fence and resync the live database against itself."""
    p, m = await read_identity(pconn), await read_identity(mconn)
    if p.same_database(m):
        return CheckItem(
            SAME_DATABASE_ITEM,
            False,
            f"primary.dsn and mirror.dsn reach the same {p}",
            "point mirror.dsn at the mirror server; pgroute run refuses to start like this",
        )
    return CheckItem("distinct nodes", True, f"primary is system {p.system_identifier}, mirror {m.system_identifier}")


async def _published_or_user_tables(conn: asyncpg.Connection, publication: str) -> list[str]:
    """The tables the publication publishes; every user table while it does not
    exist (setup-replication creates it FOR ALL TABLES)."""
    if await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", publication):
        return await published_tables(conn, publication)
    return await user_tables(conn)


async def _check_replica_identity(conn: asyncpg.Connection, publication: str) -> list[CheckItem]:
    """A published table with no primary key and no replica identity: the primary
    refuses the first UPDATE or DELETE on it."""
    unkeyed = await tables_without_replica_identity(conn, await _published_or_user_tables(conn, publication))
    if not unkeyed:
        return [CheckItem("replica identity", True, "every published table has a primary key or replica identity")]
    return [
        CheckItem(
            "replica identity",
            True,
            f"{', '.join(unkeyed)} have no primary key or replica identity: once published, "
            "the first UPDATE or DELETE on them fails on the primary",
            f"add a primary key, or ALTER TABLE {unkeyed[0]} REPLICA IDENTITY FULL (slower on the mirror)",
            warning=True,
        )
    ]


async def _check_schema(pconn: asyncpg.Connection, mconn: asyncpg.Connection, publication: str) -> list[CheckItem]:
    """Logical replication carries no DDL: a column added on the primary only stops
    the apply worker, and a failover onto a mirror without it breaks applications."""
    tables = await _published_or_user_tables(pconn, publication)
    differences = column_differences(await table_columns(pconn, tables), await table_columns(mconn, tables))
    if not differences:
        return [
            CheckItem(
                "schema",
                True,
                f"the mirror has the {len(tables)} published table(s) column for column "
                "(no DDL run on one node only: run check again right before a planned switch)",
            )
        ]
    shown = "; ".join(differences[:20]) + (f"; and {len(differences) - 20} more" if len(differences) > 20 else "")
    return [
        CheckItem(
            "schema",
            False,
            f"the mirror differs from the primary: {shown}",
            "run the same DDL on the mirror as on the primary (logical replication does not carry DDL: "
            "a difference here is DDL run on one node only, e.g. during an upgrade's replication window)",
        )
    ]


def _mixed_pair_limits(p: ServerInfo, m: ServerInfo) -> list[str]:
    """What a pair of two major versions cannot use: what its older version lacks.
    Each claim was tried on 15 <-> 18 pairs (tests/integration/test_mixed_versions.py)."""
    older = min(p.major, m.major)
    notes = []
    if older < 16:
        notes.append(
            f"while the PostgreSQL {older} node subscribes, no subscription options of 16+: "
            "streaming = parallel, origin, run_as_owner, password_required"
        )
    if older < 17:
        notes.append(
            f"no failover slots (failover = true, 17+): a PostgreSQL {older} subscriber does not know the option "
            f"and a PostgreSQL {older} publisher cannot create such a slot"
        )
    if p.major > m.major:
        notes.append(
            f"copy or replicate into the PostgreSQL {m.major} mirror a table using what {m.major} lacks "
            f"(setup-replication dumps the schema with pg_dump {p.major} and removes the session settings "
            f"{m.major} does not have; anything else {m.major} rejects fails the copy, which changes nothing)"
        )
    return notes


async def _check_versions(pconn: asyncpg.Connection, mconn: asyncpg.Connection) -> list[CheckItem]:
    """Each node's server version; for a mixed pair, what it cannot do; and the
    pg_dump/psql pgroute would run against each (setup-replication's schema copy, the
    dump before a resync): never older than the server they talk to."""
    p, m = await server_info(pconn), await server_info(mconn)
    detail = f"primary: PostgreSQL {p.version}, mirror: PostgreSQL {m.version}"
    mixed = p.major != m.major
    items = [
        CheckItem(
            "versions",
            True,
            detail + (" (a mixed pair: replication works both ways)" if mixed else ""),
            warning=mixed,
            notes=tuple(f"cannot: {n}" for n in _mixed_pair_limits(p, m)) if mixed else (),
        )
    ]
    uses: list[tuple[str, ServerInfo, ServerInfo | None]] = [
        ("the primary's resync dump", p, None),
        ("the mirror's resync dump", m, None),
        ("the schema copy primary -> mirror", p, m),
    ]
    plans, missing = [], []
    for what, source, target in uses:
        try:
            plans.append((what, plan_dump(source, target)))
        except ClientProgramError:
            missing.append(source.major)
    chosen = tuple(f"{what}: pg_dump {plan.programs.version} ({plan.programs.bindir})" for what, plan in plans)
    if missing:
        need = max(missing)
        programs = CheckItem(
            "client programs",
            False,
            f"no pg_dump of PostgreSQL {need} or newer here: pg_dump refuses a newer server, and pgroute "
            "runs it for setup-replication's schema copy and before a resync",
            f"install one: {install_hint(need)}",
            notes=chosen,
        )
    else:
        versions = ", ".join(sorted({plan.programs.version for _, plan in plans}))
        programs = CheckItem(
            "client programs", True, f"pg_dump/psql {versions} (never older than the server they dump)", notes=chosen
        )
    return [*items, programs]


async def _check_sequences(pconn: asyncpg.Connection, mconn: asyncpg.Connection) -> list[CheckItem]:
    """Logical replication copies no sequence: pgroute moves them at promotion, which
    needs each of the primary's sequences to exist on the mirror."""
    p, m = await sample_sequences(pconn), await sample_sequences(mconn)
    absent = sorted(set(p.values) - set(m.values))
    if absent:
        return [
            CheckItem(
                "sequences",
                False,
                f"{', '.join(absent)} missing on the mirror: after a switch the applications' nextval() fails "
                "there, and pgroute cannot move it past the data",
                "create them on the mirror as on the primary (logical replication does not carry DDL)",
            )
        ]
    unfed = sorted(p.unfed)
    detail = (
        f"{len(p.values)} sequence(s), all on the mirror; logical replication does not copy them: "
        "pgroute moves each past the data at promotion (plus replication.sequence_gap)"
    )
    if unfed:
        detail += (
            f"; {', '.join(unfed)} feed(s) no column: moved past the last value the running pgroute "
            "sampled on the active node, projected by its draw rate"
        )
    return [CheckItem("sequences", True, detail)]


async def _check_large_objects(pconn: asyncpg.Connection, mconn: asyncpg.Connection) -> list[CheckItem]:
    """Logical replication does not copy large objects (pg_largeobject is a catalog):
    a switch leaves them behind on the node that had them."""
    counts = {}
    for label, conn in (("primary", pconn), ("mirror", mconn)):
        counts[label] = int(await conn.fetchval("SELECT count(*) FROM pg_largeobject_metadata"))
    if not any(counts.values()):
        return [CheckItem("large objects", True, "none on either node")]
    return [
        CheckItem(
            "large objects",
            True,
            f"primary {counts['primary']}, mirror {counts['mirror']}: logical replication does not copy large "
            "objects, so after a switch the applications see the other node's (or none)",
            "keep that data in bytea columns (replicated), or copy the large objects to the other node yourself "
            "before a switch (lo_export / lo_import)",
            warning=True,
        )
    ]


async def _check_roles(label: str, conn: asyncpg.Connection) -> list[CheckItem]:
    """pgroute's own role must be a superuser (ALTER SYSTEM, subscriptions, and a fence
    that closes the database to every other role); any other superuser that can log in
    can write to a fenced node, since no fence PostgreSQL offers stops a superuser."""
    me = await conn.fetchrow("SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user")
    items = []
    if not me["rolsuper"]:
        items.append(
            CheckItem(
                f"{label} pgroute role",
                False,
                f"{me['name']} is not a superuser",
                f"connect pgroute as a superuser on the {label} (fencing, promotion and subscriptions need one)",
            )
        )
    others = [
        r["rolname"]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolsuper AND rolcanlogin AND rolname <> current_user ORDER BY 1"
        )
    ]
    if others:
        items.append(
            CheckItem(
                f"{label} superusers",
                True,
                f"{', '.join(others)} can log in as superuser(s): a fenced node cannot stop them writing",
                "give applications roles without SUPERUSER (ALTER ROLE ... NOSUPERUSER)",
                warning=True,
            )
        )
    return items


async def _check_wal_level(label: str, conn: asyncpg.Connection) -> list[CheckItem]:
    level = await setting(conn, "wal_level")
    why = "to publish" if label == "primary" else "so that a promoted mirror can publish (failback)"
    return [
        CheckItem(
            f"{label} wal_level",
            level == "logical",
            f"wal_level = {level}",
            None
            if level == "logical"
            else f"ALTER SYSTEM SET wal_level = logical on the {label} and restart it ({why})",
        )
    ]


async def _check_capacity(label: str, conn: asyncpg.Connection) -> list[CheckItem]:
    row = await conn.fetchrow(
        """
        SELECT current_setting('max_replication_slots')::int AS max_slots,
               (SELECT count(*) FROM pg_replication_slots)::int AS slots,
               current_setting('max_wal_senders')::int AS max_senders,
               (SELECT count(*) FROM pg_stat_replication)::int AS senders
        """
    )
    # Room for one more slot and sender: the reverse subscription after a failover,
    # or a table-sync worker's temporary slot during a resync.
    ok = (
        row["max_slots"] - row["slots"] >= 1
        and row["max_senders"] - row["senders"] >= 1
        and row["max_slots"] >= 2
        and row["max_senders"] >= 2
    )
    return [
        CheckItem(
            f"{label} replication capacity",
            ok,
            f"slots {row['slots']}/{row['max_slots']}, walsenders {row['senders']}/{row['max_senders']}",
            None if ok else f"raise max_replication_slots / max_wal_senders on the {label} (restart needed)",
        )
    ]


async def _check_inactive_slots(label: str, conn: asyncpg.Connection, expected: set[str]) -> list[CheckItem]:
    rows = await conn.fetch(
        """
        SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
        FROM pg_replication_slots WHERE NOT active ORDER BY slot_name
        """
    )
    if not rows:
        return [CheckItem(f"{label} inactive slots", True, "none", None)]
    names = ", ".join(f"{r['slot_name']} ({r['retained'] or 0} bytes of WAL retained)" for r in rows)
    stale = [r["slot_name"] for r in rows if r["slot_name"] not in expected]
    if stale:
        fix = f"drop the ones nobody will resume: SELECT pg_drop_replication_slot('{stale[0]}') on the {label}"
    else:
        fix = (
            "the mirror is not consuming its slot: start the mirror or enable its subscription; "
            "do not drop the slot unless the mirror will be fully resynchronised"
        )
    return [CheckItem(f"{label} inactive slots", False, f"holding WAL: {names}", fix)]


async def _check_publication(conn: asyncpg.Connection, publication: str) -> list[CheckItem]:
    row = await conn.fetchrow("SELECT puballtables FROM pg_publication WHERE pubname = $1", publication)
    if row is None:
        return [
            CheckItem(
                "publication",
                False,
                f"publication {publication} does not exist on the primary",
                "pgroute setup-replication (or CREATE PUBLICATION ... FOR ALL TABLES on the primary)",
            )
        ]
    left_out = set(await user_tables(conn)) - set(await published_tables(conn, publication))
    # No publication can carry an unlogged table (it writes no WAL): a separate
    # warning with the fix that works, not "ADD TABLE", which PostgreSQL refuses.
    unlogged = sorted(left_out & set(await _unlogged_tables(conn)))
    missing = sorted(left_out - set(unlogged))
    items = []
    if unlogged:
        items.append(
            CheckItem(
                "unlogged tables",
                True,
                f"{', '.join(unlogged)} are unlogged: logical replication never carries them, so they are "
                "empty on the other node after a switch",
                "ALTER TABLE ... SET LOGGED to replicate them (a full rewrite), or accept that they start empty",
                warning=True,
            )
        )
    if missing:
        return [
            CheckItem(
                "publication",
                False,
                f"publication {publication} does not cover {', '.join(missing)}",
                f"ALTER PUBLICATION {publication} ADD TABLE ... (or recreate it FOR ALL TABLES)",
            ),
            *items,
        ]
    scope = "all tables" if row["puballtables"] else "every table (listed)"
    if unlogged:
        scope += ", unlogged ones excepted"
    return [CheckItem("publication", True, f"publication {publication} covers {scope}", None), *items]


async def _unlogged_tables(conn: asyncpg.Connection) -> list[str]:
    """Quoted 'schema.table' of the unlogged tables, named as user_tables names them."""
    rows = await conn.fetch(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u'"
    )
    return [r["name"] for r in rows]


async def _check_subscription(conn: asyncpg.Connection, subscription: str, publication: str) -> list[CheckItem]:
    info = await subscription_info(conn, subscription)
    if info is None:
        return [
            CheckItem(
                "subscription",
                False,
                f"subscription {subscription} does not exist on the mirror",
                "pgroute setup-replication",
            )
        ]
    problems = []
    fix = None
    if not info["enabled"]:
        problems.append("disabled")
        fix = f"ALTER SUBSCRIPTION {subscription} ENABLE on the mirror"
    elif not info["worker_pid"]:
        problems.append("no apply worker running (publisher unreachable or apply errors: see the mirror's log)")
        fix = "check the mirror's log for the apply worker's error"
    if publication not in info["publications"]:
        problems.append(f"subscribes to {info['publications']}, not {publication}")
        fix = fix or f"ALTER SUBSCRIPTION {subscription} SET PUBLICATION {publication}"
    pending = {t: s for t, s in info["tables"].items() if s != "r"}
    if pending:
        problems.append(f"tables not ready: {pending}")
        fix = fix or "wait for the initial copy; if it does not progress, see the mirror's log"
    if not info["tables"]:
        problems.append("no tables subscribed")
        fix = fix or f"ALTER SUBSCRIPTION {subscription} REFRESH PUBLICATION"
    if info["apply_error_count"] or info["sync_error_count"]:
        problems.append(f"{info['apply_error_count']} apply / {info['sync_error_count']} sync error(s) so far")
    if problems:
        return [CheckItem("subscription", False, f"{subscription}: " + "; ".join(problems), fix)]
    return [
        CheckItem(
            "subscription",
            True,
            f"{subscription}: enabled, worker {info['worker_pid']}, {len(info['tables'])} table(s) ready",
            None,
        )
    ]


async def _check_lag(conn: asyncpg.Connection, subscription: str, max_lag: int | None) -> list[CheckItem]:
    lag = await lag_bytes(conn, subscription)
    if lag is None:
        return [
            CheckItem(
                "replication lag",
                False,
                f"the primary has no walsender and no slot named {subscription}",
                "pgroute setup-replication",
            )
        ]
    connected = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", subscription
    )
    if not connected:
        return [
            CheckItem(
                "replication lag",
                False,
                f"mirror not connected; its slot is {lag} bytes behind",
                "check that the mirror is up and its subscription enabled",
            )
        ]
    ok = max_lag is None or lag <= max_lag
    return [
        CheckItem(
            "replication lag",
            ok,
            f"{lag} bytes behind",
            None if ok else "the mirror is too far behind for an automatic failover: see its apply worker",
        )
    ]
