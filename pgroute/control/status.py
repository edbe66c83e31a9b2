"""``/api/status`` as a pure function of what the controller knows: the state, the
last samples, the published route, the proxy's counters, the running operation and
the event log. No I/O, no clock: table-tested in tests/unit/test_status.py.

Passwords never appear: reasons and errors are masked here, whatever produced them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..model import HealthSample, NodeName
from ..pg.dsn import mask_dsn
from ..proxy.router import ProxyStats, Route
from .state import Phase, Standby, State, divergence_problem


@dataclass(frozen=True)
class StatusInputs:
    """Everything ``/api/status`` shows, as one snapshot."""

    state: State
    samples: Mapping[NodeName, HealthSample]
    route: Route
    stats: ProxyStats
    addresses: Mapping[NodeName, tuple[str, int]]  # host, port of each node
    synchronous: str
    detection_bound: float
    operation: Mapping[str, Any] | None = None  # kind, phase, started_at
    conflicts: Sequence[Mapping[str, Any]] = ()
    events: Sequence[Mapping[str, Any]] = ()
    # The active node's sequences that no column draws from, with their draw rates:
    # their move at promotion rests on samples and rates alone (control.sequences).
    unowned_sequences: Sequence[Mapping[str, Any]] = ()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def build_status(i: StatusInputs) -> dict[str, Any]:
    s = i.state
    route = i.route
    return {
        "state": state_name(s),
        "reason": mask_dsn(s.reason),
        # During a switch new connections wait (not refused): report the node
        # holding the role until the switch routes elsewhere.
        "active": (
            route.backend.name if route.backend else s.active.value if s.busy and s.active and route.paused else None
        ),
        "epoch": s.epoch,
        "paused": route.paused,
        "auto_failover": s.policy.auto_failover,
        "auto_failback": s.policy.auto_failback,
        "synchronous": i.synchronous,
        "replication": replication_health(s),
        "nodes": {n.value: node_status(s, n, i.samples, i.addresses[n]) for n in NodeName},
        "connections": {
            "current": i.stats.connections_current,
            "total": i.stats.connections_total,
            "waiting": i.stats.waiting,
            "rejected": dict(i.stats.rejected),
        },
        "detection_bound_seconds": round(i.detection_bound, 3),
        "operation": dict(i.operation) if i.operation is not None else None,
        "conflicts": [dict(c) for c in i.conflicts[-50:]],
        "sequences": {"without_column": [dict(x) for x in i.unowned_sequences]},
        "events": [dict(e) for e in i.events],
    }


def state_name(s: State) -> str:
    if s.phase is Phase.NO_ROUTABLE_NODE or s.active is None:
        return "no_routable_node"
    if s.phase is Phase.FAILING_OVER:
        return "failing_over"
    if s.phase is Phase.SWITCHING:
        return "switching"
    if s.paused:
        return "paused"
    prefix = f"{s.active.value}_active"
    if s.phase is Phase.ACTIVE_SUSPECT:
        return f"{s.active.value}_suspect"
    if s.phase is Phase.ACTIVE_DOWN:
        return f"{s.active.value}_down"
    other = s.active.other.value
    if s.standby is Standby.DOWN:
        return f"{prefix}_{other}_down"
    if s.standby in (Standby.FENCED, Standby.UNFENCED):
        return f"{prefix}_{other}_fenced"
    if s.standby is Standby.REJOINING:
        return f"{prefix}_{other}_rejoining"
    return prefix


def replication_health(s: State) -> str:
    if s.active is None or s.standby in (
        Standby.DOWN,
        Standby.UNKNOWN,
        Standby.FENCED,
        Standby.UNFENCED,
        Standby.REJOINING,
    ):
        return "none"
    if s.standby is Standby.NOT_FOLLOWING:
        return "broken"
    if s.standby is Standby.STALLED:
        return "stalled"
    if s.standby is Standby.REFUSED:
        return "unknown"
    if s.lag_bytes is not None and s.lag_bytes > s.policy.max_lag_bytes:
        return "lagging"
    return "ok"


def _problem(s: State, node: NodeName) -> str | None:
    """What is wrong with a node that answers: refused, its replication stalled, or
    diverged (it skipped replicated changes for want of the row: PostgreSQL 18+)."""
    if node is s.active:
        return f"refuses pgroute: {s.active_refused}" if s.active_refused else None
    problems = []
    if s.standby is Standby.STALLED and s.standby_stall:
        problems.append(f"replication stalled: {s.standby_stall}")
    if s.standby is Standby.REFUSED and s.standby_refused:
        problems.append(f"refuses pgroute: {s.standby_refused}")
    if diverged := divergence_problem(s):
        problems.append(diverged)
    return "; ".join(problems) or None


def node_status(
    s: State, node: NodeName, samples: Mapping[NodeName, HealthSample], address: tuple[str, int]
) -> dict[str, Any]:
    sample = samples.get(node)
    if node is s.active:
        role = "active" if s.phase is not Phase.ACTIVE_DOWN else "down"
    elif sample is not None and sample.refused:
        role = "refusing"
    elif sample is not None and not sample.ok:
        role = "down"
    elif s.active is not None and s.standby in (Standby.FENCED, Standby.UNFENCED, Standby.REJOINING):
        role = "fenced"
    elif s.active is not None and s.standby in (Standby.FOLLOWING, Standby.NOT_FOLLOWING):
        role = "standby"
    else:
        role = "unknown"
    active_sample = samples.get(s.active) if s.active else None
    lag = lag_s = None
    if node is not s.active and active_sample is not None and active_sample.ok:
        lag, lag_s = active_sample.publisher_lag_bytes, active_sample.publisher_lag_seconds
    return {
        "role": role,
        "up": None if sample is None else sample.ok,
        "host": address[0],
        "port": address[1],
        "last_probe": iso(sample.at) if sample else None,
        "latency_ms": round(sample.latency * 1000, 3) if sample else None,
        "error": mask_dsn(sample.error) if sample and sample.error else None,
        # Answers, but refuses pgroute (authentication, permissions, ...): alive.
        "refused": sample.refused if sample else None,
        "problem": mask_dsn(problem) if (problem := _problem(s, node)) else None,
        "read_only": sample.read_only if sample else None,
        "lag_bytes": lag,
        "lag_seconds": lag_s,
        # Replicated updates/deletes its subscription skipped for want of the row, as
        # its server counts them (PostgreSQL 18+; None on 15 and 16, which cannot tell).
        "missing_rows": sample.missing_rows if sample else None,
        "subscription": (
            {"name": sample.subscription, "enabled": bool(sample.subscription_enabled)}
            if sample and sample.subscription
            else None
        ),
    }
