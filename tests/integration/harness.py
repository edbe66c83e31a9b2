"""Helpers for integration tests that run a whole pgroute in the test's event loop.

``running_pgroute`` starts proxy + controller + API on free ports in front of a real
pair; ``Writer`` writes through the proxy and records every commit that was
acknowledged, so tests can check that none was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from pgroute import app
from pgroute.config import Config
from pgroute.local import LocalPair

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


def api(running: app.Running, path: str, method: str = "GET", body: dict | None = None,
        token: str | None = None) -> tuple[int, Any]:
    """Blocking HTTP call to the API (run it in a thread from async tests)."""
    req = urllib.request.Request(f"http://127.0.0.1:{running.api_port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
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


async def api_async(running: app.Running, path: str, method: str = "GET", body: dict | None = None,
                    token: str | None = None) -> tuple[int, Any]:
    return await asyncio.to_thread(api, running, path, method, body, token)


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Writer:
    """Inserts rows through a DSN, reconnecting on errors; records acknowledged commits.

    Alternates between ``usuarios`` (serial key) and ``empleados`` (identity key) so
    both kinds of sequence are exercised across a switch."""

    def __init__(self, dsn: str, tag: str = "w", pause: float = 0.005) -> None:
        self.dsn = dsn
        self.tag = tag
        self.pause = pause
        self.acked: list[tuple[str, int, str]] = []   # (table, id, nombre)
        self.errors: list[str] = []
        self.first_ok_after: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._n = 0
        self.last_ok = 0.0

    def start(self) -> "Writer":
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await asyncio.wait_for(self._task, 30)

    async def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=5)
                self._n += 1
                name = f"{self.tag}-{self._n}"
                if self._n % 2:
                    rid = await conn.fetchval(
                        "INSERT INTO usuarios (nombre, email) VALUES ($1, $2) RETURNING id",
                        name, f"{name}@example.com", timeout=5)
                    self.acked.append(("usuarios", rid, name))
                else:
                    rid = await conn.fetchval(
                        "INSERT INTO empleados (nombre) VALUES ($1) RETURNING id", name, timeout=5)
                    self.acked.append(("empleados", rid, name))
                self.last_ok = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - any failed write: record, reconnect, go on
                # (asyncpg raises InternalClientError, not an InterfaceError, when a
                # connection dies in the middle of a protocol state change)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(self.pause)
        if conn is not None:
            conn.terminate()

    async def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        target = len(self.acked) + count
        await wait_for(lambda: len(self.acked) >= target, timeout, what=f"{count} more acknowledged writes")


async def missing_rows(dsn: str, acked: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Acknowledged rows that are not on the node at ``dsn`` (with the same name)."""
    conn = await asyncpg.connect(dsn)
    try:
        missing = []
        for table in ("usuarios", "empleados"):
            rows = await conn.fetch(f"SELECT id, nombre FROM {table}")
            have = {(r["id"], r["nombre"]) for r in rows}
            missing += [a for a in acked if a[0] == table and (a[1], a[2]) not in have]
        return missing
    finally:
        await conn.close()


def setup_test_logging() -> None:
    logging.getLogger("pgroute").setLevel(logging.INFO)
