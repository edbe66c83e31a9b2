"""The operator's surface against a running pgroute and real PostgreSQL pairs: every
HTTP endpoint, the bearer token, passwords kept out of every output and log, the
webhook of a real failover, and the CLI (`status`, `check`, `setup-replication`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import asyncpg
from aiohttp import web
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from pgroute import app, logs
from pgroute.cli import main

from .harness import api_async, make_config, proxy_dsn, wait_for, write_config_file

# Variables a developer's shell may set that would change what the CLI reads.
CLEAN_ENV = {
    "PGROUTE_API_URL": None,
    "PGROUTE_API_TOKEN": None,
    "PGROUTE_CONFIG": None,
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
    "AUTO_FAILOVER_ENABLED": None,
    "HEALTH_CHECK_INTERVAL": None,
    "HEALTH_CHECK_MAX_RETRIES": None,
    "HEALTH_CHECK_TIMEOUT": None,
}
PASSWORD = "Sup3rS3cret"
METRIC_NAMES = (
    "pgroute_active_node",
    "pgroute_node_up",
    "pgroute_probe_duration_seconds",
    "pgroute_failovers_total",
    "pgroute_client_connections",
    "pgroute_proxied_bytes_total",
    "pgroute_paused",
    "pgroute_epoch",
    "pgroute_build_info",
)


# -- helpers ---------------------------------------------------------------------------------
def _st(running) -> dict:
    return running.controller.status()


async def _wait(running, pred, timeout=30.0, what="state"):
    return await wait_for(lambda: pred(_st(running)), timeout, what=what)


async def _following(running, timeout=30.0):
    """Until the standby follows the active node and its lag has been sampled."""

    def ok(s):
        standby = "mirror" if s["active"] == "primary" else "primary"
        return s["replication"] == "ok" and s["nodes"][standby]["lag_bytes"] is not None

    await _wait(running, ok, timeout, "standby following")


@contextlib.asynccontextmanager
async def running_pgroute(config, stop_within: float = 20.0):
    """harness.running_pgroute with a bounded stop: a pgroute that does not stop fails
    the test in seconds instead of hanging it until the suite's timeout.

    (Seen on Python 3.11: Monitor.close() waits forever for a monitor loop whose
    cancellation asyncio.wait_for swallowed while a probe of a dead node returned.)"""
    running = await app.start(config)
    body_failed = False
    try:
        yield running
    except BaseException:
        body_failed = True
        raise
    finally:
        stopping = asyncio.ensure_future(running.stop())
        done, _ = await asyncio.wait({stopping}, timeout=stop_within)
        if not done:
            stuck = sorted(
                t.get_name()
                for t in asyncio.all_tasks()
                if not t.done() and t is not stopping and t is not asyncio.current_task()
            )
            for _ in range(100):  # cancel the stuck loops again so the test can end
                for task in running.controller.monitor._tasks:
                    task.cancel()
                done, _ = await asyncio.wait({stopping}, timeout=0.1)
                if done:
                    break
            if not body_failed:
                raise AssertionError(f"pgroute did not stop within {stop_within:g} s; tasks still running: {stuck}")


def _cli(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


async def _cli_async(*args: str, env: dict | None = None):
    # In a thread: the daemon the CLI talks to runs in this test's event loop.
    return await asyncio.to_thread(_cli, *args, env=env)


def _write_config(path: Path, primary_dsn: str, mirror_dsn: str, **sections: dict) -> Path:
    defaults: dict[str, dict] = {
        "replication": {"publication": "chrispar_pub", "subscription": "chrispar_sub"},
        "health": {"timeout": 2.0},
    }
    for section, values in sections.items():
        defaults.setdefault(section, {}).update(values)
    return write_config_file(path, primary_dsn, mirror_dsn, **defaults)


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}; fails on unparseable text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    value = samples.get((name, frozenset(labels.items())))
    assert value is not None, f"metric {name} {labels} missing"
    return float(value)


async def _metrics(running) -> tuple[str, dict]:
    code, text = await api_async(running, "/metrics")
    assert code == 200 and isinstance(text, str), (code, text)
    return text, _samples(text)


def _iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _check_lines(output: str) -> dict[str, str]:
    """`pgroute check` output -> {item name: '✓ detail' or '✗ detail'}."""
    items = {}
    for line in output.splitlines():
        if line[:2] in ("✓ ", "✗ "):
            name, _, detail = line[2:].partition(":")
            items[name.strip()] = line[0] + detail
    return items


# -- 1 + 7: every endpoint, and `pgroute status` -------------------------------------------------
async def test_endpoints_pause_refusals_switchover_and_cli_status(pair, tmp_path):
    config = make_config(pair, tmp_path)
    async with running_pgroute(config) as running:
        await _following(running)

        # /api/health: exactly the seed's three keys; healthy on the primary.
        code, body = await api_async(running, "/api/health")
        assert code == 200, body
        assert set(body) == {"status", "database", "timestamp"}
        assert body["status"] == "healthy" and body["database"] == "primary"
        assert abs(_iso(body["timestamp"]).timestamp() - time.time()) < 60

        # Traffic through the proxy, for the connection and byte counters.
        conn = await asyncpg.connect(proxy_dsn(running))
        assert await conn.fetchval("SELECT current_setting('port')::int") == pair.primary.port
        await conn.fetch("SELECT g FROM generate_series(1, 500) g")

        # /api/status
        code, st = await api_async(running, "/api/status")
        assert code == 200
        assert st["active"] == "primary" and st["epoch"] == 0
        assert st["paused"] is False and st["auto_failover"] is True
        assert st["connections"]["current"] >= 1 and st["connections"]["total"] >= 1
        assert st["detection_bound_seconds"] == round(config.health.detection_bound, 3)
        assert isinstance(st["events"], list)
        for name, role in (("primary", "active"), ("mirror", "standby")):
            node = st["nodes"][name]
            assert {"role", "up", "last_probe", "latency_ms", "lag_bytes"} <= set(node), node
            assert node["role"] == role and node["up"] is True, node
            assert isinstance(node["latency_ms"], (int, float)) and node["latency_ms"] > 0
            assert abs(_iso(node["last_probe"]).timestamp() - time.time()) < 30
        assert isinstance(st["nodes"]["mirror"]["lag_bytes"], int)
        assert st["nodes"]["mirror"]["lag_bytes"] >= 0
        await conn.close()

        # /metrics after traffic: every contract name, parseable, one TYPE per name.
        text, samples = await _metrics(running)
        for name in METRIC_NAMES:
            assert any(line.startswith(name) for line in text.splitlines()), name
        types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types)), "a metric name is declared twice"
        assert _value(samples, "pgroute_active_node", node="primary") == 1
        assert _value(samples, "pgroute_active_node", node="mirror") == 0
        assert _value(samples, "pgroute_node_up", node="primary") == 1
        assert _value(samples, "pgroute_node_up", node="mirror") == 1
        assert _value(samples, "pgroute_probe_duration_seconds_count", node="primary") >= 1
        assert _value(samples, "pgroute_client_connections_total") >= 1
        assert _value(samples, "pgroute_proxied_bytes_total", direction="server_to_client") > 1000
        assert _value(samples, "pgroute_proxied_bytes_total", direction="client_to_server") > 0
        assert _value(samples, "pgroute_failovers_total", kind="failover", result="ok") == 0
        assert _value(samples, "pgroute_paused") == 0 and _value(samples, "pgroute_epoch") == 0
        assert any(n == "pgroute_build_info" and v == 1 for (n, _), v in samples.items())

        # Pause: a new connection through the proxy waits; resume lets it complete.
        code, body = await api_async(running, "/api/pause", "POST")
        assert code == 200, body
        pending = asyncio.create_task(asyncpg.connect(proxy_dsn(running), timeout=20))
        try:
            await wait_for(lambda: _st(running)["connections"]["waiting"] >= 1, 5, what="a held connection")
            await asyncio.sleep(0.5)
            assert not pending.done(), "a new connection got through while paused"
            assert _st(running)["paused"] is True
            _, samples = await _metrics(running)
            assert _value(samples, "pgroute_paused") == 1
            code, body = await api_async(running, "/api/resume", "POST")
            assert code == 200, body
            held = await asyncio.wait_for(pending, 5)
        finally:
            if not pending.done():
                pending.cancel()
        assert await held.fetchval("SELECT 1") == 1
        await held.close()

        # /api/events: newest first, limit honoured, pause and resume recorded.
        code, events = await api_async(running, "/api/events")
        assert code == 200 and isinstance(events, list)
        kinds = [e["kind"] for e in events]
        assert "pause" in kinds and "resume" in kinds and kinds.index("resume") < kinds.index("pause")
        code, one = await api_async(running, "/api/events?limit=1")
        assert code == 200 and len(one) == 1 and one[0]["id"] == events[0]["id"]

        # Refusals are 409 with a reason.
        code, body = await api_async(running, "/api/failback", "POST")
        assert code == 409 and "already active" in body["error"], (code, body)
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub DISABLE", dbname="chrispar")
        await _wait(running, lambda s: s["replication"] == "broken", 15, "mirror not following")
        code, body = await api_async(running, "/api/health")
        assert code == 200 and body["status"] == "degraded", body
        code, body = await api_async(running, "/api/failover", "POST")
        assert code == 409 and "not a following standby" in body["error"], (code, body)
        assert _st(running)["active"] == "primary" and _st(running)["epoch"] == 0

        # Switchover once the mirror follows again.
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub ENABLE", dbname="chrispar")
        await _following(running)
        code, body = await api_async(running, "/api/switchover", "POST")
        assert code == 200 and body["result"] == "ok", body
        st = _st(running)
        assert st["active"] == "mirror" and st["epoch"] == 1
        conn = await asyncpg.connect(proxy_dsn(running))
        assert await conn.fetchval("SELECT current_setting('port')::int") == pair.mirror.port
        await conn.close()
        _, samples = await _metrics(running)
        assert _value(samples, "pgroute_active_node", node="mirror") == 1
        assert _value(samples, "pgroute_epoch") == 1
        assert _value(samples, "pgroute_failovers_total", kind="switchover", result="ok") == 1
        code, events = await api_async(running, "/api/events?limit=5")
        assert any(e["kind"] == "switchover" and e["result"] == "ok" for e in events), events

        # `pgroute status` against the daemon: 80 columns; --json parses.
        api_url = f"http://127.0.0.1:{running.api_port}"
        await _following(running)
        result = await _cli_async("status", "--api", api_url)
        assert result.exit_code == 0, result.output
        assert "mirror" in result.output and "epoch 1" in result.output
        too_wide = [line for line in result.output.splitlines() if len(line) > 80]
        assert not too_wide, too_wide
        result = await _cli_async("status", "--json", "--api", api_url)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["active"] == "mirror" and doc["epoch"] == 1


# -- 2: bearer token -----------------------------------------------------------------------------
async def test_token_guards_commands_not_reads(pair, tmp_path):
    config = make_config(pair, tmp_path, api={"token": "s3cret"})
    async with running_pgroute(config) as running:
        for token in (None, "wrong", "s3cret-but-longer"):
            code, body = await api_async(running, "/api/pause", "POST", token=token)
            assert code == 401 and "error" in body, (token, code, body)
        assert _st(running)["paused"] is False
        code, body = await api_async(running, "/api/pause", "POST", token="s3cret")
        assert code == 200, body
        assert _st(running)["paused"] is True
        code, body = await api_async(running, "/api/resume", "POST", token="wrong")
        assert code == 401
        code, body = await api_async(running, "/api/resume", "POST", token="s3cret")
        assert code == 200 and _st(running)["paused"] is False
        for path in ("/api/health", "/api/status", "/api/events", "/metrics"):
            code, _ = await api_async(running, path)
            assert code in (200, 503), path
        # The CLI sends PGROUTE_API_TOKEN; without it the daemon's 401 is a usage error.
        api_url = f"http://127.0.0.1:{running.api_port}"
        result = await _cli_async("pause", "--api", api_url)
        assert result.exit_code == 2 and "unauthorized" in result.output, result.output
        result = await _cli_async("pause", "--api", api_url, env={"PGROUTE_API_TOKEN": "s3cret"})
        assert result.exit_code == 0, result.output
        result = await _cli_async("resume", "--api", api_url, env={"PGROUTE_API_TOKEN": "s3cret"})
        assert result.exit_code == 0, result.output
        assert _st(running)["paused"] is False


# -- 3: no password anywhere ----------------------------------------------------------------------
async def test_passwords_never_appear_in_outputs_or_logs(pair, tmp_path, caplog):
    pdsn = pair.primary_dsn().replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    mdsn = pair.mirror_dsn().replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    assert PASSWORD in pdsn and PASSWORD in mdsn
    # The mirror's subscription carries a password too (pg_subscription.subconninfo).
    pair.mirror.sql(
        f"ALTER SUBSCRIPTION chrispar_sub CONNECTION 'host=127.0.0.1 port={pair.primary.port} "
        f"user=postgres dbname=chrispar password={PASSWORD}'",
        dbname="chrispar",
    )
    config = make_config(pair, tmp_path, primary={"dsn": pdsn}, mirror={"dsn": mdsn})
    config_file = _write_config(tmp_path / "pgroute.toml", pdsn, mdsn)

    caplog.set_level(logging.DEBUG, logger="pgroute")
    rendered = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, logging.getLogger("asyncio").level, logging.getLogger("aiohttp.access").level)
    logs.setup_logging("DEBUG", "text", stream=rendered)
    outputs: dict[str, str] = {}
    try:
        async with running_pgroute(config) as running:
            api_url = f"http://127.0.0.1:{running.api_port}"
            await _following(running)
            conn = await asyncpg.connect(proxy_dsn(running))
            await conn.fetchval("SELECT 1")
            await conn.close()
            # Switchover: the old primary subscribes to the mirror with the mirror's DSN.
            code, body = await api_async(running, "/api/switchover", "POST")
            assert code == 200, body
            outputs["switchover"] = json.dumps(body)
            await _following(running)
            # Kill the mirror (now active): probe errors, an automatic failover that
            # drops the primary's password-bearing subscription, then refusals.
            pair.mirror.kill()
            await _wait(
                running,
                lambda s: s["active"] == "primary" and s["epoch"] == 2 and s["nodes"]["mirror"]["up"] is False,
                30,
                "failover back to the primary",
            )
            for cmd in ("failover", "failback", "switchover"):
                code, body = await api_async(running, f"/api/{cmd}", "POST")
                assert code == 409, (cmd, code, body)
                outputs[f"409 {cmd}"] = json.dumps(body)
            assert "not a following standby" in outputs["409 failover"]
            for path in ("/api/status", "/api/events?limit=1000", "/api/health", "/metrics"):
                code, body = await api_async(running, path)
                assert code == 200, (path, code)
                outputs[path] = body if isinstance(body, str) else json.dumps(body)
            assert _st(running)["nodes"]["mirror"]["error"], "the dead mirror's probe error"
            for args in (("status",), ("status", "--json")):
                result = await _cli_async(*args, "--api", api_url)
                assert result.exit_code == 0, result.output
                outputs[" ".join(args)] = result.output
            too_wide = [line for line in outputs["status"].splitlines() if len(line) > 80]
            assert not too_wide, too_wide
            result = await _cli_async("check", "--config", str(config_file))
            assert result.exit_code == 1, result.output
            assert "✗ mirror reachable" in result.output
            outputs["check"] = result.output
    finally:
        for handler in list(root.handlers):
            if handler.get_name() == "pgroute":
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved[0])
        logging.getLogger("asyncio").setLevel(saved[1])
        logging.getLogger("aiohttp.access").setLevel(saved[2])

    outputs["state file"] = Path(config.state.path).read_text()
    leaked = [where for where, text in outputs.items() if PASSWORD in text]
    assert not leaked, {w: outputs[w] for w in leaked}
    text = rendered.getvalue()
    assert "FAILOVER" in text and "switchover" in text.lower()  # the logs did cover the switches
    assert PASSWORD not in text, [line for line in text.splitlines() if PASSWORD in line]
    # Raw records, before pgroute's handler masks them (caplog formats them first).
    raw = [line for line in caplog.text.splitlines() if PASSWORD in line]
    assert not raw, raw
    # The password-bearing strings did pass through: the subscription the switchover
    # created (conninfo) and the dead mirror's DSN were logged, masked.
    assert "password=***" in caplog.text and ":***@" in text
    assert ":***@" in outputs["check"]


# -- 4: webhook of a real failover ----------------------------------------------------------------
async def test_webhook_of_kill9_failover_not_delayed_by_dead_webhook(pair, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgroute")
    received: list[tuple[float, dict]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((time.time(), await request.json()))
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = make_config(
            pair,
            tmp_path,
            alerts={
                "webhook_urls": [f"http://127.0.0.1:{port}/hook", "http://127.0.0.1:1/unreachable"],
                "timeout": 1.0,
                "retries": 1,
            },
        )
        async with running_pgroute(config) as running:
            await _following(running)
            pair.primary.kill()
            await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
            event = next(e for e in _st(running)["events"] if e["kind"] == "failover")
            assert event["result"] == "ok"
            assert event["ended_at"] - event["started_at"] < 5, event

            def ended():
                return [(at, p) for at, p in received if p.get("kind") == "failover" and p.get("stage") == "ended"]

            await wait_for(ended, 10, what="the failover webhook")
            at, payload = ended()[0]
            assert "FAILOVER" in payload["text"], payload
            assert payload["result"] == "ok", payload
            # Delivered right away, not after the dead webhook's retries.
            assert at - event["ended_at"] < 2.0, at - event["ended_at"]
            # The page that a failover started arrives before the one that it ended.
            stages = [p.get("stage") for _, p in received if p.get("kind") == "failover"]
            assert stages[:2] == ["started", "ended"], stages

            async def failed_count():
                _, samples = await _metrics(running)
                return (_value(samples, "pgroute_alerts_failed_total", channel="webhook") or 0) >= 1

            await wait_for(failed_count, 20, interval=0.3, what="pgroute_alerts_failed_total")
    finally:
        await runner.cleanup()
    failures = [r.getMessage() for r in caplog.records if r.name == "pgroute.alerts" and "failed" in r.getMessage()]
    assert failures and all("127.0.0.1:1" in m and "/unreachable" not in m for m in failures), failures
    assert not any(str(port) in m for m in failures)  # the good receiver never failed
    # The finished switch reports the epoch and node it produced, not the ones before it.
    assert event["details"].get("epoch") == 1, event  # JSON-typed details
    assert payload["epoch"] == 1 and "epoch 1" in payload["text"], payload
    assert "mirror" in payload["text"], payload["text"]


# -- 5: pgroute check ----------------------------------------------------------------------------
def test_check_reports_each_broken_setup(pair, cluster_factory, tmp_path):
    cfg = _write_config(tmp_path / "ok.toml", pair.primary_dsn(), pair.mirror_dsn())
    result = _cli("check", "--config", str(cfg))
    items = _check_lines(result.output)
    assert result.exit_code == 0, result.output
    assert {
        "primary reachable",
        "mirror reachable",
        "publication",
        "subscription",
        "primary wal_level",
        "replication lag",
        "kernel splicing",
    } <= set(items), result.output
    assert all(v.startswith("✓") for v in items.values()), result.output
    # The suite runs as root (CI): the kernel takes the BPF program.
    assert "available, sessions will be forwarded by the kernel" in items["kernel splicing"]

    # (c) disabled subscription
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub DISABLE", dbname="chrispar")
    result = _cli("check", "--config", str(cfg))
    assert result.exit_code == 1, result.output
    sub = _check_lines(result.output)["subscription"]
    assert sub.startswith("✗") and "disabled" in sub, result.output
    assert "ALTER SUBSCRIPTION chrispar_sub ENABLE" in result.output
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub ENABLE", dbname="chrispar")

    # (b) missing publication
    pair.primary.sql("DROP PUBLICATION chrispar_pub", dbname="chrispar")
    result = _cli("check", "--config", str(cfg))
    assert result.exit_code == 1, result.output
    pub = _check_lines(result.output)["publication"]
    assert pub.startswith("✗") and "chrispar_pub does not exist" in pub, result.output

    # (a) a primary with wal_level = replica (the pair's mirror as the mirror)
    replica = cluster_factory("walreplica", settings={"wal_level": "replica"})
    cfg_a = _write_config(tmp_path / "a.toml", replica.dsn("postgres"), pair.mirror_dsn())
    result = _cli("check", "--config", str(cfg_a))
    assert result.exit_code == 1, result.output
    level = _check_lines(result.output)["primary wal_level"]
    assert level.startswith("✗") and "replica" in level, result.output
    assert "wal_level = logical" in result.output  # the fix

    # (d) a node down
    pair.mirror.kill()
    result = _cli("check", "--config", str(cfg))
    assert result.exit_code == 1, result.output
    items = _check_lines(result.output)
    assert items["mirror reachable"].startswith("✗"), result.output
    assert items["primary reachable"].startswith("✓"), result.output


# -- 6: pgroute setup-replication -------------------------------------------------------------------
async def test_setup_replication_on_fresh_servers_is_idempotent(cluster_factory, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # two initdb's in parallel
        primary, mirror = pool.map(cluster_factory, ("src", "dst"))
    primary.sql("CREATE DATABASE chrispar")
    primary.sql(
        "CREATE TABLE clientes (id serial PRIMARY KEY, nombre text NOT NULL);"
        "INSERT INTO clientes (nombre) VALUES ('ana'), ('luis'), ('eva');",
        dbname="chrispar",
    )
    cfg = _write_config(tmp_path / "pgroute.toml", primary.dsn("chrispar"), mirror.dsn("chrispar"))

    result = await asyncio.to_thread(_cli, "setup-replication", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert "publication chrispar_pub created" in result.output, result.output
    assert "subscription chrispar_sub created" in result.output, result.output
    assert mirror.sql("SELECT string_agg(nombre, ',' ORDER BY id) FROM clientes", dbname="chrispar") == "ana,luis,eva"

    primary.sql("INSERT INTO clientes (nombre) VALUES ('nuevo')", dbname="chrispar")
    await wait_for(
        lambda: mirror.sql("SELECT count(*) FROM clientes WHERE nombre = 'nuevo'", dbname="chrispar") == "1",
        15,
        what="the insert replicated",
    )

    again = await asyncio.to_thread(_cli, "setup-replication", "--config", str(cfg))
    assert again.exit_code == 0, again.output
    assert "publication chrispar_pub already exists" in again.output, again.output
    assert "subscription chrispar_sub already exists" in again.output, again.output
    assert mirror.sql("SELECT count(*) FROM clientes", dbname="chrispar") == "4"
    # What setup-replication built passes `pgroute check`.
    check = await asyncio.to_thread(_cli, "check", "--config", str(cfg))
    assert check.exit_code == 0, check.output
