"""`pgroute check` and `pgroute setup-replication` against real PostgreSQL servers.

The commands that need no daemon, run as an operator runs them: through the click
group (CliRunner) or the installed console script, with the configuration in the
environment or in a file written to tmp_path. What each test asserts is what the
operator reads (lines, fixes, exit status) and what the servers hold afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pgroute import local
from pgroute.cli import main

from .harness import write_config_file

# matrix: also run on every PostgreSQL major version by `make test-matrix` (issue 15).
pytestmark = pytest.mark.matrix

# Variables a developer's shell may set that would change what the CLI reads.
CLEAN_ENV: dict[str, str | None] = {
    "PGROUTE_API_URL": None,
    "PGROUTE_API_TOKEN": None,
    "PGROUTE_CONFIG": None,
    "PGROUTE_PRIMARY_DSN": None,
    "PGROUTE_MIRROR_DSN": None,
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
    "AUTO_FAILOVER_ENABLED": None,
    "HEALTH_CHECK_INTERVAL": None,
    "HEALTH_CHECK_MAX_RETRIES": None,
    "HEALTH_CHECK_TIMEOUT": None,
}
PASSWORD = "hunter2"  # the servers trust local connections: it is sent nowhere, only shown


def _cli(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _dsn_env(primary: local.LocalCluster, mirror: local.LocalCluster, dbname: str = "chrispar") -> dict[str, str]:
    """The seed's variables, with a password that must never be printed."""
    return {
        "DATABASE_URL": primary.dsn(dbname, password=PASSWORD),
        "MIRROR_DATABASE_URL": mirror.dsn(dbname, password=PASSWORD),
    }


def _marks(output: str) -> dict[str, str]:
    """`pgroute check` output -> {item name: '✓' or '✗'}."""
    return {line[2:].partition(":")[0].strip(): line[0] for line in output.splitlines() if line[:2] in ("✓ ", "✗ ")}


# -- check ----------------------------------------------------------------------------------
def test_check_bad_config_exits_2_from_the_console_script() -> None:
    # The installed entry point (pyproject's pgroute = "pgroute.cli:main") in a process
    # of its own; no server is reached when the configuration is wrong.
    script = Path(sys.executable).with_name("pgroute")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "pgroute.cli"]
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["DATABASE_URL"] = "mysql://nope"
    proc = subprocess.run([*argv, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "primary.dsn" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_all_ok_then_each_failure_with_its_fix(pair: local.LocalPair, tmp_path: Path) -> None:
    env = _dsn_env(pair.primary, pair.mirror, pair.dbname)

    # A set-up pair, configured by the seed's variables alone: the default
    # publication and subscription names are the pair's, every item passes.
    ok = _cli("check", env=env)
    assert ok.exit_code == 0, ok.output
    marks = _marks(ok.stdout)
    assert {
        "primary reachable",
        "mirror reachable",
        "publication",
        "subscription",
        "replication lag",
        "primary wal_level",
        "mirror wal_level",
    } <= set(marks), ok.output
    assert set(marks.values()) == {"✓"}, ok.output
    assert "✓ publication: publication chrispar_pub covers" in ok.stdout
    assert f"postgres:***@127.0.0.1:{pair.primary.port}/chrispar" in ok.stdout  # masked, not hidden
    assert PASSWORD not in ok.output

    # The names in the config file are the ones checked.
    cfg = write_config_file(
        tmp_path / "names.toml", *env.values(), replication={"publication": "otra_pub", "subscription": "otra_sub"}
    )
    names = _cli("check", "--config", str(cfg))
    assert names.exit_code == 1, names.output
    assert "✗ publication: publication otra_pub does not exist on the primary" in names.stdout
    assert "✗ subscription: subscription otra_sub does not exist on the mirror" in names.stdout
    assert "✓ primary reachable" in names.stdout

    # A configuration that loads but cannot run (both DSNs the same database) exits 2
    # after reporting what it could check.
    same = write_config_file(tmp_path / "same.toml", env["DATABASE_URL"], env["DATABASE_URL"])
    bad = _cli("check", "--config", str(same))
    assert bad.exit_code == 2, bad.output
    assert "✗ configuration: mirror.dsn: points at the same database as primary.dsn" in bad.stdout
    assert "✓ primary reachable" in bad.stdout

    # A hung mirror (SIGSTOP) is unreachable after health.timeout, not the default 5 s.
    hung_cfg = write_config_file(tmp_path / "hung.toml", *env.values(), health={"timeout": 1.0})
    pair.mirror.pause()
    try:
        started = time.monotonic()
        hung = _cli("check", "--config", str(hung_cfg))
        took = time.monotonic() - started
    finally:
        pair.mirror.resume()
    assert hung.exit_code == 1, hung.output
    assert _marks(hung.stdout)["mirror reachable"] == "✗", hung.output
    assert took < 4.5, f"check took {took:.1f} s with health.timeout = 1"

    # A stopped mirror: the failure, the fix, the primary still checked, no password.
    pair.mirror.stop()
    down = _cli("check", env=env)
    assert down.exit_code == 1, down.output
    marks = _marks(down.stdout)
    assert marks["mirror reachable"] == "✗" and marks["primary reachable"] == "✓", down.output
    assert "    fix: start the mirror server or fix the host and port in mirror.dsn" in down.stdout
    assert PASSWORD not in down.output


# -- setup-replication ----------------------------------------------------------------------
def test_setup_replication_on_a_fresh_pair(cluster_factory, tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:  # two initdb's in parallel
        primary, mirror = pool.map(cluster_factory, ("src", "dst"))
    primary.sql("CREATE DATABASE chrispar")
    primary.sql(
        "CREATE TABLE clientes (id serial PRIMARY KEY, nombre text NOT NULL);"
        "INSERT INTO clientes (nombre) VALUES ('ana'), ('luis'), ('eva');",
        dbname="chrispar",
    )

    result = _cli("setup-replication", env=_dsn_env(primary, mirror))
    assert result.exit_code == 0, result.output
    assert "✓ primary: publication chrispar_pub created (FOR ALL TABLES)" in result.stdout
    assert "✓ mirror: database chrispar created" in result.stdout
    assert "✓ mirror: subscription chrispar_sub created (initial copy of all tables)" in result.stdout
    assert PASSWORD not in result.output

    assert (
        primary.sql("SELECT puballtables FROM pg_publication WHERE pubname = 'chrispar_pub'", dbname="chrispar") == "t"
    )
    assert mirror.sql("SELECT subenabled FROM pg_subscription WHERE subname = 'chrispar_sub'", dbname="chrispar") == "t"
    # The command returns once the initial copy is done.
    assert mirror.sql("SELECT string_agg(nombre, ',' ORDER BY id) FROM clientes", dbname="chrispar") == "ana,luis,eva"


def test_setup_replication_when_pgroute_manages_the_pair_is_a_no_op(pair: local.LocalPair, tmp_path: Path) -> None:
    # What a failover leaves: the mirror promoted (its subscription gone) and stamped
    # with the epoch and the active node. Recreating primary -> mirror now would be
    # wrong; re-running the seed's one-shot replication_setup must not fail either.
    pair.mirror.sql("DROP SUBSCRIPTION chrispar_sub", dbname=pair.dbname)
    pair.mirror.sql("ALTER DATABASE chrispar SET pgroute.epoch = '1'")
    pair.mirror.sql("ALTER DATABASE chrispar SET pgroute.active = 'mirror'")
    cfg = write_config_file(tmp_path / "pgroute.toml", pair.primary_dsn(), pair.mirror_dsn())
    subscriptions = "SELECT count(*) FROM pg_subscription"

    result = _cli("setup-replication", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "nothing to do: pgroute manages this pair (epoch 1 stamped on "
        "mirror, active node mirror); see `pgroute status`, "
        "`pgroute rejoin`, `pgroute failback`\n"
    )
    assert pair.mirror.sql(subscriptions, dbname=pair.dbname) == "0"

    # With the old primary still down, too: the node that cannot be reached is skipped.
    pair.primary.stop()
    again = _cli("setup-replication", "--config", str(cfg))
    assert again.exit_code == 0, again.output
    assert "nothing to do: pgroute manages this pair (epoch 1 stamped on mirror" in again.stdout
    assert pair.mirror.sql(subscriptions, dbname=pair.dbname) == "0"
