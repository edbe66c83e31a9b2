"""pgroute.local against real servers: lifecycle, crash, hang, replication pair."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from pgroute import local
from pgroute.errors import LocalClusterError
from pgroute.local import binaries, processes


def _port_open(cluster: local.LocalCluster) -> bool:
    try:
        socket.create_connection((cluster.host, cluster.port), timeout=1).close()
        return True
    except OSError:
        return False


def test_start_stop_restart(local_cluster):
    assert local_cluster.sql("SELECT 1") == "1"
    assert local_cluster.sql("SHOW wal_level") == "logical"
    pid = local_cluster.postmaster_pid()

    local_cluster.start()  # already running: no-op
    assert local_cluster.postmaster_pid() == pid

    local_cluster.stop()
    assert not local_cluster.is_running()
    assert not _port_open(local_cluster)
    local_cluster.stop()  # already stopped: no-op

    local_cluster.start()
    local_cluster.restart()
    assert local_cluster.postmaster_pid() not in (None, pid)
    with pytest.raises(LocalClusterError, match="no_such_table"):
        local_cluster.sql("SELECT * FROM no_such_table")


def test_set_settings_reloads(local_cluster):
    local_cluster.set_settings(default_transaction_read_only=True)
    assert local_cluster.sql("SHOW default_transaction_read_only") == "on"


def test_kill_closes_port_and_restart_keeps_committed_data(local_cluster):
    local_cluster.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    pid = local_cluster.postmaster_pid()
    children = processes.children(pid)
    assert children  # checkpointer, walwriter, ...

    local_cluster.kill()

    assert not local_cluster.is_running()
    assert not _port_open(local_cluster)
    # Reaped, not zombies: nothing is left in the process table.
    assert [p for p in [pid, *children] if os.path.exists(f"/proc/{p}")] == []
    local_cluster.start()  # crash recovery
    assert local_cluster.sql("SELECT count(*) FROM t") == "2"


async def test_pause_hangs_server_until_resume(local_cluster):
    conn = await asyncpg.connect(local_cluster.dsn(), timeout=5)
    local_cluster.pause()
    try:
        # The kernel still completes TCP handshakes; the server answers nothing.
        assert _port_open(local_cluster)
        with pytest.raises(asyncio.TimeoutError):
            await asyncpg.connect(local_cluster.dsn(), timeout=0.5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 0.5)
    finally:
        local_cluster.resume()
        conn.terminate()
    again = await asyncpg.connect(local_cluster.dsn(), timeout=5)
    try:
        assert await again.fetchval("SELECT 1", timeout=5) == 1
    finally:
        await again.close()


def test_pair_replicates_inserts(pair):
    assert pair.mirror.sql("SELECT subname FROM pg_subscription", pair.dbname) == "chrispar_sub"
    pair.primary.sql(
        "INSERT INTO usuarios (nombre, email) VALUES ('Ana', 'ana@example.com');"
        "INSERT INTO empleados (nombre, usuario_id) VALUES ('Luis', 1);",
        pair.dbname,
    )
    pair.wait_synced(timeout=10)
    assert pair.mirror.sql("SELECT nombre, email FROM usuarios", pair.dbname) == "Ana|ana@example.com"
    assert pair.mirror.sql("SELECT nombre FROM empleados", pair.dbname) == "Luis"
    # Not replicated: the mirror has its own, untouched sequence.
    assert pair.mirror.sql("SELECT last_value, is_called FROM folio_seq", pair.dbname) == "1|f"


def test_atexit_kills_servers_left_running(pg_base_dir):
    datadir = local.make_base_dir("atexit-", parent=pg_base_dir) / "data"
    script = textwrap.dedent(
        f"""
        from pgroute.local import LocalCluster
        cluster = LocalCluster({str(datadir)!r}, name="orphan")
        cluster.init().start()
        print(cluster.postmaster_pid())
        """
    )
    root = Path(__file__).parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root, timeout=60
    ).stdout
    pid = int(out.split()[-1])
    assert not os.path.exists(f"/proc/{pid}")
    assert local.LocalCluster(datadir).postmaster_pid() is None


def test_find_binaries_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(binaries.VERSION_ENV, raising=False)  # the search, not one version
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "SEARCH_GLOBS", ())
    monkeypatch.setattr(binaries, "_pgserver_bindir", lambda: None)
    with pytest.raises(LocalClusterError) as excinfo:
        local.find_binaries()
    message = str(excinfo.value)
    for hint in ("initdb", "apt-get install postgresql", "brew install postgresql@15", "pip install pgserver"):
        assert hint in message

    for name in ("initdb", "pg_ctl", "postgres"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert local.find_binaries().bindir == tmp_path
