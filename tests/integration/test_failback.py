"""Failback, rejoin, switchover and synchronous mode against real pairs, with a writer
recording every acknowledged commit: nothing acknowledged may be lost."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import asyncpg
import pytest

from .harness import Writer, api_async, make_config, missing, proxy_dsn, running_pgroute, wait_for, wait_state
from .harness import status as _st
from .harness import wait_following as _following

# matrix: also run on every PostgreSQL major version by `make test-matrix` (issue 15).
pytestmark = [pytest.mark.asyncio, pytest.mark.matrix]


async def _wait(running, pred, timeout=60.0, what="state"):
    return await wait_state(running, pred, timeout, what)


async def _rows(dsn: str) -> dict[str, set]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for table in ("usuarios", "empleados", "pedidos"):
            out[table] = {
                tuple(r)
                for r in await conn.fetch(
                    f"SELECT id, nombre FROM {table}" if table != "pedidos" else "SELECT id, total::text FROM pedidos"
                )
            }
        return out
    finally:
        await conn.close()


def _slots(cluster) -> list[str]:
    out = cluster.sql("SELECT slot_name || ':' || active FROM pg_replication_slots", dbname="chrispar")
    return [line for line in out.splitlines() if line]


async def _diverge_then_kill(pair, writer: Writer, n: int = 10) -> list:
    """Disable the mirror's subscription, let the writer commit n rows on the primary
    only, kill -9 the primary, then re-enable the subscription (its worker cannot reach
    the dead primary): those commits are divergent, deterministically."""
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub DISABLE", dbname="chrispar")
    start = len(writer.acks)
    await writer.wait_acked(n)
    pair.primary.kill()
    pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub ENABLE", dbname="chrispar")
    return writer.acks[start:]


async def test_failback_recovers_divergent_commits_under_writer(pair, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgroute")
    config = make_config(pair, tmp_path, health={"max_lag_bytes": 1 << 30})
    async with running_pgroute(config) as running:
        await _following(running)
        writer = Writer(proxy_dsn(running)).start()
        await writer.wait_acked(20)
        divergent = await _diverge_then_kill(pair, writer)
        await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
        await writer.wait_acked(20)
        # Those commits are not on the mirror (yet).
        assert await missing(pair.mirror_dsn(), divergent)

        pair.primary.start()
        # Fenced, then rejoined automatically: divergent commits applied to the mirror.
        await _wait(
            running,
            lambda s: s["nodes"]["primary"]["subscription"] is not None and s["replication"] == "ok",
            90,
            "primary rejoined",
        )
        assert await missing(pair.mirror_dsn(), divergent) == []
        rejoin = next((e for e in _st(running)["events"] if e["kind"] == "rejoin"), None)
        assert rejoin is not None, "no rejoin event"
        assert rejoin["result"] == "ok" and rejoin["details"]["mode"] == "full resync"
        assert int(rejoin["details"]["divergent_transactions"]) >= 1
        assert Path(rejoin["details"]["recovery_sql"]).exists()
        assert Path(rejoin["details"]["pg_dump"]).exists()

        status, body = await api_async(running, "/api/failback", "POST", {})
        assert status == 200, body
        assert body["result"] == "ok"
        await writer.wait_acked(20)
        await writer.stop()
        assert _st(running)["active"] == "primary"
        await _following(running)
        # An insert on the primary appears on the mirror.
        pair.primary.sql("INSERT INTO usuarios (nombre) VALUES ('after-failback')", dbname="chrispar")
        await wait_for(
            lambda: (
                pair.mirror.sql("SELECT count(*) FROM usuarios WHERE nombre = 'after-failback'", dbname="chrispar")
                == "1"
            ),
            30,
            what="replicated insert",
        )
    # Every acknowledged commit of the whole run is on the primary, divergent ones included.
    assert await missing(pair.primary_dsn(), writer.acks) == []
    assert await _rows(pair.primary_dsn()) == await _rows(pair.mirror_dsn())
    # No inactive replication slot left on either node.
    for cluster in (pair.primary, pair.mirror):
        assert not [s for s in _slots(cluster) if s.endswith(":f")], _slots(cluster)
    assert any("FAILBACK" in r.getMessage() for r in caplog.records)


async def test_colliding_divergent_insert_is_a_conflict_and_both_versions_kept(pair, tmp_path):
    config = make_config(pair, tmp_path, health={"max_lag_bytes": 1 << 30})
    async with running_pgroute(config) as running:
        await _following(running)
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub DISABLE", dbname="chrispar")
        pair.primary.sql(
            "INSERT INTO usuarios (id, nombre, email) VALUES (424242, 'primary-version', 'p@x')", dbname="chrispar"
        )
        pair.primary.kill()
        pair.mirror.sql("ALTER SUBSCRIPTION chrispar_sub ENABLE", dbname="chrispar")
        await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
        conn = await asyncpg.connect(proxy_dsn(running))
        await conn.execute("INSERT INTO usuarios (id, nombre, email) VALUES (424242, 'mirror-version', 'm@x')")
        await conn.close()
        pair.primary.start()
        await _wait(running, lambda s: s["conflicts"], 90, "conflict reported")
        conflict = _st(running)["conflicts"][0]
        assert conflict["table"].endswith("usuarios") and conflict["key"] == {"id": "424242"}
        assert conflict["divergent"]["nombre"] == "primary-version"
        assert conflict["active"]["nombre"] == "mirror-version"
        text = Path(conflict["recovery_file"]).read_text()
        assert "primary-version" in text and '"conflict": true' in text
        await _wait(running, lambda s: s["replication"] == "ok", 60, "primary rejoined")
        status, body = await api_async(running, "/api/failback", "POST", {})
        assert status == 200, body
    # The active node's version survives on both nodes; the divergent one is in the file.
    assert pair.primary.sql("SELECT nombre FROM usuarios WHERE id = 424242", dbname="chrispar") == "mirror-version"


async def test_switchover_under_writer_loses_nothing(pair, tmp_path):
    config = make_config(pair, tmp_path)
    async with running_pgroute(config) as running:
        await _following(running)
        writer = Writer(proxy_dsn(running), pause=0.0).start()
        await writer.wait_acked(50)
        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200, body
        stall = int(body["details"]["write_stall_ms"])
        print(f"switchover write stall: {stall} ms, phases {body['phases']}")
        await writer.wait_acked(50)
        assert _st(running)["active"] == "mirror"
        # The old active node now follows the new one.
        await _following(running)
        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200, body
        await writer.wait_acked(50)
        await writer.stop()
        assert _st(running)["active"] == "primary"
    assert await missing(pair.primary_dsn(), writer.acks) == []
    pair.wait_synced()  # the mirror follows the primary again: it catches up fully
    assert await missing(pair.mirror_dsn(), writer.acks) == []


@pytest.mark.parametrize(
    "victim,when", [("mirror", "catch_up"), ("primary", "promote"), ("mirror", "promote"), ("primary", "resubscribe")]
)
async def test_node_killed_mid_switchover_never_routes_to_stale(pair, tmp_path, victim, when):
    config = make_config(pair, tmp_path)
    async with running_pgroute(config) as running:
        await _following(running)
        writer = Writer(proxy_dsn(running)).start()
        await writer.wait_acked(20)
        node = pair.primary if victim == "primary" else pair.mirror

        def on_phase(op):
            if op.phase_name == when:
                node.kill()

        running.controller.add_phase_listener(on_phase)
        # Whatever the switchover answers (a node dies during it), the checks below
        # are on where pgroute routes afterwards.
        await api_async(running, "/api/switchover", "POST", {})
        running.controller.remove_phase_listener(on_phase)
        st = _st(running)
        acked_before = list(writer.acks)
        await writer.stop()
        # Wherever pgroute routes now holds every acknowledged commit, or it routes nowhere.
        active = st["active"]
        if active is None:
            assert st["reason"]
        else:
            target = pair.primary_dsn() if active == "primary" else pair.mirror_dsn()
            alive = (pair.primary if active == "primary" else pair.mirror).is_running()
            if alive:
                assert await missing(target, acked_before) == []
            else:
                # Routed to the node that just died: it must be the one with the data,
                # and failover moves away from it once the monitor declares it down.
                await _wait(running, lambda s: s["active"] != active or s["state"].endswith("_down"), 30)


async def test_synchronous_on_kill9_loses_nothing_and_the_old_primary_rejoins(pair, tmp_path):
    config = make_config(pair, tmp_path, replication={"synchronous": "on"})
    async with running_pgroute(config) as running:
        await _wait(running, lambda s: s["replication"] == "ok", 30)
        await wait_for(
            lambda: (
                pair.primary.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'chrispar_sub'")
                == "sync"
            ),
            30,
            what="synchronous standby",
        )
        writer = Writer(proxy_dsn(running), pause=0.0).start()
        await writer.wait_acked(100)
        pair.primary.kill()
        at_kill = list(writer.acks)
        await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
        await writer.wait_acked(10)
        # The old primary returns with synchronous_standby_names still naming the
        # subscription that was its standby: pgroute's own commits on it (the fence,
        # the stamp, the rejoin) must not wait for a standby that no longer exists.
        pair.primary.start()
        await _following(running, 60)
        await writer.wait_acked(10)
        await writer.stop()
        assert _st(running)["active"] == "mirror"
    assert await missing(pair.mirror_dsn(), at_kill) == []
    assert await missing(pair.mirror_dsn(), writer.acks) == []


@pytest.mark.parametrize("mode", ["on", "strict"])
async def test_synchronous_mirror_down(pair, tmp_path, mode):
    config = make_config(pair, tmp_path, replication={"synchronous": mode})
    async with running_pgroute(config) as running:
        await wait_for(
            lambda: (
                pair.primary.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'chrispar_sub'")
                == "sync"
            ),
            30,
            what="synchronous standby",
        )
        pair.mirror.kill()
        await _wait(running, lambda s: s["nodes"]["mirror"]["up"] is False, 30, "mirror down")
        conn = await asyncpg.connect(proxy_dsn(running))
        try:
            insert = conn.execute("INSERT INTO usuarios (nombre) VALUES ('while-mirror-down')")
            if mode == "on":
                await asyncio.wait_for(insert, 10)  # degraded, writes keep flowing
                assert _st(running)["replication"] != "ok"
            else:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(insert, 3)  # strict: commits wait for the standby
        finally:
            conn.terminate()
        pair.mirror.start()
        await wait_for(
            lambda: (
                pair.primary.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'chrispar_sub'")
                == "sync"
            ),
            30,
            what="synchronous standby restored",
        )


async def test_auto_failback_after_primary_returns(pair, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgroute")
    config = make_config(pair, tmp_path, health={"auto_failback": True, "failback_delay": 1.0})
    async with running_pgroute(config) as running:
        await _following(running)
        writer = Writer(proxy_dsn(running)).start()
        await writer.wait_acked(10)
        pair.primary.kill()
        await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
        await writer.wait_acked(10)
        pair.primary.start()
        # Fenced, rejoined, caught up for failback_delay: pgroute fails back by itself.
        await _wait(
            running,
            lambda s: s["active"] == "primary" and s["epoch"] >= 2 and s["replication"] == "ok",
            90,
            "automatic failback",
        )
        await writer.wait_acked(10)
        await writer.stop()
        events = _st(running)["events"]
        assert [e for e in events if e["kind"] == "failback" and e["result"] == "ok"]
    assert await missing(pair.primary_dsn(), writer.acks) == []
    assert any("FAILBACK" in r.getMessage() and "auto_failback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("victim,when", [("primary", "divergence"), ("mirror", "promote"), ("primary", "promote")])
async def test_node_killed_mid_failback_never_routes_to_stale(pair, tmp_path, victim, when):
    config = make_config(pair, tmp_path, health={"max_lag_bytes": 1 << 30})
    async with running_pgroute(config) as running:
        await _following(running)
        # No automatic rejoin, so the failback runs rejoin + switchover itself.
        ctl = running.controller
        ctl.state = dataclasses.replace(ctl.state, policy=dataclasses.replace(ctl.state.policy, auto_rejoin=False))
        writer = Writer(proxy_dsn(running)).start()
        await writer.wait_acked(10)
        await _diverge_then_kill(pair, writer, 5)
        await _wait(running, lambda s: s["active"] == "mirror", 30, "failover")
        after_failover = len(writer.acks)
        await writer.wait_acked(10)
        pair.primary.start()
        await _wait(running, lambda s: s["nodes"]["primary"]["role"] == "fenced", 30, "primary fenced")
        node = pair.primary if victim == "primary" else pair.mirror

        def on_phase(op):
            if op.phase_name == when and node.is_running():
                node.kill()

        running.controller.add_phase_listener(on_phase)
        status, body = await api_async(running, "/api/failback", "POST", {})
        running.controller.remove_phase_listener(on_phase)
        assert status in (200, 409, 500), body
        await writer.stop()
        acked = writer.acks[after_failover:]  # acknowledged by the mirror
        st = _st(running)
        active = st["active"]
        if active is None:
            assert st["reason"]
            return
        cluster = pair.primary if active == "primary" else pair.mirror
        if cluster.is_running():
            # The routed node holds every commit the mirror acknowledged (commits only
            # the old primary acknowledged may sit there until a rejoin succeeds).
            assert await missing(pair.primary_dsn() if active == "primary" else pair.mirror_dsn(), acked) == []
