"""Table-driven tests of the failover state machine (``pgroute.control.state.transition``).

Every case gives an input ``State`` and one observation and asserts:
- the exact list of actions (kind, node, force, manual; the detail of EVENT actions),
- the resulting phase, standby status, active node and epoch (unchanged unless the case
  says otherwise), plus any other State field the case names,
- the reason: each listed substring must appear in it; an empty list means the decision
  is quiet (reason "").

Multi-step scenarios (confirmation counting, quiet repeats, auto failback timing) feed
several observations in a row through ``run``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import pytest

from pgroute.control.state import (
    Act,
    Action,
    Decision,
    Finished,
    Phase,
    Policy,
    Probed,
    Requested,
    Standby,
    Started,
    State,
    synchronous_standby,
    transition,
)
from pgroute.model import HealthSample, NodeName, Operation

P, M = NodeName.PRIMARY, NodeName.MIRROR
T0 = 1_700_000_000.0
SUB = "chrispar_sub"
MAX_LAG = Policy().max_lag_bytes  # 16 MiB
BIG_LAG = MAX_LAG + 1


# -- builders -----------------------------------------------------------------------------


def pol(**kw) -> Policy:
    return Policy(**kw)


def st(**kw) -> State:
    """A state where the primary is active and healthy and the mirror follows it with no
    lag; keyword arguments override any field."""
    base: dict[str, Any] = {
        "active": P,
        "epoch": 0,
        "phase": Phase.ACTIVE_HEALTHY,
        "standby": Standby.FOLLOWING,
        "active_up": True,
        "lag_bytes": 0,
    }
    base.update(kw)
    return State(**base)


def hs(node: NodeName, ok: bool = True, *, at: float = T0, error: str | None = None, **kw) -> HealthSample:
    if not ok and error is None:
        error = "timeout after 5.0s"
    return HealthSample(node=node, ok=ok, at=at, latency=0.002, error=error, **kw)


def up(node: NodeName = P, lag: int | None = 0, sync: str | None = None, *, now: float = T0) -> Probed:
    """The active node answers; it reports the standby's slot lag and walsender sync_state."""
    return Probed(hs(node, at=now, read_only=False, publisher_lag_bytes=lag, sync_state=sync), now)


def up_read_only(node: NodeName = P, lag: int | None = 0, *, now: float = T0) -> Probed:
    """The active node answers but is read-only (left fenced by an interrupted switch)."""
    return Probed(hs(node, at=now, read_only=True, publisher_lag_bytes=lag), now)


def down(node: NodeName = P, *, now: float = T0, error: str = "timeout after 5.0s") -> Probed:
    return Probed(hs(node, False, at=now, error=error), now)


def following(node: NodeName = M, *, now: float = T0, read_only: bool = False) -> Probed:
    return Probed(hs(node, at=now, read_only=read_only, subscription=SUB, subscription_enabled=True), now)


def sub_disabled(node: NodeName = M, *, now: float = T0) -> Probed:
    return Probed(hs(node, at=now, read_only=False, subscription=SUB, subscription_enabled=False), now)


def writable(node: NodeName = M, *, now: float = T0) -> Probed:
    """Up, not a subscriber, writable: an unfenced stale node."""
    return Probed(hs(node, at=now, read_only=False, subscription=None), now)


def fenced(node: NodeName = M, *, now: float = T0) -> Probed:
    """Up, read-only, not a subscriber: fenced, waiting for rejoin."""
    return Probed(hs(node, at=now, read_only=True, fenced=True, subscription=None), now)


def req(kind: str, force: bool = False, *, now: float = T0) -> Requested:
    return Requested(Operation(kind), now, force=force)


def fin(
    kind: str,
    ok: bool,
    *,
    node: NodeName | None = None,
    active: NodeName | None = None,
    epoch: int = 0,
    detail: str = "",
    now: float = T0,
) -> Finished:
    return Finished(Operation(kind), ok, now, node=node, active=active, epoch=epoch, detail=detail)


@dataclass(frozen=True)
class A:
    """An expected action. detail=None: the detail is not checked."""

    kind: Act
    node: NodeName | None = None
    force: bool = False
    manual: bool = False
    detail: str | None = None


def REFUSE() -> A:
    return A(Act.REFUSE)


def event(node: NodeName, kind: str) -> A:
    return A(Act.EVENT, node, detail=kind)


def case(id: str, state: State, obs, actions: list[A], reason: list[str], **after):
    """``after``: State fields expected after the transition. phase, standby, active and
    epoch are always checked: when not given they must be unchanged."""
    return pytest.param(state, obs, actions, reason, after, id=id)


def check(before: State, d: Decision, actions: list[A], reason: list[str], after: dict) -> None:
    assert isinstance(d, Decision)
    got = [(a.kind, a.node, a.force, a.manual) for a in d.actions]
    want = [(e.kind, e.node, e.force, e.manual) for e in actions]
    assert got == want, f"actions {got} != {want} (reason: {d.reason!r})"
    for a, e in zip(d.actions, actions, strict=True):
        if e.detail is not None:
            assert a.detail == e.detail, (a, e)
        if a.kind is Act.REFUSE:
            # The refusal carries the decision's reason for the operator.
            assert a.detail == d.reason
    if reason:
        for words in reason:
            assert words in d.reason, f"{words!r} not in reason {d.reason!r}"
    else:
        assert d.reason == "", f"expected a quiet decision, got reason {d.reason!r}"
    for field in ("phase", "standby", "active", "epoch"):
        expected = after.get(field, getattr(before, field))
        assert getattr(d.state, field) == expected, (
            f"{field}: {getattr(d.state, field)!r} != {expected!r} (reason: {d.reason!r})"
        )
    for field, expected in after.items():
        assert getattr(d.state, field) == expected, f"{field}: {getattr(d.state, field)!r} != {expected!r}"


def run(state: State, *observations) -> list[Decision]:
    """Feed observations in order; return every decision."""
    decisions = []
    for obs in observations:
        d = transition(state, obs)
        decisions.append(d)
        state = d.state
    return decisions


def kinds(d: Decision) -> list[Act]:
    return [a.kind for a in d.actions]


# -- probes of the active node ------------------------------------------------------------

SUSPECT = Phase.ACTIVE_SUSPECT
HEALTHY = Phase.ACTIVE_HEALTHY
ACTIVE_DOWN = Phase.ACTIVE_DOWN

ACTIVE_PROBES = [
    case(
        "healthy-ok-no-action",
        st(),
        up(lag=100),
        [],
        [],
        phase=HEALTHY,
        failures=0,
        active_up=True,
        lag_bytes=100,
        sync_standby=False,
    ),
    case("healthy-ok-keeps-last-lag-when-not-reported", st(lag_bytes=42), up(lag=None), [], [], lag_bytes=42),
    case("healthy-ok-sync-walsender", st(), up(lag=0, sync="sync"), [], [], sync_standby=True),
    case("healthy-ok-async-walsender", st(sync_standby=True), up(lag=0, sync="async"), [], [], sync_standby=False),
    case(
        "first-failure-confirms",
        st(),
        down(),
        [A(Act.CONFIRM_PROBE, P, detail="3")],
        ["primary probe failed (timeout after 5.0s)", "confirming, attempt 1/3"],
        phase=SUSPECT,
        failures=1,
        active_up=True,
    ),
    # Every confirming probe was scheduled at the first failure: later ones only count.
    case(
        "second-failure-counts",
        st(phase=SUSPECT, failures=1),
        down(),
        [],
        ["confirming, attempt 2/3"],
        phase=SUSPECT,
        failures=2,
    ),
    case(
        "third-failure-counts",
        st(phase=SUSPECT, failures=2),
        down(),
        [],
        ["confirming, attempt 3/3"],
        phase=SUSPECT,
        failures=3,
    ),
    case(
        "fourth-failure-fails-over",
        st(phase=SUSPECT, failures=3, lag_bytes=1000),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["primary down after 4 failed probes", "FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
        failures=4,
        active_up=False,
    ),
    case(
        "max-retries-0-fails-over-on-first-failure",
        st(policy=pol(max_retries=0)),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["down after 1 failed probes", "FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
        failures=1,
        active_up=False,
    ),
    case(
        "max-retries-1-second-failure-fails-over",
        st(phase=SUSPECT, failures=1, policy=pol(max_retries=1)),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "suspect-ok-recovers-without-failover",
        st(phase=SUSPECT, failures=1),
        up(),
        [],
        ["primary answered again after 1 failed probe(s); no failover"],
        phase=HEALTHY,
        failures=0,
        active_up=True,
    ),
    case(
        "suspect-ok-after-3-failures",
        st(phase=SUSPECT, failures=3),
        up(),
        [],
        ["answered again after 3 failed probe(s)"],
        phase=HEALTHY,
        failures=0,
    ),
    # -- lag gate
    case(
        "lag-at-limit-fails-over",
        st(phase=SUSPECT, failures=3, lag_bytes=MAX_LAG),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "lag-over-limit-refused",
        st(phase=SUSPECT, failures=3, lag_bytes=BIG_LAG),
        down(),
        [event(P, "node_down")],
        ["FAILOVER not started", f"mirror lags {BIG_LAG} bytes", f"max_lag_bytes {MAX_LAG}"],
        phase=ACTIVE_DOWN,
        active_up=False,
        failures=4,
    ),
    case(
        "lag-over-small-limit-refused",
        st(phase=SUSPECT, failures=3, lag_bytes=2048, policy=pol(max_lag_bytes=1024)),
        down(),
        [event(P, "node_down")],
        ["lags 2048 bytes", "max_lag_bytes 1024"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "lag-unknown-refused",
        st(phase=SUSPECT, failures=3, lag_bytes=None),
        down(),
        [event(P, "node_down")],
        ["FAILOVER not started", "replication lag is unknown"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "sync-on-sync-standby-ignores-lag",
        st(phase=SUSPECT, failures=3, lag_bytes=BIG_LAG, sync_standby=True, policy=pol(synchronous="on")),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "sync-strict-sync-standby-lag-unknown",
        st(phase=SUSPECT, failures=3, lag_bytes=None, sync_standby=True, policy=pol(synchronous="strict")),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "sync-on-but-walsender-not-sync-keeps-gate",
        st(phase=SUSPECT, failures=3, lag_bytes=BIG_LAG, sync_standby=False, policy=pol(synchronous="on")),
        down(),
        [event(P, "node_down")],
        ["lags"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "sync-off-stale-sync-flag-keeps-gate",
        st(phase=SUSPECT, failures=3, lag_bytes=BIG_LAG, sync_standby=True, policy=pol(synchronous="off")),
        down(),
        [event(P, "node_down")],
        ["lags"],
        phase=ACTIVE_DOWN,
    ),
    # -- policy and standby status
    case(
        "auto-failover-disabled",
        st(phase=SUSPECT, failures=3, policy=pol(auto_failover=False)),
        down(),
        [event(P, "node_down")],
        ["primary down after 4 failed probes", "automatic failover is disabled"],
        phase=ACTIVE_DOWN,
        active_up=False,
    ),
    case(
        "standby-down-no-failover",
        st(phase=SUSPECT, failures=3, standby=Standby.DOWN),
        down(),
        [event(P, "node_down")],
        ["FAILOVER not started", "mirror is down, not a following standby"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "standby-unknown-no-failover",
        st(phase=SUSPECT, failures=3, standby=Standby.UNKNOWN),
        down(),
        [event(P, "node_down")],
        ["mirror is unknown, not a following standby"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "standby-not-following-no-failover",
        st(phase=SUSPECT, failures=3, standby=Standby.NOT_FOLLOWING),
        down(),
        [event(P, "node_down")],
        ["mirror is not_following, not a following standby"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "standby-fenced-no-failover",
        st(phase=SUSPECT, failures=3, standby=Standby.FENCED),
        down(),
        [event(P, "node_down")],
        ["mirror is fenced"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "standby-unfenced-no-failover",
        st(phase=SUSPECT, failures=3, standby=Standby.UNFENCED),
        down(),
        [event(P, "node_down")],
        ["mirror is unfenced"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "standby-rejoining-failure-counted-only",
        st(standby=Standby.REJOINING),
        down(),
        [],
        [],
        phase=HEALTHY,
        standby=Standby.REJOINING,
        failures=1,
    ),
    # -- already declared down
    case(
        "active-down-repeat-failure-quiet",
        st(phase=ACTIVE_DOWN, failures=4, active_up=False, standby=Standby.DOWN),
        down(),
        [],
        [],
        phase=ACTIVE_DOWN,
        failures=5,
    ),
    case(
        "active-down-repeat-failure-lag-still-high-quiet",
        st(phase=ACTIVE_DOWN, failures=4, active_up=False, lag_bytes=BIG_LAG),
        down(),
        [],
        [],
        phase=ACTIVE_DOWN,
        failures=5,
    ),
    case(
        "active-down-auto-failover-off-quiet",
        st(phase=ACTIVE_DOWN, failures=4, active_up=False, policy=pol(auto_failover=False)),
        down(),
        [],
        [],
        phase=ACTIVE_DOWN,
    ),
    case(
        "active-down-failover-became-possible",
        st(phase=ACTIVE_DOWN, failures=4, active_up=False, standby=Standby.FOLLOWING),
        down(),
        [A(Act.FAILOVER, M)],
        ["primary still down", "FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
        failures=5,
    ),
    case(
        "active-down-ok-comes-back",
        st(phase=ACTIVE_DOWN, failures=4, active_up=False),
        up(),
        [event(P, "node_up")],
        ["primary answers again after being declared down"],
        phase=HEALTHY,
        failures=0,
        active_up=True,
    ),
    # -- fail closed
    case(
        "no-routable-ok-routes-again",
        st(phase=Phase.NO_ROUTABLE_NODE, failures=4, active_up=False),
        up(),
        [event(P, "node_up")],
        ["primary answers again; routing to it"],
        phase=HEALTHY,
        failures=0,
        active_up=True,
    ),
    case(
        "no-routable-failing-standby-following-retries-failover",
        st(phase=Phase.NO_ROUTABLE_NODE, failures=4, active_up=False),
        down(),
        [A(Act.FAILOVER, M)],
        ["still down", "FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
        failures=5,
    ),
    case(
        "no-routable-failing-standby-down-stays-closed",
        st(phase=Phase.NO_ROUTABLE_NODE, failures=4, active_up=False, standby=Standby.DOWN),
        down(),
        [],
        [],
        phase=Phase.NO_ROUTABLE_NODE,
    ),
    # -- busy: probes update knowledge, start nothing
    case(
        "failing-over-active-fails",
        st(phase=Phase.FAILING_OVER, failures=4, active_up=False),
        down(),
        [],
        [],
        phase=Phase.FAILING_OVER,
        failures=5,
    ),
    case(
        "failing-over-active-answers",
        st(phase=Phase.FAILING_OVER, failures=4, active_up=False),
        up(),
        [],
        [],
        phase=Phase.FAILING_OVER,
    ),
    case("switching-active-fails", st(phase=Phase.SWITCHING), down(), [], [], phase=Phase.SWITCHING, failures=1),
    case("switching-active-answers", st(phase=Phase.SWITCHING), up(), [], [], phase=Phase.SWITCHING),
    # -- the active node was left read-only by an interrupted switch
    case(
        "active-read-only-gets-unfenced",
        st(),
        up_read_only(),
        [A(Act.UNFENCE, P)],
        ["active node primary is read-only", "unfencing it"],
        phase=HEALTHY,
        active_up=True,
    ),
    case(
        "active-read-only-after-suspect-gets-unfenced",
        st(phase=SUSPECT, failures=2),
        up_read_only(),
        [A(Act.UNFENCE, P)],
        ["unfencing it"],
        phase=HEALTHY,
        failures=0,
    ),
    case(
        "active-read-only-while-switching-left-alone",
        st(phase=Phase.SWITCHING),
        up_read_only(),
        [],
        [],
        phase=Phase.SWITCHING,
    ),
    case(
        "active-read-only-while-failing-over-left-alone",
        st(phase=Phase.FAILING_OVER, active_up=False),
        up_read_only(),
        [],
        [],
        phase=Phase.FAILING_OVER,
    ),
    # -- symmetric: the mirror is active, the primary follows it
    case(
        "mirror-active-fails-over-to-primary",
        st(active=M, epoch=1, phase=SUSPECT, failures=3),
        down(M),
        [event(M, "node_down"), A(Act.FAILOVER, P)],
        ["mirror down after 4 failed probes", "FAILOVER to primary"],
        phase=Phase.FAILING_OVER,
        epoch=1,
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", ACTIVE_PROBES)
def test_active_probe(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


# -- probes of the standby -----------------------------------------------------------------------

STANDBY_PROBES = [
    case(
        "unknown-to-following",
        st(standby=Standby.UNKNOWN),
        following(),
        [],
        ["standby mirror is following"],
        standby=Standby.FOLLOWING,
    ),
    case(
        "down-to-following-node-up",
        st(standby=Standby.DOWN),
        following(),
        [event(M, "node_up")],
        ["standby mirror is following"],
        standby=Standby.FOLLOWING,
    ),
    case("following-stays-following-quiet", st(), following(), [], [], standby=Standby.FOLLOWING),
    case(
        "following-read-only-subscriber-is-following",
        st(standby=Standby.UNKNOWN),
        following(read_only=True),
        [],
        ["following"],
        standby=Standby.FOLLOWING,
    ),
    case(
        "unknown-to-not-following",
        st(standby=Standby.UNKNOWN),
        sub_disabled(),
        [],
        ["standby mirror is not_following"],
        standby=Standby.NOT_FOLLOWING,
    ),
    case(
        "down-to-not-following-node-up",
        st(standby=Standby.DOWN),
        sub_disabled(),
        [event(M, "node_up")],
        ["not_following"],
        standby=Standby.NOT_FOLLOWING,
    ),
    case(
        "not-following-stays-quiet",
        st(standby=Standby.NOT_FOLLOWING),
        sub_disabled(),
        [],
        [],
        standby=Standby.NOT_FOLLOWING,
    ),
    case(
        "following-to-down",
        st(),
        down(M, error="connection refused"),
        [event(M, "node_down")],
        ["standby mirror down (connection refused)"],
        standby=Standby.DOWN,
    ),
    case(
        "unknown-to-down",
        st(standby=Standby.UNKNOWN),
        down(M),
        [event(M, "node_down")],
        ["standby mirror down"],
        standby=Standby.DOWN,
    ),
    case("down-stays-down-quiet", st(standby=Standby.DOWN), down(M), [], [], standby=Standby.DOWN),
    case(
        "unknown-writable-gets-fenced",
        st(standby=Standby.UNKNOWN),
        writable(),
        [A(Act.FENCE, M)],
        ["mirror is up, writable and not following primary: fencing it"],
        standby=Standby.UNFENCED,
    ),
    case(
        "following-to-writable-gets-fenced", st(), writable(), [A(Act.FENCE, M)], ["fencing"], standby=Standby.UNFENCED
    ),
    case("unfenced-while-fence-runs-quiet", st(standby=Standby.UNFENCED), writable(), [], [], standby=Standby.UNFENCED),
    case(
        "writable-fenced-even-when-active-down",
        st(phase=ACTIVE_DOWN, active_up=False, standby=Standby.DOWN),
        writable(),
        [A(Act.FENCE, M)],
        ["fencing"],
        standby=Standby.UNFENCED,
    ),
    case(
        "fenced-active-healthy-rejoins",
        st(standby=Standby.UNKNOWN),
        fenced(),
        [A(Act.REJOIN, M)],
        ["mirror is fenced and up; rejoining it to primary"],
        standby=Standby.REJOINING,
    ),
    case(
        "fenced-again-active-healthy-rejoins",
        st(standby=Standby.FENCED),
        fenced(),
        [A(Act.REJOIN, M)],
        ["rejoining it to primary"],
        standby=Standby.REJOINING,
    ),
    case(
        "fenced-active-down-no-rejoin",
        st(phase=ACTIVE_DOWN, active_up=False, standby=Standby.UNKNOWN),
        fenced(),
        [],
        ["standby mirror is fenced"],
        standby=Standby.FENCED,
    ),
    case(
        "fenced-active-suspect-no-rejoin",
        st(phase=SUSPECT, failures=1, standby=Standby.DOWN),
        fenced(),
        [event(M, "node_up")],
        ["standby mirror is fenced"],
        standby=Standby.FENCED,
    ),
    case(
        "fenced-no-routable-no-rejoin",
        st(phase=Phase.NO_ROUTABLE_NODE, active_up=False, standby=Standby.FENCED),
        fenced(),
        [],
        [],
        standby=Standby.FENCED,
    ),
    case(
        "fenced-auto-rejoin-off-no-rejoin",
        st(standby=Standby.UNKNOWN, policy=pol(auto_rejoin=False)),
        fenced(),
        [],
        ["standby mirror is fenced"],
        standby=Standby.FENCED,
    ),
    case("rejoining-probe-quiet", st(standby=Standby.REJOINING), fenced(), [], [], standby=Standby.REJOINING),
    case(
        "rejoining-subscribed-waits-for-finished",
        st(standby=Standby.REJOINING),
        following(),
        [],
        [],
        standby=Standby.REJOINING,
    ),
    # The rejoin task reports through Finished; a probe must not end REJOINING early
    # (a second rejoin could start while the first still runs).
    case(
        "rejoining-down-waits-for-finished", st(standby=Standby.REJOINING), down(M), [], [], standby=Standby.REJOINING
    ),
    case(
        "failing-over-standby-fenced-ignored",
        st(phase=Phase.FAILING_OVER, active_up=False),
        fenced(),
        [],
        [],
        phase=Phase.FAILING_OVER,
        standby=Standby.FOLLOWING,
    ),
    case(
        "failing-over-standby-down-recorded",
        st(phase=Phase.FAILING_OVER, active_up=False),
        down(M),
        [],
        [],
        phase=Phase.FAILING_OVER,
        standby=Standby.DOWN,
    ),
    case(
        "switching-standby-writable-ignored",
        st(phase=Phase.SWITCHING),
        writable(),
        [],
        [],
        phase=Phase.SWITCHING,
        standby=Standby.FOLLOWING,
    ),
    case(
        "no-active-node-probes-ignored",
        st(active=None, phase=Phase.NO_ROUTABLE_NODE, standby=Standby.UNKNOWN),
        writable(M),
        [],
        [],
        standby=Standby.UNKNOWN,
    ),
    case(
        "primary-as-standby-of-mirror",
        st(active=M, epoch=1, standby=Standby.UNKNOWN),
        writable(P),
        [A(Act.FENCE, P)],
        ["primary is up, writable and not following mirror"],
        standby=Standby.UNFENCED,
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", STANDBY_PROBES)
def test_standby_probe(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


# -- operator requests ------------------------------------------------------------------------------

MIRROR_ACTIVE = {"active": M, "epoch": 1}
FAILING_OVER, SWITCHING = Phase.FAILING_OVER, Phase.SWITCHING

REQUESTS = [
    case("pause", st(), req("pause"), [A(Act.PAUSE, detail="operator")], ["paused by operator"], paused=True),
    case("pause-idempotent", st(paused=True), req("pause"), [], ["already paused"], paused=True),
    case(
        "resume",
        st(paused=True),
        req("resume"),
        [A(Act.RESUME, detail="operator")],
        ["resumed by operator"],
        paused=False,
    ),
    case("resume-idempotent", st(), req("resume"), [], ["not paused"], paused=False),
    case(
        "pause-while-failing-over-is-not-an-operation",
        st(phase=FAILING_OVER),
        req("pause"),
        [A(Act.PAUSE, detail="operator")],
        ["paused by operator"],
        paused=True,
    ),
    # -- failover
    case(
        "failover-manual",
        st(lag_bytes=10),
        req("failover"),
        [A(Act.FAILOVER, M, manual=True)],
        ["manual FAILOVER to mirror requested"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-lag-too-high-refused",
        st(lag_bytes=BIG_LAG),
        req("failover"),
        [REFUSE()],
        ["failover refused", f"mirror lags {BIG_LAG} bytes", "--force"],
    ),
    case(
        "failover-lag-unknown-refused",
        st(lag_bytes=None),
        req("failover"),
        [REFUSE()],
        ["failover refused", "lag is unknown"],
    ),
    case(
        "failover-forced-over-lag",
        st(lag_bytes=BIG_LAG),
        req("failover", force=True),
        [A(Act.FAILOVER, M, force=True, manual=True)],
        ["manual FAILOVER to mirror requested (forced)"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-forced-active-down",
        st(phase=ACTIVE_DOWN, active_up=False, failures=4, lag_bytes=BIG_LAG),
        req("failover", force=True),
        [A(Act.FAILOVER, M, force=True, manual=True)],
        ["FAILOVER", "forced"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-forced-not-following",
        st(standby=Standby.NOT_FOLLOWING),
        req("failover", force=True),
        [A(Act.FAILOVER, M, force=True, manual=True)],
        ["forced"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-sync-standby-ignores-lag",
        st(lag_bytes=BIG_LAG, sync_standby=True, policy=pol(synchronous="on")),
        req("failover"),
        [A(Act.FAILOVER, M, manual=True)],
        ["manual FAILOVER"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-standby-down-refused",
        st(standby=Standby.DOWN),
        req("failover"),
        [REFUSE()],
        ["failover refused", "mirror is down"],
    ),
    case(
        "failover-standby-down-refused-even-forced",
        st(standby=Standby.DOWN),
        req("failover", force=True),
        [REFUSE()],
        ["failover refused", "mirror is down"],
    ),
    case(
        "failover-standby-unknown-refused",
        st(standby=Standby.UNKNOWN),
        req("failover", force=True),
        [REFUSE()],
        ["mirror is unknown"],
    ),
    case(
        "failover-not-following-refused-unforced",
        st(standby=Standby.NOT_FOLLOWING),
        req("failover"),
        [REFUSE()],
        ["mirror is not_following"],
    ),
    case(
        "failover-auto-failover-off-manual-allowed",
        st(policy=pol(auto_failover=False)),
        req("failover"),
        [A(Act.FAILOVER, M, manual=True)],
        ["manual FAILOVER"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-from-no-routable",
        st(phase=Phase.NO_ROUTABLE_NODE, active_up=False),
        req("failover"),
        [A(Act.FAILOVER, M, manual=True)],
        ["manual FAILOVER to mirror"],
        phase=FAILING_OVER,
    ),
    case(
        "failover-no-active-refused",
        st(active=None, phase=Phase.NO_ROUTABLE_NODE, reason="epoch claims disagree"),
        req("failover"),
        [REFUSE()],
        ["no active node is known", "epoch claims disagree"],
    ),
    # -- switchover
    case(
        "switchover",
        st(),
        req("switchover"),
        [A(Act.SWITCHOVER, M, manual=True)],
        ["switchover to mirror requested"],
        phase=SWITCHING,
    ),
    case(
        "switchover-active-down-refused",
        st(phase=ACTIVE_DOWN, active_up=False),
        req("switchover"),
        [REFUSE()],
        ["switchover refused", "primary is not up (use failover)"],
    ),
    case(
        "switchover-active-never-probed-refused",
        st(active_up=None),
        req("switchover"),
        [REFUSE()],
        ["switchover refused", "not up"],
    ),
    case(
        "switchover-standby-not-following-refused",
        st(standby=Standby.NOT_FOLLOWING),
        req("switchover"),
        [REFUSE()],
        ["switchover refused", "mirror is not_following, not following"],
    ),
    case(
        "switchover-standby-down-refused", st(standby=Standby.DOWN), req("switchover"), [REFUSE()], ["mirror is down"]
    ),
    case(
        "switchover-back-to-primary",
        st(**MIRROR_ACTIVE),
        req("switchover"),
        [A(Act.SWITCHOVER, P, manual=True)],
        ["switchover to primary requested"],
        phase=SWITCHING,
    ),
    # -- failback
    case(
        "failback-primary-already-active-refused",
        st(),
        req("failback"),
        [REFUSE()],
        ["failback refused: primary is already active"],
    ),
    case(
        "failback-primary-down-refused",
        st(**MIRROR_ACTIVE, standby=Standby.DOWN),
        req("failback"),
        [REFUSE()],
        ["failback refused: primary is down"],
    ),
    case(
        "failback-primary-unknown-refused",
        st(**MIRROR_ACTIVE, standby=Standby.UNKNOWN),
        req("failback"),
        [REFUSE()],
        ["failback refused: primary is unknown"],
    ),
    case(
        "failback-primary-unfenced-refused",
        st(**MIRROR_ACTIVE, standby=Standby.UNFENCED),
        req("failback"),
        [REFUSE()],
        ["failback refused", "not fenced yet"],
    ),
    case(
        "failback-mirror-not-up-refused",
        st(**MIRROR_ACTIVE, standby=Standby.FENCED, active_up=False, phase=ACTIVE_DOWN),
        req("failback"),
        [REFUSE()],
        ["failback refused: mirror is not up"],
    ),
    case(
        "failback-primary-fenced",
        st(**MIRROR_ACTIVE, standby=Standby.FENCED),
        req("failback"),
        [A(Act.FAILBACK, P, manual=True)],
        ["FAILBACK to primary requested"],
        phase=SWITCHING,
    ),
    case(
        "failback-primary-following",
        st(**MIRROR_ACTIVE),
        req("failback"),
        [A(Act.FAILBACK, P, manual=True)],
        ["FAILBACK to primary requested"],
        phase=SWITCHING,
    ),
    case(
        "failback-primary-not-following",
        st(**MIRROR_ACTIVE, standby=Standby.NOT_FOLLOWING),
        req("failback"),
        [A(Act.FAILBACK, P, manual=True)],
        ["FAILBACK"],
        phase=SWITCHING,
    ),
    case(
        "failback-resync-forced",
        st(**MIRROR_ACTIVE, standby=Standby.FENCED),
        req("failback", force=True),
        [A(Act.FAILBACK, P, force=True, manual=True)],
        ["FAILBACK to primary requested"],
        phase=SWITCHING,
    ),
    # -- rejoin
    case(
        "rejoin-fenced",
        st(standby=Standby.FENCED),
        req("rejoin"),
        [A(Act.REJOIN, M, manual=True)],
        ["rejoin of mirror requested"],
        standby=Standby.REJOINING,
    ),
    case(
        "rejoin-not-following",
        st(standby=Standby.NOT_FOLLOWING),
        req("rejoin"),
        [A(Act.REJOIN, M, manual=True)],
        ["rejoin of mirror requested"],
        standby=Standby.REJOINING,
    ),
    case(
        "rejoin-resync",
        st(**MIRROR_ACTIVE, standby=Standby.FENCED),
        req("rejoin", force=True),
        [A(Act.REJOIN, P, force=True, manual=True)],
        ["rejoin of primary requested"],
        standby=Standby.REJOINING,
    ),
    case("rejoin-following-refused", st(), req("rejoin"), [REFUSE()], ["rejoin refused: mirror is following"]),
    case(
        "rejoin-down-refused", st(standby=Standby.DOWN), req("rejoin"), [REFUSE()], ["rejoin refused: mirror is down"]
    ),
    case(
        "rejoin-unfenced-refused",
        st(standby=Standby.UNFENCED),
        req("rejoin"),
        [REFUSE()],
        ["rejoin refused: mirror is unfenced"],
    ),
    case(
        "internal-operation-request-refused",
        st(),
        req("fence"),
        [REFUSE()],
        ["fence is not something an operator can request here"],
    ),
]

# Any operation requested while another one runs is refused, whatever it is.
_BUSY_STATES = {
    "failing-over": st(phase=FAILING_OVER, active_up=False, lag_bytes=0),
    "switching": st(**MIRROR_ACTIVE, phase=SWITCHING, standby=Standby.FENCED),
    "rejoining": st(**MIRROR_ACTIVE, standby=Standby.REJOINING),
}
REQUESTS += [
    case(
        f"{kind}-while-{busy}-refused",
        state,
        req(kind, force=True),
        [REFUSE()],
        ["another operation is running", f"({state.phase.value}, standby {state.standby.value})"],
    )
    for busy, state in _BUSY_STATES.items()
    for kind in ("failover", "switchover", "failback", "rejoin")
]


@pytest.mark.parametrize("state, obs, actions, reason, after", REQUESTS)
def test_request(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


# -- operation results ---------------------------------------------------------------------------------

_FAILING_OVER = st(
    phase=FAILING_OVER, failures=4, active_up=False, lag_bytes=10, sync_standby=True, standby_ready_since=T0 - 100
)

FINISHED = [
    case(
        "failover-ok",
        _FAILING_OVER,
        fin("failover", True, node=M, active=M, epoch=1, detail="promoted in 0.4s"),
        [],
        ["FAILOVER to mirror completed: promoted in 0.4s"],
        active=M,
        epoch=1,
        phase=HEALTHY,
        standby=Standby.UNKNOWN,
        failures=0,
        active_up=True,
        lag_bytes=None,
        sync_standby=False,
        standby_ready_since=None,
    ),
    case(
        "failover-ok-no-detail",
        _FAILING_OVER,
        fin("failover", True, node=M, active=M, epoch=1),
        [],
        ["FAILOVER to mirror completed"],
        active=M,
        epoch=1,
        phase=HEALTHY,
        standby=Standby.UNKNOWN,
    ),
    case(
        "failover-failed-no-node",
        _FAILING_OVER,
        fin("failover", False, node=M, active=None, epoch=1, detail="promotion failed"),
        [],
        ["failover failed, routing to no node (fail closed): promotion failed"],
        active=P,
        epoch=1,
        phase=Phase.NO_ROUTABLE_NODE,
        standby=Standby.UNKNOWN,
    ),
    case(
        "failover-failed-no-node-keeps-higher-epoch",
        replace(_FAILING_OVER, epoch=3),
        fin("failover", False, node=M, active=None, epoch=2),
        [],
        ["fail closed"],
        active=P,
        epoch=3,
        phase=Phase.NO_ROUTABLE_NODE,
        standby=Standby.UNKNOWN,
    ),
    case(
        "failover-failed-still-routing-to-down-active",
        _FAILING_OVER,
        fin("failover", False, node=M, active=P, epoch=0, detail="mirror refused promotion"),
        [],
        ["failover failed, still routing to primary: mirror refused promotion"],
        active=P,
        epoch=0,
        phase=ACTIVE_DOWN,
        standby=Standby.UNKNOWN,
    ),
    case(
        "manual-failover-failed-active-up",
        st(phase=FAILING_OVER),
        fin("failover", False, node=M, active=P, epoch=0, detail="aborted"),
        [],
        ["failover failed, still routing to primary"],
        active=P,
        phase=HEALTHY,
        standby=Standby.UNKNOWN,
    ),
    case(
        "switchover-ok",
        st(phase=SWITCHING),
        fin("switchover", True, node=M, active=M, epoch=1),
        [],
        ["switchover to mirror completed"],
        active=M,
        epoch=1,
        phase=HEALTHY,
        standby=Standby.FOLLOWING,
        lag_bytes=None,
        active_up=True,
    ),
    case(
        "switchover-failed",
        st(phase=SWITCHING),
        fin("switchover", False, node=M, active=P, detail="timeout"),
        [],
        ["switchover failed, still routing to primary: timeout"],
        active=P,
        phase=HEALTHY,
    ),
    case(
        "switchover-failed-no-node",
        st(phase=SWITCHING),
        fin("switchover", False, node=M, active=None, epoch=1),
        [],
        ["switchover failed, routing to no node"],
        active=P,
        epoch=1,
        phase=Phase.NO_ROUTABLE_NODE,
    ),
    case(
        "failback-ok",
        st(**MIRROR_ACTIVE, phase=SWITCHING, standby=Standby.FENCED),
        fin("failback", True, node=P, active=P, epoch=2, detail="0 conflicts"),
        [],
        ["FAILBACK to primary completed: 0 conflicts"],
        active=P,
        epoch=2,
        phase=HEALTHY,
        standby=Standby.FOLLOWING,
    ),
    case(
        "failback-failed",
        st(**MIRROR_ACTIVE, phase=SWITCHING, standby=Standby.FENCED),
        fin("failback", False, node=P, active=M, epoch=1, detail="primary unreachable"),
        [],
        ["failback failed, still routing to mirror"],
        active=M,
        epoch=1,
        phase=HEALTHY,
    ),
    case(
        "fence-ok",
        st(standby=Standby.UNFENCED),
        fin("fence", True, node=M, active=P),
        [],
        ["mirror fenced (read-only)"],
        standby=Standby.FENCED,
    ),
    case("unfence-ok", st(), fin("unfence", True, node=P, active=P), [], ["primary unfenced"]),
    case(
        "unfence-failed",
        st(),
        fin("unfence", False, node=P, active=P, detail="timeout"),
        [],
        ["unfencing primary failed: timeout"],
    ),
    case(
        "rejoin-ok",
        st(standby=Standby.REJOINING, lag_bytes=500),
        fin("rejoin", True, node=M, active=P, detail="2 commits recovered"),
        [],
        ["mirror rejoined: follows primary (2 commits recovered)"],
        standby=Standby.FOLLOWING,
        lag_bytes=None,
    ),
    case(
        "rejoin-failed-stops-auto-rejoin",
        st(standby=Standby.REJOINING),
        fin("rejoin", False, node=M, active=P, detail="slot missing"),
        [],
        ["rejoin of mirror failed, automatic rejoin stopped: slot missing"],
        standby=Standby.FENCED,
        policy=pol(auto_rejoin=False),
    ),
    case(
        "promotion-finished",
        st(active=M, phase=Phase.FAILING_OVER, standby=Standby.UNKNOWN),
        fin("promote", True, node=M, active=M, epoch=4),
        [],
        ["promotion of mirror finished"],
        phase=HEALTHY,
    ),
    case(
        "promotion-not-finished-fails-closed",
        st(active=M, phase=Phase.FAILING_OVER, standby=Standby.UNKNOWN),
        fin("promote", False, node=M, epoch=4, detail="connection refused"),
        [],
        ["could not finish promoting mirror: connection refused"],
        phase=Phase.NO_ROUTABLE_NODE,
        active=M,
    ),
]


def test_a_failed_failover_is_not_retried_until_the_target_is_seen_again():
    """Both nodes down: one failover attempt, one failure, then quiet repeats; the
    mirror answering again makes it a target again."""
    s = st(phase=SUSPECT, failures=3, lag_bytes=0)
    d = run(s, down())
    assert kinds(d[0]) == [Act.EVENT, Act.FAILOVER]
    failed = transition(d[0].state, fin("failover", False, node=M, active=None, epoch=0, detail="mirror unreachable"))
    assert failed.state.standby is Standby.UNKNOWN
    repeats = run(failed.state, down(), down(), down())
    assert all(not x.actions for x in repeats), [x.reason for x in repeats]
    back = run(repeats[-1].state, following(), down())
    assert kinds(back[-1]) == [Act.FAILOVER]


def test_unknown_result_or_request_cannot_be_observed():
    with pytest.raises(ValueError):
        fin("reboot", True)
    with pytest.raises(ValueError):
        req("reboot")


def test_operation_actions_need_a_node():
    with pytest.raises(ValueError, match="needs a node"):
        Action(Act.FAILOVER)
    with pytest.raises(ValueError, match="needs a node"):
        Action(Act.CONFIRM_PROBE, detail="3")
    assert Action(Act.REFUSE, detail="no").node is None


NOT_ROUTING = {"active": None, "phase": Phase.NO_ROUTABLE_NODE, "standby": Standby.UNKNOWN, "active_up": None}

STARTED = [
    case(
        "start-routes-to-the-winner",
        st(**NOT_ROUTING),
        Started(P, 3, "epoch 3: primary is active", T0),
        [],
        ["epoch 3: primary is active"],
        active=P,
        epoch=3,
        phase=HEALTHY,
        standby=Standby.UNKNOWN,
    ),
    case(
        "start-fails-closed",
        st(**NOT_ROUTING),
        Started(None, 3, "epoch 3 claims disagree: cannot tell which node is current", T0),
        [],
        ["cannot tell"],
        epoch=3,
    ),
    case(
        "start-finishes-an-interrupted-promotion",
        st(**NOT_ROUTING),
        Started(M, 4, "epoch 4: mirror is active", T0, unfinished_promotion=True),
        [A(Act.PROMOTE, M)],
        ["mirror is stamped active but still subscribed", "FAILOVER"],
        active=M,
        epoch=4,
        phase=Phase.FAILING_OVER,
    ),
    case(
        "start-stamps-an-unstamped-winner",
        st(**NOT_ROUTING),
        Started(P, 0, "fresh start: no state file, no stamps; primary is active", T0, unstamped=True),
        [A(Act.STAMP, P)],
        ["fresh start"],
        active=P,
        phase=HEALTHY,
    ),
    case(
        "resolve",
        st(**NOT_ROUTING),
        Started(M, 5, "operator resolved", T0, by_operator=True),
        [],
        ["operator resolved the active node: mirror"],
        active=M,
        epoch=5,
        phase=HEALTHY,
    ),
    case(
        "resolve-none",
        st(**NOT_ROUTING),
        Started(None, 6, "operator resolved", T0, by_operator=True),
        [],
        ["operator resolved the active node: none"],
        epoch=6,
    ),
    case(
        "resolve-requested-while-failing-closed",
        st(**NOT_ROUTING),
        req("resolve"),
        [],
        ["operator resolving the active node"],
    ),
    case(
        "resolve-refused-while-routing",
        st(),
        req("resolve"),
        [REFUSE()],
        ["pgroute routes to primary and is not failing closed"],
    ),
    case(
        "resolve-refused-while-busy",
        st(phase=Phase.FAILING_OVER),
        req("resolve"),
        [REFUSE()],
        ["an operation is running"],
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", STARTED)
def test_started(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


@pytest.mark.parametrize("state, obs, actions, reason, after", FINISHED)
def test_finished(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


# -- auto failback ------------------------------------------------------------------------------------

DELAY = 60.0


def _mirror_active(**kw) -> State:
    base = {
        "active": M,
        "epoch": 1,
        "standby": Standby.FOLLOWING,
        "lag_bytes": 100,
        "policy": pol(auto_failback=True, failback_delay=DELAY),
    }
    base.update(kw)
    return st(**base)


AUTO_FAILBACK = [
    case(
        "ready-for-delay-fails-back",
        _mirror_active(standby_ready_since=T0),
        up(M, lag=100, now=T0 + DELAY),
        [A(Act.FAILBACK, P)],
        ["FAILBACK: primary healthy and caught up for 60s", "health.auto_failback"],
        phase=SWITCHING,
    ),
    case(
        "standby-probe-after-delay-fails-back",
        _mirror_active(standby_ready_since=T0),
        following(P, now=T0 + DELAY + 5, read_only=True),
        [A(Act.FAILBACK, P)],
        ["FAILBACK", "65s"],
        phase=SWITCHING,
    ),
    case(
        "before-delay-nothing",
        _mirror_active(standby_ready_since=T0),
        up(M, lag=100, now=T0 + DELAY - 1),
        [],
        [],
        phase=HEALTHY,
        standby_ready_since=T0,
    ),
    case("first-ready-probe-starts-timer", _mirror_active(), up(M, lag=100, now=T0), [], [], standby_ready_since=T0),
    case(
        "auto-failback-off",
        _mirror_active(standby_ready_since=T0, policy=pol(auto_failback=False)),
        up(M, lag=100, now=T0 + 10 * DELAY),
        [],
        [],
        phase=HEALTHY,
    ),
    case(
        "lag-over-limit-resets-timer",
        _mirror_active(standby_ready_since=T0),
        up(M, lag=BIG_LAG, now=T0 + DELAY),
        [],
        [],
        phase=HEALTHY,
        standby_ready_since=None,
        lag_bytes=BIG_LAG,
    ),
    case(
        "primary-not-following-no-failback",
        _mirror_active(standby=Standby.NOT_FOLLOWING, standby_ready_since=None),
        up(M, lag=100, now=T0 + DELAY),
        [],
        [],
        standby_ready_since=None,
    ),
    case(
        "paused-no-failback",
        _mirror_active(standby_ready_since=T0, paused=True),
        up(M, lag=100, now=T0 + DELAY),
        [],
        [],
        phase=HEALTHY,
    ),
    case(
        "primary-active-never-auto-fails-back",
        st(standby_ready_since=T0, policy=pol(auto_failback=True, failback_delay=DELAY)),
        up(P, lag=100, now=T0 + DELAY),
        [],
        [],
        phase=HEALTHY,
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", AUTO_FAILBACK)
def test_auto_failback(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


def test_auto_failback_timeline():
    """Mirror active; the primary rejoins; after failback_delay of being caught up, FAILBACK."""
    s = _mirror_active(standby=Standby.REJOINING, lag_bytes=None)
    d = run(
        s,
        fin("rejoin", True, node=P, active=M, now=T0),
        up(M, lag=50, now=T0 + 1),  # timer starts: following, caught up
        following(P, now=T0 + 30, read_only=True),
        up(M, lag=50, now=T0 + 31),
        up(M, lag=50, now=T0 + 61),
    )
    assert d[0].state.standby is Standby.FOLLOWING
    assert d[1].state.standby_ready_since == T0 + 1
    assert [kinds(x) for x in d[1:4]] == [[], [], []]
    assert kinds(d[4]) == [Act.FAILBACK] and d[4].actions[0].node is P and not d[4].actions[0].manual
    assert d[4].state.phase is SWITCHING
    assert "FAILBACK: primary healthy and caught up for 60s" in d[4].reason


def test_auto_failback_timer_restarts_after_the_active_was_down():
    """'caught up for Ns' must count time while the active node was up: an outage of the
    active node (declared down) restarts the failback delay."""
    s = _mirror_active(
        standby_ready_since=T0, policy=pol(auto_failback=True, auto_failover=False, failback_delay=DELAY, max_retries=0)
    )
    d = run(
        s,
        down(M, now=T0 + 10),  # declared down; automatic failover is off
        down(M, now=T0 + 40),
        up(M, lag=50, now=T0 + 200),  # back after 190 s
        up(M, lag=50, now=T0 + 230),
    )  # only 30 s caught up since it came back
    assert d[0].state.phase is ACTIVE_DOWN
    assert d[2].state.phase is HEALTHY
    assert kinds(d[3]) == [], f"failed back {d[3].reason!r} only 30s after the mirror came back"
    d2 = transition(d[3].state, up(M, lag=50, now=T0 + 200 + DELAY))
    assert kinds(d2) == [Act.FAILBACK]


# -- synchronous replication target -------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, expected",
    [
        pytest.param(st(policy=pol(synchronous="off")), None, id="off"),
        pytest.param(st(policy=pol(synchronous="on")), M, id="on-following-caught-up"),
        pytest.param(st(policy=pol(synchronous="on"), lag_bytes=MAX_LAG), M, id="on-lag-at-limit"),
        pytest.param(st(policy=pol(synchronous="on"), lag_bytes=BIG_LAG), None, id="on-behind-async"),
        pytest.param(st(policy=pol(synchronous="on"), lag_bytes=None), None, id="on-lag-unknown-async"),
        pytest.param(st(policy=pol(synchronous="on"), standby=Standby.DOWN), None, id="on-standby-down-async"),
        pytest.param(st(policy=pol(synchronous="on"), standby=Standby.REJOINING), None, id="on-rejoining-async"),
        pytest.param(
            st(policy=pol(synchronous="strict"), standby=Standby.DOWN, lag_bytes=None),
            M,
            id="strict-standby-down-still-waits",
        ),
        pytest.param(st(active=M, epoch=1, policy=pol(synchronous="strict")), P, id="strict-mirror-active"),
        pytest.param(st(active=None, policy=pol(synchronous="strict")), None, id="strict-no-active"),
    ],
)
def test_synchronous_standby(state, expected):
    assert synchronous_standby(state) == expected


# -- scenarios -------------------------------------------------------------------------------------------


def test_single_failed_probe_then_success_does_not_fail_over():
    d = run(st(), up(now=T0), down(now=T0 + 30), up(now=T0 + 31), up(now=T0 + 60))
    assert all(a.kind is not Act.FAILOVER for x in d for a in x.actions)
    assert kinds(d[1]) == [Act.CONFIRM_PROBE] and d[1].state.phase is SUSPECT
    assert d[2].state.phase is HEALTHY and d[2].state.failures == 0
    assert "answered again after 1 failed probe(s); no failover" in d[2].reason
    assert d[3].reason == "" and d[3].actions == ()


@pytest.mark.parametrize("max_retries", [0, 1, 3, 5], ids=lambda n: f"max_retries={n}")
def test_confirming_probes_then_failover(max_retries):
    s = st(policy=pol(max_retries=max_retries), lag_bytes=123)
    d = run(s, *[down(now=T0 + i) for i in range(max_retries + 1)])
    for attempt, x in enumerate(d[:-1], start=1):
        expected = (Action(Act.CONFIRM_PROBE, P, detail=str(max_retries)),) if attempt == 1 else ()
        assert x.actions == expected
        assert f"confirming, attempt {attempt}/{max_retries}" in x.reason
        assert x.state.phase is SUSPECT and x.state.failures == attempt
    last = d[-1]
    assert last.actions == (Action(Act.EVENT, P, detail="node_down"), Action(Act.FAILOVER, M))
    assert f"primary down after {max_retries + 1} failed probes" in last.reason
    assert "FAILOVER to mirror" in last.reason
    assert last.state.phase is Phase.FAILING_OVER and last.state.active is P and last.state.active_up is False


def test_active_down_stays_quiet_until_failover_becomes_possible():
    s = st(phase=SUSPECT, failures=3, standby=Standby.DOWN)
    d = run(
        s,
        down(now=T0),  # declared down, standby down: node_down, no failover
        down(now=T0 + 30),  # quiet
        down(now=T0 + 60),  # quiet
        following(M, now=T0 + 70),  # standby back and following
        down(now=T0 + 90),
    )  # failover is possible now
    assert d[0].actions == (Action(Act.EVENT, P, detail="node_down"),)
    assert "FAILOVER not started" in d[0].reason and d[0].state.phase is ACTIVE_DOWN
    assert d[1].actions == () and d[1].reason == "" and d[1].state.phase is ACTIVE_DOWN
    assert d[2].actions == () and d[2].reason == ""
    assert d[3].state.standby is Standby.FOLLOWING
    assert d[4].actions == (Action(Act.FAILOVER, M),)
    assert d[4].state.phase is Phase.FAILING_OVER and "FAILOVER to mirror" in d[4].reason


def test_failed_failover_fails_closed_then_routes_back_when_active_answers():
    s = st(phase=SUSPECT, failures=3)
    d = run(
        s,
        down(now=T0),
        fin("failover", False, node=M, active=None, epoch=1, detail="mirror unreachable", now=T0 + 2),
        up(now=T0 + 30),
    )
    assert kinds(d[0]) == [Act.EVENT, Act.FAILOVER]
    assert d[1].state.phase is Phase.NO_ROUTABLE_NODE and d[1].state.active is P
    assert d[2].state.phase is HEALTHY and d[2].actions == (Action(Act.EVENT, P, detail="node_up"),)


def test_failover_completes_then_old_primary_is_fenced_and_rejoined():
    s = st(phase=SUSPECT, failures=3)
    d = run(
        s,
        down(P, now=T0),
        fin("failover", True, node=M, active=M, epoch=1, now=T0 + 1),
        up(M, lag=None, now=T0 + 2),
        writable(P, now=T0 + 100),  # old primary returns writable
        fin("fence", True, node=P, active=M, now=T0 + 101),
        fenced(P, now=T0 + 130),  # next probe: fenced and up -> rejoin
        fin("rejoin", True, node=P, active=M, now=T0 + 140),
    )
    assert d[1].state.active is M and d[1].state.epoch == 1
    assert d[3].actions == (Action(Act.FENCE, P),)
    assert d[4].state.standby is Standby.FENCED
    assert d[5].actions == (Action(Act.REJOIN, P),) and d[5].state.standby is Standby.REJOINING
    assert d[6].state.standby is Standby.FOLLOWING


def test_failed_fence_is_retried_on_next_probe():
    """Invariant (state.py docstring): a standby that is up, not a subscriber and not
    read-only gets fenced. A fence that failed must be retried by a later probe."""
    s = st(standby=Standby.UNKNOWN)
    d = run(
        s,
        writable(M, now=T0),
        fin("fence", False, node=M, active=P, detail="connection reset", now=T0 + 1),
        writable(M, now=T0 + 30),
    )
    assert d[0].actions == (Action(Act.FENCE, M),)
    assert "fencing mirror failed: connection reset" in d[1].reason and d[1].actions == ()
    assert d[2].actions == (Action(Act.FENCE, M),), f"the still-writable mirror is never fenced again: {d[2].reason!r}"


@pytest.mark.parametrize(
    "before, obs",
    [
        (Standby.FOLLOWING, sub_disabled(M)),
        (Standby.FOLLOWING, writable(M)),
        (Standby.NOT_FOLLOWING, following(M)),
    ],
    ids=["following-to-not-following", "following-to-unfenced", "not-following-to-following"],
)
def test_node_up_event_only_when_node_was_down(before, obs):
    """A status change between two 'up' statuses is not a node_up event (alerts would
    announce a node coming up that never went down)."""
    d = transition(st(standby=before), obs)
    assert Action(Act.EVENT, M, detail="node_up") not in d.actions, d.reason


# -- purity -----------------------------------------------------------------------------------------

# -- safety under real faults (refused probes, local errors, stalls, restarts) ---------------


def refused(node: NodeName = P, *, now: float = T0, error: str = "password authentication failed") -> Probed:
    """The server answered with an error: alive, not usable by pgroute."""
    return Probed(hs(node, False, at=now, error=error, reached=True), now)


def local_error(node: NodeName = P, *, now: float = T0) -> Probed:
    """pgroute ran out of file descriptors: the node was never reached."""
    return Probed(hs(node, False, at=now, error="[Errno 24] Too many open files", local=True), now)


def sub_sample(
    node: NodeName = M,
    *,
    now: float = T0,
    errors: int = 0,
    worker: bool = True,
    received: int | None = 100,
    applied: int | None = None,
) -> Probed:
    return Probed(
        hs(
            node,
            at=now,
            read_only=False,
            subscription=SUB,
            subscription_enabled=True,
            apply_errors=errors,
            worker_running=worker,
            received_lsn=received,
            applied_lsn=applied,
        ),
        now,
    )


STALL = Policy().stall_seconds
STALLED_ST = {
    "standby": Standby.STALLED,
    "standby_stall": "its apply worker fails",
    "standby_errors": 3,
    "standby_error_at": T0 - 1,
    "standby_error_rises": 2,
}

SAFETY = [
    case(
        "active-refused-is-alive-no-failover",
        st(phase=SUSPECT, failures=2),
        refused(),
        [event(P, "node_refused")],
        ["primary answers but refuses pgroute", "password authentication failed", "no FAILOVER"],
        phase=HEALTHY,
        failures=0,
        active_refused="password authentication failed",
    ),
    case(
        "active-refused-again-quiet", st(active_refused="password authentication failed"), refused(), [], [], failures=0
    ),
    case(
        "active-refused-after-declared-down-is-alive",
        st(phase=ACTIVE_DOWN, active_up=False, failures=4),
        refused(),
        [event(P, "node_refused")],
        ["refuses pgroute"],
        phase=HEALTHY,
        active_up=True,
    ),
    case(
        "active-accepts-again",
        st(active_refused="password authentication failed"),
        up(),
        [event(P, "node_up")],
        ["primary accepts pgroute again"],
        active_refused=None,
    ),
    case("active-local-error-not-counted", st(), local_error(), [], [], failures=0),
    case("standby-local-error-not-counted", st(), local_error(M), [], [], standby=Standby.FOLLOWING),
    case(
        "standby-refused-is-no-target",
        st(),
        refused(M),
        [event(M, "node_refused")],
        ["standby mirror answers but refuses pgroute"],
        standby=Standby.REFUSED,
    ),
    case(
        "standby-refused-accepts-again",
        st(standby=Standby.REFUSED, standby_refused="x"),
        following(),
        [],
        ["standby mirror is following"],
        standby=Standby.FOLLOWING,
        standby_refused=None,
    ),
    case(
        "failover-refused-to-refusing-standby",
        st(standby=Standby.REFUSED, standby_refused="no such database"),
        down(),
        [A(Act.CONFIRM_PROBE, P, detail="3")],
        ["confirming"],
        phase=SUSPECT,
    ),
    case(
        "standby-one-error-rise-is-not-a-stall",
        st(standby_errors=3),
        sub_sample(errors=4),
        [],
        [],
        standby=Standby.FOLLOWING,
        standby_error_rises=1,
        standby_error_at=T0,
    ),
    case(
        "standby-errors-stop-rising-no-stall",
        st(standby_errors=4, standby_error_rises=1, standby_error_at=T0 - STALL - 1),
        sub_sample(errors=5),
        [],
        [],
        standby=Standby.FOLLOWING,
        standby_error_rises=1,
    ),
    case(
        "standby-errors-while-active-down-are-no-stall",
        st(standby_errors=3, standby_error_rises=1, standby_error_at=T0 - 5, active_up=False, phase=ACTIVE_DOWN),
        sub_sample(errors=5, worker=False),
        [],
        [],
        standby=Standby.FOLLOWING,
        standby_error_rises=0,
    ),
    case(
        "standby-errors-rising-stalls",
        st(standby_errors=3, standby_error_rises=1, standby_error_at=T0 - 5),
        sub_sample(errors=5),
        [event(M, "replication_stalled")],
        ["replication to mirror is stalled", "5 error(s)", "not a FAILOVER target"],
        standby=Standby.STALLED,
        standby_error_at=T0,
        standby_error_rises=2,
    ),
    case(
        "standby-first-error-count-is-a-baseline",
        st(),
        sub_sample(errors=5),
        [],
        [],
        standby=Standby.FOLLOWING,
        standby_errors=5,
    ),
    case(
        "stalled-stays-stalled-between-retries",
        st(**STALLED_ST),
        sub_sample(errors=3, worker=False),
        [],
        [],
        standby=Standby.STALLED,
    ),
    case(
        "stalled-recovers-after-quiet-window",
        st(**{**STALLED_ST, "standby_error_at": T0 - STALL - 1}),
        sub_sample(errors=3),
        [event(M, "replication_resumed")],
        ["replication to mirror applies again"],
        standby=Standby.FOLLOWING,
        standby_stall=None,
    ),
    case(
        "no-apply-worker-for-the-window-stalls",
        st(standby_no_worker_since=T0 - STALL),
        sub_sample(worker=False),
        [event(M, "replication_stalled")],
        ["no apply worker for 30s"],
        standby=Standby.STALLED,
    ),
    case(
        "no-progress-while-behind-stalls",
        st(lag_bytes=5000, standby_received=100, standby_received_at=T0 - STALL),
        sub_sample(received=100),
        [event(M, "replication_stalled")],
        ["received position not moving", "5000 bytes behind"],
        standby=Standby.STALLED,
    ),
    case(
        "no-progress-while-caught-up-is-fine",
        st(lag_bytes=0, standby_received=100, standby_received_at=T0 - STALL),
        sub_sample(received=100),
        [],
        [],
        standby=Standby.FOLLOWING,
    ),
    case(
        "stalled-standby-blocks-automatic-failover",
        st(**STALLED_ST, phase=SUSPECT, failures=3),
        down(),
        [event(P, "node_down")],
        ["FAILOVER not started", "mirror is stalled (its apply worker fails)"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "stalled-standby-manual-failover-refused-with-cause",
        st(**STALLED_ST),
        req("failover"),
        [REFUSE()],
        ["failover refused: mirror is stalled (its apply worker fails)"],
    ),
    case(
        "stalled-standby-forced-failover",
        st(**STALLED_ST),
        req("failover", force=True),
        [A(Act.FAILOVER, M, force=True, manual=True)],
        ["forced"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "stalled-standby-switchover-refused-with-cause",
        st(**STALLED_ST),
        req("switchover"),
        [REFUSE()],
        ["switchover refused: mirror is stalled (its apply worker fails)"],
    ),
    case(
        "stalled-primary-failback-refused-with-cause",
        st(**{**STALLED_ST, "active": M}),
        req("failback"),
        [REFUSE()],
        ["failback refused: primary is stalled (its apply worker fails)", "--resync"],
    ),
    case(
        "stalled-primary-failback-resync",
        st(**{**STALLED_ST, "active": M}),
        req("failback", force=True),
        [A(Act.FAILBACK, P, force=True, manual=True)],
        ["FAILBACK"],
        phase=SWITCHING,
    ),
    case(
        "stalled-standby-rejoin-allowed",
        st(**STALLED_ST),
        req("rejoin", force=True),
        [A(Act.REJOIN, M, force=True, manual=True)],
        ["rejoin of mirror requested"],
        standby=Standby.REJOINING,
    ),
    # Restarted while the active node is down: its lag is estimated from the position
    # recorded in the state file and the standby's applied position.
    case(
        "restart-lag-estimated-from-recorded-position",
        st(lag_bytes=None, active_up=None, active_lsn=10_000, standby=Standby.UNKNOWN),
        sub_sample(applied=9_000),
        [],
        ["standby mirror is following"],
        lag_bytes=1_000,
        standby=Standby.FOLLOWING,
    ),
    case(
        "restart-lag-not-estimated-while-active-answers",
        st(lag_bytes=None, active_up=True, active_lsn=10_000, standby=Standby.UNKNOWN),
        sub_sample(applied=9_000),
        [],
        ["standby mirror is following"],
        lag_bytes=None,
        standby=Standby.FOLLOWING,
    ),
    case(
        "restart-estimated-lag-lets-failover-proceed",
        st(lag_bytes=1_000, active_up=None, active_lsn=10_000, phase=SUSPECT, failures=3),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "start-unfences-a-winner-left-fenced",
        st(**NOT_ROUTING),
        Started(P, 3, "epoch 3: primary is active", T0, fenced_winner=True),
        [A(Act.UNFENCE, P)],
        ["left fenced by a switch that promoted nothing"],
        active=P,
        epoch=3,
        phase=Phase.FAILING_OVER,
    ),
    case(
        "start-unfence-done-routes",
        st(phase=Phase.FAILING_OVER, standby=Standby.UNKNOWN),
        fin("unfence", True, node=P, active=P, epoch=3),
        [],
        ["primary unfenced; routing to it"],
        phase=HEALTHY,
    ),
    case(
        "start-unfence-failed-fails-closed",
        st(phase=Phase.FAILING_OVER, standby=Standby.UNKNOWN),
        fin("unfence", False, node=P, epoch=3, detail="timeout"),
        [],
        ["could not unfence primary: timeout"],
        phase=Phase.NO_ROUTABLE_NODE,
    ),
    case(
        "start-records-the-active-position",
        st(**NOT_ROUTING),
        Started(P, 3, "epoch 3", T0, active_lsn=77),
        [],
        ["epoch 3"],
        active=P,
        epoch=3,
        phase=HEALTHY,
        active_lsn=77,
    ),
    case(
        "partly-fenced-standby-is-fenced-again",
        st(standby=Standby.UNKNOWN),
        Probed(hs(M, read_only=True, fenced=False, subscription=None), T0),
        [A(Act.FENCE, M)],
        ["fencing it"],
        standby=Standby.UNFENCED,
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", SAFETY)
def test_safety(state, obs, actions, reason, after):
    check(state, transition(state, obs), actions, reason, after)


ALL_CASES = ACTIVE_PROBES + STANDBY_PROBES + REQUESTS + FINISHED + AUTO_FAILBACK + SAFETY


@pytest.mark.parametrize("state, obs, actions, reason, after", ALL_CASES)
def test_transition_is_pure(state, obs, actions, reason, after):
    before = copy.deepcopy(state)
    first = transition(state, obs)
    second = transition(state, obs)
    assert first == second
    assert state == before
    assert isinstance(first.actions, tuple)


def test_state_and_decision_are_frozen():
    s = st()
    d = transition(s, down())
    for obj, attr in (
        (s, "phase"),
        (s.policy, "max_retries"),
        (d, "reason"),
        (d.state, "failures"),
        (d.actions[0], "node"),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)
    assert s.phase is HEALTHY and s.failures == 0


def test_unknown_observation_is_a_type_error():
    with pytest.raises(TypeError):
        transition(st(), object())  # type: ignore[arg-type]  # the wrong type is the test


def test_tables_cover_every_phase_and_standby_status():
    """Every Phase and every Standby status appears as an input state in the tables."""
    phases = {p.values[0].phase for p in ALL_CASES}
    standbys = {p.values[0].standby for p in ALL_CASES}
    assert phases == set(Phase)
    assert standbys == set(Standby)
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
