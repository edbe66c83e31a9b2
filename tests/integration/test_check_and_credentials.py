"""`pgroute check` telling the truth, and credentials kept out of the DSN the libpq
way (PGPASSWORD, PGPASSFILE, PGSERVICE), against real PostgreSQL servers.

The local servers trust the ``postgres`` user; the password tests add a superuser
``app`` that must log in with scram-sha-256 (a pg_hba.conf line before the trust
ones), so a password that does not arrive fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pgroute import local
from pgroute.cli import main
from pgroute.pg.connect import connect
from pgroute.tools.setup import ReplicationSetupError, setup_replication

CLEAN_ENV: dict[str, str | None] = {
    "PGROUTE_API_URL": None,
    "PGROUTE_API_TOKEN": None,
    "PGROUTE_CONFIG": None,
    "PGROUTE_PRIMARY_DSN": None,
    "PGROUTE_MIRROR_DSN": None,
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
    "PGPASSWORD": None,
    "PGPASSFILE": None,
    "PGSERVICE": None,
    "PGSERVICEFILE": None,
}
SECRET = "s3cret-Pass"


def _cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _config(path: Path, primary_dsn: str, mirror_dsn: str) -> str:
    path.write_text(f"[primary]\ndsn = {json.dumps(primary_dsn)}\n[mirror]\ndsn = {json.dumps(mirror_dsn)}\n")
    return str(path)


def _require_password(cluster: local.LocalCluster, user: str = "app") -> None:
    """A superuser ``user`` with SECRET as its password, which the server asks for."""
    cluster.sql(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{SECRET}'")
    hba = cluster.datadir / "pg_hba.conf"
    hba.write_text(f"host all {user} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    cluster.sql("SELECT pg_reload_conf()")


# -- section 4: check ------------------------------------------------------------------------
def test_check_gives_one_verdict_when_both_dsns_reach_one_database(pair: local.LocalPair, tmp_path: Path) -> None:
    # Two spellings of one server (127.0.0.1 and localhost): the configuration loads,
    # only the servers can tell it is one database.
    alias = pair.primary_dsn().replace("@127.0.0.1:", "@localhost:")
    cfg = _config(tmp_path / "same.toml", pair.primary_dsn(), alias)
    result = _cli("check", "--config", cfg)
    assert result.exit_code == 2, result.output
    assert "✗ configuration: mirror.dsn: primary.dsn and mirror.dsn reach the same database" in result.stdout
    assert "is valid" not in result.output
    assert "setup-replication" not in result.output
    assert "distinct nodes" not in result.output
    assert "publication" not in result.output and "subscription" not in result.output

    # setup-replication says the same, with the same status, and changes nothing.
    setup = _cli("setup-replication", "--config", cfg)
    assert setup.exit_code == 2, setup.output
    assert "configuration error: mirror.dsn:" in setup.output and "nothing was changed" in setup.output


def test_check_fixes_match_the_cause(pair: local.LocalPair, tmp_path: Path) -> None:
    # The mirror's database does not exist: setup-replication creates it.
    missing = _config(tmp_path / "missing.toml", pair.primary_dsn(), pair.mirror.dsn("nueva"))
    result = _cli("check", "--config", missing)
    assert result.exit_code == 1, result.output
    assert "✗ mirror reachable" in result.stdout
    assert "    fix: pgroute setup-replication (it creates the mirror's database)" in result.stdout
    assert "start the mirror server" not in result.output

    # A wrong password: the credentials, not the server.
    _require_password(pair.mirror)
    wrong = _config(
        tmp_path / "wrong.toml", pair.primary_dsn(), pair.mirror.dsn(pair.dbname, user="app", password="nope")
    )
    result = _cli("check", "--config", wrong)
    assert result.exit_code == 1, result.output
    assert "✗ mirror reachable" in result.stdout
    assert "    fix: fix the credentials for the mirror" in result.stdout
    assert "start the mirror server" not in result.output
    assert "nope" not in result.output

    # No password at all (none in the DSN, none in the environment): credentials too.
    nopw = _config(tmp_path / "nopw.toml", pair.primary_dsn(), pair.mirror.dsn(pair.dbname, user="app"))
    result = _cli("check", "--config", nopw)
    assert "    fix: fix the credentials for the mirror" in result.stdout, result.output

    # A stopped server: start it.
    pair.mirror.stop()
    result = _cli("check", "--config", missing)
    assert "    fix: start the mirror server or fix the host and port in mirror.dsn" in result.stdout


def test_check_warns_about_tables_without_replica_identity_and_reports_schema_drift(
    pair: local.LocalPair, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "pgroute.toml", pair.primary_dsn(), pair.mirror_dsn())
    for node in (pair.primary, pair.mirror):
        node.sql("CREATE TABLE registro (momento timestamptz, texto text)", dbname=pair.dbname)
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub REFRESH PUBLICATION", dbname=pair.dbname)
    result = _cli("check", "--config", cfg)
    assert "! replica identity: public.registro have no primary key or replica identity" in result.stdout, result.output
    assert "✓ schema: the mirror has the" in result.stdout, result.output

    # DDL on the primary only (logical replication does not carry it).
    pair.primary.sql(
        "ALTER TABLE usuarios ADD COLUMN telefono text; ALTER TABLE empleados ALTER COLUMN nombre SET NOT NULL;"
        "ALTER TABLE registro ALTER COLUMN texto TYPE varchar(40)",
        dbname=pair.dbname,
    )
    pair.mirror.sql("ALTER TABLE pedidos ADD COLUMN nota text", dbname=pair.dbname)
    result = _cli("check", "--config", cfg)
    assert result.exit_code == 1, result.output
    schema = next(line for line in result.stdout.splitlines() if line.startswith("✗ schema:"))
    assert "public.usuarios.telefono is missing on the mirror" in schema
    assert "public.empleados.nombre is NOT NULL on the primary, nullable on the mirror" in schema
    assert "public.registro.texto is character varying(40) on the primary, text on the mirror" in schema
    assert "public.pedidos.nota exists only on the mirror" in schema


def test_check_names_unlogged_tables_apart_with_a_fix_that_works(pair: local.LocalPair, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "pgroute.toml", pair.primary_dsn(), pair.mirror_dsn())
    for node in (pair.primary, pair.mirror):
        node.sql("CREATE UNLOGGED TABLE cache (k int PRIMARY KEY, v text)", dbname=pair.dbname)
    result = _cli("check", "--config", cfg)
    # FOR ALL TABLES leaves an unlogged table out, and ADD TABLE would be refused:
    # a warning, not a failing publication line with that advice.
    assert result.exit_code == 0, result.output
    assert "✓ publication: publication chrispar_pub covers all tables, unlogged ones excepted" in result.stdout
    assert "! unlogged tables: public.cache are unlogged" in result.stdout, result.output
    assert "    fix: ALTER TABLE ... SET LOGGED to replicate them" in result.stdout
    assert "ADD TABLE" not in result.stdout


# -- section 3: credentials the libpq way ------------------------------------------------------
@pytest.fixture
def password_servers(cluster_factory):
    """A primary with a table (no primary key on one) and a fresh mirror, both asking
    ``app`` for SECRET."""
    with ThreadPoolExecutor(2) as pool:
        primary, mirror = pool.map(cluster_factory, ("pwsrc", "pwdst"))
    for node in (primary, mirror):
        _require_password(node)
    primary.sql("CREATE DATABASE chrispar")
    primary.sql(
        "CREATE TYPE estado AS ENUM ('nuevo', 'viejo');"
        "CREATE TABLE clientes (id serial PRIMARY KEY, nombre text NOT NULL, e estado);"
        "CREATE TABLE bitacora (texto text);"
        "INSERT INTO clientes (nombre) VALUES ('ana'), ('luis');",
        dbname="chrispar",
    )
    return primary, mirror


def _nothing_created(primary: local.LocalCluster, mirror: local.LocalCluster) -> None:
    assert primary.sql("SELECT count(*) FROM pg_publication", dbname="chrispar") == "0"
    assert primary.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert mirror.sql("SELECT count(*) FROM pg_database WHERE datname = 'chrispar'") == "0"
    assert mirror.sql("SELECT count(*) FROM pg_subscription") == "0"


def test_setup_replication_when_pgroute_has_no_password_changes_nothing(password_servers, tmp_path: Path) -> None:
    primary, mirror = password_servers
    cfg = _config(tmp_path / "pgroute.toml", primary.dsn("chrispar", user="app"), mirror.dsn("chrispar", user="app"))
    passfile = tmp_path / "pgpass"  # a password for the mirror only
    passfile.write_text(f"127.0.0.1:{mirror.port}:*:app:{SECRET}\n")
    passfile.chmod(0o600)
    result = _cli("setup-replication", "--config", cfg, env={"PGPASSFILE": str(passfile)})
    assert result.exit_code == 1, result.output
    assert "password" in result.output
    assert SECRET not in result.output
    _nothing_created(primary, mirror)


@pytest.mark.parametrize("source", ["PGPASSWORD", "PGPASSFILE", "PGSERVICE"])
def test_setup_replication_with_the_password_outside_the_dsn(password_servers, tmp_path: Path, source: str) -> None:
    primary, mirror = password_servers
    cfg = _config(tmp_path / "pgroute.toml", primary.dsn("chrispar", user="app"), mirror.dsn("chrispar", user="app"))
    env: dict[str, str | None]
    if source == "PGPASSWORD":
        env = {"PGPASSWORD": SECRET}
    elif source == "PGPASSFILE":
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"# pgroute test\n127.0.0.1:*:*:app:{SECRET}\n")
        passfile.chmod(0o600)
        env = {"PGPASSFILE": str(passfile)}
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[chrispar]\npassword={SECRET}\n")
        env = {"PGSERVICE": "chrispar", "PGSERVICEFILE": str(services)}

    result = _cli("setup-replication", "--config", cfg, env=env)
    assert result.exit_code == 0, result.output
    assert "✓ mirror: schema copied from the primary" in result.stdout
    assert "✓ mirror: subscription chrispar_sub created" in result.stdout
    assert "carries the password pgroute found in" in result.stdout
    assert "! public.bitacora have no primary key or replica identity" in result.stdout
    assert SECRET not in result.output
    assert mirror.sql("SELECT string_agg(nombre, ',' ORDER BY id) FROM clientes", dbname="chrispar") == "ana,luis"

    # check, with the same environment, reaches both nodes.
    check = _cli("check", "--config", cfg, env=env)
    assert "✓ primary reachable" in check.stdout and "✓ mirror reachable" in check.stdout, check.output
    assert SECRET not in check.output


def test_setup_replication_refuses_when_the_mirror_cannot_log_in(password_servers) -> None:
    primary, mirror = password_servers
    # pgroute logs in as postgres (trusted); the subscription would log in as app,
    # whose password pgroute does not know: refuse, say what the mirror needs.
    message = asyncio.run(
        _setup_raises(primary.dsn("chrispar", user="app"), primary.dsn("chrispar"), mirror.dsn("chrispar"))
    )
    assert "cannot log in to the primary" in message and "nothing was changed" in message, message
    assert f"127.0.0.1:{primary.port}:chrispar:app:<password>" in message, message
    _nothing_created(primary, mirror)


async def _setup_raises(publisher: str, primary: str, mirror: str, **kwargs: object) -> str:
    with pytest.raises(ReplicationSetupError) as info:
        await setup_replication(primary, mirror, "chrispar_pub", "chrispar_sub", publisher_conninfo=publisher, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


@pytest.mark.parametrize("mirror_database", ["created by the run", "there, empty"])
def test_a_failed_setup_replication_leaves_both_nodes_as_they_were(password_servers, mirror_database: str) -> None:
    primary, mirror = password_servers
    if mirror_database == "there, empty":
        mirror.sql("CREATE DATABASE chrispar")
    # An initial copy that cannot finish in time: the run fails after creating the
    # database, publication, schema, subscription and slot; all of it goes again.
    message = asyncio.run(
        _setup_raises(None, primary.dsn("chrispar"), mirror.dsn("chrispar"), timeout=0.0)  # type: ignore[arg-type]
    )
    assert "removed what this run had created" in message, message
    assert primary.sql("SELECT count(*) FROM pg_publication", dbname="chrispar") == "0"
    assert primary.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert mirror.sql("SELECT count(*) FROM pg_subscription") == "0"
    if mirror_database == "there, empty":
        objects = (
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public') + (SELECT count(*) FROM pg_type t JOIN pg_namespace n"
            " ON n.oid = t.typnamespace WHERE n.nspname = 'public')"
        )
        assert mirror.sql(objects, dbname="chrispar") == "0"
    else:
        assert mirror.sql("SELECT count(*) FROM pg_database WHERE datname = 'chrispar'") == "0"


async def _connects(dsn: str) -> bool:
    conn = await connect(dsn, 5.0)
    await conn.close()
    return True


def test_pgroute_connections_find_the_password_in_pgservice(password_servers, tmp_path: Path, monkeypatch) -> None:
    primary, _ = password_servers
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[chrispar]\npassword={SECRET}\n")
    for name in ("PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "chrispar")
    assert asyncio.run(_connects(primary.dsn("chrispar", user="app")))
    assert os.environ["PGSERVICE"] == "chrispar"
