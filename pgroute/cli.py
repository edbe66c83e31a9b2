"""The ``pgroute`` command line.

Owns the commands of the contract and their exit statuses: 0 done, 1 refused or
failed (the reason on stderr), 2 usage or configuration error. ``run`` starts the
daemon; ``status``, ``failover``, ``failback``, ``switchover``, ``pause`` and
``resume`` talk to a running daemon's HTTP API (as ``patronictl`` talks to
Patroni); ``check``, ``setup-replication`` and ``demo`` work without a daemon.

Heavy modules (the daemon, replication SQL, the demo) are imported inside their
commands so ``pgroute status`` starts fast and a missing optional piece only
affects the command that needs it. The HTTP client is ``urllib.request``: no
extra dependency for a handful of small JSON requests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable, NoReturn

import click

from . import __version__
from .config import Config, ConfigError, load_config, parse_listen, validate_runtime
from .pg.dsn import mask_dsn

DEFAULT_API_URL = "http://127.0.0.1:5000"
POLL_INTERVAL = 0.3
# Socket inactivity limit for a command's POST; the daemon answers when the
# operation ends, and a failback with a long catch-up may take minutes.
OPERATION_TIMEOUT = 900.0
WIDTH = 80

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- small helpers ---------------------------------------------------------------------
def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"pgroute: {mask_dsn(message)}", err=True)
    sys.exit(code)


def _load_config(config_path: str | None, env_file: str | None) -> Config:
    try:
        return load_config(config_path, env_file)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", EXIT_USAGE)


class DaemonUnreachable(Exception):
    pass


class ApiClient:
    """Tiny synchronous JSON client for the daemon's API."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())
        except urllib.error.URLError as exc:
            raise DaemonUnreachable(str(getattr(exc.reason, "strerror", None) or exc.reason)) from None
        except (OSError, TimeoutError) as exc:
            raise DaemonUnreachable(str(exc) or type(exc).__name__) from None

    def get(self, path: str, timeout: float | None = None) -> tuple[int, Any]:
        return self.call("GET", path, timeout=timeout)

    def post(self, path: str, body: dict | None = None,
             timeout: float | None = None) -> tuple[int, Any]:
        return self.call("POST", path, body or {}, timeout=timeout)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:200]}


def _url_from_listen(listen: str) -> str:
    host, port = parse_listen(listen)
    # A wildcard listen address is reached through loopback from this machine.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _api_from_config_file(path: str) -> tuple[str | None, str]:
    """([api] listen as a URL, [api] token) from a config file, reading only [api]:
    the DSNs may come from the environment, so a full load could fail needlessly."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        _fail(f"configuration error: --config: cannot read {path}: {exc.strerror}", EXIT_USAGE)
    except tomllib.TOMLDecodeError as exc:
        _fail(f"configuration error: --config: {path} is not valid TOML: {exc}", EXIT_USAGE)
    api = data.get("api") or {}
    if not isinstance(api, dict):
        _fail("configuration error: api: must be a table", EXIT_USAGE)
    url = None
    if "listen" in api:
        try:
            url = _url_from_listen(str(api["listen"]))
        except ValueError as exc:
            _fail(f"configuration error: api.listen: {exc}", EXIT_USAGE)
    return url, str(api.get("token") or "")


def _client(api_url: str | None, config_path: str | None) -> ApiClient:
    file_url, file_token = (None, "")
    if config_path:
        file_url, file_token = _api_from_config_file(config_path)
    url = api_url or file_url or DEFAULT_API_URL
    if not url.startswith(("http://", "https://")):
        _fail(f"--api: expected an http:// URL, got {url!r}", EXIT_USAGE)
    token = os.environ.get("PGROUTE_API_TOKEN") or file_token
    return ApiClient(url, token)


def _unreachable(client: ApiClient, reason: str) -> NoReturn:
    _fail(f"cannot reach the pgroute daemon at {client.base_url} ({reason}); "
          "is `pgroute run` running? (set --api or PGROUTE_API_URL if it listens elsewhere)")


def _check_http(client: ApiClient, what: str, code: int, body: Any) -> None:
    """Exit with the contract's status for any non-2xx answer."""
    if 200 <= code < 300:
        return
    error = body.get("error") if isinstance(body, dict) else None
    error = error or f"HTTP {code}"
    if code == 401:
        _fail(f"{what}: unauthorized ({error}); set PGROUTE_API_TOKEN to the daemon's api.token",
              EXIT_USAGE)
    if code == 409:
        _fail(f"{what} refused: {error}")
    if code == 400:
        _fail(f"{what}: {error}", EXIT_USAGE)
    if code == 404:
        _fail(f"{what}: {error} (is {client.base_url} a pgroute API?)")
    _fail(error if error.startswith(f"{what} ") else f"{what} failed: {error}")


def _get_status(client: ApiClient) -> dict:
    try:
        code, body = client.get("/api/status")
    except DaemonUnreachable as exc:
        _unreachable(client, str(exc))
    _check_http(client, "status", code, body)
    if not isinstance(body, dict):
        _fail(f"status: unexpected answer from {client.base_url}")
    return body


# -- formatting --------------------------------------------------------------------------
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def _age(iso: str | None) -> str:
    if not iso:
        return "never"
    try:
        ts = datetime.fromisoformat(iso)
    except ValueError:
        return iso[:8]
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    delta = (datetime.now(timezone.utc) - ts).total_seconds()
    return f"{_fmt_seconds(max(delta, 0.0))} ago"


def _fmt_epoch_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _health_word(info: dict) -> str:
    up = info.get("up")
    return "up" if up is True else "down" if up is False else "?"


def _onoff(flag: Any) -> str:
    return "on" if flag else "off"


def render_status(st: dict) -> str:
    """The human ``pgroute status``: everything an operator checks first, in 80 columns."""
    lines: list[str] = []
    active = st.get("active") or "NONE"
    lines.append(_clip(f"pgroute  {st.get('state', '?')}   active: {active}   "
                       f"epoch {st.get('epoch', '?')}"
                       + ("   PAUSED" if st.get("paused") else "")))
    if st.get("reason"):
        lines.append(_clip(f"  reason: {st['reason']}"))
    op = st.get("operation")
    if op:
        started = op.get("started_at")
        running = f", {_fmt_seconds(time.time() - started)}" if isinstance(started, (int, float)) else ""
        lines.append(_clip(f"  operation: {op.get('kind')} (phase {op.get('phase')}{running})"))
    lines.append("")
    header = f"{'NODE':<7}  {'ROLE':<7}  {'HEALTH':<6}  {'LATENCY':>8}  {'LAG':<14}  {'PROBED':<10}  ENDPOINT"
    lines.append(header)
    nodes = st.get("nodes") or {}
    for name in ("primary", "mirror"):
        info = nodes.get(name) or {}
        lat = info.get("latency_ms")
        latency = f"{lat:.1f} ms" if isinstance(lat, (int, float)) else "-"
        lag = "-"
        if info.get("lag_bytes") is not None or info.get("lag_seconds") is not None:
            lag = _fmt_bytes(info.get("lag_bytes"))
            if info.get("lag_seconds") is not None:
                lag += f" {_fmt_seconds(info['lag_seconds'])}"
        probed = _age(info.get("last_probe")).replace(" ago", "")
        endpoint = f"{info.get('host', '?')}:{info.get('port', '?')}"
        row = (f"{name:<7}  {str(info.get('role', '?')):<7}  {_health_word(info):<6}  "
               f"{latency:>8}  {lag:<14}  {probed:<10}  {endpoint}")
        lines.append(_clip(row))
        extras = []
        if info.get("read_only"):
            extras.append("read-only (fenced)")
        sub = info.get("subscription")
        if isinstance(sub, dict):
            extras.append(f"subscription {sub.get('name')} "
                          f"{'enabled' if sub.get('enabled') else 'disabled'}")
        if info.get("error"):
            extras.append(f"error: {info['error']}")
        if extras:
            lines.append(_clip(f"{'':9}" + "; ".join(extras)))
    lines.append("")
    conns = st.get("connections") or {}
    rejected = conns.get("rejected") or {}
    rej = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
    lines.append(_clip(f"connections: {conns.get('current', 0)} open, {conns.get('total', 0)} total, "
                       f"{conns.get('waiting', 0)} waiting; rejected: {rej}"))
    lines.append(_clip(
        f"replication: {st.get('replication', '?')} (synchronous {st.get('synchronous', '?')})   "
        f"auto-failover: {_onoff(st.get('auto_failover'))}   "
        f"auto-failback: {_onoff(st.get('auto_failback'))}"))
    bound = st.get("detection_bound_seconds")
    if isinstance(bound, (int, float)):
        lines.append(f"failure detected within {_fmt_seconds(bound)}")
    conflicts = st.get("conflicts") or []
    if conflicts:
        lines.append(_clip(f"CONFLICTS: {len(conflicts)} (details: pgroute status --json)"))
    events = st.get("events") or []
    if events:
        ev = events[0]
        took = ""
        if ev.get("ended_at") and ev.get("started_at"):
            took = f" in {_fmt_seconds(ev['ended_at'] - ev['started_at'])}"
        lines.append(_clip(f"last event: #{ev.get('id')} {ev.get('kind')} "
                           f"{ev.get('result') or 'running'}{took} at "
                           f"{_fmt_epoch_time(ev.get('started_at'))}: {ev.get('reason', '')}"))
    return mask_dsn("\n".join(lines))


def render_event(event: dict) -> list[str]:
    kind = str(event.get("kind", "?"))
    result = event.get("result") or "ended"
    took = ""
    if event.get("ended_at") and event.get("started_at"):
        took = f" in {event['ended_at'] - event['started_at']:.2f} s"
    lines = [f"{kind.upper()} {result}{took}: {event.get('reason', '')}"]
    phases = event.get("phases") or {}
    if phases:
        width = max(len(p) for p in phases)
        for phase, seconds in phases.items():
            lines.append(f"  {phase:<{width}}  {seconds * 1000:9.1f} ms")
    details = event.get("details") or {}
    if details:
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in details.items()))
    return [mask_dsn(line) for line in lines]


# -- commands --------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgroute")
def main() -> None:
    """pgroute: keep a PostgreSQL application writing when its primary dies."""


def _config_option(help_text: str) -> Callable:
    return click.option("--config", "config_path", metavar="FILE", envvar="PGROUTE_CONFIG",
                        type=click.Path(dir_okay=False), help=help_text)


def _env_file_option() -> Callable:
    return click.option("--env-file", metavar="FILE", type=click.Path(dir_okay=False),
                        help="dotenv file (e.g. backend/.env); the process environment wins")


def _daemon_options(func: Callable) -> Callable:
    func = click.option("--api", "api_url", metavar="URL", envvar="PGROUTE_API_URL",
                        help=f"daemon API (default: --config's [api] listen, else {DEFAULT_API_URL})"
                        )(func)
    func = _config_option("config file to read [api] listen (and token) from")(func)
    return func


@main.command()
@_config_option("TOML configuration file")
@_env_file_option()
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False), help="overrides [log] level")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="overrides [log] format")
def run(config_path: str | None, env_file: str | None, log_level: str | None,
        log_format: str | None) -> None:
    """Run the proxy, the monitor and the API until SIGTERM/SIGINT."""
    config = _load_config(config_path, env_file)
    try:
        validate_runtime(config)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", EXIT_USAGE)
    log_update: dict[str, str] = {}
    if log_level:
        log_update["level"] = log_level.upper()
    if log_format:
        log_update["format"] = log_format
    if log_update:
        config = config.model_copy(update={"log": config.log.model_copy(update=log_update)})
    from .logs import setup_logging

    setup_logging(config.log.level, config.log.format)
    from .app import run as run_app

    sys.exit(run_app(config))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="the raw /api/status document")
@_daemon_options
def status(as_json: bool, api_url: str | None, config_path: str | None) -> None:
    """Active node, epoch, node health, lag, connections."""
    client = _client(api_url, config_path)
    st = _get_status(client)
    if as_json:
        click.echo(mask_dsn(json.dumps(st, indent=2, sort_keys=False)))
    else:
        click.echo(render_status(st))


_PROMPTS = {
    "failover": "FAILOVER: route new connections to the mirror and promote it",
    "failback": "FAILBACK: route new connections back to the primary and restore replication",
    "switchover": "SWITCHOVER: move the active role to the other node without losing a commit",
    "rejoin": "REJOIN: recover the standby's divergent commits and make it follow the active node",
}


def _operation(kind: str, options: dict[str, bool], yes: bool, api_url: str | None,
               config_path: str | None) -> None:
    client = _client(api_url, config_path)
    st = _get_status(client)  # also proves the daemon is there before asking
    if not yes:
        flags = "".join(f" --{k}" for k, v in options.items() if v)
        click.confirm(f"{_PROMPTS[kind]}{flags}\n(now: {st.get('state', '?')}, active "
                      f"{st.get('active') or 'none'}, epoch {st.get('epoch', '?')}). Continue?",
                      abort=True, err=True)

    outcome: dict[str, Any] = {}

    def post() -> None:
        try:
            outcome["answer"] = client.post(f"/api/{kind}", options, timeout=OPERATION_TIMEOUT)
        except DaemonUnreachable as exc:
            outcome["unreachable"] = str(exc)

    worker = threading.Thread(target=post, name=f"pgroute-{kind}", daemon=True)
    worker.start()
    click.echo(f"{kind.upper()} requested at {client.base_url}")
    last_phase = None
    try:
        while True:
            worker.join(POLL_INTERVAL)
            if not worker.is_alive():
                break
            try:
                code, body = client.get("/api/status", timeout=2.0)
            except DaemonUnreachable:
                continue
            op = body.get("operation") if code == 200 and isinstance(body, dict) else None
            phase = op.get("phase") if isinstance(op, dict) else None
            if phase and phase != last_phase:
                click.echo(f"  ... {phase}")
                last_phase = phase
    except KeyboardInterrupt:
        _fail(f"interrupted: the {kind} goes on in the daemon; follow it with `pgroute status`")
    if "unreachable" in outcome:
        _unreachable(client, outcome["unreachable"])
    code, body = outcome["answer"]
    _check_http(client, kind, code, body)
    if not isinstance(body, dict):
        _fail(f"{kind}: unexpected answer from {client.base_url}")
    for line in render_event(body):
        click.echo(line)
    if body.get("result") not in ("ok", None):
        _fail(f"{kind} {body.get('result')}: {body.get('reason', 'no reason given')}")


@main.command()
@click.option("--force", is_flag=True,
              help="fail over even if the mirror lags or the primary still answers")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def failover(force: bool, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """Manual switch to the mirror (seed: failover_to_mirror.ps1)."""
    _operation("failover", {"force": force}, yes, api_url, config_path)


@main.command()
@click.option("--resync", is_flag=True,
              help="rebuild the primary's data from the mirror instead of catching up")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def failback(resync: bool, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """Back to the primary, replication restored (seed: failback_to_primary.ps1)."""
    _operation("failback", {"resync": resync}, yes, api_url, config_path)


@main.command()
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def switchover(yes: bool, api_url: str | None, config_path: str | None) -> None:
    """Planned, zero-loss move of the active role."""
    _operation("switchover", {}, yes, api_url, config_path)


@main.command()
@click.option("--resync", is_flag=True, help="full resynchronisation (pg_dump of the node first)")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def rejoin(resync: bool, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """Make the fenced standby follow the active node again (divergent commits recovered)."""
    _operation("rejoin", {"resync": resync}, yes, api_url, config_path)


@main.command()
@click.option("--active", "active", type=click.Choice(["primary", "mirror"]), required=True,
              help="the node that holds the current data")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def resolve(active: str, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """When pgroute fails closed (cannot tell which node is current): declare the active node."""
    client = _client(api_url, config_path)
    st = _get_status(client)
    if not yes:
        click.confirm(f"Declare {active} the active node (now: {st.get('state', '?')}: "
                      f"{st.get('reason', '')})? Routing to a stale node loses data. Continue?",
                      abort=True, err=True)
    try:
        code, body = client.post("/api/resolve", {"active": active}, timeout=60.0)
    except DaemonUnreachable as exc:
        _unreachable(client, str(exc))
    _check_http(client, "resolve", code, body)
    for line in render_event(body):
        click.echo(line)


def _simple(kind: str, api_url: str | None, config_path: str | None) -> None:
    client = _client(api_url, config_path)
    try:
        code, body = client.post(f"/api/{kind}", {}, timeout=30.0)
    except DaemonUnreachable as exc:
        _unreachable(client, str(exc))
    _check_http(client, kind, code, body)
    reason = body.get("reason") if isinstance(body, dict) else None
    click.echo(mask_dsn(f"{kind}d" + (f": {reason}" if reason else "")))
    if isinstance(body, dict) and body.get("result") not in ("ok", None):
        _fail(f"{kind} {body.get('result')}: {reason or 'no reason given'}")


@main.command()
@_daemon_options
def pause(api_url: str | None, config_path: str | None) -> None:
    """Hold new connections (they wait up to proxy.pause_timeout)."""
    _simple("pause", api_url, config_path)


@main.command()
@_daemon_options
def resume(api_url: str | None, config_path: str | None) -> None:
    """Release held and new connections."""
    _simple("resume", api_url, config_path)


def _run_maybe_async(value: Any) -> Any:
    return asyncio.run(value) if inspect.isawaitable(value) else value


@main.command()
@_config_option("TOML configuration file")
@_env_file_option()
def check(config_path: str | None, env_file: str | None) -> None:
    """Validate the config, reach both nodes, verify the replication setup."""
    config = _load_config(config_path, env_file)
    click.echo(f"✓ configuration: {config_path or 'defaults and environment'} is valid")
    config_ok = True
    try:
        validate_runtime(config)
    except ConfigError as exc:
        config_ok = False
        click.echo(mask_dsn(f"✗ configuration: {exc}"))
    splice_ok, splice_line, splice_fix = _check_splice(config.proxy.splice)
    click.echo(f"{'✓' if splice_ok else '✗'} {splice_line}")
    if splice_fix:
        click.echo(f"    fix: {splice_fix}")
    from .tools.check import check_pair

    try:
        items = _run_maybe_async(check_pair(
            config.primary.dsn, config.mirror.dsn, config.replication.publication,
            config.replication.subscription, config.health.timeout,
            max_lag_bytes=config.health.max_lag_bytes))
    except Exception as exc:  # check_pair should report, not raise; say what broke anyway
        _fail(f"check could not run: {type(exc).__name__}: {exc}")
    if hasattr(items, "ok"):
        items = [items]
    all_ok = config_ok and splice_ok
    for item in items:
        mark = "✓" if item.ok else "✗"
        detail = f": {item.detail}" if getattr(item, "detail", "") else ""
        click.echo(mask_dsn(f"{mark} {item.name}{detail}"))
        if not item.ok:
            all_ok = False
            if getattr(item, "fix", ""):
                click.echo(mask_dsn(f"    fix: {item.fix}"))
    if not config_ok:
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_OK if all_ok else EXIT_FAILED)


def _check_splice(mode: str) -> tuple[bool, str, str]:
    """(ok, line, fix) for proxy.splice: can this machine load the kernel splice?"""
    if mode == "off":
        return True, "kernel splicing: off (proxy.splice), sessions are piped by pgroute", ""
    from .proxy.sockmap import TRUSTED_KERNEL, Splicer, SpliceUnavailable, trusted_kernel

    if mode == "auto" and not trusted_kernel():
        return (True, "kernel splicing: not used on this kernel (auto needs Linux "
                      f"{TRUSTED_KERNEL[0]}.{TRUSTED_KERNEL[1]} or newer); sessions will be piped "
                      "by pgroute", "")
    try:
        splicer = Splicer.create(1)
        try:
            splicer.self_test()
        finally:
            splicer.close()
    except SpliceUnavailable as exc:
        if mode == "on":
            return (False, f"kernel splicing: unavailable ({exc.strerror}) and proxy.splice is \"on\"",
                    "run pgroute as root or with CAP_BPF and CAP_NET_ADMIN, or set proxy.splice = \"auto\"")
        return (True, f"kernel splicing: unavailable ({exc.strerror}); sessions will be piped by "
                      "pgroute (slower under load; root or CAP_BPF + CAP_NET_ADMIN enable it)", "")
    return True, "kernel splicing: available, sessions will be forwarded by the kernel", ""


async def _managed_by_pgroute(config: Config) -> str | None:
    """A description of pgroute's epoch stamp when a switch already happened, else None."""
    from .pg.catalog import read_stamp
    from .pg.connect import connect
    from .errors import PgRouteError

    for name in ("primary", "mirror"):
        try:
            conn = await connect(config.node_dsn(name), config.health.timeout)
        except (PgRouteError, OSError):
            continue
        try:
            epoch, active = await read_stamp(conn)
        finally:
            await conn.close()
        if epoch and epoch > 0:
            return f"epoch {epoch} stamped on {name}, active node {active}"
    return None


@main.command("setup-replication")
@_config_option("TOML configuration file")
@_env_file_option()
def setup_replication_cmd(config_path: str | None, env_file: str | None) -> None:
    """Create the publication and subscription if missing."""
    config = _load_config(config_path, env_file)
    import asyncpg

    from .tools.setup import setup_replication
    from .errors import PgRouteError

    managed = _run_maybe_async(_managed_by_pgroute(config))
    if managed:
        # After a failover the mirror is active and the primary follows it (or is
        # fenced): recreating the original direction would be wrong. Re-running the
        # seed's one-shot replication_setup must not fail the stack either.
        click.echo(f"nothing to do: pgroute manages this pair ({managed}); "
                   "see `pgroute status`, `pgroute rejoin`, `pgroute failback`")
        return
    try:
        steps = _run_maybe_async(setup_replication(
            config.primary.dsn, config.mirror.dsn, config.replication.publication,
            config.replication.subscription))
    except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # OSError covers TimeoutError (initial copy too slow) and refused connections.
        _fail(f"setup-replication failed: {exc}")
    for step in steps or []:
        click.echo(mask_dsn(f"✓ {step}"))
    if not steps:
        click.echo("nothing to do: publication and subscription already exist")


@main.command()
@click.option("--tour", is_flag=True, help="walk through a failover and a failback step by step")
def demo(tour: bool) -> None:
    """Local primary + mirror + pgroute, no Docker needed."""
    from .demo import main as demo_main

    sys.exit(demo_main(tour=tour) or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
