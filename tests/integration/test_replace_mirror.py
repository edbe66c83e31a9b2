"""Replacing the mirror of a pair pgroute already manages with a server of a newer
major version: the README's upgrade recipe when pgroute ran in front of two
old-version servers. pgroute is stopped, the old mirror's subscription dropped, the
configuration pointed at a fresh 18 server, `pgroute setup-replication` run (it must
set up a new mirror although the pair carries epoch stamps), pgroute restarted; then
the switchover to 18 and the rollback lose nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import asyncpg
import pytest

from .harness import Writer, api_async, make_config, missing, proxy_dsn, running_pgroute, write_config_file
from .harness import status as _st
from .harness import wait_following as _following

pytestmark = pytest.mark.asyncio

NEW_VERSION = 18


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgroute.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


async def _server_version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


async def test_new_version_mirror_replaces_the_old_one_of_a_managed_pair(pair, cluster_factory, tmp_path):
    config = make_config(pair, tmp_path)
    # pgroute manages the pair: a switchover and a failback leave epoch stamps on both.
    async with running_pgroute(config) as running:
        await _following(running)
        for _ in range(2):
            status, body = await api_async(running, "/api/switchover", "POST", {})
            assert status == 200, body
            await _following(running)
        assert _st(running)["active"] == "primary"
        epoch = _st(running)["epoch"]
    assert epoch >= 2

    # The recipe: drop the old mirror's subscription (and with it its slot on the
    # primary), add a new-version server, point mirror.dsn at it.
    # The old mirror is fenced (read-only by default): the DROP says so for itself.
    subs = pair.mirror.sql("SELECT string_agg(subname, ',') FROM pg_subscription", dbname=pair.dbname)
    assert subs, "the old mirror follows the primary through a subscription"
    for sub in subs.split(","):
        pair.mirror.sql(f"SET default_transaction_read_only = off; DROP SUBSCRIPTION {sub}", dbname=pair.dbname)
    assert pair.primary.sql("SELECT count(*) FROM pg_replication_slots", dbname=pair.dbname) == "0"
    pair.mirror.stop()
    new = cluster_factory("new", version=NEW_VERSION)
    new_dsn = new.dsn(pair.dbname)
    cfg = write_config_file(
        tmp_path / "pgroute.toml",
        pair.primary_dsn(),
        new_dsn,
        replication={"publication": pair.publication, "subscription": pair.subscription},
    )

    # Writes keep landing on the primary meanwhile.
    pair.primary.sql("INSERT INTO usuarios (nombre) SELECT 'before-' || g FROM generate_series(1, 500) g", pair.dbname)
    setup = await asyncio.to_thread(_cli, "setup-replication", "--config", str(cfg))
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"setting up a new mirror for the pair pgroute manages (epoch {epoch}, primary active)" in setup.stdout
    assert "subscription chrispar_sub created" in setup.stdout
    assert new.sql("SELECT count(*) FROM usuarios WHERE nombre LIKE 'before-%'", pair.dbname) == "500"

    check = await asyncio.to_thread(_cli, "check", "--config", str(cfg))
    assert check.returncode == 0, check.stdout + check.stderr

    # Run again: the new mirror is subscribed now; nothing is created twice.
    again = await asyncio.to_thread(_cli, "setup-replication", "--config", str(cfg))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "subscription chrispar_sub already exists" in again.stdout

    # pgroute restarted on the new configuration (same state file): the upgrade by
    # switchover, under a writer, and the rollback.
    new_config = make_config(dataclasses.replace(pair, mirror=new), tmp_path)
    async with running_pgroute(new_config) as running:
        await _following(running)
        assert _st(running)["epoch"] == epoch
        writer = Writer(proxy_dsn(running), pause=0.0).start()
        await writer.wait_acked(50)
        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200, body
        await writer.wait_acked(50)
        assert _st(running)["active"] == "mirror"
        assert await _server_version(proxy_dsn(running)) == NEW_VERSION
        await _following(running)  # the old version follows the new one: the rollback path
        status, body = await api_async(running, "/api/failback", "POST", {})
        assert status == 200, body
        await writer.wait_acked(50)
        await writer.stop()
        assert _st(running)["active"] == "primary"
        await _following(running)
    assert await missing(pair.primary_dsn(), writer.acks) == []
