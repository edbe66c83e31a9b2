"""How the CLI shows the daemon's documents to a person.

Owns the human ``pgroute status`` (:func:`render_status`), the lines printed for a
finished operation (:func:`render_event`) and for one ``pgroute check`` item
(:func:`render_check_item`), with their small formatting helpers.
Everything here is a pure function of the JSON the API returns (plus the clock, for
ages): no click, no I/O, no import of the command modules, so the demo can print the
same text without pulling in the command line. Every string returned has passwords
masked; the status fits in 80 columns.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..pg.dsn import mask_dsn

WIDTH = 80


def _fmt_bytes(n: int | None) -> str:
    """A byte count for people: ``512 B``, ``1.5 MiB``; ``-`` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _fmt_seconds(s: float | None) -> str:
    """A duration in the unit that keeps it short: ms, s, min, h, d; ``-`` when unknown."""
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
        ts = ts.replace(tzinfo=UTC)
    delta = (datetime.now(UTC) - ts).total_seconds()
    return f"{_fmt_seconds(max(delta, 0.0))} ago"


def _fmt_epoch_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _health_word(info: dict[str, Any]) -> str:
    up = info.get("up")
    if info.get("refused"):
        return "refuses"  # answers with an error: alive, not usable by pgroute
    return "up" if up is True else "down" if up is False else "?"


def _onoff(flag: Any) -> str:
    return "on" if flag else "off"


def render_status(st: dict[str, Any]) -> str:
    """The human ``pgroute status``: everything an operator checks first, in 80 columns."""
    lines: list[str] = []
    active = st.get("active") or "NONE"
    lines.append(
        _clip(
            f"pgroute  {st.get('state', '?')}   active: {active}   "
            f"epoch {st.get('epoch', '?')}" + ("   PAUSED" if st.get("paused") else "")
        )
    )
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
        row = (
            f"{name:<7}  {info.get('role', '?')!s:<7}  {_health_word(info):<6}  "
            f"{latency:>8}  {lag:<14}  {probed:<10}  {endpoint}"
        )
        lines.append(_clip(row))
        extras = []
        if info.get("read_only"):
            extras.append("read-only (fenced)")
        sub = info.get("subscription")
        if isinstance(sub, dict):
            extras.append(f"subscription {sub.get('name')} {'enabled' if sub.get('enabled') else 'disabled'}")
        if info.get("missing_rows"):
            # The server's count (PostgreSQL 18+); the problem line says when it rose.
            extras.append(f"missing rows: {info['missing_rows']}")
        if info.get("error") and not info.get("problem"):
            extras.append(f"error: {info['error']}")
        if extras:
            lines.append(_clip(f"{'':9}" + "; ".join(extras)))
        if info.get("problem"):
            # Its own lines, wrapped rather than clipped: the one thing an operator must
            # read about this node, and its end often says what to run.
            lines.extend(textwrap.wrap(str(info["problem"]), WIDTH, initial_indent=" " * 9, subsequent_indent=" " * 11))
    lines.append("")
    conns = st.get("connections") or {}
    rejected = conns.get("rejected") or {}
    rej = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
    lines.append(
        _clip(
            f"connections: {conns.get('current', 0)} open, {conns.get('total', 0)} total, "
            f"{conns.get('waiting', 0)} waiting; rejected: {rej}"
        )
    )
    lines.append(
        _clip(
            f"replication: {st.get('replication', '?')} (synchronous {st.get('synchronous', '?')})   "
            f"auto-failover: {_onoff(st.get('auto_failover'))}   "
            f"auto-failback: {_onoff(st.get('auto_failback'))}"
        )
    )
    cluster = st.get("cluster")
    if isinstance(cluster, dict):
        lines.extend(_cluster_lines(cluster))
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
        lines.append(
            _clip(
                f"last event: #{ev.get('id')} {ev.get('kind')} "
                f"{ev.get('result') or 'running'}{took} at "
                f"{_fmt_epoch_time(ev.get('started_at'))}: {ev.get('reason', '')}"
            )
        )
    return mask_dsn("\n".join(lines))


def _cluster_lines(cluster: dict[str, Any]) -> list[str]:
    """``/api/status``'s cluster section: this instance, the leader, each member's
    applied epoch (a member behind the route's epoch has not acknowledged it yet)."""
    me = cluster.get("name", "?")
    role = cluster.get("role", "?")
    head = f"cluster: this instance {me} ({role}), leader {cluster.get('leader') or 'none elected'}"
    lines = [_clip(head)]
    if cluster.get("cut_off"):
        lines.append("  CUT OFF from etcd: routing to no node until it answers")
    failsafe = cluster.get("failsafe")
    if isinstance(failsafe, dict):
        lines.append(
            _clip(
                f"  FAILSAFE: etcd unreachable for {failsafe.get('since_s', '?')}s; routing on, "
                f"{failsafe.get('last') or 'confirmed by every peer'}"
            )
        )
    roster = cluster.get("roster")
    if isinstance(roster, dict):
        members = roster.get("members") or []
        waiting = sorted(set(members) - set(roster.get("may_lead") or []))
        note = f" (not yet eligible to lead: {', '.join(waiting)})" if waiting else ""
        lines.append(_clip(f"  roster generation {roster.get('gen', '?')}: {', '.join(members)}{note}"))
    for member in cluster.get("members") or []:
        if not isinstance(member, dict):
            continue
        paused = ", paused" if member.get("paused") else ""
        lines.append(
            _clip(
                f"  {member.get('name', '?')}: epoch {member.get('epoch', '?')}{paused}, "
                f"proxy {member.get('proxy') or '?'}, api {member.get('api') or '?'}"
            )
        )
    return lines


def render_event(event: dict[str, Any]) -> list[str]:
    """A finished operation's event as lines: kind, result, duration and reason, then
    one line per phase with its milliseconds, then the details."""
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


def render_check_item(
    name: str, ok: bool, detail: str, fix: str | None = None, warning: bool = False, notes: Sequence[str] = ()
) -> list[str]:
    """One ``pgroute check`` item: ``✓``, ``!`` (ok, but read it) or ``✗``, its name and
    detail; the fix under a failure or a warning; its notes under it whatever the
    verdict (a mixed pair's limits, which pg_dump serves which use)."""
    mark = "✗" if not ok else "!" if warning else "✓"
    lines = [f"{mark} {name}" + (f": {detail}" if detail else "")]
    if (not ok or warning) and fix:
        lines.append(f"    fix: {fix}")
    lines += [f"    {note}" for note in notes]
    return [mask_dsn(line) for line in lines]


__all__ = ["render_check_item", "render_event", "render_status"]
