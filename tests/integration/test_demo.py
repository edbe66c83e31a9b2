"""`pgroute demo` as a user runs it: a subprocess, real servers, real signals.

The scripted tour must lose no acknowledged write; the interactive demo must route a
client through its DATABASE_URL and, on Ctrl-C (SIGINT), stop pgroute, destroy both
servers and remove its directory; closing the terminal (SIGHUP) must clean up the same
way in both modes. The welcome's steps and the keeping of recovery files are checked
without servers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgroute import demo, local
from pgroute.config import HealthConfig
from pgroute.errors import LocalClusterError

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    # The demo must not depend on (or be redirected by) the caller's PG settings.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "PGROUTE_")) and k not in ("DATABASE_URL", "MIRROR_DATABASE_URL")
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgroute.cli", "demo", *args]


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture
def workdir(pg_base_dir):
    """An empty current directory the postgres OS user can reach (the demo puts its
    servers in ./.pgroute-demo); whatever a failed run leaves there is killed."""
    path = local.make_base_dir("demo-cwd-", parent=pg_base_dir)
    try:
        yield path
    finally:
        leftovers = path / demo.DEMO_DIR
        if leftovers.exists():
            local.cleanup_abandoned(demo.RUN_PREFIX, leftovers)


def test_tour_loses_no_acknowledged_write(workdir):
    res = subprocess.run(_argv("--tour"), cwd=workdir, env=_env(), capture_output=True, text=True, timeout=240)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"^  lost: 0 ", out, re.M), out
    m = re.search(r"writes acknowledged: (\d+)", out)
    assert m, out
    acked = int(m.group(1))
    assert acked > demo.TOUR_WRITES_BEFORE_KILL
    m = re.search(r"failover time \(kill -9 to first acknowledged write\): ([\d.]+) s", out)
    assert m, out
    failover = float(m.group(1))
    # Detection is bounded by the demo's health settings; the switch and the client's
    # reconnect take well under the margin.
    assert 0 < failover < HealthConfig.model_validate(demo.HEALTH).detection_bound + 5
    assert re.search(r"failback write stall: \d+ ms", out)
    assert "FAILOVER ok" in out and "FAILBACK ok" in out
    assert "active node: primary" in out
    assert "Traceback" not in res.stderr
    # Everything it created is gone, but for the recovery files pgroute wrote (if a
    # commit diverged), which are kept and named.
    left = sorted(p.name for p in (workdir / demo.DEMO_DIR).glob("*"))
    assert all(name.startswith(demo.RECOVERY_PREFIX) for name in left), left
    if left:
        assert f"kept in {workdir / demo.DEMO_DIR / left[0]}" in out, out
    else:
        assert "no recovery files" in out, out
        assert not (workdir / demo.DEMO_DIR).exists()


class _Lines:
    """Reads a process's stdout in a thread, so waits can time out."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")
            try:
                got = self._q.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                raise AssertionError(f"output ended before {pattern!r}:\n{''.join(self.lines)}")
            self.lines.append(got)
            if m := re.search(pattern, got):
                return m

    def rest(self, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines)


def test_interactive_demo_routes_writes_and_cleans_up_on_sigint(workdir):
    proc = subprocess.Popen(
        _argv(),
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = proc.stderr
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(stderr), daemon=True).start()
    out = _Lines(proc.stdout)
    try:
        url = out.wait_for(r"DATABASE_URL=(postgresql://\S+)", 120).group(1)
        primary_pid = int(out.wait_for(r"^  primary .*\(pid (\d+)\)", 10).group(1))
        mirror_pid = int(out.wait_for(r"^  mirror .*\(pid (\d+)\)", 10).group(1))
        config = Path(out.wait_for(r"^  config\s+(\S+)", 10).group(1))
        out.wait_for(r"status --api http://127\.0\.0\.1:\d+", 10)
        assert config.is_file()
        assert _alive(primary_pid) and _alive(mirror_pid)

        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "INSERT INTO usuarios (nombre, email) VALUES ('demo-test', 'dt@x') RETURNING id"
            ).fetchone()
            assert row is not None and row[0] > 0
            seeded = conn.execute("SELECT count(*) FROM usuarios").fetchone()
            assert seeded is not None and seeded[0] >= 4  # the seed rows plus ours
            server = conn.execute("SELECT inet_server_port()").fetchone()
            assert server is not None and server[0] != int(url.split(":")[-1].split("/")[0])

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.rest()
    assert "removed" in text, text
    assert not _alive(primary_pid) and not _alive(mirror_pid)
    assert not config.exists()
    assert not (workdir / demo.DEMO_DIR).exists()
    assert "Traceback" not in "".join(err_lines)


def test_without_postgresql_binaries_prints_the_install_hint(monkeypatch, tmp_path, capsys):
    def missing():
        raise LocalClusterError(
            f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; {local.INSTALL_HINT}"
        )

    monkeypatch.setattr(local, "find_binaries", missing)
    monkeypatch.chdir(tmp_path)
    assert demo.main(tour=True) == 1
    err = capsys.readouterr().err
    assert "apt-get install postgresql" in err and "pip install pgserver" in err
    assert not (tmp_path / demo.DEMO_DIR).exists()


def _servers_under(path: Path) -> set[int]:
    """The pids of postmasters whose command line names a directory under `path`, and
    of their children (backends' command lines do not name the data directory)."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry.name)] = (ppid, cmdline)
    masters = {pid for pid, (_, cmd) in procs.items() if "postgres" in cmd and str(path) in cmd}
    return masters | {pid for pid, (ppid, _) in procs.items() if ppid in masters}


@pytest.mark.parametrize("mode", ["interactive", "tour"])
def test_closing_the_terminal_sighup_destroys_servers_and_directory(workdir, mode):
    args, ready = ((), r"status --api http://127\.0\.0\.1:\d+") if mode == "interactive" else (("--tour",), r"writer:")
    proc = subprocess.Popen(
        _argv(*args),
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Whatever the test runner was started with (nohup), a terminal's SIGHUP kills.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    out = _Lines(proc.stdout)
    try:
        out.wait_for(ready, 120)
        servers = _servers_under(workdir)
        assert len(servers) >= 2, servers  # two postmasters at least
        proc.send_signal(signal.SIGHUP)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.rest()
    assert status == (0 if mode == "interactive" else 130), text
    assert "removed" in text, text
    assert "Traceback" not in text, text
    assert [pid for pid in servers if _alive(pid)] == []
    assert _servers_under(workdir) == set()
    assert not (workdir / demo.DEMO_DIR).exists()


def test_things_to_try_work_top_to_bottom():
    """Played in order against a model of who is active, every step is possible: the
    kill names the active node's pid, failback follows a failover, switchover and
    failover start from a healthy pair."""
    from pgroute.demo.interactive import things_to_try

    pids = {"primary": 111, "mirror": 222}
    steps = things_to_try("pgroute", "http://api", "primary", pids["primary"], 999, "")
    active, killed = "primary", None
    other = {"primary": "mirror", "mirror": "primary"}
    seen = []
    for comment, command in steps:
        word = command.split()[1] if command.startswith("pgroute ") else command.split()[0]
        if command.startswith("kill -9"):
            assert killed is None, "a second kill before the first server came back"
            assert int(command.split()[-1]) == pids[active], (comment, active)
            assert active in comment and str(pids[active]) in comment
            killed, active = active, other[active]
        elif command.startswith("kill -USR1"):
            assert killed is not None and command.endswith(" 999")
            killed = None
        elif word in ("failover", "switchover"):
            assert killed is None, f"{word} needs both nodes up"
            active = other[active]
        elif word == "failback":
            assert killed is None and active == "mirror", "failback needs the mirror active"
            active = "primary"
        seen.append(word)
    assert {"status", "kill", "failover", "failback", "switchover", "curl"} <= set(seen)
    assert seen[0] == "status"


def test_recovery_files_are_kept_out_of_the_removed_directory(tmp_path):
    from pgroute.demo.setup import remove_demo_dir

    parent = tmp_path / demo.DEMO_DIR
    base = parent / "demo-x"
    (base / "recovery").mkdir(parents=True)
    (base / "recovery" / "divergent-primary-epoch1-1.sql").write_text("INSERT ...;\n")
    (base / "primary").mkdir()
    kept = demo.keep_recovery_files(base)
    remove_demo_dir(base)
    assert kept is not None and kept.parent == parent and kept.name.startswith(demo.RECOVERY_PREFIX)
    assert (kept / "divergent-primary-epoch1-1.sql").read_text() == "INSERT ...;\n"
    assert not base.exists()
    # A second run in the same second gets its own directory; a run with none keeps nothing.
    (base / "recovery").mkdir(parents=True)
    (base / "recovery" / "pg_dump-primary-epoch2-2.sql").write_text("--\n")
    assert demo.keep_recovery_files(base) not in (None, kept)
    remove_demo_dir(base)
    (base / "recovery").mkdir(parents=True)
    assert demo.keep_recovery_files(base) is None
