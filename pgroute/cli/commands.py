"""The ``pgroute`` command group and the commands that run or talk to the daemon.

Owns the commands of the contract and their exit statuses: 0 done, 1 refused or
failed (the reason on stderr), 2 usage or configuration error. ``run`` starts the
daemon; ``status``, ``failover``, ``failback``, ``switchover``, ``rejoin``,
``resolve``, ``pause`` and ``resume`` talk to a running daemon's HTTP API (as
``patronictl`` talks to Patroni); ``demo`` starts a local pair. The commands that work
without a daemon (``check``, ``setup-replication``) live in :mod:`.offline` and are
added to the group here.

Heavy modules (the daemon, the demo) are imported inside their commands so
``pgroute status`` starts fast and a missing optional piece only affects the command
that needs it.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, NoReturn

import click

from .. import __version__
from ..config import ConfigError, validate_runtime
from ..pg.dsn import mask_dsn
from .base import EXIT_USAGE, F, config_option, env_file_option, fail, load_config_or_exit
from .client import DEFAULT_API_URL, ApiClient, ClientSetupError, DaemonUnreachable, make_client
from .offline import check, setup_replication_cmd
from .render import render_event, render_status

POLL_INTERVAL = 0.3
# Socket inactivity limit for a command's POST; the daemon answers when the
# operation ends, and a failback with a long catch-up may take minutes.
OPERATION_TIMEOUT = 900.0


# -- reaching the daemon -----------------------------------------------------------------
def _client(api_url: str | None, config_path: str | None) -> ApiClient:
    try:
        return make_client(api_url, config_path)
    except ClientSetupError as exc:
        fail(str(exc), EXIT_USAGE)


def _unreachable(client: ApiClient, reason: str) -> NoReturn:
    fail(
        f"cannot reach the pgroute daemon at {client.base_url} ({reason}); "
        "is `pgroute run` running? (set --api or PGROUTE_API_URL if it listens elsewhere)"
    )


def _check_http(client: ApiClient, what: str, code: int, body: Any) -> None:
    """Exit with the contract's status for any non-2xx answer."""
    if 200 <= code < 300:
        return
    error = body.get("error") if isinstance(body, dict) else None
    error = error or f"HTTP {code}"
    if code == 401:
        fail(f"{what}: unauthorized ({error}); set PGROUTE_API_TOKEN to the daemon's api.token", EXIT_USAGE)
    if code == 409:
        # The controller's reasons already say "<kind> refused: ..." (state.py).
        fail(error if error.startswith(f"{what} refused") else f"{what} refused: {error}")
    if code == 400:
        fail(f"{what}: {error}", EXIT_USAGE)
    if code == 404:
        fail(f"{what}: {error} (is {client.base_url} a pgroute API?)")
    fail(error if error.startswith(f"{what} ") else f"{what} failed: {error}")


def _get_status(client: ApiClient) -> dict[str, Any]:
    try:
        code, body = client.get("/api/status")
    except DaemonUnreachable as exc:
        _unreachable(client, str(exc))
    _check_http(client, "status", code, body)
    if not isinstance(body, dict):
        fail(f"status: unexpected answer from {client.base_url}")
    return body


# -- the group and `run` --------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgroute")
def main() -> None:
    """pgroute: keep a PostgreSQL application writing when its primary dies."""


def _daemon_options(func: F) -> F:
    """--api and --config (for [api] listen and token), taken by every daemon command."""
    func = click.option(
        "--api",
        "api_url",
        metavar="URL",
        envvar="PGROUTE_API_URL",
        help=f"daemon API (default: --config's [api] listen, else {DEFAULT_API_URL})",
    )(func)
    func = config_option("config file to read [api] listen (and token) from")(func)
    return func


@main.command()
@config_option("TOML configuration file")
@env_file_option()
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="overrides [log] level",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="overrides [log] format")
def run(config_path: str | None, env_file: str | None, log_level: str | None, log_format: str | None) -> None:
    """Run the proxy, the monitor and the API until SIGTERM/SIGINT."""
    config = load_config_or_exit(config_path, env_file)
    try:
        validate_runtime(config)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_USAGE)
    log_update: dict[str, str] = {}
    if log_level:
        log_update["level"] = log_level.upper()
    if log_format:
        log_update["format"] = log_format
    if log_update:
        config = config.model_copy(update={"log": config.log.model_copy(update=log_update)})
    from ..logs import setup_logging

    setup_logging(config.log.level, config.log.format)
    from ..app import run as run_app

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


def _operation(kind: str, options: dict[str, bool], yes: bool, api_url: str | None, config_path: str | None) -> None:
    client = _client(api_url, config_path)
    st = _get_status(client)  # also proves the daemon is there before asking
    if not yes:
        flags = "".join(f" --{k}" for k, v in options.items() if v)
        click.confirm(
            f"{_PROMPTS[kind]}{flags}\n(now: {st.get('state', '?')}, active "
            f"{st.get('active') or 'none'}, epoch {st.get('epoch', '?')}). Continue?",
            abort=True,
            err=True,
        )

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
        fail(f"interrupted: the {kind} goes on in the daemon; follow it with `pgroute status`")
    if "unreachable" in outcome:
        _unreachable(client, outcome["unreachable"])
    code, body = outcome["answer"]
    _check_http(client, kind, code, body)
    if not isinstance(body, dict):
        fail(f"{kind}: unexpected answer from {client.base_url}")
    for line in render_event(body):
        click.echo(line)
    if body.get("result") not in ("ok", None):
        fail(f"{kind} {body.get('result')}: {body.get('reason', 'no reason given')}")


@main.command()
@click.option("--force", is_flag=True, help="fail over even if the mirror lags or the primary still answers")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def failover(force: bool, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """Manual switch to the mirror (seed: failover_to_mirror.ps1)."""
    _operation("failover", {"force": force}, yes, api_url, config_path)


@main.command()
@click.option("--resync", is_flag=True, help="rebuild the primary's data from the mirror instead of catching up")
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
@click.option(
    "--active",
    "active",
    type=click.Choice(["primary", "mirror"]),
    required=True,
    help="the node that holds the current data",
)
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_daemon_options
def resolve(active: str, yes: bool, api_url: str | None, config_path: str | None) -> None:
    """When pgroute fails closed (cannot tell which node is current): declare the active node."""
    client = _client(api_url, config_path)
    st = _get_status(client)
    if not yes:
        click.confirm(
            f"Declare {active} the active node (now: {st.get('state', '?')}: "
            f"{st.get('reason', '')})? Routing to a stale node loses data. Continue?",
            abort=True,
            err=True,
        )
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
        fail(f"{kind} {body.get('result')}: {reason or 'no reason given'}")


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


@main.command()
@click.option("--tour", is_flag=True, help="walk through a failover and a failback step by step")
@click.option("--upgrade", is_flag=True, help="walk through a major-version upgrade by switchover, with rollback")
@click.option(
    "--from", "from_version", type=int, metavar="MAJOR", help="--upgrade: old version (default: oldest installed)"
)
@click.option(
    "--to", "to_version", type=int, metavar="MAJOR", help="--upgrade: new version (default: newest installed)"
)
@click.option("--cluster", is_flag=True, help="three pgroute instances sharing one route through a local etcd")
def demo(tour: bool, upgrade: bool, from_version: int | None, to_version: int | None, cluster: bool) -> None:
    """Local primary + mirror + pgroute, no Docker needed."""
    if (from_version is not None or to_version is not None) and not upgrade:
        fail("--from and --to go with --upgrade", EXIT_USAGE)
    if sum((tour, upgrade, cluster)) > 1:
        fail("--tour, --upgrade and --cluster are different demos: choose one", EXIT_USAGE)
    from ..demo import main as demo_main

    if cluster:
        sys.exit(demo_main(cluster=True) or 0)
    if upgrade:
        sys.exit(demo_main(upgrade=(from_version, to_version)) or 0)
    sys.exit(demo_main(tour=tour) or 0)


main.add_command(check)
main.add_command(setup_replication_cmd)
