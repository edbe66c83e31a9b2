"""`pgroute run`: wires configuration, Router, proxy, controller, API, metrics and alerts.

Start order: the controller decides where to route (it may fail closed) before the
proxy accepts a connection; the API comes up last. Stop order is the reverse, on
SIGTERM or SIGINT: stop accepting, let sessions finish up to
``proxy.shutdown_timeout``, then close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .cluster.store import StoreError
from .config import Config
from .errors import ConfigError
from .proxy.loop import install_event_loop_policy
from .proxy.router import Route, Router
from .proxy.server import ProxyServer

if TYPE_CHECKING:
    # Imported for real inside start(): `pgroute run` loads the control plane, the
    # API and alerts only when it starts them.
    from aiohttp.web import AppRunner

    from .alerts import Alerter
    from .cluster_node import ClusterNode
    from .control.controller import Controller

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Running:
    """A started pgroute, for `run`, the demo and the tests."""

    config: Config
    router: Router
    proxy: ProxyServer
    # The single instance's controller; in a cluster, the first one (each term
    # builds a new one: `controller` is the current).
    first_controller: Controller
    api_runner: AppRunner
    alerter: Alerter
    # proxy.listen_piped: the same Router (fencing, counters), sessions never spliced.
    piped_proxy: ProxyServer | None = None
    # [cluster] etcd: this instance in the cluster (its controller runs while it leads).
    cluster: ClusterNode | None = None

    @property
    def controller(self) -> Controller:
        """The controller running now (in a cluster: this instance's current one,
        which decides only while it leads)."""
        return self.cluster.controller if self.cluster is not None else self.first_controller

    @property
    def proxy_port(self) -> int:
        return self.proxy.port

    @property
    def piped_port(self) -> int | None:
        return self.piped_proxy.port if self.piped_proxy is not None else None

    @property
    def api_port(self) -> int:
        from .api.http import bound_port

        return bound_port(self.api_runner)

    async def stop(self) -> None:
        from .api.http import stop_api

        if self.cluster is not None:
            # Hand the leadership over first (the leader key revoked: another
            # instance leads now); the member record stays while sessions drain.
            await self.cluster.step_down()
        # Both listeners drain at once: shutdown_timeout bounds the whole stop.
        await asyncio.gather(*(p.close() for p in (self.proxy, self.piped_proxy) if p is not None))
        if self.cluster is not None:
            # Sessions are closed: the member lease is revoked, the record vanishes.
            await self.cluster.close()
        await self.controller.close()
        await stop_api(self.api_runner)
        await self.alerter.close()


async def start(config: Config) -> Running:
    if config.cluster.enabled:
        return await _start_cluster(config)
    from .alerts import Alerter
    from .api.http import make_app, start_api
    from .api.metrics import create_metrics
    from .control.controller import Controller

    router = Router(Route(None, 0, paused=True, reason="starting"))
    controller = Controller(config, router)
    registry, metrics = create_metrics(controller, router)
    alerter = Alerter(config.alerts, on_failure=metrics.alert_failed)
    await alerter.start()
    controller.add_event_listener(alerter.emit)
    try:
        await controller.start()
    except BaseException:
        await controller.close()
        await alerter.close()
        raise
    p = config.proxy
    started: list[ProxyServer] = []
    try:
        proxy = _proxy_server(config, router, p.host, p.port, p.splice)
        await _listen("proxy.listen", p.listen, proxy.start())
        started.append(proxy)
        piped = None
        if p.listen_piped:
            piped = _proxy_server(config, router, p.piped_host, p.piped_port, "off")
            await _listen("proxy.listen_piped", p.listen_piped, piped.start())
            started.append(piped)
            log.info("piped listener (proxy.listen_piped) on %s:%d", p.piped_host, piped.port)
        app = make_app(controller, router, config, registry)
        api_runner = await _listen("api.listen", config.api.listen, start_api(app, config.api.host, config.api.port))
    except BaseException:
        await asyncio.gather(*(s.close() for s in started))
        await controller.close()
        await alerter.close()
        raise
    log.info("pgroute listening on %s:%d (API %s)", p.host, proxy.port, config.api.listen)
    return Running(config, router, proxy, controller, api_runner, alerter, piped)


async def _start_cluster(config: Config) -> Running:
    """A cluster member: the proxy follows the etcd route from the start (no node
    until it is read); the controller runs only while this instance leads."""
    from .alerts import Alerter
    from .api.http import bound_port, make_app, start_api, stop_api
    from .api.metrics import create_metrics
    from .cluster_node import ClusterNode

    router = Router(Route(None, 0, paused=True, reason="starting: reading the route from etcd"))
    node = ClusterNode(config, router)
    registry, metrics = create_metrics(node.control, router, cluster=node)
    alerter = Alerter(config.alerts, on_failure=metrics.alert_failed)
    await alerter.start()
    node.control.add_event_listener(alerter.emit)
    p = config.proxy
    proxy = _proxy_server(config, router, p.host, p.port, p.splice)
    piped = _proxy_server(config, router, p.piped_host, p.piped_port, "off") if p.listen_piped else None
    api_runner = None
    started: list[ProxyServer] = []
    try:
        await _listen("proxy.listen", p.listen, proxy.start())
        started.append(proxy)
        if piped is not None:
            await _listen("proxy.listen_piped", p.listen_piped, piped.start())
            started.append(piped)
        app = make_app(node.control, router, config, registry)
        api_runner = await _listen("api.listen", config.api.listen, start_api(app, config.api.host, config.api.port))
        c = config.cluster
        await node.start(
            c.advertise_proxy or f"{p.host}:{proxy.port}",
            c.advertise_api or f"http://{config.api.host}:{bound_port(api_runner)}",
        )
    except BaseException:
        await asyncio.gather(*(s.close() for s in started))
        if api_runner is not None:
            await stop_api(api_runner)
        await node.close()
        await alerter.close()
        raise
    log.info("pgroute cluster member %s listening on %s:%d (API %s)", node.name, p.host, proxy.port, config.api.listen)
    return Running(config, router, proxy, node.controller, api_runner, alerter, piped, node)


def _proxy_server(config: Config, router: Router, host: str, port: int, splice: str) -> ProxyServer:
    """A listener on the shared Router with [proxy]'s limits (the main one spliced as
    configured; the piped one never)."""
    p = config.proxy
    return ProxyServer(
        router,
        host,
        port,
        max_client_connections=p.max_client_connections,
        connect_timeout=p.connect_timeout,
        pause_timeout=p.pause_timeout,
        startup_timeout=p.startup_timeout,
        shutdown_timeout=p.shutdown_timeout,
        splice=splice,
    )


async def _listen(key: str, address: str, starting: Awaitable[T]) -> T:
    """Await a listener's start; an OSError (address already in use, cannot assign
    the address, permission denied) names the configuration key to change."""
    try:
        return await starting
    except OSError as exc:
        raise OSError(exc.errno, f"{key} = {address!r}: {exc.strerror or exc}") from exc


async def _main(config: Config) -> int:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop()
    return 0


def run(config: Config) -> int:
    loop_name = install_event_loop_policy()
    log.info("event loop: %s", loop_name)
    try:
        return asyncio.run(_main(config))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except StoreError as exc:  # [cluster]: etcd unreachable at start, or the name in use
        log.error("cannot start: cluster: %s", exc)
        return 1
