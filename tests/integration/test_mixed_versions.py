"""Mixed-version pairs: a PostgreSQL 15 primary with an 18 mirror, and the reverse.

One compact scenario per feature, each run in both directions: setup-replication on
two fresh servers (the schema dumped by a pg_dump at least as new as the primary and
loaded into the mirror, older or newer), probes and health, kill -9 failover under a
writer, rejoin with divergent commits, failback, switchover, synchronous mode, and
what ``pgroute check`` says about such a pair. The version-specific facts the check
reports (subscription options a 15 node lacks) are tried here on real servers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pgroute import local
from pgroute.cli import main
from pgroute.errors import LocalClusterError
from pgroute.pg import clients
from pgroute.pg.catalog import column_differences, table_columns
from pgroute.pg.connect import connect
from pgroute.pg.dsn import parse_dsn
from pgroute.tools.setup import copy_schema, drop_copied_schema, setup_replication

from .harness import (
    Writer,
    api_async,
    make_config,
    missing,
    proxy_dsn,
    running_pgroute,
    wait_following,
    wait_for,
    wait_state,
    write_config_file,
)
from .harness import status as _status

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

DIRECTIONS = [pytest.param((15, 18), id="15-to-18"), pytest.param((18, 15), id="18-to-15")]

# A schema with what pg_dump writes besides plain tables: serial, identity, a
# free-standing sequence, a view, an index, a function, a check constraint.
SCHEMA = (
    local.DEFAULT_SCHEMA
    + """
CREATE INDEX pedidos_usuario ON pedidos (usuario_id);
CREATE VIEW usuarios_con_pedidos AS SELECT u.id, u.nombre FROM usuarios u WHERE EXISTS (
    SELECT 1 FROM pedidos p WHERE p.usuario_id = u.id);
CREATE FUNCTION total_de(uid int) RETURNS numeric LANGUAGE sql AS
    'SELECT coalesce(sum(total), 0) FROM pedidos WHERE usuario_id = uid';
ALTER TABLE pedidos ADD CONSTRAINT total_positivo CHECK (total >= 0);
"""
)

# How a PostgreSQL 15 subscriber refuses the subscription options of 16+.
REFUSED_OPTION = r"streaming requires a Boolean value|unrecognized subscription parameter"

CLEAN_ENV: dict[str, str | None] = {
    "PGROUTE_CONFIG": None,
    "PGROUTE_PRIMARY_DSN": None,
    "PGROUTE_MIRROR_DSN": None,
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
}


def _check_blocking(config: Path) -> Result:
    result = CliRunner().invoke(main, ["check", "--config", str(config)], env=CLEAN_ENV)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


async def _check(config: Path) -> Result:
    """`pgroute check --config` (it runs its own event loop: in a thread)."""
    return await asyncio.to_thread(_check_blocking, config)


def _marks(output: str) -> dict[str, str]:
    """`pgroute check` output -> {item name: '✓', '!' or '✗'}."""
    return {
        line[2:].partition(":")[0].strip(): line[0] for line in output.splitlines() if line[:2] in ("✓ ", "! ", "✗ ")
    }


async def _shape(dsn: str) -> dict:
    conn = await connect(dsn, 10.0)
    try:
        tables = [
            r["t"]
            for r in await conn.fetch(
                "SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables WHERE schemaname = 'public'"
            )
        ]
        return await table_columns(conn, tables)
    finally:
        await conn.close()


def _major(cluster: local.LocalCluster) -> int:
    return int(cluster.sql("SELECT current_setting('server_version_num')::int / 10000"))


# -- setup-replication -------------------------------------------------------------------
@pytest.mark.parametrize("versions", DIRECTIONS)
async def test_setup_replication_between_two_versions(cluster_factory, versions) -> None:
    primary = cluster_factory("src", version=versions[0])
    mirror = cluster_factory("dst", version=versions[1])
    assert (_major(primary), _major(mirror)) == versions
    primary.sql("CREATE DATABASE chrispar")
    primary.sql(
        SCHEMA + "INSERT INTO usuarios (nombre, email) VALUES ('ana', 'a@x'), ('luis', 'l@x');"
        "INSERT INTO pedidos (usuario_id, total) VALUES (1, 10), (1, 5), (2, 7);",
        dbname="chrispar",
    )
    p_dsn, m_dsn = primary.dsn("chrispar"), mirror.dsn("chrispar")

    # Undo of a schema copy (setup-replication's rollback) on a spare database, both ways.
    mirror.sql("CREATE DATABASE spare")
    assert await copy_schema(p_dsn, mirror.dsn("spare"))
    assert mirror.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", dbname="spare") == "3"
    await drop_copied_schema(p_dsn, mirror.dsn("spare"))
    assert mirror.sql("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace", "spare") == "0"

    steps = await setup_replication(p_dsn, m_dsn, "chrispar_pub", "chrispar_sub")
    assert "mirror: schema copied from the primary" in steps, steps
    assert "mirror: 3 table(s) replicated and ready" in steps, steps
    assert not [s for s in steps if s.startswith("warning")], steps
    # The whole schema arrived, not only the tables: view, function, sequence, constraint.
    assert mirror.sql("SELECT total_de(1)", dbname="chrispar") == "15"
    assert mirror.sql("SELECT string_agg(nombre, ',' ORDER BY id) FROM usuarios_con_pedidos", "chrispar") == "ana,luis"
    assert mirror.sql("SELECT nextval('folio_seq')", dbname="chrispar") == "1"
    with pytest.raises(LocalClusterError, match="total_positivo"):
        mirror.sql("INSERT INTO pedidos (usuario_id, total) VALUES (1, -1)", dbname="chrispar")
    assert column_differences(await _shape(p_dsn), await _shape(m_dsn)) == []
    # And it replicates.
    primary.sql("INSERT INTO usuarios (nombre, email) VALUES ('eva', 'e@x')", dbname="chrispar")
    await wait_for(
        lambda: mirror.sql("SELECT count(*) FROM usuarios", dbname="chrispar") == "3", 30, what="replicated insert"
    )


# -- failover, rejoin with divergent commits, failback -----------------------------------
@pytest.mark.parametrize("versions", DIRECTIONS)
async def test_failover_rejoin_and_failback_lose_nothing(pair_factory, tmp_path, versions) -> None:
    pair = pair_factory(primary_version=versions[0], mirror_version=versions[1])
    config = make_config(pair, tmp_path, health={"max_lag_bytes": 1 << 30})
    async with running_pgroute(config) as running:
        await wait_following(running)
        status, body = await api_async(running, "/api/health")
        assert (status, body["status"], body["database"]) == (200, "healthy", "primary"), body
        assert all(_status(running)["nodes"][n]["up"] for n in ("primary", "mirror"))

        writer = Writer(proxy_dsn(running)).start()
        await writer.wait_acked(20)
        # Commits the mirror never receives (its subscription disabled), then kill -9.
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub DISABLE", dbname="chrispar")
        start = len(writer.acks)
        await writer.wait_acked(10)
        pair.primary.kill()
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub ENABLE", dbname="chrispar")
        divergent = writer.acks[start:]
        await wait_state(running, lambda s: s["active"] == "mirror", 30, "failover")
        await writer.wait_acked(20)
        assert await missing(pair.mirror_dsn(), divergent)

        pair.primary.start()
        await wait_state(
            running,
            lambda s: s["nodes"]["primary"]["subscription"] is not None and s["replication"] == "ok",
            90,
            "primary rejoined",
        )
        assert await missing(pair.mirror_dsn(), divergent) == []
        rejoin = next(e for e in _status(running)["events"] if e["kind"] == "rejoin")
        assert rejoin["result"] == "ok" and rejoin["details"]["mode"] == "full resync", rejoin
        assert int(rejoin["details"]["divergent_transactions"]) >= 1
        # The dump before the resync was taken with the primary's own major version.
        head = Path(rejoin["details"]["pg_dump"]).read_text()[:2000]
        assert f"Dumped from database version {versions[0]}." in head
        assert f"Dumped by pg_dump version {versions[0]}." in head

        status, body = await api_async(running, "/api/failback", "POST", {})
        assert status == 200 and body["result"] == "ok", body
        await writer.wait_acked(20)
        await writer.stop()
        assert _status(running)["active"] == "primary"
        await wait_following(running)
    # Every acknowledged commit, divergent ones included, is on both nodes.
    assert await missing(pair.primary_dsn(), writer.acks) == []
    pair.wait_synced()
    assert await missing(pair.mirror_dsn(), writer.acks) == []
    assert not writer.errors["UniqueViolationError"], writer.error_samples()


# -- switchover and synchronous mode -----------------------------------------------------
def _sync_state(cluster: local.LocalCluster, subscription: str) -> str:
    return cluster.sql(f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{subscription}'")


@pytest.mark.parametrize("versions", DIRECTIONS)
async def test_switchover_both_ways_in_synchronous_mode(pair_factory, tmp_path, versions) -> None:
    pair = pair_factory(primary_version=versions[0], mirror_version=versions[1])
    config = make_config(pair, tmp_path, replication={"synchronous": "on"})
    async with running_pgroute(config) as running:
        await wait_following(running)
        await wait_for(lambda: _sync_state(pair.primary, "chrispar_sub") == "sync", 30, what="synchronous mirror")
        writer = Writer(proxy_dsn(running), pause=0.0).start()
        await writer.wait_acked(30)

        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200 and body["result"] == "ok", body
        await writer.wait_acked(30)
        assert _status(running)["active"] == "mirror"
        await wait_following(running)
        # The newly active node (the other version) keeps the old one synchronous.
        await wait_for(lambda: _sync_state(pair.mirror, "chrispar_sub_rev") == "sync", 30, what="synchronous primary")
        synchronous_since = time.monotonic()
        await writer.wait_acked(30)
        # Synchronous: a commit sent once the standby is synchronous is on it when
        # acknowledged, without waiting for it to catch up.
        acked = [a for a in writer.acks if a.started > synchronous_since]
        assert acked and await missing(pair.primary_dsn(), acked) == []

        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200 and body["result"] == "ok", body
        await writer.wait_acked(30)
        await writer.stop()
        assert _status(running)["active"] == "primary"
        await wait_following(running)
        await wait_for(lambda: _sync_state(pair.primary, "chrispar_sub") == "sync", 30, what="synchronous mirror")
    assert await missing(pair.primary_dsn(), writer.acks) == []
    pair.wait_synced()
    assert await missing(pair.mirror_dsn(), writer.acks) == []


# -- pgroute check -----------------------------------------------------------------------
@pytest.mark.parametrize("versions", DIRECTIONS)
async def test_check_shows_versions_limits_and_what_replication_leaves_behind(pair_factory, tmp_path, versions) -> None:
    pair = pair_factory(primary_version=versions[0], mirror_version=versions[1])
    cfg = write_config_file(tmp_path / "pgroute.toml", pair.primary_dsn(), pair.mirror_dsn())
    older = pair.primary if versions[0] < versions[1] else pair.mirror
    newer = pair.mirror if older is pair.primary else pair.primary

    ok = await _check(cfg)
    assert ok.exit_code == 0, ok.output
    marks = _marks(ok.stdout)
    assert marks["versions"] == "!" and marks["client programs"] == "✓", ok.output
    p_ver, m_ver = (
        pair.primary.sql("SHOW server_version").split()[0],
        pair.mirror.sql("SHOW server_version").split()[0],
    )
    assert f"versions: primary: PostgreSQL {p_ver}, mirror: PostgreSQL {m_ver}" in ok.stdout
    assert "streaming = parallel, origin, run_as_owner, password_required" in ok.stdout
    assert "no failover slots (failover = true, 17+)" in ok.stdout
    assert f"the schema copy primary -> mirror: pg_dump {max(versions)}." in ok.stdout
    assert f"the primary's resync dump: pg_dump {versions[0]}." in ok.stdout
    assert f"the mirror's resync dump: pg_dump {versions[1]}." in ok.stdout
    assert marks["schema"] == "✓" and marks["sequences"] == "✓" and marks["large objects"] == "✓", ok.output
    assert "folio_seq" in ok.stdout and "pgroute moves each past the data at promotion" in ok.stdout

    # What the limits say, tried: the older node as subscriber refuses the newer
    # options; a failover slot cannot be created on it as publisher.
    newer.sql("CREATE PUBLICATION probe_pub FOR TABLE usuarios", dbname="chrispar")
    for option in ("streaming = parallel", "origin = none", "run_as_owner = true", "password_required = false"):
        with pytest.raises(LocalClusterError, match=REFUSED_OPTION):
            older.sql(
                f"CREATE SUBSCRIPTION probe CONNECTION '{newer.dsn('chrispar')}' PUBLICATION probe_pub "
                f"WITH ({option}, connect = false)",
                dbname="chrispar",
            )
    older.sql("CREATE PUBLICATION probe_pub FOR TABLE usuarios", dbname="chrispar")
    with pytest.raises(LocalClusterError, match="unrecognized option: failover"):
        newer.sql(
            f"CREATE SUBSCRIPTION probe CONNECTION '{older.dsn('chrispar')}' PUBLICATION probe_pub "
            "WITH (failover = true, copy_data = false)",
            dbname="chrispar",
        )
    for cluster in (older, newer):
        cluster.sql("DROP PUBLICATION probe_pub", dbname="chrispar")

    # What logical replication does not carry, each reported: a large object, a
    # sequence and a column created on the primary only (DDL in the window).
    pair.primary.sql(
        "SELECT lo_from_bytea(0, 'scan'::bytea); CREATE SEQUENCE factura_seq;"
        "ALTER TABLE usuarios ADD COLUMN telefono text",
        dbname="chrispar",
    )
    drift = await _check(cfg)
    assert drift.exit_code == 1, drift.output
    marks = _marks(drift.stdout)
    assert marks["large objects"] == "!" and "large objects: primary 1, mirror 0" in drift.stdout, drift.output
    assert marks["sequences"] == "✗" and '"public"."factura_seq" missing on the mirror' in drift.stdout
    assert marks["schema"] == "✗" and "public.usuarios.telefono is missing on the mirror" in drift.stdout
    assert "DDL run on one node only" in drift.stdout

    # A publication that lists its tables: the ones it leaves out are named.
    pair.primary.sql("CREATE PUBLICATION listed_pub FOR TABLE usuarios, pedidos", dbname="chrispar")
    listed = write_config_file(
        tmp_path / "listed.toml", pair.primary_dsn(), pair.mirror_dsn(), replication={"publication": "listed_pub"}
    )
    out = await _check(listed)
    assert "✗ publication: publication listed_pub does not cover public.empleados" in out.stdout, out.output


async def test_no_pg_dump_new_enough_is_an_error_naming_what_to_install(pair, tmp_path, monkeypatch) -> None:
    # Only client programs older than the servers: pg_dump would refuse them, so
    # check fails the item with what to install, and a dump is refused before it runs.
    major = _major(pair.primary)
    older = [clients.ClientPrograms(Path("/nowhere/bin"), f"{major - 1}.9")]
    monkeypatch.setattr(clients, "installed_programs", lambda: older)
    cfg = write_config_file(tmp_path / "pgroute.toml", pair.primary_dsn(), pair.mirror_dsn())
    result = await _check(cfg)
    assert result.exit_code == 1, result.output
    assert _marks(result.stdout)["client programs"] == "✗", result.output
    assert f"no pg_dump of PostgreSQL {major} or newer here" in result.stdout
    assert f"fix: install one: apt-get install postgresql-client-{major}" in result.stdout
    with pytest.raises(clients.ClientProgramError, match=f"postgresql-client-{major}"):
        await clients.dump_database(parse_dsn(pair.primary_dsn()), tmp_path / "never.sql")
    assert not (tmp_path / "never.sql").exists()
