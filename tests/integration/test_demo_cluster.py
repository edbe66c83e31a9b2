"""`pgroute demo --cluster` as a user runs it: a subprocess, real servers, a real
3-member etcd, three `pgroute run` instances, real signals.

A client on the printed multi-host DSN must write through the instances; exactly one
instance must say it leads (the one the demo names); SIGINT must stop every
instance, etcd member and server and remove the demo's directory. Without etcd the
demo says what to install and exits 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import psycopg

from pgroute import demo
from pgroute.errors import LocalClusterError
from pgroute.local import etcd as etcd_module
from pgroute.local.etcd import ETCD_INSTALL_HINT

from .test_demo import _alive, _argv, _env, _Lines, _servers_under, workdir  # noqa: F401 (fixture)


def _processes_naming(path: Path) -> set[int]:
    """Pids of the processes whose command line names a path under `path` (etcd's
    data directory, an instance's configuration file, a postmaster's data directory)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.add(int(entry.name))
    return found


def _status(api: str) -> dict:
    with urllib.request.urlopen(api + "/api/status", timeout=10) as resp:
        return json.loads(resp.read())


def test_cluster_demo_routes_through_the_multi_host_dsn_and_cleans_up_on_sigint(workdir):  # noqa: F811 (fixture)
    proc = subprocess.Popen(
        _argv("--cluster"),
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    out = _Lines(proc.stdout)
    try:
        dsn = out.wait_for(r"DATABASE_URL=(postgresql://\S+)", 180).group(1)
        instances = {}
        for _ in range(3):
            m = out.wait_for(r"^  instance (\w) .*proxy (\S+)\s+API (\S+)\s+pid (\d+)\s+(\w+)", 10)
            instances[m.group(1)] = (m.group(2), m.group(3), int(m.group(4)), m.group(5))
            out.lines.remove(m.string)  # the next wait_for finds the next instance
        assert set(instances) == {"a", "b", "c"}, instances
        assert dsn.endswith("?target_session_attrs=read-write")
        assert all(proxy in dsn for proxy, *_ in instances.values()), dsn
        leader = out.wait_for(r"^  leader\s+(\w)$", 10).group(1)
        out.wait_for(r"kill -USR1 \d+", 10)
        assert instances[leader][3] == "leader", instances
        pids = {pid for _, _, pid, _ in instances.values()}
        assert all(_alive(pid) for pid in pids)
        etcd = {pid for pid in _processes_naming(workdir) if "etcd" in Path(f"/proc/{pid}/cmdline").read_text()}
        assert len(etcd) == 3, etcd
        servers = _servers_under(workdir)
        assert len(servers) >= 2, servers

        # Every instance reports the same leader; only that one says it leads.
        roles = {}
        for name, (_, api, _, _) in instances.items():
            st = _status(api)
            assert st["cluster"]["leader"] == leader, st["cluster"]
            roles[name] = st["cluster"]["role"]
        assert roles == {n: "leader" if n == leader else "follower" for n in instances}, roles

        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "INSERT INTO usuarios (nombre, email) VALUES ('cluster-demo', 'cd@x') RETURNING id, inet_server_port()"
            ).fetchone()
            assert row is not None and row[0] > 0
            # Through an instance of the list (the first that answers), to a server.
            assert f"127.0.0.1:{conn.info.port}" in dsn
            assert row[1] != conn.info.port

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.rest()
    assert "removed" in text, text
    assert "Traceback" not in text, text
    assert not [pid for pid in pids | etcd | servers if _alive(pid)]
    assert _processes_naming(workdir) == set()
    assert not (workdir / demo.DEMO_DIR).exists()


def test_cluster_demo_without_etcd_says_what_to_install_and_exits_2(monkeypatch, tmp_path, capsys):
    def missing():
        raise LocalClusterError(f"etcd is not installed (no etcd on PATH): {ETCD_INSTALL_HINT}")

    monkeypatch.setattr(etcd_module, "find_etcd", missing)
    monkeypatch.chdir(tmp_path)
    assert demo.main(cluster=True) == 2
    assert "apt-get install etcd-server" in capsys.readouterr().err
    assert not (tmp_path / demo.DEMO_DIR).exists()


def test_cluster_demo_with_an_unusable_etcd_binary_exits_2(workdir):  # noqa: F811 (fixture)
    env = _env() | {"PATH": "/nonexistent"}
    # find_etcd falls back to /usr/bin/etcd: point it at a file that is not executable.
    env["PGROUTE_ETCD_BIN"] = str(workdir / "no-etcd")
    res = subprocess.run(_argv("--cluster"), cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "PGROUTE_ETCD_BIN" in res.stderr and "is not an executable file" in res.stderr, res.stderr
    assert not (workdir / demo.DEMO_DIR).exists()


def test_cluster_demo_is_its_own_demo():
    res = subprocess.run(_argv("--cluster", "--tour"), env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "choose one" in res.stderr
