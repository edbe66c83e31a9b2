"""`pgroute demo`: a local primary + mirror + pgroute in one process, no Docker.

Owns the first-run experience. ``main(tour=False)`` starts two real PostgreSQL
servers from the binaries on this machine (``pgroute.local``), the seed's
``chrispar`` database on both with logical replication from the primary to the
mirror, writes a demo configuration file, and runs pgroute (proxy, monitor, API)
in this process. Interactive mode prints what to connect to and what to try, then
waits for Ctrl-C; ``tour=True`` runs a scripted crash, failover, rejoin and failback
under a writer and checks that no acknowledged write was lost.

Invariants:

- Everything lives in one directory (``.pgroute-demo/demo-*`` under the current
  directory, else under the system temporary directory), and Ctrl-C, SIGTERM,
  closing the terminal (SIGHUP) or the end of the tour destroys both servers and
  that directory. Only recovery files pgroute wrote (divergent commits, pg_dump)
  are kept, moved to ``.pgroute-demo/recovery-<time>``. A run killed with SIGKILL
  leaves its directory behind; the next run removes it (``local.cleanup_abandoned``).
- The demo configuration ignores the process environment: a ``DATABASE_URL`` in the
  shell must not point the demo's pgroute at somebody's real database.
- Blocking server management (start, kill, psql) runs in threads so the proxy and
  the monitor keep running while a node is crashed or restarted.

Modules: `setup` (directory, servers, configuration: what the modes share),
`interactive` (the default mode), `tour` (``--tour``), `upgrade` (``--upgrade``: a
major-version upgrade by switchover), `cluster` (``--cluster``: three instances on a
local etcd). This module owns `main`:
setting up, choosing the mode, and the clean-up that must run however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pgroute import local
from pgroute.errors import LocalClusterError, PgRouteError

from .cluster import cluster_main, etcd_missing
from .interactive import interactive
from .setup import (
    DEMO_DIR,
    HEALTH,
    RECOVERY_PREFIX,
    RUN_PREFIX,
    Demo,
    ignore_stop_signals,
    keep_recovery_files,
    make_demo_dir,
    prepare,
    remove_demo_dir,
    say,
    stop_signals,
)
from .tour import TOUR_WRITES_BEFORE_KILL, tour_main
from .upgrade import choose_versions, prepare_upgrade, upgrade_main

__all__ = [
    "DEMO_DIR",
    "HEALTH",
    "RECOVERY_PREFIX",
    "RUN_PREFIX",
    "TOUR_WRITES_BEFORE_KILL",
    "keep_recovery_files",
    "main",
]


def main(tour: bool = False, upgrade: tuple[int | None, int | None] | None = None, cluster: bool = False) -> int:
    """Run the demo; returns the exit status (0 ok, 1 failed or lost writes, 130 interrupted).
    ``upgrade=(from, to)`` runs the upgrade story (`upgrade`); None versions: the oldest
    and newest installed. ``cluster``: three instances on a local etcd (`cluster`;
    2 when etcd is not installed)."""
    if cluster:
        return _cluster()
    previous = _stop_signals_as_interrupt()
    base: Path | None = None
    demo: Demo | None = None
    versions: tuple[int, int] | None = None
    try:
        try:
            if upgrade is not None:
                versions = choose_versions(*upgrade)
            else:
                local.find_binaries()
            base = make_demo_dir()
            if versions is not None:
                say(f"pgroute demo: starting PostgreSQL {versions[0]} and {versions[1]} servers in {base} ...")
                started = time.monotonic()
                demo = prepare_upgrade(base, *versions)
            else:
                say(f"pgroute demo: starting a primary and a mirror in {base} ...")
                started = time.monotonic()
                demo = prepare(base)
        except LocalClusterError as exc:
            say(f"pgroute demo: {exc}", err=True)
            return 1
        except PgRouteError as exc:  # ConfigError: a bug in write_config, say it plainly
            say(f"pgroute demo: {exc}", err=True)
            return 1
        say(f"pgroute demo: primary and mirror ready in {time.monotonic() - started:.1f} s")

        from pgroute.proxy.loop import install_event_loop_policy

        install_event_loop_policy()
        if versions is not None:
            from pgroute.logs import setup_logging

            setup_logging("WARNING")  # the story tells itself; the log shows what went wrong
            return asyncio.run(upgrade_main(demo, *versions))
        if tour:
            from pgroute.logs import setup_logging

            # The tour tells its own story; pgroute's log shows only what went wrong.
            setup_logging("WARNING")
            return asyncio.run(tour_main(demo))
        from pgroute.logs import setup_logging

        setup_logging("INFO")
        logging.getLogger("pgroute.local").setLevel(logging.WARNING)
        return asyncio.run(interactive(demo))
    except KeyboardInterrupt:
        say("pgroute demo: interrupted", err=True)
        return 130
    finally:
        # Cleanup must finish: a second Ctrl-C (or SIGTERM, SIGHUP) here would leave
        # servers behind.
        if threading.current_thread() is threading.main_thread():
            ignore_stop_signals()
        try:
            _clean_up(base, demo, tour or versions is not None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _cluster() -> int:
    """`pgroute demo --cluster`: what is missing first (etcd: 2, PostgreSQL: 1), then
    the run (`cluster.cluster_main`, which stops what it started) and the directory."""
    why = etcd_missing()
    if why is not None:
        say(f"pgroute demo --cluster: {why}", err=True)
        return 2
    previous = _stop_signals_as_interrupt()
    base: Path | None = None
    try:
        try:
            local.find_binaries()
            base = make_demo_dir()
        except LocalClusterError as exc:
            say(f"pgroute demo: {exc}", err=True)
            return 1
        return cluster_main(base)
    except KeyboardInterrupt:
        say("pgroute demo: interrupted", err=True)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            ignore_stop_signals()
        try:
            if base is not None:
                _clean_up(base, None, False)
                if not base.exists():
                    say(f"pgroute demo: {base} removed")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _clean_up(base: Path | None, demo: Demo | None, tour: bool) -> None:
    """Destroy both servers and remove the run's directory, keeping the recovery files."""
    if demo is not None:
        demo.pair.destroy()
    if base is None:
        return
    try:
        kept = keep_recovery_files(base)
    except OSError as exc:
        say(f"pgroute demo: cannot move the recovery files out of {base} ({exc}); left it in place", err=True)
        return
    remove_demo_dir(base)
    if demo is not None:
        say(f"pgroute demo: primary and mirror destroyed, {base} removed")
    if kept is not None:
        say(f"pgroute demo: recovery files (divergent commits, pg_dump before a resync) kept in {kept}")
    elif tour and demo is not None:
        say("pgroute demo: no recovery files: no commit diverged, no node was resynchronised")


def _stop_signals_as_interrupt() -> dict[int, Any]:
    """SIGTERM and SIGHUP (closing the terminal) during the (blocking) setup end it
    like Ctrl-C, so cleanup runs; a SIGHUP ignored at start (``nohup``) stays ignored.
    Returns the original handlers of SIGINT, SIGTERM and SIGHUP, to restore at the end."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    if threading.current_thread() is not threading.main_thread():
        return {}
    for sig in stop_signals():
        if sig is not signal.SIGINT:  # SIGINT already raises KeyboardInterrupt
            signal.signal(sig, handler)
    return previous
