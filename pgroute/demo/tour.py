"""`pgroute demo --tour`: a scripted crash, failover, rejoin and failback under a
writer, then a check that no acknowledged write was lost on either node.

Invariant: the tour's exit status is 0 only when every step completed and every
write the writer saw acknowledged is on both nodes at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import textwrap
import time
from typing import TYPE_CHECKING, Any

from pgroute.local.workload import Chrispar, Writer, missing, wait_until

from .setup import Demo, ignore_stop_signals, start_with_retries, stop_signals, wait_following
from .setup import say as _say

if TYPE_CHECKING:
    from pgroute.app import Running
    from pgroute.control.controller import Controller

log = logging.getLogger(__name__)

TOUR_WRITES_BEFORE_KILL = 100
TOUR_REJOIN_TIMEOUT = 120.0


class _Clock:
    """Prints tour steps stamped with the seconds since the tour began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        """Print one step, wrapped to 80 columns under its time stamp."""
        stamp = f"[{time.monotonic() - self.t0:6.1f} s] "
        _say(
            textwrap.fill(
                text,
                80,
                initial_indent=stamp,
                subsequent_indent=" " * len(stamp),
                break_long_words=False,
                break_on_hyphens=False,
            )
        )


def _indent(lines: list[str] | str, prefix: str = "           ", width: int = 80) -> str:
    """Indent (and wrap to ``width``) lines printed under a tour step."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = []
    for line in lines:
        if len(prefix + line) <= width:
            out.append(prefix + line if line else "")
            continue
        lead = line[: len(line) - len(line.lstrip())]
        out.append(
            textwrap.fill(
                line.strip(),
                width,
                initial_indent=prefix + lead,
                subsequent_indent=prefix + lead + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)


async def tour_main(demo: Demo) -> int:
    """Run pgroute and the tour; SIGINT, SIGTERM or SIGHUP end it (130). Returns the exit status."""
    from pgroute.app import start

    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    stoppers = stop_signals()
    for sig in stoppers:
        loop.add_signal_handler(sig, main_task.cancel)
    running: Running | None = None
    try:
        running = await start(demo.config)
        return await _tour_steps(demo, running)
    except asyncio.CancelledError:
        _say("pgroute demo: tour interrupted", err=True)
        return 130
    except Exception as exc:  # the tour's one catch-all: say what broke, then clean up
        log.debug("tour failed", exc_info=True)
        _say(f"pgroute demo: tour failed: {type(exc).__name__}: {exc}", err=True)
        if running is not None:
            from ..cli.render import render_status

            _say(render_status(running.controller.status()), err=True)
        return 1
    finally:
        for sig in stoppers:
            loop.remove_signal_handler(sig)
        ignore_stop_signals()  # a second signal must not cut running.stop() short
        if running is not None:
            await running.stop()


async def _tour_steps(demo: Demo, running: Running) -> int:
    """The tour itself: crash, failover, rejoin, failback, then the check of every write."""
    from ..cli.render import render_event, render_status

    pair, cfg, ctl = demo.pair, demo.config, running.controller
    clock = _Clock()
    status = ctl.status
    say = clock.say
    say(
        f"pgroute: proxy {cfg.proxy.listen}, API {demo.api_url}; health probe every "
        f"{cfg.health.interval:g} s, a dead primary is declared down within "
        f"{cfg.health.detection_bound:.1f} s"
    )
    say(
        f"primary {pair.primary.host}:{pair.primary.port} (pid {pair.primary.postmaster_pid()}) "
        f"-> mirror {pair.mirror.host}:{pair.mirror.port} (subscription {pair.subscription})"
    )

    await wait_following(ctl)
    writer = Writer(demo.database_url, Chrispar("tour")).start()
    say(f"writer: inserting into usuarios (serial) and empleados (identity) through {demo.database_url}")
    try:
        await writer.wait_acked(TOUR_WRITES_BEFORE_KILL, 60)

        # -- crash -----------------------------------------------------------------------
        pid = pair.primary.postmaster_pid()
        acked_before = len(writer.acks)
        say(f"{acked_before} writes acknowledged; kill -9 the primary (pid {pid})")
        await asyncio.to_thread(pair.primary.kill)
        t_kill, wall_kill = time.monotonic(), time.time()
        first = await wait_until(
            lambda: writer.first_started_after(t_kill), 60, what="a write acknowledged after the kill"
        )
        failover_s = first.t - t_kill
        ev = await wait_until(lambda: _ended(ctl, "failover"), 30, what="the failover event")
        detected_s = max(ev["started_at"] - wall_kill, 0.0)
        say(
            f"first write acknowledged by the mirror {failover_s:.2f} s after the kill "
            f"(primary declared down after {detected_s:.2f} s)"
        )
        _say(_indent(render_event(ev)))
        if ev["result"] != "ok" or status()["active"] != "mirror":
            say("FAILOVER did not complete: see above")
            return 1
        await writer.wait_acked(20, 60)
        say("`pgroute status` now:")
        _say(f"\n{render_status(status())}\n")

        # -- return ------------------------------------------------------------------------
        say("starting the old primary again ...")
        await asyncio.to_thread(start_with_retries, pair.primary)
        t_back = time.monotonic()
        say(
            f"primary is back (pid {pair.primary.postmaster_pid()}); pgroute fences it, recovers "
            "its commits the mirror never got, and makes it follow the mirror"
        )
        try:
            await wait_until(lambda: _rejoined(ctl), TOUR_REJOIN_TIMEOUT, what="the primary to rejoin", interval=0.1)
        except TimeoutError:
            say("the primary did not rejoin in time:")
            _say(f"\n{render_status(status())}\n")
            return 1
        rejoin = _ended(ctl, "rejoin")
        say(f"primary rejoined in {time.monotonic() - t_back:.1f} s")
        if rejoin is not None:
            _say(_indent(render_event(rejoin)))

        # -- failback ----------------------------------------------------------------------
        await writer.wait_acked(20, 60)
        say("FAILBACK to the primary (what `pgroute failback --yes` asks for) ...")
        failback = await _request_with_retries(ctl, "failback")
        _say(_indent(render_event(failback)))
        stall_ms = failback.get("details", {}).get("write_stall_ms", "?")
        await writer.wait_acked(20, 60)
    finally:
        await writer.stop()
    say(f"writer stopped: {len(writer.acks)} writes acknowledged, {writer.error_count} errors retried")

    # -- verify ----------------------------------------------------------------------------
    say("checking every acknowledged write on both nodes ...")
    await asyncio.to_thread(pair.wait_synced, 60)
    lost_primary = await missing(pair.primary_dsn(), writer.acks)
    lost_mirror = await missing(pair.mirror_dsn(), writer.acks)
    lost = {(a.table, a.id) for a in lost_primary + lost_mirror}
    # Show a status probed after the failback, not the samples taken before it.
    since = time.time()
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: _probed_since(status(), since), 10, what="fresh probes", interval=0.1)
    st = status()
    say("`pgroute status` at the end:")
    _say(f"\n{render_status(st)}")
    _say(f"""
summary
  writes acknowledged: {len(writer.acks)}
  lost: {len(lost)} (missing on the primary: {len(lost_primary)}, on the mirror: {len(lost_mirror)})
  failover time (kill -9 to first acknowledged write): {failover_s:.2f} s
  failback write stall: {stall_ms} ms
  active node: {st["active"]}, epoch {st["epoch"]}, replication {st["replication"]}
""")
    if lost:
        for a in (lost_primary + lost_mirror)[:10]:
            _say(f"  LOST: {a.table} id {a.id} ({a.name})", err=True)
        return 1
    return 0


def _ended(ctl: Controller, kind: str) -> dict[str, Any] | None:
    """The newest finished event of ``kind``."""
    return next((e for e in ctl.events(200) if e["kind"] == kind and e["ended_at"]), None)


def _probed_since(st: dict[str, Any], since: float) -> bool:
    """True when every node in status `st` was probed after wall time `since`."""
    from datetime import datetime

    for info in st["nodes"].values():
        when = info.get("last_probe")
        if not when or datetime.fromisoformat(when).timestamp() < since:
            return False
    return True


def _rejoined(ctl: Controller) -> bool:
    """True once the old primary follows the active mirror."""
    st = ctl.status()
    return st["active"] == "mirror" and st["replication"] == "ok" and st["nodes"]["primary"]["subscription"] is not None


async def _request_with_retries(ctl: Controller, kind: str, attempts: int = 10) -> dict[str, Any]:
    """Ask for an operation, retrying while it is refused (e.g. a probe is pending)."""
    from pgroute.errors import ActionRefused

    for attempt in range(attempts):
        try:
            return await ctl.request(kind)
        except ActionRefused as exc:
            if attempt == attempts - 1:
                raise
            log.info("%s refused (%s); retrying", kind, exc)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")
