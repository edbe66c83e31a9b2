"""Immutable values shared by the monitor, the controller and the interfaces.

Nothing here does I/O. Every value is frozen: shared state is replaced, never mutated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeName(str, enum.Enum):
    """The two configured nodes. 'primary' is the node configured as primary,
    whichever role it has right now."""

    PRIMARY = "primary"
    MIRROR = "mirror"

    @property
    def other(self) -> NodeName:
        return NodeName.MIRROR if self is NodeName.PRIMARY else NodeName.PRIMARY


class Operation(str, enum.Enum):
    """What an operator can ask for and what the controller runs: one name for each,
    shared by the state machine, the procedures, the API and the CLI."""

    FAILOVER = "failover"  # promote the standby, fencing the old active node first
    SWITCHOVER = "switchover"  # planned, zero-loss move of the active role (both up)
    FAILBACK = "failback"  # rejoin the configured primary if needed, then switch over to it
    REJOIN = "rejoin"  # recover divergent commits, resubscribe the standby
    FENCE = "fence"  # make a returned node read-only, end its sessions, stamp the epoch
    UNFENCE = "unfence"  # the active node was left read-only by an interrupted switch
    PROMOTE = "promote"  # finish a promotion interrupted by a pgroute restart
    PAUSE = "pause"  # hold new connections
    RESUME = "resume"  # release them
    RESOLVE = "resolve"  # operator declares the active node after a fail-closed start

    @property
    def moves_role(self) -> bool:
        """Whether it moves the active role (routes elsewhere while it runs)."""
        return self in (Operation.FAILOVER, Operation.SWITCHOVER, Operation.FAILBACK)

    @property
    def tag(self) -> str:
        """The word its log lines carry (the seed's operators grep for them)."""
        if self in (Operation.FAILBACK, Operation.REJOIN):
            return "FAILBACK"
        if self is Operation.SWITCHOVER:
            return "SWITCHOVER"
        return "FAILOVER"


@dataclass(frozen=True)
class HealthSample:
    """One probe of one node. A probe never raises: failures are samples with ok=False.

    A failed probe is one of three things, and only the first counts against the node:
    - unreachable (``reached`` False): no answer, connection refused or reset, timeout;
    - refused (``reached`` True): the server answered with an error (authentication,
      permissions, missing database, too many connections, starting up, shutting
      down): the node is alive and pgroute cannot use it;
    - local (``local`` True): pgroute itself ran out of something (open files,
      memory, buffers) and never reached the node.
    """

    node: NodeName
    ok: bool
    at: float  # time.time() when the probe finished
    latency: float  # seconds the probe took
    error: str | None = None  # short, password-free reason when not ok
    reached: bool = False  # the server answered (ok, or refused with an error)
    local: bool = False  # the probe failed inside pgroute, not at the node
    read_only: bool | None = None  # any part of the fence is in force (read-only default or closed to logins)
    fenced: bool | None = None  # the whole fence is in force
    wal_lsn: int | None = None  # pg_current_wal_lsn() as an integer
    subscription: str | None = None  # name of a pgroute subscription on this node
    subscription_enabled: bool | None = None
    publisher_lag_bytes: int | None = None  # lag of the standby's slot as seen on this node
    sync_state: str | None = None  # pg_stat_replication.sync_state of the standby's walsender
    publisher_lag_seconds: float | None = None  # replay_lag of the standby's walsender
    # last_value of every sequence (naming.qualified name -> value); unowned ones are moved
    # past these at promotion since logical replication does not carry sequences.
    sequences: tuple[tuple[str, int], ...] | None = None
    unfed_sequences: frozenset[str] = frozenset()  # sequences no integer column draws from
    # This node's own subscription, as its server counts it (stall detection).
    worker_running: bool | None = None  # an apply worker runs
    received_lsn: int | None = None  # last publisher position received
    applied_lsn: int | None = None  # last publisher commit applied (replication origin)
    apply_errors: int | None = None  # apply + sync errors since the statistics were reset
    apply_error: str | None = None  # the last apply error's text, when the server log is readable
    # Replicated UPDATEs/DELETEs its apply worker skipped for want of the row (PostgreSQL
    # 18+: confl_update_missing + confl_delete_missing; None before, which cannot count
    # them): no error, replication goes on, and this node has silently diverged.
    missing_rows: int | None = None

    @property
    def refused(self) -> bool:
        """The server answered but refused pgroute: alive, not usable."""
        return not self.ok and self.reached


#: An event detail's value, as it appears in JSON.
Detail = str | int | float | bool


@dataclass(frozen=True)
class Event:
    """A recorded control-plane event (for the API, metrics and alerts)."""

    id: int
    kind: str  # failover, failback, switchover, node_down, node_up, fence, lag, ...
    reason: str
    started_at: float
    ended_at: float | None = None
    result: str | None = None  # ok, failed, refused, None while running
    phases: tuple[tuple[str, float], ...] = ()  # (phase, seconds)
    details: tuple[tuple[str, Detail], ...] = ()  # JSON-typed: counts are ints, flags bools

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
