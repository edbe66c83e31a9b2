"""Safety under real faults, against real PostgreSQL pairs (issue: server identity, a
fence that holds, sessions named like pgroute, a login failure is not a dead node,
ids never handed out twice, a stalled follower, a restart while the primary is down).

Each test drives the fault the way an operator or an attacker would: two names for
one server, a direct non-superuser client, a changed login, a colliding direct
write on the follower, a restart with the primary dead."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from pgroute.config import Config
from pgroute.control.procedures import Context, Op, rejoin
from pgroute.control.state_store import StateFile
from pgroute.model import NodeName, Operation
from pgroute.proxy.router import Backend, Route, Router

from .harness import FAST_HEALTH, api_async, make_config, proxy_dsn, running_pgroute, wait_for
from .harness import status as _status
from .harness import wait_following as _wait_following
from .harness import wait_state as _wait_state

# matrix: also run on every PostgreSQL major version by `make test-matrix` (issue 15).
pytestmark = [pytest.mark.asyncio, pytest.mark.matrix]

APP_ROLE = "app"
APP_PASSWORD = "app-secret"


def _create_app_role(pair) -> None:
    """A non-superuser application role with the rights an application has, on both
    nodes (roles are not replicated)."""
    for node in (pair.primary, pair.mirror):
        node.sql(
            f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}';"
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_ROLE};"
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};",
            pair.dbname,
        )


def _app_dsn(cluster, dbname: str) -> str:
    return cluster.dsn(dbname, user=APP_ROLE, password=APP_PASSWORD)


def _pgroute(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgroute.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


# -- 1. one server under two names ------------------------------------------------------------------


async def test_one_server_under_two_names_is_refused_everywhere(pair, tmp_path):
    pair.primary.sql("INSERT INTO usuarios (nombre) SELECT 'u' || i FROM generate_series(1, 5000) i", pair.dbname)
    port = pair.primary.port
    secret = "pw-not-for-logs"
    primary = f"postgresql://postgres:{secret}@127.0.0.1:{port}/{pair.dbname}"
    mirror = f"postgresql://postgres:{secret}@localhost:{port}/{pair.dbname}"
    cfg = tmp_path / "pgroute.toml"
    cfg.write_text(
        f'[primary]\ndsn = "{primary}"\n[mirror]\ndsn = "{mirror}"\n'
        f'[proxy]\nlisten = "127.0.0.1:0"\n[api]\nlisten = "127.0.0.1:0"\n'
        f'[state]\npath = "{tmp_path / "state.json"}"\n'
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    run = await asyncio.to_thread(_pgroute, "run", "--config", str(cfg), env=env)
    assert run.returncode == 2, run.stderr
    assert "reach the same database chrispar" in run.stderr
    assert secret not in run.stderr + run.stdout and "***" in run.stderr

    check = await asyncio.to_thread(_pgroute, "check", "--config", str(cfg), env=env)
    assert check.returncode == 2
    assert "reach the same database chrispar" in check.stdout and secret not in check.stdout

    setup = await asyncio.to_thread(_pgroute, "setup-replication", "--config", str(cfg), env=env)
    assert setup.returncode == 2, setup.stdout + setup.stderr
    assert "reach the same database" in setup.stderr and "nothing was changed" in setup.stderr

    # The destructive steps prove, right before acting, that they change another
    # database: a resync of the "mirror" from the "primary" refuses and keeps its dump.
    config = Config.model_validate(
        {
            "primary": {"dsn": primary},
            "mirror": {"dsn": mirror},
            "state": {"path": str(tmp_path / "state.json"), "recovery_dir": str(tmp_path / "recovery")},
        }
    )
    backends = {n: Backend(n.value, "127.0.0.1", port) for n in NodeName}
    ctx = Context(
        config,
        Router(Route(None, 0)),
        StateFile(tmp_path / "state.json"),
        backends,
        is_paused=lambda: False,
        sequences=lambda: None,
    )
    result = await rejoin(ctx, Op(Operation.REJOIN), NodeName.MIRROR, 1, NodeName.PRIMARY, lambda c: None, resync=True)
    assert not result.ok and "refusing to rejoin mirror to primary" in result.detail
    count = pair.primary.sql("SELECT count(*) FROM usuarios", pair.dbname).strip()
    assert count == "5000"
    read_only = pair.primary.sql("SHOW default_transaction_read_only", pair.dbname).strip()
    assert read_only == "off"


# -- 2 and 3. a fence that holds, sessions named like pgroute ------------------------------------------


async def test_fence_holds_against_direct_clients_and_spares_no_lookalike(pair, tmp_path):
    _create_app_role(pair)
    config = make_config(pair, tmp_path)
    async with running_pgroute(config) as running:
        await _wait_following(running)
        # A direct client of the primary that calls itself like pgroute's own sessions.
        lookalike = await asyncpg.connect(
            _app_dsn(pair.primary, pair.dbname), server_settings={"application_name": "pgroute-reporting"}
        )
        # ... and that switches the read-only default off for itself, as any client may.
        await lookalike.execute("SET default_transaction_read_only = off")
        await lookalike.execute("INSERT INTO usuarios (nombre) VALUES ('before switchover')")
        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200, body
        assert _status(running)["active"] == "mirror"

        # The lookalike session was terminated with every other client session.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await lookalike.execute("INSERT INTO usuarios (nombre) VALUES ('lookalike after fence')")
        lookalike.terminate()

        # No non-superuser session can start on the fenced old primary, whatever it asks for.
        for settings in (
            {},
            {"default_transaction_read_only": "off"},
            {"options": "-c default_transaction_read_only=off"},
        ):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(_app_dsn(pair.primary, pair.dbname), server_settings=settings)
        # ... while it still applies what the new active node commits.
        app = await asyncpg.connect(proxy_dsn(running).replace("postgres@", f"{APP_ROLE}:{APP_PASSWORD}@"))
        try:
            await app.execute("INSERT INTO usuarios (nombre) VALUES ('through pgroute after fence')")
        finally:
            await app.close()
        await wait_for(
            lambda: (
                pair.primary.sql(
                    "SELECT count(*) FROM usuarios WHERE nombre = 'through pgroute after fence'", pair.dbname
                ).strip()
                == "1"
            ),
            20,
            what="the fenced follower applies",
        )
        assert (
            pair.primary.sql("SELECT count(*) FROM usuarios WHERE nombre LIKE 'lookalike%'", pair.dbname).strip() == "0"
        )

        # Failing back opens the old primary again with the limit it had.
        status, body = await api_async(running, "/api/failback", "POST", {})
        assert status == 200, body
        conn = await asyncpg.connect(_app_dsn(pair.primary, pair.dbname))
        await conn.close()
        # ... and fences the mirror, which now follows.
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(_app_dsn(pair.mirror, pair.dbname))


# -- 4. a login failure is not a dead node ------------------------------------------------------------


async def test_refused_login_is_alive_and_degraded_never_a_failover(pair, tmp_path):
    for node in (pair.primary, pair.mirror):
        node.sql("CREATE ROLE watcher LOGIN SUPERUSER", pair.dbname)
    config = make_config(pair, tmp_path)
    config = config.model_copy(
        update={
            "primary": config.primary.model_copy(update={"dsn": pair.primary.dsn(pair.dbname, user="watcher")}),
            "mirror": config.mirror.model_copy(update={"dsn": pair.mirror.dsn(pair.dbname, user="watcher")}),
        }
    )
    async with running_pgroute(config) as running:
        await _wait_following(running)
        # The operator changes pgroute's login on the primary; its sessions end.
        pair.primary.sql(
            "ALTER ROLE watcher NOLOGIN;"
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'watcher'",
            pair.dbname,
        )
        await asyncio.sleep(12 * FAST_HEALTH["interval"])  # far past max_retries failed probes
        st = _status(running)
        assert st["active"] == "primary" and st["epoch"] == 0, st["reason"]
        assert not [e for e in st["events"] if e["kind"] == "failover"]
        assert st["nodes"]["primary"]["refused"] is True
        assert "not permitted to log in" in st["nodes"]["primary"]["problem"]
        assert any(e["kind"] == "node_refused" for e in st["events"])
        code, health = await api_async(running, "/api/health")
        assert code == 200 and health["status"] == "degraded"

        pair.primary.sql("ALTER ROLE watcher LOGIN", pair.dbname)
        await _wait_state(running, lambda s: s["nodes"]["primary"]["problem"] is None, 10, "accepted again")
        code, health = await api_async(running, "/api/health")
        assert health["status"] == "healthy"


# -- 5. ids never handed out twice ---------------------------------------------------------------------


async def _draw(dsn: str, seq: str, values: list[int], stop: asyncio.Event) -> None:
    """Draw from a sequence through pgroute as fast as one client can, recording every
    value handed out; reconnect through a failover."""
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn, timeout=2)
            values.append(await conn.fetchval(f"SELECT nextval('{seq}')"))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError):
            # InternalClientError: asyncpg's protocol state when the link is cut mid-query.
            conn = None
            await asyncio.sleep(0.05)
    if conn is not None:
        conn.terminate()


async def test_sequence_no_column_draws_from_is_never_handed_out_twice(pair, tmp_path):
    seq = '"public"."Folio_Mixto"'  # mixed case: named one way everywhere
    for node in (pair.primary, pair.mirror):
        node.sql('CREATE SEQUENCE "Folio_Mixto"', pair.dbname)
    config = make_config(pair, tmp_path, replication={"sequence_gap": 1})
    async with running_pgroute(config) as running:
        await _wait_following(running)
        values: list[int] = []
        stop = asyncio.Event()
        drawer = asyncio.create_task(_draw(proxy_dsn(running), seq, values, stop))
        await asyncio.sleep(3)  # several probe samples: a measured draw rate
        exposure = _status(running).get("sequences", {}).get("without_column", [])
        drawn_before_kill = len(values)
        pair.primary.kill()
        await _wait_state(running, lambda s: s["active"] == "mirror", 30, "failover")
        await wait_for(lambda: len(values) > drawn_before_kill + 200, 30, what="draws after failover")
        stop.set()
        await drawer
    assert drawn_before_kill > 100
    duplicates = sorted({v for v in values if values.count(v) > 1})
    assert duplicates == [], f"{len(duplicates)} value(s) handed out twice, first {duplicates[:5]}"
    # /api/status showed the exposure: the sequences no column draws from, with their rate.
    rates = {e["name"]: e["rate_per_second"] for e in exposure}
    assert rates[seq] > 0 and rates['"public"."folio_seq"'] == 0  # the schema's own, idle


async def test_sequence_drawn_by_a_default_moves_past_the_column(pair):
    for node in (pair.primary, pair.mirror):
        node.sql(
            "CREATE SEQUENCE shared_seq;"
            "CREATE TABLE t_shared (id int PRIMARY KEY DEFAULT nextval('shared_seq'), v text)",
            pair.dbname,
        )
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub REFRESH PUBLICATION WITH (copy_data = false)", pair.dbname)
    pair.primary.sql("INSERT INTO t_shared (v) SELECT 'r' FROM generate_series(1, 50)", pair.dbname)
    await wait_for(
        lambda: pair.mirror.sql("SELECT count(*) FROM t_shared", pair.dbname).strip() == "50", 20, what="copy"
    )
    pair.primary.kill()
    from pgroute.control import replication
    from pgroute.pg.connect import connect

    conn = await connect(pair.mirror_dsn(), 5)
    try:
        report = await replication.promote(conn, pair.subscription, 10, None)  # no sample at all
        assert report["sequences"]['"public"."shared_seq"'] == 60
        assert await conn.fetchval("INSERT INTO t_shared (v) VALUES ('after') RETURNING id") == 61
    finally:
        await conn.close()


# -- 6. a stalled follower ---------------------------------------------------------------------------


async def test_stalled_follower_is_reported_and_no_target(pair, tmp_path):
    config = make_config(pair, tmp_path)
    async with running_pgroute(config) as running:
        await _wait_following(running)
        # A direct write on the follower that a later write through pgroute collides with.
        pair.mirror.sql("INSERT INTO usuarios (id, nombre) VALUES (100000, 'direct on the follower')", pair.dbname)
        conn = await asyncpg.connect(proxy_dsn(running))
        try:
            await conn.execute("INSERT INTO usuarios (id, nombre) VALUES (100000, 'through pgroute')")
        finally:
            await conn.close()
        await _wait_state(running, lambda s: s["replication"] == "stalled", 30, "stall seen")
        st = _status(running)
        assert "replication stalled" in st["nodes"]["mirror"]["problem"]
        assert "apply worker fails" in st["nodes"]["mirror"]["problem"]
        assert any(e["kind"] == "replication_stalled" for e in st["events"])
        code, health = await api_async(running, "/api/health")
        assert code == 200 and health["status"] == "degraded"
        for kind in ("failover", "switchover"):
            code, body = await api_async(running, f"/api/{kind}", "POST", {})
            assert code == 409, body
            assert "stalled (its apply worker fails" in body["error"], body
        assert _status(running)["active"] == "primary"


# -- 7. restarted while the primary is down ------------------------------------------------------------


async def test_restart_while_primary_down_fails_over_from_recorded_position(pair, tmp_path):
    config = make_config(pair, tmp_path)
    state_path = Path(config.state.path)
    async with running_pgroute(config) as running:
        await _wait_following(running)
        conn = await asyncpg.connect(proxy_dsn(running))
        try:
            await conn.execute("INSERT INTO usuarios (nombre) SELECT 'w' || i FROM generate_series(1, 100) i")
        finally:
            await conn.close()
        lsn = int(pair.primary.sql("SELECT pg_current_wal_lsn() - '0/0'", pair.dbname).strip())
        await wait_for(
            lambda: json.loads(state_path.read_text()).get("active_lsn", 0) >= lsn, 15, what="position recorded"
        )
        pair.wait_synced()
    # pgroute is down; then the primary dies; then pgroute starts again.
    pair.primary.kill()
    started = time.monotonic()
    async with running_pgroute(config) as running:
        await _wait_state(running, lambda s: s["active"] == "mirror", 30, "failover after restart")
        assert time.monotonic() - started < 30
        st = _status(running)
        assert any(e["kind"] == "failover" and e["result"] == "ok" for e in st["events"])


async def test_check_warns_about_superusers_a_fence_cannot_stop(pair, tmp_path):
    pair.primary.sql("CREATE ROLE reporting LOGIN SUPERUSER", pair.dbname)
    cfg = tmp_path / "pgroute.toml"
    cfg.write_text(
        f'[primary]\ndsn = "{pair.primary_dsn()}"\n[mirror]\ndsn = "{pair.mirror_dsn()}"\n'
        f'[replication]\npublication = "{pair.publication}"\nsubscription = "{pair.subscription}"\n'
    )
    check = await asyncio.to_thread(_pgroute, "check", "--config", str(cfg))
    assert "! primary superusers: reporting can log in as superuser(s)" in check.stdout, check.stdout
    assert "mirror superusers" not in check.stdout
    assert "✓ distinct nodes" in check.stdout
