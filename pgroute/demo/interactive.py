"""`pgroute demo` without ``--tour``: pgroute runs until Ctrl-C while the user
plays with it (kills a server, asks for a failover, ...) from another terminal.

Invariant: blocking server management (starting a killed server) runs in a thread,
so the proxy and the monitor keep running meanwhile; zombie backends of a server
the user killed are reaped (this process is their subreaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from pgroute.errors import LocalClusterError
from pgroute.local import LocalPair
from pgroute.local.processes import reap_zombie_children

from .setup import DBNAME, Demo, ignore_stop_signals, say, start_with_retries, stop_signals, wait_following


def _reap_orphans(pair: LocalPair) -> None:
    """Reap backends of a server the user killed (so no zombie postgres lingers)."""
    reap_zombie_children(p for p in (pair.primary.postmaster_pid(), pair.mirror.postmaster_pid()) if p)


async def interactive(demo: Demo) -> int:
    """Run pgroute for the demo until SIGINT, SIGTERM or SIGHUP; SIGUSR1 (or Enter)
    starts stopped servers again. Returns the exit status."""
    from pgroute.app import start

    pair = demo.pair
    try:
        running = await start(demo.config)
    except OSError as exc:  # a port taken between the check and the bind
        say(f"pgroute demo: cannot start pgroute: {exc}", err=True)
        return 1
    stop = asyncio.Event()
    restart = asyncio.Event()
    loop = asyncio.get_running_loop()
    stoppers = stop_signals()
    for sig in stoppers:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, restart.set)
    stdin_watched = False
    if sys.stdin is not None and sys.stdin.isatty():

        def on_stdin() -> None:
            if sys.stdin.readline():
                restart.set()
            else:  # Ctrl-D: stop listening (EOF would fire forever)
                loop.remove_reader(sys.stdin.fileno())

        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            loop.add_reader(sys.stdin.fileno(), on_stdin)
            stdin_watched = True
    try:
        try:
            await wait_following(running.controller)
        except TimeoutError:
            say(
                "pgroute demo: pgroute has not seen the mirror following yet; "
                "an automatic failover waits for that (see `status`)",
                err=True,
            )
        _print_welcome(demo, stdin_watched, running.controller.status()["active"])
        pids = {c.name: c.postmaster_pid() for c in (pair.primary, pair.mirror)}
        shown = _active_with_pid(demo, running.controller.status()["active"])
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(stop, restart), 0.5)
            _reap_orphans(pair)
            # The welcome's kill step needs the active node's pid: say it whenever it changes.
            now = _active_with_pid(demo, running.controller.status()["active"])
            if now is not None and now != shown:
                say(f">>> pgroute now routes to {now[0]} (pid {now[1]}); `kill -9 {now[1]}` crashes it.")
            shown = now if now is not None else shown
            for cluster in (pair.primary, pair.mirror):
                pid = cluster.postmaster_pid()
                if pids.get(cluster.name) and pid is None:
                    how = "press Enter or run" if stdin_watched else "run"
                    say(
                        f"\n>>> {cluster.name} (pid {pids[cluster.name]}) is gone. "
                        f"pgroute notices within {demo.config.health.detection_bound:.1f} s.\n"
                        f">>> To start it again: {how} `kill -USR1 {os.getpid()}`."
                    )
                pids[cluster.name] = pid
            if restart.is_set() and not stop.is_set():
                restart.clear()
                await _restart_stopped(demo, pids)
    finally:
        for sig in (*stoppers, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        ignore_stop_signals()
        if stdin_watched:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(sys.stdin.fileno())
        say("\npgroute demo: stopping pgroute ...")
        await running.stop()
    return 0


async def _first(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _restart_stopped(demo: Demo, pids: dict[str, int | None]) -> None:
    """Start the servers that are not running (in a thread), and say what changed."""
    stopped = [c for c in (demo.pair.primary, demo.pair.mirror) if not c.is_running()]
    if not stopped:
        say(">>> both servers are running; nothing to start")
        return
    for cluster in stopped:
        _reap_orphans(demo.pair)
        try:
            await asyncio.to_thread(start_with_retries, cluster)
        except LocalClusterError as exc:
            say(f">>> could not start {cluster.name}: {exc}", err=True)
            continue
        pids[cluster.name] = cluster.postmaster_pid()
        say(f">>> {cluster.name} started again (pid {pids[cluster.name]}, port {cluster.port}).")
        if cluster is demo.pair.primary:
            say(
                ">>> If the mirror is active, pgroute fences the primary (read-only), recovers its\n"
                ">>> commits the mirror never got, and makes it follow the mirror. Then:\n"
                f">>>   {demo.pgroute} status --api {demo.api_url}\n"
                f">>>   {demo.pgroute} failback --yes --api {demo.api_url}"
            )


def _active_with_pid(demo: Demo, active: str | None) -> tuple[str, int] | None:
    """(the active node's name, its postmaster pid), or None when none is active or running."""
    cluster = {c.name: c for c in (demo.pair.primary, demo.pair.mirror)}.get(active or "")
    pid = cluster.postmaster_pid() if cluster is not None else None
    return (cluster.name, pid) if cluster is not None and pid else None


def things_to_try(
    cmd: str, api: str, active: str, active_pid: int | None, demo_pid: int, enter: str
) -> list[tuple[str, str]]:
    """The welcome's steps, as (comment, command), in an order where each works after
    the one before: the kill comes while the node whose pid it names is active, the
    failback after a failover, the switchover with both nodes up and following."""
    other = "mirror" if active == "primary" else "primary"
    return [
        ("where pgroute routes, node health, lag, connections", f"{cmd} status --api {api}"),
        (
            f"crash the active node ({active}, pid {active_pid}): pgroute fails over to the {other} by itself "
            "(this demo prints the active node's pid whenever it changes)",
            f"kill -9 {active_pid}",
        ),
        (
            f"start the killed server again{enter}: pgroute fences it, recovers its commits the "
            f"{other} never got, and makes it follow",
            f"kill -USR1 {demo_pid}",
        ),
        (
            "back to the primary once it follows, replication restored (the seed's failback_to_primary.ps1)",
            f"{cmd} failback --yes --api {api}",
        ),
        (
            "manual switch to the mirror (the seed's failover_to_mirror.ps1); the primary is fenced and follows",
            f"{cmd} failover --yes --api {api}",
        ),
        ("planned move of the active role back to the primary, no commit lost", f"{cmd} switchover --yes --api {api}"),
        ("the seed's health check, same answer", f"curl -s {api}/api/health"),
    ]


def _print_welcome(demo: Demo, stdin_watched: bool, active: str | None) -> None:
    """What to connect to and what to try."""
    pair, cfg, cmd, api = demo.pair, demo.config, demo.pgroute, demo.api_url
    primary_pid, mirror_pid = pair.primary.postmaster_pid(), pair.mirror.postmaster_pid()
    enter = " (or press Enter here)" if stdin_watched else ""
    now = _active_with_pid(demo, active) or ("primary", primary_pid)
    tries = things_to_try(cmd, api, now[0], now[1], os.getpid(), enter)
    say(f"""
pgroute demo is running (Ctrl-C stops it and removes everything).

Point your application at pgroute:
  DATABASE_URL=postgresql://postgres@{cfg.proxy.listen}/{DBNAME}
  psql postgresql://postgres@{cfg.proxy.listen}/{DBNAME} -c 'SELECT * FROM usuarios'

  health   {api}/api/health
  status   {api}/api/status
  metrics  {api}/metrics
  config   {demo.config_path}
  primary  {pair.primary.host}:{pair.primary.port} (pid {primary_pid})
  mirror   {pair.mirror.host}:{pair.mirror.port} (pid {mirror_pid}), subscription {pair.subscription}
  active   {now[0]} (pid {now[1]})

Things to try, in another terminal, in this order:""")
    for comment, command in tries:
        say(f"  # {comment}\n  {command}")
    say()
