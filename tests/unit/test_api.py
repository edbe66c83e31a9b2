"""HTTP API: shapes, status codes, token enforcement, and that no password leaks."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pgroute.api.http import ControlPlane, health_of, make_app
from pgroute.config import Config
from pgroute.errors import ActionRefused, PgRouteError
from pgroute.model import Event, HealthSample, NodeName
from pgroute.proxy.router import Backend, Route, Router

SECRET = "s3cretpw"
LEAKY_DSN = f"postgresql://postgres:{SECRET}@10.0.0.1:5432/chrispar"


def base_status() -> dict:
    return {
        "state": "primary_active",
        "reason": "primary healthy",
        "active": "primary",
        "epoch": 3,
        "paused": False,
        "auto_failover": True,
        "auto_failback": False,
        "synchronous": "off",
        "replication": "ok",
        "nodes": {
            "primary": {
                "role": "active",
                "up": True,
                "host": "127.0.0.1",
                "port": 5432,
                "last_probe": "2026-01-08T10:30:00.000Z",
                "latency_ms": 1.2,
                "error": None,
                "read_only": False,
                "lag_bytes": None,
                "lag_seconds": None,
                "subscription": None,
            },
            "mirror": {
                "role": "standby",
                "up": True,
                "host": "127.0.0.1",
                "port": 5433,
                "last_probe": "2026-01-08T10:30:00.000Z",
                "latency_ms": 1.1,
                "error": None,
                "read_only": False,
                "lag_bytes": 128,
                "lag_seconds": 0.2,
                "subscription": {"name": "chrispar_sub", "enabled": True},
            },
        },
        "connections": {"current": 2, "total": 10, "waiting": 0, "rejected": {}},
        "detection_bound_seconds": 53.0,
        "operation": None,
        "conflicts": [],
        "events": [],
    }


class FakeControl:
    """Implements the ControlPlane protocol with canned answers."""

    def __init__(self) -> None:
        self.st = base_status()
        self.evs: list[dict] = []
        self.requests: list[tuple[str, dict]] = []
        self.refuse: str | None = None
        self.raise_error: Exception | None = None
        self.result = "ok"
        self.event_listeners: list[Callable[[Event], None]] = []
        self.sample_listeners: list[Callable[[HealthSample], None]] = []
        self.next_id = 1

    def status(self) -> dict:
        return copy.deepcopy(self.st)

    def events(self, limit: int = 50) -> list[dict]:
        return self.evs[:limit]

    async def request(self, kind: str, *, force: bool = False, resync: bool = False) -> dict:
        self.requests.append((kind, {"force": force, "resync": resync}))
        if self.refuse:
            raise ActionRefused(self.refuse)
        if self.raise_error:
            raise self.raise_error
        now = time.time()
        ev = Event(
            self.next_id,
            kind,
            f"operator asked for {kind}",
            now - 1.5,
            now,
            self.result,
            (("fence", 0.01), ("promote", 1.2)),
            (("epoch", "4"), ("active", "mirror")),
        )
        self.next_id += 1
        for cb in self.event_listeners:
            cb(ev)
        return ev.to_json()

    async def resolve(self, active: NodeName | None) -> dict:
        # /api/resolve is tested against the real Controller (integration tests).
        raise NotImplementedError

    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        self.event_listeners.append(cb)

    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None:
        self.sample_listeners.append(cb)


def make_config(token: str = "") -> Config:
    return Config.model_validate(
        {
            "primary": {"dsn": "postgresql://postgres@127.0.0.1:5432/chrispar"},
            "mirror": {"dsn": "postgresql://postgres@127.0.0.1:5433/chrispar"},
            "api": {"token": token},
        }
    )


def make_router(backend: str | None = "primary") -> Router:
    b = Backend(backend, "127.0.0.1", 5432 if backend == "primary" else 5433) if backend else None
    return Router(Route(b, 3))


@pytest.fixture
def fake() -> FakeControl:
    return FakeControl()


@pytest.fixture
def router() -> Router:
    return make_router()


async def _client(fake: FakeControl, router: Router, token: str = "") -> TestClient:
    app = make_app(fake, router, make_config(token), None)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(fake, router):
    c = await _client(fake, router)
    yield c
    await c.close()


@pytest.fixture
async def token_client(fake, router):
    c = await _client(fake, router, token="t0ken")
    yield c
    await c.close()


def test_fake_satisfies_protocol():
    fake: ControlPlane = FakeControl()  # static duck-typing check
    assert callable(fake.status)


# -- /api/health -----------------------------------------------------------------------
async def test_health_healthy(client):
    resp = await client.get("/api/health")
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"status", "database", "timestamp"}
    assert body["status"] == "healthy" and body["database"] == "primary"
    assert body["timestamp"].endswith("Z") and "T" in body["timestamp"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda st: st["nodes"]["mirror"].update(up=False),
        lambda st: st.update(replication="none"),
        lambda st: st.update(replication="lagging"),
        lambda st: st["nodes"]["primary"].update(up=None),
    ],
)
async def test_health_degraded(client, fake, mutate):
    mutate(fake.st)
    resp = await client.get("/api/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "degraded" and body["database"] == "primary"


async def test_health_mirror_active_is_degraded(fake):
    fake.st.update(state="mirror_active_primary_fenced", active="mirror", replication="none")
    fake.st["nodes"]["primary"].update(up=False, role="down")
    router = make_router("mirror")
    c = await _client(fake, router)
    try:
        resp = await c.get("/api/health")
        body = await resp.json()
        assert resp.status == 200
        assert body == {"status": "degraded", "database": "mirror", "timestamp": body["timestamp"]}
    finally:
        await c.close()


async def test_health_unhealthy_when_no_active(client, fake):
    fake.st.update(state="no_routable_node", active=None)
    resp = await client.get("/api/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unhealthy" and body["database"] is None


def test_health_unhealthy_when_router_fails_closed(fake):
    code, body = health_of(fake.status(), make_router(None))
    assert code == 503 and body["status"] == "unhealthy"


def test_health_paused_still_routable(fake):
    router = make_router()
    router.pause("switching")
    code, body = health_of(fake.status(), router)
    assert code == 200 and body["database"] == "primary"


# -- reads ---------------------------------------------------------------------------------
async def test_status_is_controller_snapshot(client, fake):
    resp = await client.get("/api/status")
    assert resp.status == 200
    assert await resp.json() == fake.st


async def test_events_limit(client, fake):
    fake.evs = [{"id": i, "kind": "node_up"} for i in range(10, 0, -1)]
    resp = await client.get("/api/events?limit=3")
    assert resp.status == 200
    assert [e["id"] for e in await resp.json()] == [10, 9, 8]
    resp = await client.get("/api/events")
    assert len(await resp.json()) == 10
    for bad in ("x", "0", "100000"):
        resp = await client.get(f"/api/events?limit={bad}")
        assert resp.status == 400
        assert "limit" in (await resp.json())["error"]


async def test_metrics_endpoint(client):
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "pgroute_active_node" in await resp.text()


async def test_unknown_path_is_json_404(client):
    resp = await client.get("/nope")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_wrong_method_is_json_405(client):
    resp = await client.get("/api/failover")
    assert resp.status == 405
    assert "error" in await resp.json()


# -- commands --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["failover", "failback", "switchover", "pause", "resume"])
async def test_command_ok(client, fake, kind):
    resp = await client.post(f"/api/{kind}")
    assert resp.status == 200
    body = await resp.json()
    assert body["kind"] == kind and body["result"] == "ok"
    assert body["phases"] == {"fence": 0.01, "promote": 1.2}
    assert fake.requests[-1][0] == kind


async def test_command_options_from_body_and_query(client, fake):
    assert (await client.post("/api/failover", json={"force": True})).status == 200
    assert fake.requests[-1] == ("failover", {"force": True, "resync": False})
    assert (await client.post("/api/failback?resync=true")).status == 200
    assert fake.requests[-1] == ("failback", {"force": False, "resync": True})
    assert (await client.post("/api/failover")).status == 200
    assert fake.requests[-1] == ("failover", {"force": False, "resync": False})


@pytest.mark.parametrize("value", ["yes", "true", "false", 1, 0, None, [True], {"x": 1}])
async def test_command_options_must_be_json_booleans(client, fake, value):
    resp = await client.post("/api/failover", json={"force": value})
    assert resp.status == 400 and resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert "force must be a JSON boolean" in error, error
    assert fake.requests == []


async def test_command_query_options_are_true_or_false(client, fake):
    assert (await client.post("/api/failover?force=TRUE")).status == 200
    assert fake.requests[-1] == ("failover", {"force": True, "resync": False})
    resp = await client.post("/api/failover?force=yes")
    assert resp.status == 400 and "force must be true or false" in (await resp.json())["error"]


async def test_command_bad_options(client, fake):
    resp = await client.post("/api/failover", json={"force": "maybe"})
    assert resp.status == 400
    resp = await client.post("/api/switchover", json={"force": True})
    assert resp.status == 400 and "force" in (await resp.json())["error"]
    resp = await client.post("/api/failover", data=b"not json")
    assert resp.status == 400
    assert fake.requests == []


async def test_command_refused_is_409(client, fake):
    fake.refuse = "mirror is 32 MiB behind (max 16 MiB); use --force"
    resp = await client.post("/api/failover")
    assert resp.status == 409
    assert await resp.json() == {"error": fake.refuse}


async def test_command_error_is_500_without_traceback(client, fake):
    fake.raise_error = PgRouteError(f"promote failed on {LEAKY_DSN}")
    resp = await client.post("/api/failover")
    assert resp.status == 500
    text = await resp.text()
    assert SECRET not in text and "Traceback" not in text
    assert "promote failed" in (await resp.json())["error"]
    fake.raise_error = RuntimeError(f"bug with {LEAKY_DSN}")
    resp = await client.post("/api/failover")
    assert resp.status == 500
    text = await resp.text()
    assert SECRET not in text and "RuntimeError" not in text and "Traceback" not in text


async def test_token_required(token_client, fake):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dDBrZW4="},
        {"Authorization": "t0ken"},
    ):
        resp = await token_client.post("/api/failover", headers=headers)
        assert resp.status == 401, headers
        assert "error" in await resp.json()
        assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert fake.requests == []
    resp = await token_client.post("/api/failover", headers={"Authorization": "Bearer t0ken"})
    assert resp.status == 200
    assert fake.requests[-1][0] == "failover"
    # Reads stay open: they carry no secret.
    assert (await token_client.get("/api/status")).status == 200


async def test_no_password_in_any_response(client, fake):
    fake.st["reason"] = f"cannot reach {LEAKY_DSN}"
    fake.st["nodes"]["primary"]["error"] = f"connection to {LEAKY_DSN} refused"
    fake.st["events"] = [{"id": 1, "kind": "node_down", "reason": LEAKY_DSN}]
    fake.evs = [{"id": 1, "kind": "node_down", "reason": f"down: {LEAKY_DSN}"}]
    for path in ("/api/health", "/api/status", "/api/events", "/metrics", "/nope"):
        text = await (await client.get(path)).text()
        assert SECRET not in text, path
    fake.refuse = f"refused: {LEAKY_DSN}"
    text = await (await client.post("/api/failover")).text()
    assert SECRET not in text and "postgres:***@" in text


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 9000 + b"\r\n\r\n",
        b"POST /api/pause HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Header With Spaces: <script>\r\n\r\n",
    ],
    ids=["header-over-8k", "negative-content-length", "invalid-header"],
)
async def test_malformed_http_gets_json_and_one_log_line(fake, router, raw, caplog):
    from pgroute.api.http import bound_port, start_api, stop_api

    app = make_app(fake, router, make_config(), None)
    runner = await start_api(app, "127.0.0.1", 0)
    try:
        caplog.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", bound_port(runner))
        writer.write(raw)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await stop_api(runner)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1].startswith(b"4"), head  # aiohttp answers a broken request as HTTP/1.0
    assert b"application/json" in head
    data = json.loads(body)
    assert "malformed" in data["error"]
    assert b"AAAA" not in body and b"script" not in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if "unusable HTTP request" in r.getMessage()]) == 1
