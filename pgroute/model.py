"""Immutable values shared by the monitor, the controller and the interfaces.

Nothing here does I/O. Every value is frozen: shared state is replaced, never mutated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NodeName(str, enum.Enum):
    """The two configured nodes. 'primary' is the node configured as primary,
    whichever role it has right now."""

    PRIMARY = "primary"
    MIRROR = "mirror"

    @property
    def other(self) -> "NodeName":
        return NodeName.MIRROR if self is NodeName.PRIMARY else NodeName.PRIMARY


@dataclass(frozen=True)
class HealthSample:
    """One probe of one node. A probe never raises: failures are samples with ok=False."""

    node: NodeName
    ok: bool
    at: float                      # time.time() when the probe finished
    latency: float                 # seconds the probe took
    error: str | None = None       # short, password-free reason when not ok
    in_recovery: bool | None = None
    read_only: bool | None = None  # default_transaction_read_only = on (fenced)
    wal_lsn: int | None = None     # pg_current_wal_lsn() as an integer
    epoch_stamp: int | None = None  # pgroute epoch stamped on the node, if any
    active_stamp: str | None = None  # node name stamped as active with that epoch
    subscription: str | None = None  # name of a pgroute subscription on this node
    subscription_enabled: bool | None = None
    subscription_lsn: int | None = None  # latest applied/flushed LSN reported by its worker
    publisher_lag_bytes: int | None = None  # lag of the standby's slot as seen on this node
    sync_state: str | None = None  # pg_stat_replication.sync_state of the standby's walsender
    publisher_lag_seconds: float | None = None  # replay_lag of the standby's walsender
    # last_value of every sequence ('schema.name' -> value); unowned ones are moved
    # past these at promotion since logical replication does not carry sequences.
    sequences: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class NodeHealth:
    """What the monitor believes about a node: last sample plus confirmation counters."""

    node: NodeName
    up: bool | None = None          # None until the first probe
    last: HealthSample | None = None
    consecutive_failures: int = 0
    lag_bytes: int | None = None    # standby lag behind the active node, last known
    lag_at: float | None = None


@dataclass(frozen=True)
class Event:
    """A recorded control-plane event (for the API, metrics and alerts)."""

    id: int
    kind: str              # failover, failback, switchover, node_down, node_up, fence, lag, ...
    reason: str
    started_at: float
    ended_at: float | None = None
    result: str | None = None    # ok, failed, refused, None while running
    phases: tuple[tuple[str, float], ...] = ()   # (phase, seconds)
    details: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "result": self.result,
            "phases": {name: round(sec, 4) for name, sec in self.phases},
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class PersistedState:
    """What survives a pgroute restart (state file and node stamps)."""

    epoch: int = 0
    active: NodeName | None = NodeName.PRIMARY
    # The node that must never be routed to until it is rejoined (None: none fenced).
    fenced: NodeName | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())
