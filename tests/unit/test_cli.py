"""CLI: commands against a real API app (fake control plane) served from a thread.

`check` and `setup-replication` talk to PostgreSQL, not to the daemon: they are tested
against real servers in tests/integration/test_cli_offline.py."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import types
from collections import defaultdict
from typing import Any

import pytest
from click.testing import CliRunner

from pgroute.api.http import bound_port, make_app, start_api, stop_api
from pgroute.cli import main
from pgroute.cli.render import render_status
from pgroute.config import Config
from pgroute.model import Event

from .test_alerts import free_port
from .test_api import FakeControl, base_status, make_config, make_router

CLEAN_ENV = {
    "PGROUTE_API_URL": None,
    "PGROUTE_API_TOKEN": None,
    "PGROUTE_CONFIG": None,
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
}


class SlowControl(FakeControl):
    """Walks through phases so the CLI's progress polling has something to print.

    With ``phase_delay`` set, each phase lasts at least that long AND until a status
    read has seen it (up to 10 s), so the test does not depend on the machine's load."""

    phase_delay = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # phase -> set once a status read has shown it (the daemon's loop runs both).
        self.seen: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def status(self) -> dict:
        op = self.st.get("operation")
        if op:
            self.seen[op["phase"]].set()
        return super().status()

    async def request(self, kind, *, force=False, resync=False):
        if kind in ("failover", "failback", "switchover") and not self.refuse:
            for phase in ("fence", "promote", "route"):
                self.st["operation"] = {"kind": kind, "phase": phase, "started_at": time.time()}
                await asyncio.sleep(self.phase_delay)
                if self.phase_delay:
                    try:
                        await asyncio.wait_for(self.seen[phase].wait(), 10)
                    except TimeoutError:
                        pass
            self.st["operation"] = None
        return await super().request(kind, force=force, resync=resync)


class Daemon:
    def __init__(self, token: str = "") -> None:
        self.fake = SlowControl()
        self.loop = asyncio.new_event_loop()
        self.token = token
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                app = make_app(self.fake, make_router(), make_config(token), None)
                self.runner = await start_api(app, "127.0.0.1", 0)

            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(5)
        self.url = f"http://127.0.0.1:{bound_port(self.runner)}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(stop_api(self.runner), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def daemon():
    d = Daemon()
    yield d
    d.stop()


def invoke(args, env=None, input=None):
    merged = dict(CLEAN_ENV)
    merged.update(env or {})
    return CliRunner().invoke(main, args, env=merged, input=input)


def test_status_human(daemon):
    daemon.fake.st["events"] = [Event(3, "failover", "primary down", 100.0, 102.5, "ok").to_json()]
    res = invoke(["status", "--api", daemon.url])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "primary_active" in out and "epoch 3" in out
    assert "primary" in out and "mirror" in out and "standby" in out
    assert "128 B" in out  # mirror lag
    assert "last event: #3 failover ok in 2.5 s" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_status_json(daemon):
    res = invoke(["status", "--json"], env={"PGROUTE_API_URL": daemon.url})
    assert res.exit_code == 0
    assert json.loads(res.stdout) == daemon.fake.st


def test_render_status_fits_80_columns_in_a_bad_state():
    st = base_status()
    st.update(
        state="mirror_active_primary_fenced",
        active="mirror",
        paused=True,
        reason="primary fenced after failover; " + "x" * 200,
        operation={"kind": "failback", "phase": "catch_up", "started_at": time.time() - 3},
        conflicts=[{"table": "t"}],
    )
    st["nodes"]["primary"].update(
        up=False, role="fenced", error="connection refused " * 10, last_probe=None, latency_ms=None
    )
    st["nodes"]["mirror"].update(lag_bytes=3 * 1024 * 1024 * 1024, host="a-very-long-hostname." * 4)
    text = render_status(st)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "PAUSED" in text and "CONFLICTS: 1" in text and "catch_up" in text


def test_render_status_names_a_refusing_node_and_a_stalled_follower():
    st = base_status()
    st["nodes"]["primary"].update(up=False, refused=True, problem="refuses pgroute: password authentication failed")
    st["nodes"]["mirror"].update(problem="replication stalled: its apply worker fails: 4 error(s)")
    text = render_status(st)
    assert "refuses" in text and "password authentication failed" in text
    assert "replication stalled: its apply worker fails" in text


def test_render_status_shows_the_cluster_and_each_members_epoch():
    st = base_status()
    assert "cluster:" not in render_status(st)  # one instance: no cluster lines
    st["cluster"] = {
        "name": "b",
        "leader": "a",
        "leader_api": "http://h1:5000",
        "role": "follower",
        "cut_off": False,
        "members": [
            {"name": "a", "epoch": 4, "paused": False, "proxy": "h1:6432", "api": "http://h1:5000"},
            {"name": "b", "epoch": 3, "paused": True, "proxy": "h2:6432", "api": "http://h2:5000"},
        ],
    }
    text = render_status(st)
    assert "cluster: this instance b (follower), leader a" in text
    assert "  a: epoch 4, proxy h1:6432, api http://h1:5000" in text
    assert "  b: epoch 3, paused, proxy h2:6432, api http://h2:5000" in text
    st["cluster"].update(cut_off=True, leader=None)
    text = render_status(st)
    assert "cluster: this instance b (follower), leader none elected" in text
    assert "  CUT OFF from etcd: routing to no node until it answers" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    st["cluster"].update(
        cut_off=None,
        failsafe={"since_s": 4.2, "last": "confirmed by a"},
        roster={"gen": 3, "members": ["a", "b", "c"], "may_lead": ["a", "b"]},
    )
    text = render_status(st)
    assert "  FAILSAFE: etcd unreachable for 4.2s; routing on, confirmed by a" in text
    assert "  roster generation 3: a, b, c (not yet eligible to lead: c)" in text


def test_failover_asks_and_aborts(daemon):
    res = invoke(["failover", "--api", daemon.url], input="n\n")
    assert res.exit_code == 1
    assert "Continue?" in res.output and "Aborted" in res.output
    assert daemon.fake.requests == []


def test_failover_confirmed_interactively(daemon):
    res = invoke(["failover", "--api", daemon.url], input="y\n")
    assert res.exit_code == 0, res.output
    assert daemon.fake.requests == [("failover", {"force": False, "resync": False})]


def test_failover_yes_shows_progress_and_result(daemon):
    daemon.fake.phase_delay = 0.05  # each phase also waits until a status poll saw it
    res = invoke(["failover", "--yes", "--force", "--api", daemon.url])
    assert res.exit_code == 0, res.output
    assert daemon.fake.requests == [("failover", {"force": True, "resync": False})]
    out = res.stdout
    assert "... fence" in out and "... promote" in out
    assert "FAILOVER ok in 1.50 s" in out
    assert "promote" in out and "1200.0 ms" in out


def test_failback_resync_and_switchover(daemon):
    assert invoke(["failback", "--resync", "-y", "--api", daemon.url]).exit_code == 0
    assert daemon.fake.requests[-1] == ("failback", {"force": False, "resync": True})
    assert invoke(["switchover", "--yes", "--api", daemon.url]).exit_code == 0
    assert daemon.fake.requests[-1][0] == "switchover"


def test_refused_exits_1_with_reason(daemon):
    daemon.fake.refuse = "mirror is 32 MiB behind"
    res = invoke(["failover", "--yes", "--api", daemon.url])
    assert res.exit_code == 1
    assert "refused: mirror is 32 MiB behind" in res.stderr


def test_refusal_is_not_prefixed_twice(daemon):
    # The controller's reasons start with "<kind> refused:" (control/state.py).
    daemon.fake.refuse = "failback refused: primary is already active"
    res = invoke(["failback", "--yes", "--api", daemon.url])
    assert res.exit_code == 1
    assert res.stderr.strip() == "pgroute: failback refused: primary is already active"


def test_failed_result_exits_1(daemon):
    daemon.fake.result = "failed"
    res = invoke(["switchover", "--yes", "--api", daemon.url])
    assert res.exit_code == 1
    assert "switchover failed" in res.stderr


def test_pause_resume(daemon):
    res = invoke(["pause", "--api", daemon.url])
    assert res.exit_code == 0, res.output
    assert invoke(["resume", "--api", daemon.url]).exit_code == 0
    assert [r[0] for r in daemon.fake.requests] == ["pause", "resume"]


def test_no_daemon_exits_1():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["failover", "--yes"], ["pause"]):
        res = invoke([*args, "--api", url])
        assert res.exit_code == 1, args
        assert "cannot reach the pgroute daemon" in res.stderr
        assert "Traceback" not in res.output


def test_token():
    d = Daemon(token="t0ken")
    try:
        res = invoke(["pause", "--api", d.url])
        assert res.exit_code == 2 and "PGROUTE_API_TOKEN" in res.stderr
        res = invoke(["pause", "--api", d.url], env={"PGROUTE_API_TOKEN": "wrong"})
        assert res.exit_code == 2
        res = invoke(["pause", "--api", d.url], env={"PGROUTE_API_TOKEN": "t0ken"})
        assert res.exit_code == 0, res.output
    finally:
        d.stop()


def test_api_url_from_config_file(daemon, tmp_path):
    port = daemon.url.rsplit(":", 1)[1]
    cfg = tmp_path / "pgroute.toml"
    cfg.write_text(f'[api]\nlisten = "0.0.0.0:{port}"\n')  # no DSNs needed for this
    res = invoke(["status", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    # --api wins over the file.
    res = invoke(["status", "--config", str(cfg), "--api", f"http://127.0.0.1:{free_port()}"])
    assert res.exit_code == 1


def test_run_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[primary]\ndsn = "postgresql://u@h/db"\n[mirror]\ndsn = "postgresql://u@h2/db"\n'
        '[health]\nmax_retries = "three"\n'
    )
    res = invoke(["run", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "health.max_retries" in res.stderr


def test_run_calls_app_with_overrides(tmp_path, monkeypatch):
    seen: dict[str, Any] = {}
    fake_app = types.ModuleType("pgroute.app")
    fake_app.run = lambda config: seen.setdefault("config", config) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgroute.app", fake_app)
    import pgroute.logs

    monkeypatch.setattr(pgroute.logs, "setup_logging", lambda level, fmt: seen.update(level=level, fmt=fmt))
    env_file = tmp_path / ".env"
    env_file.write_text(
        "DATABASE_URL=postgresql://u:pw@127.0.0.1:5432/db\nMIRROR_DATABASE_URL=postgresql://u:pw@127.0.0.1:5433/db\n"
    )
    res = invoke(["run", "--env-file", str(env_file), "--log-level", "debug", "--log-format", "json"])
    assert res.exit_code == 0, res.output
    config: Config = seen["config"]
    assert config.mirror.parsed.port == 5433
    assert config.log.level == "DEBUG" and config.log.format == "json"
    assert (seen["level"], seen["fmt"]) == ("DEBUG", "json")


def test_demo_is_lazy(monkeypatch):
    seen: dict[str, Any] = {}
    mod = types.ModuleType("pgroute.demo")
    mod.main = lambda tour=False: seen.setdefault("tour", tour) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgroute.demo", mod)
    assert invoke(["demo", "--tour"]).exit_code == 0
    assert seen["tour"] is True


# -- logging (pgroute/logs.py, set up by `pgroute run`) -------------------------------------
@pytest.fixture
def restore_root_logger():
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logging_one_line_and_masked(fmt, restore_root_logger):
    import io
    import logging
    import re

    from pgroute.logs import setup_logging

    stream = io.StringIO()
    setup_logging("info", fmt, stream=stream)
    log = logging.getLogger("pgroute.control.controller")
    log.info("FAILOVER to mirror: primary %s unreachable", "postgresql://u:hunter2@h/db")
    log.debug("not shown at INFO")
    try:
        raise OSError("connect postgresql://u:hunter2@h/db failed")
    except OSError:
        log.exception("FAILBACK failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "hunter2" not in stream.getvalue()
    if fmt == "text":
        assert re.match(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO "
            r"pgroute\.control\.controller FAILOVER to mirror",
            lines[0],
        )
        assert "ERROR pgroute.control.controller FAILBACK failed\\nTraceback" in lines[1]
    else:
        first, second = (json.loads(line) for line in lines)
        assert first["level"] == "INFO" and first["logger"] == "pgroute.control.controller"
        assert first["message"].startswith("FAILOVER to mirror") and first["ts"].endswith("Z")
        assert "OSError" in second["exception"] and "u:***@h" in second["exception"]
    # Calling it again replaces the handler instead of doubling every line.
    setup_logging("info", fmt, stream=stream)
    before = len(stream.getvalue().splitlines())
    log.warning("once")
    assert len(stream.getvalue().splitlines()) == before + 1


def test_daemon_error_exits_1_masked(daemon):
    from pgroute.errors import PgRouteError

    daemon.fake.raise_error = PgRouteError("failover failed: cannot promote postgresql://u:hunter2@h/db")
    res = invoke(["failover", "--yes", "--api", daemon.url])
    assert res.exit_code == 1
    assert "pgroute: failover failed: cannot promote" in res.stderr
    assert "hunter2" not in res.output and "Traceback" not in res.output


def test_render_imports_neither_click_nor_the_commands():
    # The demo imports pgroute.cli.render and the `demo` command imports the demo:
    # rendering must not bring the command line (and with it the demo) back in.
    import subprocess

    code = (
        "import sys, pgroute.cli.render; "
        "print(sorted(m for m in sys.modules if m == 'click' or m.startswith('pgroute.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "['pgroute.cli.render']"
