"""The failover state machine: a pure function from (state, observation) to a decision.

No I/O, no clock: time arrives inside observations. ``transition`` returns a
``Decision`` holding the next state, the actions the controller must run in order,
and a one-line reason that the controller logs once and the tests assert.

The machine is symmetric: "active" is whichever node takes writes (the configured
primary or the configured mirror) and "standby" is the other one. A failover promotes
the standby; a failback is a switchover back to the configured primary.

Invariants:
- A node is promoted only when it was seen up, is a follower of the active node (it
  holds a pgroute subscription) and its last known lag passes the lag gate (or the
  pair runs synchronously, or an operator forces it).
- A standby that is up, is not a subscriber and is not read-only gets fenced: it could
  hold or take writes the active node does not have.
- While an operation runs (failing over, switching, rejoining), probes update
  knowledge but start nothing new.
- A standby that skipped replicated updates/deletes for want of the row (PostgreSQL
  18+ counts them; see ``_divergence``) has diverged: reported once per rise, never
  failed back to automatically, and an operator's switch to it needs ``--force``, but
  an automatic failover still takes it (its reason says so): when the active node is
  dead the alternative is no database at all, and the diverged node lacks only the
  rows it was missing, unlike a stalled one that may lack everything since it stopped.

It runs past 600 lines on purpose: every case of the one transition table (active
probes, standby probes, requests, results, start-up) is read and table-tested
together in tests/unit/test_state.py, and splitting the table would scatter it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ..model import HealthSample, NodeName, Operation


class Phase(str, enum.Enum):
    ACTIVE_HEALTHY = "active_healthy"  # active node answering
    ACTIVE_SUSPECT = "active_suspect"  # active node failed probes, confirming
    ACTIVE_DOWN = "active_down"  # active node down, no failover possible/allowed
    FAILING_OVER = "failing_over"
    SWITCHING = "switching"  # switchover or failback running
    NO_ROUTABLE_NODE = "no_routable_node"  # fail closed


class Standby(str, enum.Enum):
    UNKNOWN = "unknown"  # not probed yet
    FOLLOWING = "following"  # up, subscribed to the active node
    NOT_FOLLOWING = "not_following"  # up, subscription present but disabled
    DOWN = "down"
    UNFENCED = "unfenced"  # up, not a subscriber, writable: must be fenced
    FENCED = "fenced"  # up, read-only, not a subscriber: waits for rejoin
    REJOINING = "rejoining"
    STALLED = "stalled"  # subscribed, but its apply worker fails or makes no progress
    REFUSED = "refused"  # answers, but refuses pgroute (authentication, permissions, ...)


class Act(str, enum.Enum):
    """What a decision asks the controller to do. The members named like an
    ``Operation`` run that operation's procedure on ``Action.node``."""

    CONFIRM_PROBE = "confirm_probe"  # run `detail` confirming probes of node, retry_interval apart
    FAILOVER = Operation.FAILOVER.value  # promote the standby (node), fencing the old active first
    SWITCHOVER = Operation.SWITCHOVER.value  # planned move to node (both up)
    FAILBACK = Operation.FAILBACK.value  # rejoin if needed + switchover to the configured primary
    FENCE = Operation.FENCE.value  # make node read-only, end its sessions, stamp the epoch
    UNFENCE = Operation.UNFENCE.value  # the active node was left read-only by an interrupted switch
    REJOIN = Operation.REJOIN.value  # recover divergent commits, resubscribe node to the active one
    PROMOTE = Operation.PROMOTE.value  # finish a promotion a restart interrupted (node)
    STAMP = "stamp"  # write the state's epoch and active node on node (never stamped)
    PAUSE = Operation.PAUSE.value
    RESUME = Operation.RESUME.value
    EVENT = "event"  # record + alert an event of kind `detail`
    REFUSE = "refuse"  # refuse the operator's request with the decision's reason

    @property
    def operation(self) -> Operation | None:
        """The procedure this action runs, or None."""
        if self in _RUNS:
            return Operation(self.value)
        return None


_RUNS = frozenset({Act.FAILOVER, Act.SWITCHOVER, Act.FAILBACK, Act.FENCE, Act.UNFENCE, Act.REJOIN, Act.PROMOTE})
# Actions about one node: they cannot be built without it.
_NEEDS_NODE = _RUNS | {Act.CONFIRM_PROBE, Act.STAMP}


@dataclass(frozen=True)
class Action:
    kind: Act
    node: NodeName | None = None
    force: bool = False
    manual: bool = False
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind in _NEEDS_NODE and self.node is None:
            raise ValueError(f"action {self.kind.value} needs a node")

    @property
    def target(self) -> NodeName:
        """The node of an action that needs one (checked at construction)."""
        assert self.node is not None, self
        return self.node


@dataclass(frozen=True)
class Policy:
    auto_failover: bool = True
    auto_failback: bool = False
    auto_rejoin: bool = True
    max_retries: int = 3
    max_lag_bytes: int = 16 * 1024 * 1024
    synchronous: str = "off"
    failback_delay: float = 60.0
    # A follower whose error count rose this recently, or with no apply worker or no
    # progress (while behind) for this long, is stalled. Apply workers retry every
    # wal_retrieve_retry_interval (5 s by default): a window of several retries.
    stall_seconds: float = 30.0


@dataclass(frozen=True)
class State:
    active: NodeName | None
    epoch: int
    phase: Phase = Phase.ACTIVE_HEALTHY
    standby: Standby = Standby.UNKNOWN
    paused: bool = False  # operator pause (pgroute pause)
    failures: int = 0  # consecutive failed probes of the active node
    active_up: bool | None = None
    lag_bytes: int | None = None  # standby lag behind the active node, last known
    sync_standby: bool = False  # last sample: the standby's walsender was 'sync'
    standby_ready_since: float | None = None  # following and caught up since (auto failback)
    active_refused: str | None = None  # the active node answers but refuses pgroute: why
    standby_refused: str | None = None  # the same for the standby
    # Stall detection of the standby's subscription (see _stall).
    standby_errors: int | None = None  # apply + sync errors, last count
    standby_error_at: float | None = None  # when that count last rose
    standby_error_rises: int = 0  # rises in a row, each within stall_seconds of the last
    standby_no_worker_since: float | None = None
    standby_received: int | None = None  # received position, last seen
    standby_received_at: float | None = None  # when it last moved
    standby_stall: str | None = None  # why the standby is stalled
    # Divergence of the standby (see _divergence): replicated updates/deletes its
    # subscription skipped because it lacked the row (PostgreSQL 18+; None before).
    standby_missing: int | None = None  # the server's count, last seen: the baseline
    standby_skipped: int = 0  # its rises since pgroute first saw it: > 0 means diverged
    # The active node's WAL position last sampled (persisted with the state): with the
    # standby's applied position it estimates the lag while the active node is down.
    active_lsn: int | None = None
    reason: str = ""
    policy: Policy = Policy()

    @property
    def standby_node(self) -> NodeName | None:
        return self.active.other if self.active else None

    @property
    def busy(self) -> bool:
        return self.phase in (Phase.FAILING_OVER, Phase.SWITCHING) or self.standby is Standby.REJOINING


# -- observations -------------------------------------------------------------------


@dataclass(frozen=True)
class Probed:
    sample: HealthSample
    now: float


@dataclass(frozen=True)
class Requested:
    kind: Operation  # failover | failback | switchover | pause | resume | rejoin | resolve
    now: float
    force: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Operation(self.kind))  # a plain "failover" is accepted


@dataclass(frozen=True)
class Started:
    """The active node and epoch were decided from stored evidence: at start
    (``state_store.resolve_start``), or by an operator (``resolve``)."""

    active: NodeName | None
    epoch: int
    reason: str
    now: float
    unfinished_promotion: bool = False  # the active node still holds its subscription
    unstamped: bool = False  # the active node carries no epoch stamp yet
    fenced_winner: bool = False  # the active node was left fenced by a switch that never promoted
    by_operator: bool = False
    active_lsn: int | None = None  # its WAL position last sampled (state file)


@dataclass(frozen=True)
class Finished:
    kind: Operation  # failover | switchover | failback | fence | unfence | rejoin | promote
    ok: bool
    now: float
    node: NodeName | None = None  # the node the operation was about
    active: NodeName | None = None  # active node after the operation
    epoch: int = 0
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Operation(self.kind))


Observation = Probed | Requested | Finished | Started


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...]
    reason: str


def _fresh_standby(s: State) -> State:
    """Forget what was known about the standby (the roles moved, or pgroute started)."""
    return replace(
        s,
        standby_refused=None,
        active_refused=None,
        standby_errors=None,
        standby_error_at=None,
        standby_error_rises=0,
        standby_no_worker_since=None,
        standby_received=None,
        standby_received_at=None,
        standby_stall=None,
        standby_missing=None,
        standby_skipped=0,
    )


def _d(state: State, reason: str, *actions: Action) -> Decision:
    return Decision(replace(state, reason=reason) if actions or reason else state, tuple(actions), reason)


def transition(state: State, obs: Observation) -> Decision:
    if isinstance(obs, Probed):
        if state.active is not None and obs.sample.node is state.active:
            return _active_probed(state, obs)
        return _standby_probed(state, obs)
    if isinstance(obs, Requested):
        return _requested(state, obs)
    if isinstance(obs, Finished):
        return _finished(state, obs)
    if isinstance(obs, Started):
        return _started(state, obs)
    raise TypeError(f"unknown observation {obs!r}")


# -- probes of the active node ------------------------------------------------------------


def _active_probed(s: State, obs: Probed) -> Decision:
    sample, p = obs.sample, s.policy
    name = sample.node.value
    if sample.local:
        return _d(s, "")  # pgroute's own trouble (logged by the controller), not the node's
    if sample.refused:
        return _active_refused(s, obs)
    if sample.ok:
        lag = sample.publisher_lag_bytes if sample.publisher_lag_bytes is not None else s.lag_bytes
        new = replace(
            s,
            failures=0,
            active_up=True,
            lag_bytes=lag,
            sync_standby=sample.sync_state == "sync",
            active_refused=None,
            active_lsn=sample.wal_lsn if sample.wal_lsn is not None else s.active_lsn,
        )
        new = _track_ready(new, obs.now)
        if s.active_refused is not None and not s.busy:
            return _d(
                replace(new, phase=Phase.ACTIVE_HEALTHY if s.phase is not Phase.NO_ROUTABLE_NODE else s.phase),
                f"{name} accepts pgroute again",
                Action(Act.EVENT, sample.node, detail="node_up"),
            )
        if sample.read_only and not s.busy:
            return _d(
                replace(new, phase=Phase.ACTIVE_HEALTHY),
                f"active node {name} is read-only (left fenced by an interrupted switch): unfencing it",
                Action(Act.UNFENCE, sample.node),
            )
        if s.phase is Phase.NO_ROUTABLE_NODE and not s.busy:
            # A failover that failed routed nowhere and wrote nothing on the standby:
            # the active node still holds every commit.
            return _d(
                replace(new, phase=Phase.ACTIVE_HEALTHY),
                f"{name} answers again; routing to it (the failed failover routed no writes elsewhere)",
                Action(Act.EVENT, sample.node, detail="node_up"),
            )
        if s.phase in (Phase.ACTIVE_SUSPECT, Phase.ACTIVE_DOWN) and not s.busy:
            was = s.failures
            new = replace(new, phase=Phase.ACTIVE_HEALTHY)
            if s.phase is Phase.ACTIVE_DOWN:
                return _d(
                    new,
                    f"{name} answers again after being declared down",
                    Action(Act.EVENT, sample.node, detail="node_up"),
                )
            return _d(new, f"{name} answered again after {was} failed probe(s); no failover")
        return _maybe_auto_failback(new, obs.now)

    failures = s.failures + 1
    new = replace(s, failures=failures)
    if s.busy:
        return _d(new, "")
    if s.phase in (Phase.ACTIVE_DOWN, Phase.NO_ROUTABLE_NODE):
        # Already declared down; a failover may have become possible since.
        return _try_auto_failover(new, f"{name} still down ({sample.error})", repeat=True)
    if failures <= p.max_retries:
        # The first failure schedules every confirming probe at once (spaced
        # retry_interval, each bounded by the timeout, overlapping when the node hangs);
        # later failures only count. A success in between cancels the rest.
        confirm = (Action(Act.CONFIRM_PROBE, sample.node, detail=str(p.max_retries)),) if failures == 1 else ()
        return _d(
            replace(new, phase=Phase.ACTIVE_SUSPECT),
            f"{name} probe failed ({sample.error}); confirming, attempt {failures}/{p.max_retries}",
            *confirm,
        )
    new = replace(new, active_up=False, standby_ready_since=None)
    return _try_auto_failover(new, f"{name} down after {failures} failed probes ({sample.error})")


def _active_refused(s: State, obs: Probed) -> Decision:
    """The active node answered with an error: it is alive (and may still serve its
    clients), so it is never failed over from; health is degraded with the cause."""
    sample = obs.sample
    name = sample.node.value
    new = replace(s, failures=0, active_up=True, active_refused=sample.error or "refused")
    if s.busy:
        return _d(new, "")
    if s.phase in (Phase.ACTIVE_SUSPECT, Phase.ACTIVE_DOWN):
        new = replace(new, phase=Phase.ACTIVE_HEALTHY)
    if s.active_refused is None:
        return _d(
            new,
            f"{name} answers but refuses pgroute ({sample.error}): alive, no FAILOVER; fix pgroute's access to it",
            Action(Act.EVENT, sample.node, detail="node_refused"),
        )
    return _d(new, "")


def _try_auto_failover(s: State, why: str, repeat: bool = False) -> Decision:
    """The active node is declared down: fail over if policy and the standby allow.
    ``repeat``: it was already declared down; stay quiet unless something changed."""
    target = s.standby_node
    assert target is not None and s.active is not None
    blocked: str | None
    if not s.policy.auto_failover:
        blocked = "automatic failover is disabled (health.auto_failover = false)"
    else:
        blocked = _promotion_blocker(s, force=False)
    down_event = () if repeat else (Action(Act.EVENT, s.active, detail="node_down"),)
    if blocked:
        new = replace(s, phase=Phase.ACTIVE_DOWN if s.phase is not Phase.NO_ROUTABLE_NODE else s.phase)
        if repeat:
            return Decision(new, (), "")
        return _d(new, f"{why}; FAILOVER not started: {blocked}", *down_event)
    # A diverged standby is still taken (see the module docstring), and the reason says so.
    diverged = f", although it has diverged (it {skipped_words(s)})" if s.standby_skipped else ""
    return _d(
        replace(s, phase=Phase.FAILING_OVER),
        f"{why}; FAILOVER to {target.value}{diverged}",
        *down_event,
        Action(Act.FAILOVER, target),
    )


def _promotion_blocker(s: State, force: bool, manual: bool = False) -> str | None:
    """Why the standby may not be promoted now, or None. ``manual``: an operator asks
    (a diverged standby is then refused unless forced; an automatic failover takes it)."""
    target = s.standby_node
    if target is None:
        return "no active node is known"
    forceable = (Standby.NOT_FOLLOWING, Standby.FENCED, Standby.UNFENCED, Standby.STALLED)
    if s.standby is not Standby.FOLLOWING and not (force and s.standby in forceable):
        return f"{target.value} is {standby_words(s)}, not a following standby"
    if manual and not force and s.standby_skipped:
        return f"{target.value} has diverged (it {skipped_words(s)}); {resync_advice(s)}"
    synchronous = s.policy.synchronous in ("on", "strict") and s.sync_standby
    if synchronous or force:
        return None
    if s.lag_bytes is None:
        return f"{target.value} replication lag is unknown"
    if s.lag_bytes > s.policy.max_lag_bytes:
        return f"{target.value} lags {s.lag_bytes} bytes, over health.max_lag_bytes {s.policy.max_lag_bytes}"
    return None


# -- probes of the standby -------------------------------------------------------------------


def standby_words(s: State) -> str:
    """The standby's status for a person, with its cause when it has one."""
    if s.standby is Standby.STALLED and s.standby_stall:
        return f"stalled ({s.standby_stall})"
    if s.standby is Standby.REFUSED and s.standby_refused:
        return f"refusing pgroute ({s.standby_refused})"
    return s.standby.value


def skipped_words(s: State) -> str:
    """What the diverged standby skipped, for a person."""
    return f"skipped {s.standby_skipped} update(s)/delete(s) of rows it does not have"


def resync_advice(s: State) -> str:
    """How an operator repairs a diverged standby: only a full copy brings the rows back."""
    advice = "`pgroute rejoin --resync`"
    if s.standby_node is NodeName.PRIMARY:
        advice = f"`pgroute failback --resync` or {advice}"
    return f"resync it ({advice})"


def divergence_problem(s: State) -> str | None:
    """The diverged standby's problem line, or None when it has not diverged (or its
    server cannot tell: PostgreSQL 15 and 16 do not count skipped changes)."""
    if not s.standby_skipped or s.standby_node is None:
        return None
    return f"{skipped_words(s)}: the follower has diverged; {resync_advice(s)}"


def _divergence(s: State, sample: HealthSample) -> tuple[State, int]:
    """Track the standby's count of replicated updates/deletes skipped for want of the
    row; return the state and how much the count rose (0: no news).

    The first count seen is a baseline, not news: a restart of pgroute, or roles that
    moved, must not report again what was reported before. A count lower than the last
    one means the server's counters restarted (a recreated subscription, as a resync
    does, or ``pg_stat_reset_subscription_stats`` after a manual repair): a new baseline,
    and the divergence counted so far is forgotten. No count (PostgreSQL 15 and 16, or no
    subscription) changes nothing."""
    count, last = sample.missing_rows, s.standby_missing
    if count is None:
        return s, 0
    if last is None:
        return replace(s, standby_missing=count), 0
    if count < last:
        return replace(s, standby_missing=count, standby_skipped=0), 0
    if count > last:
        return replace(s, standby_missing=count, standby_skipped=s.standby_skipped + count - last), count - last
    return s, 0


def _standby_status(sample: HealthSample) -> Standby:
    if sample.refused:
        return Standby.REFUSED
    if not sample.ok:
        return Standby.DOWN
    if sample.subscription is not None:
        return Standby.FOLLOWING if sample.subscription_enabled else Standby.NOT_FOLLOWING
    return Standby.FENCED if sample.fenced else Standby.UNFENCED


def _stall(s: State, sample: HealthSample, now: float) -> State:
    """Track the standby's subscription and say whether it is stalled. Pure: times
    come from the observation. Stalled, while the active node answers, when:

    - its error count rose at least twice, the last time within ``stall_seconds``
      (a failing apply worker retries every wal_retrieve_retry_interval; one error
      alone is also what a publisher's restart costs);
    - or it has had no apply worker for ``stall_seconds``;
    - or, while behind, its received position has not moved for ``stall_seconds``.

    While the active node does not answer, a follower cannot receive anything: the
    tracking restarts and nothing counts as a stall (its errors then are the
    publisher's absence, and a failover must not wait for them)."""
    window = s.policy.stall_seconds
    errors = sample.apply_errors
    if s.active_up is not True:
        return replace(
            s,
            standby_errors=errors if errors is not None else s.standby_errors,
            standby_error_at=None,
            standby_error_rises=0,
            standby_no_worker_since=None,
            standby_received=sample.received_lsn,
            standby_received_at=now,
            standby_stall=None,
        )
    error_at, rises = s.standby_error_at, s.standby_error_rises
    if errors is not None and s.standby_errors is not None and errors > s.standby_errors:
        rises = rises + 1 if error_at is not None and now - error_at < window else 1
        error_at = now
    no_worker_since = None if sample.worker_running is not False else (s.standby_no_worker_since or now)
    received, received_at = s.standby_received, s.standby_received_at
    if sample.received_lsn is not None and sample.received_lsn != received:
        received, received_at = sample.received_lsn, now
    behind = s.lag_bytes is not None and s.lag_bytes > 0
    cause = None
    if rises >= 2 and error_at is not None and now - error_at < window:
        cause = f"its apply worker fails: {errors} error(s) counted on {sample.node.value}, see its server log"
        if sample.apply_error:
            cause += f": {sample.apply_error}"
    elif no_worker_since is not None and now - no_worker_since >= window:
        cause = f"no apply worker for {now - no_worker_since:.0f}s"
    elif behind and received_at is not None and now - received_at >= window:
        cause = f"received position not moving for {now - received_at:.0f}s while {s.lag_bytes} bytes behind"
    return replace(
        s,
        standby_errors=errors if errors is not None else s.standby_errors,
        standby_error_at=error_at,
        standby_error_rises=rises,
        standby_no_worker_since=no_worker_since,
        standby_received=received,
        standby_received_at=received_at,
        standby_stall=cause,
    )


def _standby_probed(s: State, obs: Probed) -> Decision:
    sample = obs.sample
    if sample.local:
        return _d(s, "")  # pgroute's own trouble, not the node's
    if s.active is None:
        return _d(s, "")
    if s.standby is Standby.REJOINING:
        return _d(s, "")  # the rejoin reports through Finished, whatever the probes say
    status = _standby_status(sample)
    s = replace(s, standby_refused=sample.error if status is Standby.REFUSED else None)
    if status is Standby.FOLLOWING:
        s = _stall(s, sample, obs.now)
        if s.standby_stall is not None:
            status = Standby.STALLED
    if s.lag_bytes is None and s.active_up is not True and s.active_lsn is not None and sample.applied_lsn is not None:
        # The active node is down and its lag was never sampled by this pgroute (a
        # restart while it was down): estimate it from its last sampled position.
        s = replace(s, lag_bytes=max(0, s.active_lsn - sample.applied_lsn))
    return _standby_changed(s, obs, status)


def _standby_changed(s: State, obs: Probed, status: Standby) -> Decision:
    sample = obs.sample
    if s.busy:
        # Not even the divergence count: a rise seen now is reported after the operation.
        return _d(replace(s, standby=status) if status is Standby.DOWN else s, "")
    s, rise = _divergence(s, sample)
    d = _standby_moved(s, obs, status)
    if not rise:
        return d
    # Once per rise, whatever else this probe changed.
    why = (
        f"replication to {sample.node.value} skipped {rise} more update(s)/delete(s) of rows it does not "
        f"have ({d.state.standby_skipped} since pgroute first saw it): the follower has diverged; "
        f"{resync_advice(d.state)}"
    )
    reason = f"{d.reason}; {why}" if d.reason else why
    event = Action(Act.EVENT, sample.node, detail="replication_diverged")
    return Decision(replace(d.state, reason=reason), (*d.actions, event), reason)


def _standby_moved(s: State, obs: Probed, status: Standby) -> Decision:
    """The decision a standby's probe makes about its status."""
    sample = obs.sample
    name = sample.node.value
    assert s.active is not None
    new = _track_ready(replace(s, standby=status), obs.now)
    if status is s.standby:
        if status is Standby.FENCED and _can_rejoin(s):
            return _d(
                replace(new, standby=Standby.REJOINING),
                f"{name} is fenced and up; rejoining it to {s.active.value}",
                Action(Act.REJOIN, sample.node),
            )
        return _maybe_auto_failback(new, obs.now)
    if status is Standby.DOWN:
        return _d(new, f"standby {name} down ({sample.error})", Action(Act.EVENT, sample.node, detail="node_down"))
    if status is Standby.REFUSED:
        return _d(
            new,
            f"standby {name} answers but refuses pgroute ({sample.error}): not a FAILOVER target until fixed",
            Action(Act.EVENT, sample.node, detail="node_refused"),
        )
    if status is Standby.STALLED:
        return _d(
            new,
            f"replication to {name} is stalled: {new.standby_stall}; not a FAILOVER target until it applies again",
            Action(Act.EVENT, sample.node, detail="replication_stalled"),
        )
    if s.standby is Standby.STALLED and status is Standby.FOLLOWING:
        return _d(
            new, f"replication to {name} applies again", Action(Act.EVENT, sample.node, detail="replication_resumed")
        )
    if status is Standby.UNFENCED:
        return _d(
            new,
            f"{name} is up, writable and not following {s.active.value}: fencing it",
            Action(Act.FENCE, sample.node),
        )
    if status is Standby.FENCED and _can_rejoin(s):
        return _d(
            replace(new, standby=Standby.REJOINING),
            f"{name} is fenced and up; rejoining it to {s.active.value}",
            Action(Act.REJOIN, sample.node),
        )
    event = (Action(Act.EVENT, sample.node, detail="node_up"),) if s.standby is Standby.DOWN else ()
    return _d(new, f"standby {name} is {status.value}", *event)


def _can_rejoin(s: State) -> bool:
    return s.policy.auto_rejoin and s.phase is Phase.ACTIVE_HEALTHY and bool(s.active_up)


def _track_ready(s: State, now: float) -> State:
    ready = (
        s.standby is Standby.FOLLOWING
        and not s.standby_skipped  # never fail back automatically to a node missing rows
        and s.active_up
        and s.lag_bytes is not None
        and s.lag_bytes <= s.policy.max_lag_bytes
    )
    if not ready:
        return replace(s, standby_ready_since=None)
    return s if s.standby_ready_since is not None else replace(s, standby_ready_since=now)


def _maybe_auto_failback(s: State, now: float) -> Decision:
    p = s.policy
    if (
        p.auto_failback
        and s.active is NodeName.MIRROR
        and not s.busy
        and not s.paused
        and s.phase is Phase.ACTIVE_HEALTHY
        and s.standby_ready_since is not None
        and now - s.standby_ready_since >= p.failback_delay
    ):
        return _d(
            replace(s, phase=Phase.SWITCHING),
            f"FAILBACK: primary healthy and caught up for {now - s.standby_ready_since:.0f}s (health.auto_failback)",
            Action(Act.FAILBACK, NodeName.PRIMARY),
        )
    return _d(s, "")


# -- operator requests ---------------------------------------------------------------------------


def _refuse(s: State, reason: str) -> Decision:
    return Decision(s, (Action(Act.REFUSE, detail=reason),), reason)


def _requested(s: State, obs: Requested) -> Decision:
    kind = obs.kind
    if kind is Operation.PAUSE:
        if s.paused:
            return _d(s, "already paused")
        return _d(
            replace(s, paused=True), "paused by operator: new connections wait", Action(Act.PAUSE, detail="operator")
        )
    if kind is Operation.RESUME:
        if not s.paused:
            return _d(s, "not paused")
        return _d(replace(s, paused=False), "resumed by operator", Action(Act.RESUME, detail="operator"))
    if kind is Operation.RESOLVE:
        # The controller reads the nodes' stamps and reports back with Started.
        if s.busy:
            return _refuse(s, "an operation is running")
        if s.phase is not Phase.NO_ROUTABLE_NODE:
            return _refuse(
                s,
                f"pgroute routes to {s.active.value if s.active else 'none'} "
                "and is not failing closed; use switchover or failover",
            )
        return _d(s, "operator resolving the active node")
    if s.busy:
        return _refuse(s, f"another operation is running ({s.phase.value}, standby {s.standby.value})")
    if s.active is None or s.standby_node is None:
        return _refuse(s, f"no active node is known: {s.reason}")
    standby = s.standby_node
    if kind is Operation.FAILOVER:
        blocked = _promotion_blocker(s, force=obs.force, manual=True)
        if blocked:
            hint = "" if obs.force else " (use --force to override the lag gate)"
            if s.standby_skipped and not obs.force and s.standby is Standby.FOLLOWING:
                hint = ", or use --force to fail over to it anyway"
            return _refuse(s, f"failover refused: {blocked}{hint}")
        target = standby
        return _d(
            replace(s, phase=Phase.FAILING_OVER),
            f"manual FAILOVER to {target.value} requested" + (" (forced)" if obs.force else ""),
            Action(Act.FAILOVER, target, force=obs.force, manual=True),
        )
    if kind is Operation.SWITCHOVER:
        target = standby
        if not s.active_up:
            return _refuse(s, f"switchover refused: {s.active.value} is not up (use failover)")
        if s.standby is not Standby.FOLLOWING:
            return _refuse(s, f"switchover refused: {target.value} is {standby_words(s)}, not following")
        if s.standby_skipped:
            return _refuse(
                s,
                f"switchover refused: {target.value} has diverged (it {skipped_words(s)}); "
                f"{resync_advice(s)}, or `pgroute failover --force` to move to it anyway",
            )
        return _d(
            replace(s, phase=Phase.SWITCHING),
            f"switchover to {target.value} requested",
            Action(Act.SWITCHOVER, target, manual=True),
        )
    if kind is Operation.FAILBACK:
        if s.active is NodeName.PRIMARY:
            return _refuse(s, "failback refused: primary is already active")
        if s.standby in (Standby.DOWN, Standby.UNKNOWN):
            return _refuse(s, f"failback refused: primary is {s.standby.value}")
        if s.standby is Standby.UNFENCED:
            return _refuse(s, "failback refused: primary is not fenced yet; retry in a moment")
        if s.standby is Standby.REFUSED:
            return _refuse(s, f"failback refused: primary is {standby_words(s)}")
        if s.standby is Standby.STALLED and not obs.force:
            return _refuse(
                s,
                f"failback refused: primary is {standby_words(s)}; fix the cause, or "
                "`pgroute failback --resync` copies the data afresh",
            )
        if s.standby_skipped and not obs.force:
            return _refuse(
                s,
                f"failback refused: primary has diverged (it {skipped_words(s)}); "
                "`pgroute failback --resync` copies the data afresh",
            )
        if not s.active_up:
            return _refuse(s, "failback refused: mirror is not up")
        return _d(
            replace(s, phase=Phase.SWITCHING),
            "FAILBACK to primary requested",
            Action(Act.FAILBACK, NodeName.PRIMARY, force=obs.force, manual=True),
        )
    if kind is Operation.REJOIN:
        if s.standby is Standby.FOLLOWING and s.standby_skipped:
            # Only a full copy brings back the rows it lacks (and restarts the count).
            if not obs.force:
                return _refuse(s, f"rejoin refused: {standby.value} has diverged: use `pgroute rejoin --resync`")
        elif s.standby not in (Standby.FENCED, Standby.NOT_FOLLOWING, Standby.STALLED):
            return _refuse(s, f"rejoin refused: {standby.value} is {standby_words(s)}")
        return _d(
            replace(s, standby=Standby.REJOINING),
            f"rejoin of {standby.value} requested",
            Action(Act.REJOIN, standby, force=obs.force, manual=True),
        )
    return _refuse(s, f"{kind.value} is not something an operator can request here")


# -- operation results -----------------------------------------------------------------------------


def _finished(s: State, obs: Finished) -> Decision:
    kind = obs.kind
    if kind.moves_role:
        if obs.ok:
            new = replace(
                _fresh_standby(s),
                active=obs.active,
                active_lsn=None,
                epoch=obs.epoch,
                phase=Phase.ACTIVE_HEALTHY,
                failures=0,
                active_up=True,
                lag_bytes=None,
                sync_standby=False,
                standby_ready_since=None,
                standby=Standby.FOLLOWING if kind is not Operation.FAILOVER else Standby.UNKNOWN,
            )
            tag = kind.tag if kind is not Operation.SWITCHOVER else "switchover"
            return _d(
                new, f"{tag} to {obs.active.value if obs.active else 'none'} completed: {obs.detail}".rstrip(": ")
            )
        if kind is Operation.FAILOVER:
            # The target could not be promoted: it is no automatic target again until a
            # probe sees it following (else every failed probe of the dead active node
            # would start, and fail, another failover: one failure event per attempt).
            s = replace(s, standby=Standby.UNKNOWN)
        if obs.active is None:
            # Keep `active` (the node that holds the data) so that it can be routed to
            # again when it answers, or an operator can retry the failover.
            return _d(
                replace(s, phase=Phase.NO_ROUTABLE_NODE, epoch=max(s.epoch, obs.epoch)),
                f"{kind.value} failed, routing to no node (fail closed): {obs.detail}",
            )
        # The operation failed but left a known-good active node.
        phase = Phase.ACTIVE_HEALTHY if s.active_up or obs.active != s.active else Phase.ACTIVE_DOWN
        return _d(
            replace(s, active=obs.active, epoch=max(s.epoch, obs.epoch), phase=phase),
            f"{kind.value} failed, still routing to {obs.active.value}: {obs.detail}",
        )
    node = obs.node.value if obs.node else "?"
    if kind is Operation.UNFENCE:
        if s.phase is Phase.FAILING_OVER and obs.node is s.active:
            # The start-up unfence of the node that kept every commit (Started.fenced_winner).
            if obs.ok:
                return _d(replace(s, phase=Phase.ACTIVE_HEALTHY), f"FAILOVER: {node} unfenced; routing to it")
            return _d(replace(s, phase=Phase.NO_ROUTABLE_NODE), f"could not unfence {node}: {obs.detail}")
        return _d(s, f"{node} unfenced" if obs.ok else f"unfencing {node} failed: {obs.detail}")
    if kind is Operation.FENCE:
        if obs.ok:
            return _d(replace(s, standby=Standby.FENCED), f"{node} fenced (read-only)")
        # Forget the status so the next probe of the node decides (and fences) again.
        return _d(replace(s, standby=Standby.UNKNOWN), f"fencing {node} failed: {obs.detail}")
    if kind is Operation.REJOIN:
        if obs.ok:
            return _d(
                replace(s, standby=Standby.FOLLOWING, lag_bytes=None),
                f"{node} rejoined: follows {s.active.value if s.active else '?'} ({obs.detail})",
            )
        return _d(
            replace(
                s,
                standby=Standby.FENCED if s.policy.auto_rejoin else Standby.UNKNOWN,
                policy=replace(s.policy, auto_rejoin=False),
            ),
            f"rejoin of {node} failed, automatic rejoin stopped: {obs.detail}",
        )
    if kind is Operation.PROMOTE:
        if obs.ok:
            return _d(replace(s, phase=Phase.ACTIVE_HEALTHY), f"FAILOVER: promotion of {node} finished; routing to it")
        return _d(replace(s, phase=Phase.NO_ROUTABLE_NODE), f"could not finish promoting {node}: {obs.detail}")
    return _d(s, f"unknown result {kind.value!r}")


# -- start-up and operator resolution --------------------------------------------------------------


def _started(s: State, obs: Started) -> Decision:
    new = replace(
        _fresh_standby(s),
        active_lsn=obs.active_lsn,
        active=obs.active,
        epoch=obs.epoch,
        failures=0,
        active_up=None,
        standby=Standby.UNKNOWN,
        lag_bytes=None,
        sync_standby=False,
        standby_ready_since=None,
    )
    why = (
        f"operator resolved the active node: {obs.active.value if obs.active else 'none'} (epoch {obs.epoch})"
        if obs.by_operator
        else obs.reason
    )
    if obs.active is None:
        return _d(replace(new, phase=Phase.NO_ROUTABLE_NODE), why)
    if obs.unfinished_promotion:
        return _d(
            replace(new, phase=Phase.FAILING_OVER),
            f"{why}; FAILOVER: {obs.active.value} is stamped active but still subscribed: finishing its promotion",
            Action(Act.PROMOTE, obs.active),
        )
    if obs.fenced_winner:
        return _d(
            replace(new, phase=Phase.FAILING_OVER),
            f"{why}; FAILOVER: {obs.active.value} was left fenced by a switch that promoted nothing: unfencing it",
            Action(Act.UNFENCE, obs.active),
        )
    stamp = (Action(Act.STAMP, obs.active),) if obs.unstamped else ()
    return _d(replace(new, phase=Phase.ACTIVE_HEALTHY), why, *stamp)


def synchronous_standby(s: State) -> NodeName | None:
    """The standby the active node must wait for before acknowledging commits.

    ``on``: the standby while it follows and is caught up (lag within the gate);
    back to asynchronous while it is down or behind, so writes keep flowing.
    ``strict``: always the standby, whatever its state (writes block while it is away).
    """
    mode = s.policy.synchronous
    if s.active is None or mode == "off":
        return None
    if mode == "strict":
        return s.standby_node
    caught_up = s.lag_bytes is not None and s.lag_bytes <= s.policy.max_lag_bytes
    return s.standby_node if s.standby is Standby.FOLLOWING and caught_up else None
