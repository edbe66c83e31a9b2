"""Helpers for integration tests that run a whole pgroute in the test's event loop.

``running_pgroute`` starts proxy + controller + API on free ports in front of a real
pair. The writer that records every acknowledged commit, the check of which ones a
node lacks, and the polling helper (``wait_for`` here) are pgroute.local.workload's,
shared with the demo and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

from pgroute import app
from pgroute.config import Config
from pgroute.local import LocalPair
from pgroute.local.workload import Writer, missing
from pgroute.local.workload import wait_until as wait_for

__all__ = [
    "FAST_HEALTH",
    "Writer",
    "api",
    "api_async",
    "make_config",
    "missing",
    "proxy_dsn",
    "running_pgroute",
    "setup_test_logging",
    "status",
    "wait_following",
    "wait_for",
    "wait_state",
    "write_config_file",
]

FAST_HEALTH = {"interval": 0.5, "max_retries": 2, "retry_interval": 0.2, "timeout": 1.0}


def make_config(pair: LocalPair, state_dir: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "proxy": {"listen": "127.0.0.1:0", "connect_timeout": 2.0, "pause_timeout": 15.0},
        "primary": {"dsn": pair.primary_dsn()},
        "mirror": {"dsn": pair.mirror_dsn()},
        "replication": {"publication": pair.publication, "subscription": pair.subscription},
        "health": dict(FAST_HEALTH),
        "api": {"listen": "127.0.0.1:0"},
        "state": {"path": str(state_dir / "state.json"), "recovery_dir": str(state_dir / "recovery")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.model_validate(data)


@contextlib.asynccontextmanager
async def running_pgroute(config: Config):
    running = await app.start(config)
    try:
        yield running
    finally:
        await running.stop()


def proxy_dsn(running: app.Running, dbname: str = "chrispar") -> str:
    return f"postgresql://postgres@127.0.0.1:{running.proxy_port}/{dbname}"


def api(
    running: app.Running, path: str, method: str = "GET", body: dict | None = None, token: str | None = None
) -> tuple[int, Any]:
    """Blocking HTTP call to the API (run it in a thread from async tests)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{running.api_port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
    )
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


async def api_async(
    running: app.Running, path: str, method: str = "GET", body: dict | None = None, token: str | None = None
) -> tuple[int, Any]:
    return await asyncio.to_thread(api, running, path, method, body, token)


def setup_test_logging() -> None:
    logging.getLogger("pgroute").setLevel(logging.INFO)


def status(running: app.Running) -> dict[str, Any]:
    """/api/status of a pgroute running in this event loop."""
    return running.controller.status()


async def wait_state(running: app.Running, predicate: Any, timeout: float = 30.0, what: str = "state") -> Any:
    """Until ``predicate(status)`` holds."""
    return await wait_for(lambda: predicate(status(running)), timeout, what=what)


async def wait_following(running: app.Running, timeout: float = 30.0) -> None:
    """Until the standby (whichever node it is) follows and its lag has been sampled."""

    def ok(s: dict[str, Any]) -> bool:
        standby = "mirror" if s["active"] == "primary" else "primary"
        return bool(s["replication"] == "ok" and s["nodes"][standby]["lag_bytes"] is not None)

    await wait_state(running, ok, timeout, "standby following")


def write_config_file(path: Path, primary_dsn: str, mirror_dsn: str, **sections: dict[str, Any]) -> Path:
    """A pgroute TOML file with the two DSNs and ``sections`` ({"health": {...}}), for
    tests that run pgroute's CLI or a pgroute process."""
    data: dict[str, dict[str, Any]] = {"primary": {"dsn": primary_dsn}, "mirror": {"dsn": mirror_dsn}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        # JSON strings, numbers and lists of strings are valid TOML values.
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
