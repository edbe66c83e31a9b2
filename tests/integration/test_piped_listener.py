"""proxy.listen_piped: a second listener whose sessions are never spliced, behind the
same Router as the main one, so a switch fences and moves both alike."""

from __future__ import annotations

import asyncpg
import pytest

from pgroute.config import Config

from .harness import api_async, make_config, running_pgroute, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def dsn(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/chrispar"


async def test_piped_listener_is_piped_and_switches_with_the_main_one(pair, tmp_path):
    config = make_config(pair, tmp_path, proxy={"listen_piped": "127.0.0.1:0"})
    async with running_pgroute(config) as running:
        assert running.piped_port and running.piped_port != running.proxy_port
        assert running.proxy.splicing and not running.piped_proxy.splicing
        await wait_for(lambda: running.controller.status()["replication"] == "ok", 30, what="the mirror following")
        stats = running.router.stats
        spliced_before = stats.spliced_total
        main = await asyncpg.connect(dsn(running.proxy_port))
        piped = await asyncpg.connect(dsn(running.piped_port))
        port_sql = "SELECT inet_server_port()"
        assert await main.fetchval(port_sql) == await piped.fetchval(port_sql) == pair.primary.port
        assert stats.spliced_total == spliced_before + 1  # only the main listener's
        assert len(running.piped_proxy._clients) == 1  # piped: a protocol pair

        status, body = await api_async(running, "/api/switchover", "POST", {})
        assert status == 200, body
        # Both sessions were on the old active node: both are closed by the switch.
        for conn in (main, piped):
            with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
                await conn.fetchval("SELECT 1")
            conn.terminate()
        for port in (running.proxy_port, running.piped_port):
            conn = await asyncpg.connect(dsn(port))
            assert await conn.fetchval(port_sql) == pair.mirror.port
            await conn.close()


@pytest.mark.parametrize(
    "value, ok", [("", True), ("127.0.0.1:6433", True), ("127.0.0.1:6432", False), ("nonsense", False)]
)
def test_listen_piped_validation(value, ok):
    data = {
        "primary": {"dsn": "postgresql://u@h1/db"},
        "mirror": {"dsn": "postgresql://u@h2/db"},
        "proxy": {"listen": "127.0.0.1:6432", "listen_piped": value},
    }
    if ok:
        assert Config.model_validate(data).proxy.listen_piped == value
    else:
        with pytest.raises(ValueError, match="listen_piped"):
            Config.model_validate(data)
