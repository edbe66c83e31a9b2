"""The HTTP API: health, status, events, metrics, and the operator's commands.

Owns the URL surface of the contract (``/api/health``, ``/api/status``,
``/api/events``, ``/metrics``, ``POST /api/{failover,failback,switchover,pause,resume}``)
and its error format. It reads snapshots from the control plane and submits
commands to it; it never touches a node itself.

Invariants:

- Every JSON body passes through ``mask_dsn`` just before it is sent: the control
  plane already strips passwords, this is the last line of defence.
- Errors are JSON ``{"error": ...}``; no traceback and no DSN password ever reaches a
  client.
- Commands need ``Authorization: Bearer <api.token>`` when a token is configured;
  reads stay open (like Patroni's REST API) because they carry no secret.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..config import Config
from ..errors import ActionRefused, PgRouteError
from ..model import Event, HealthSample, NodeName
from ..pg.dsn import mask_dsn
from ..proxy.router import Router

log = logging.getLogger(__name__)

ACTIONS = ("failover", "failback", "switchover", "pause", "resume", "rejoin")
# Which boolean options each command accepts (body or query string).
ACTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "failover": ("force",),
    "failback": ("resync",),
    "switchover": (),
    "pause": (),
    "resume": (),
    "rejoin": ("resync",),
}
MAX_EVENTS = 1000
#: In a cluster a follower forwards operator commands to the leader with this header;
#: a request carrying it is never forwarded again (no loops between stale views).
FORWARDED_HEADER = "X-Pgroute-Forwarded"
#: True while a command handler serves a forwarded request (read by the cluster's
#: ControlPlane; asyncio tasks started by the handler inherit it).
forwarded: contextvars.ContextVar[bool] = contextvars.ContextVar("pgroute_forwarded", default=False)

CONTROL_KEY: web.AppKey[ControlPlane] = web.AppKey("control")
ROUTER_KEY = web.AppKey("router", Router)
CONFIG_KEY = web.AppKey("config", Config)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


class ControlPlane(Protocol):
    """What the API needs from the controller (duck-typed; see control/controller.py)."""

    def status(self) -> dict:
        """The /api/status body; already password-free."""

    def events(self, limit: int = 50) -> list[dict]:
        """Newest first, ``Event.to_json()`` dicts."""

    async def request(self, kind: str, *, force: bool = False, resync: bool = False) -> dict:
        """Run an operator command to completion and return its finished event dict.
        Raises ActionRefused(reason) when refused."""

    async def resolve(self, active: NodeName | None) -> dict:
        """Declare the active node after a fail-closed start; the finished event dict.
        Raises ActionRefused(reason) when refused."""

    def add_event_listener(self, cb: Callable[[Event], None]) -> None:
        """``cb`` is called when an event starts and when it ends (ended_at set)."""

    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None:
        """``cb`` is called with every probe result."""


# -- helpers -----------------------------------------------------------------------------
def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    text = mask_dsn(json.dumps(data, default=str))
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": mask_dsn(message)}, status, headers)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _body_bool(name: str, value: Any) -> bool:
    # Only a real JSON boolean: "yes", "false" or 1 in a body is a client bug, and
    # reading "false" as true would fail over on a typo.
    if isinstance(value, bool):
        return value
    raise web.HTTPBadRequest(reason=f"{name} must be a JSON boolean (true or false), not {json.dumps(value)}")


def _query_bool(name: str, value: str) -> bool:
    # A query string has only text: exactly "true" or "false".
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise web.HTTPBadRequest(reason=f"{name} must be true or false, not {value!r}")


def health_of(status: dict, router: Router) -> tuple[int, dict]:
    """Map a status snapshot to the /api/health answer (HTTP code, body).

    Routable means the controller names an active node and the router has a
    backend: a failing-closed proxy is unhealthy even if one node answers. A
    paused router still counts as routable, since held connections proceed when
    the switch ends (503 during every switchover would make load balancers flap).
    """
    active = status.get("active")
    routable = (
        active in ("primary", "mirror")
        and status.get("state") != "no_routable_node"
        and router.route.backend is not None
    )
    if not routable:
        return 503, {"status": "unhealthy", "database": None, "timestamp": _now_iso()}
    nodes = status.get("nodes") or {}
    both_up = all((nodes.get(n) or {}).get("up") is True for n in ("primary", "mirror"))
    troubled = any((nodes.get(n) or {}).get("problem") for n in ("primary", "mirror"))
    healthy = both_up and not troubled and status.get("replication") == "ok"
    return 200, {"status": "healthy" if healthy else "degraded", "database": active, "timestamp": _now_iso()}


# -- middleware --------------------------------------------------------------------------
@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into a JSON error without internals."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        message = exc.reason or "error"
        if isinstance(exc, web.HTTPNotFound) and message == "Not Found":
            message = f"no such endpoint: {request.path}"
        return _error(exc.status, message, headers)
    except ActionRefused as exc:
        log.info("API %s %s refused: %s", request.method, request.path, exc)
        return _error(409, str(exc) or "refused")
    except PgRouteError as exc:
        log.error("API %s %s failed: %s", request.method, request.path, exc)
        return _error(500, str(exc) or type(exc).__name__)
    except Exception:
        # The traceback goes to the (masked) log, never to the client.
        log.exception("API %s %s: internal error", request.method, request.path)
        return _error(500, "internal error (see the pgroute log)")


# -- handlers ----------------------------------------------------------------------------
async def _health(request: web.Request) -> web.Response:
    status = request.app[CONTROL_KEY].status()
    code, body = health_of(status, request.app[ROUTER_KEY])
    return _json(body, code, {"Cache-Control": "no-store"})


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[CONTROL_KEY].status(), headers={"Cache-Control": "no-store"})


async def _events(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason="limit must be an integer") from None
    if not 1 <= limit <= MAX_EVENTS:
        raise web.HTTPBadRequest(reason=f"limit must be between 1 and {MAX_EVENTS}")
    return _json(request.app[CONTROL_KEY].events(limit=limit))


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(
        body=mask_dsn(body.decode("utf-8")).encode("utf-8"), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
    )


def _authorized(request: web.Request) -> bool:
    token = request.app[CONFIG_KEY].api.token
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant-time comparison: the token is the only thing guarding the commands.
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


async def _options(request: web.Request, allowed: tuple[str, ...]) -> dict[str, bool]:
    query = dict(request.query)
    body: dict[str, Any] = {}
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise web.HTTPBadRequest(reason="body must be a JSON object") from None
            if not isinstance(body, dict):
                raise web.HTTPBadRequest(reason="body must be a JSON object")
    unknown = sorted((set(query) | set(body)) - set(allowed))
    if unknown:
        raise web.HTTPBadRequest(reason=f"unknown option(s): {', '.join(unknown)}")
    values = {name: _query_bool(name, value) for name, value in query.items()}
    values.update({name: _body_bool(name, value) for name, value in body.items()})
    return values


def _action(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        if not _authorized(request):
            raise web.HTTPUnauthorized(
                reason="missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="pgroute"'}
            )
        options = await _options(request, ACTION_OPTIONS[kind])
        peer = request.remote or "?"
        log.info("API command %s%s from %s", kind, "".join(f" {k}={v}" for k, v in options.items()), peer)
        # Shielded: a client that hangs up (Ctrl-C in `pgroute failover`) must not
        # cancel a switch halfway; the operation finishes and is recorded anyway.
        control = request.app[CONTROL_KEY]
        forwarded.set(FORWARDED_HEADER in request.headers)
        event = await asyncio.shield(control.request(kind, **options))
        return _json(event)

    handler.__name__ = f"_{kind}"
    return handler


async def _resolve(request: web.Request) -> web.Response:
    """Operator override when pgroute failed closed: declare which node is active."""
    if not _authorized(request):
        raise web.HTTPUnauthorized(
            reason="missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="pgroute"'}
        )
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(reason="body must be a JSON object") from None
    active = body.get("active") if isinstance(body, dict) else None
    if active not in ("primary", "mirror"):
        raise web.HTTPBadRequest(reason='body must be {"active": "primary"|"mirror"}')
    log.info("API command resolve active=%s from %s", active, request.remote or "?")
    control = request.app[CONTROL_KEY]
    forwarded.set(FORWARDED_HEADER in request.headers)
    event = await asyncio.shield(control.resolve(NodeName(active)))
    return _json(event)


async def _failsafe(request: web.Request) -> web.Response:
    """A peer in a cluster, cut off from etcd, asks this instance to confirm its
    route (pgroute/cluster/failsafe.py). 200 confirmed, 409 not (with why)."""
    if not _authorized(request):
        raise web.HTTPUnauthorized(
            reason="missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="pgroute"'}
        )
    confirm = getattr(request.app[CONTROL_KEY], "failsafe_confirm", None)
    if confirm is None:
        raise web.HTTPNotFound(reason="not a cluster member")
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(reason="body must be a JSON object") from None
    status, answer = confirm(body)
    return _json(answer, status)


def make_app(
    control: ControlPlane, router: Router, config: Config, registry: CollectorRegistry | None = None
) -> web.Application:
    """Build the aiohttp application. Pass the registry from ``create_metrics``; when
    None, one is created here (and the metric listeners subscribed)."""
    if registry is None:
        from .metrics import create_metrics

        registry, _ = create_metrics(control, router)
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024)
    app[CONTROL_KEY] = control
    app[ROUTER_KEY] = router
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = registry
    app.router.add_get("/api/health", _health)
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/metrics", _metrics)
    for kind in ACTIONS:
        app.router.add_post(f"/api/{kind}", _action(kind))
    app.router.add_post("/api/resolve", _resolve)
    app.router.add_post("/api/cluster/failsafe", _failsafe)
    return app


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (a header over 8 KB, a negative
    Content-Length, garbage) before any handler or middleware runs, with text/plain
    that echoes the input and a traceback in the log at ERROR. Here: one log line
    and a JSON error that repeats nothing the client sent."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        log.warning(
            "API: unusable HTTP request from %s: %s (%s)", request.remote, status, type(exc).__name__ if exc else "-"
        )
        if request.writer.output_size > 0:  # a response is already under way: nothing more can be said
            raise ConnectionError("response already started")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        resp = web.json_response({"error": f"{status} {phrase}: malformed or oversized HTTP request"}, status=status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class _ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer unparseable requests with JSON.
    (aiohttp offers no public hook for this: tests/unit/test_api.py pins the
    behaviour, so an aiohttp upgrade that changes the internals fails there.)"""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


async def start_api(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on host:port (port 0: any free port; see ``bound_port``)."""
    # No access log: Prometheus scrapes would drown the log; commands are logged above.
    runner = _ApiRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("API listening on http://%s", _fmt_addr(runner))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the runner actually listens on (useful after port 0)."""
    return runner.addresses[0][1]


def _fmt_addr(runner: web.AppRunner) -> str:
    addr = runner.addresses[0] if runner.addresses else ("?", 0)
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"


async def stop_api(runner: web.AppRunner) -> None:
    """Stop listening and close open API connections."""
    await runner.cleanup()
