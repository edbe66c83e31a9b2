"""A follower that skipped replicated updates/deletes for want of the row (PostgreSQL 18+
counts them in ``pg_stat_subscription_stats``): table tests of the state machine
(``pgroute.control.state``), of ``/api/status`` and of ``pgroute status``.

The cases use the builders and the checker of tests/unit/test_state.py: exact actions,
the reason's words, and the State fields named after each case."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pgroute.alerts import FlapDamper
from pgroute.api.http import health_of
from pgroute.cli.render import render_status
from pgroute.control.state import Act, Phase, Probed, Standby, Started, State, transition
from pgroute.control.status import StatusInputs, build_status
from pgroute.model import Event, HealthSample, NodeName
from pgroute.proxy.router import Backend, ProxyStats, Route, Router

from .test_state import (
    ACTIVE_DOWN,
    HEALTHY,
    REFUSE,
    STALLED_ST,
    SUB,
    SUSPECT,
    T0,
    A,
    M,
    P,
    case,
    check,
    down,
    event,
    fin,
    hs,
    pol,
    req,
    run,
    st,
    up,
)

DIVERGED = {"standby_missing": 1, "standby_skipped": 1}
REPAIR_MIRROR = "resync it (`pgroute rejoin --resync`)"
REPAIR_PRIMARY = "resync it (`pgroute failback --resync` or `pgroute rejoin --resync`)"


def sub(node: NodeName = M, missing: int | None = 0, *, now: float = T0, **kw: Any) -> Probed:
    """The standby answers, follows, and its server counts ``missing`` skipped changes
    (None: PostgreSQL 15 or 16, which do not count them)."""
    return Probed(
        hs(node, at=now, read_only=True, subscription=SUB, subscription_enabled=True, missing_rows=missing, **kw), now
    )


CASES = [
    # -- the count ------------------------------------------------------------------------
    case("first-count-is-a-baseline", st(), sub(missing=5), [], [], standby_missing=5, standby_skipped=0),
    case(
        "rise-reports-once",
        st(standby_missing=0),
        sub(missing=1),
        [event(M, "replication_diverged")],
        [
            "replication to mirror skipped 1 more update(s)/delete(s) of rows it does not have",
            "(1 since pgroute first saw it)",
            f"the follower has diverged; {REPAIR_MIRROR}",
        ],
        standby=Standby.FOLLOWING,
        standby_missing=1,
        standby_skipped=1,
    ),
    case("same-count-is-quiet", st(**DIVERGED), sub(missing=1), [], [], standby_skipped=1),
    case(
        "further-rise-reports-again",
        st(**DIVERGED),
        sub(missing=3),
        [event(M, "replication_diverged")],
        ["skipped 2 more", "(3 since pgroute first saw it)"],
        standby_missing=3,
        standby_skipped=3,
    ),
    # A recreated subscription (a resync) or reset statistics restart the count.
    case(
        "lower-count-is-a-new-baseline",
        st(standby_missing=3, standby_skipped=3),
        sub(missing=0),
        [],
        [],
        standby_missing=0,
        standby_skipped=0,
    ),
    # PostgreSQL 15 and 16 do not count: nothing is known, nothing changes.
    case("no-count-15-16-changes-nothing", st(), sub(missing=None), [], [], standby_missing=None, standby_skipped=0),
    case("no-count-keeps-what-was-known", st(**DIVERGED), sub(missing=None), [], [], **DIVERGED),
    case(
        "rise-while-an-operation-runs-is-reported-after",
        st(phase=Phase.SWITCHING, standby_missing=0),
        sub(missing=1),
        [],
        [],
        standby_missing=0,
        standby_skipped=0,
    ),
    case(
        "rise-with-a-status-change-reports-both",
        st(standby=Standby.DOWN, standby_missing=0),
        sub(missing=2),
        [event(M, "node_up"), event(M, "replication_diverged")],
        ["standby mirror is following", "skipped 2 more"],
        standby=Standby.FOLLOWING,
        standby_skipped=2,
    ),
    case(
        "diverged-primary-is-repaired-by-failback-resync",
        st(active=M, standby_missing=0),
        sub(P, missing=1),
        [event(P, "replication_diverged")],
        ["replication to primary skipped 1 more", REPAIR_PRIMARY],
        standby_skipped=1,
    ),
    # -- what a diverged standby may become ----------------------------------------------------
    case(
        "automatic-failover-takes-a-diverged-standby-and-says-so",
        st(**DIVERGED, phase=SUSPECT, failures=3),
        down(),
        [event(P, "node_down"), A(Act.FAILOVER, M)],
        ["FAILOVER to mirror, although it has diverged (it skipped 1 update(s)/delete(s) of rows it does not have)"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "automatic-failover-still-gated-by-lag",
        st(**DIVERGED, phase=SUSPECT, failures=3, lag_bytes=pol().max_lag_bytes + 1),
        down(),
        [event(P, "node_down")],
        ["FAILOVER not started", "over health.max_lag_bytes"],
        phase=ACTIVE_DOWN,
    ),
    case(
        "manual-failover-refused-with-cause",
        st(**DIVERGED),
        req("failover"),
        [REFUSE()],
        ["failover refused: mirror has diverged (it skipped 1 update(s)/delete(s)", REPAIR_MIRROR, "--force"],
    ),
    case(
        "manual-failover-forced",
        st(**DIVERGED),
        req("failover", force=True),
        [A(Act.FAILOVER, M, force=True, manual=True)],
        ["manual FAILOVER to mirror requested (forced)"],
        phase=Phase.FAILING_OVER,
    ),
    case(
        "switchover-refused-with-cause",
        st(**DIVERGED),
        req("switchover"),
        [REFUSE()],
        ["switchover refused: mirror has diverged", REPAIR_MIRROR, "`pgroute failover --force`"],
    ),
    case(
        "failback-to-diverged-primary-refused",
        st(**DIVERGED, active=M),
        req("failback"),
        [REFUSE()],
        ["failback refused: primary has diverged", "`pgroute failback --resync`"],
    ),
    case(
        "failback-resync-to-diverged-primary",
        st(**DIVERGED, active=M),
        req("failback", force=True),
        [A(Act.FAILBACK, P, force=True, manual=True)],
        ["FAILBACK to primary requested"],
        phase=Phase.SWITCHING,
    ),
    case(
        "rejoin-without-resync-refused",
        st(**DIVERGED),
        req("rejoin"),
        [REFUSE()],
        ["rejoin refused: mirror has diverged: use `pgroute rejoin --resync`"],
    ),
    case(
        "rejoin-resync-of-a-diverged-follower",
        st(**DIVERGED),
        req("rejoin", force=True),
        [A(Act.REJOIN, M, force=True, manual=True)],
        ["rejoin of mirror requested"],
        standby=Standby.REJOINING,
    ),
    case("following-not-diverged-rejoin-still-refused", st(), req("rejoin", force=True), [REFUSE()], ["is following"]),
    case(
        "no-automatic-failback-to-a-diverged-primary",
        st(**DIVERGED, active=M, policy=pol(auto_failback=True, failback_delay=0)),
        up(M),
        [],
        [],
        standby_ready_since=None,
        phase=HEALTHY,
    ),
    case(
        "automatic-failback-when-not-diverged",
        st(active=M, policy=pol(auto_failback=True, failback_delay=0)),
        up(M),
        [A(Act.FAILBACK, P)],
        ["FAILBACK"],
        phase=Phase.SWITCHING,
    ),
    # -- forgetting ---------------------------------------------------------------------------
    case(
        "roles-moved-forget-the-count",
        st(**DIVERGED, phase=Phase.FAILING_OVER),
        fin("failover", True, active=M, epoch=1),
        [],
        ["FAILOVER to mirror completed"],
        active=M,
        epoch=1,
        phase=HEALTHY,
        standby=Standby.UNKNOWN,
        standby_missing=None,
        standby_skipped=0,
    ),
]


@pytest.mark.parametrize("state, obs, actions, reason, after", CASES)
def test_transition(state: State, obs, actions, reason, after) -> None:
    check(state, transition(state, obs), actions, reason, after)


def test_a_restart_of_pgroute_does_not_report_an_old_count() -> None:
    """pgroute restarts with the follower's count at 7 (from before): a baseline, no
    event; the next rise is reported, once."""
    started = Started(P, 3, "epoch 3 from the state file", T0)
    ds = run(st(**DIVERGED), started, sub(missing=7), sub(missing=7, now=T0 + 1), sub(missing=8, now=T0 + 2))
    assert ds[0].state.standby_skipped == 0 and ds[0].state.standby_missing is None
    assert [d.actions for d in ds[1:3]] == [(), ()]
    assert [(a.kind, a.detail) for a in ds[3].actions] == [(Act.EVENT, "replication_diverged")]
    assert ds[3].state.standby_skipped == 1


def test_a_stalled_and_diverged_follower_keeps_both() -> None:
    d = transition(st(**STALLED_ST, standby_missing=0), sub(missing=1, apply_errors=3, worker_running=False))
    assert d.state.standby is Standby.STALLED and d.state.standby_skipped == 1
    assert [a.detail for a in d.actions] == ["replication_diverged"]


# -- /api/status, /api/health, pgroute status -------------------------------------------------------

ADDR = {P: ("127.0.0.1", 5432), M: ("127.0.0.1", 5433)}


def _status(state: State, mirror: HealthSample) -> dict[str, Any]:
    primary = HealthSample(P, True, T0, 0.001, reached=True, publisher_lag_bytes=0)
    return build_status(
        StatusInputs(
            state=state,
            samples={P: primary, M: mirror},
            route=Route(Backend("primary", *ADDR[P]), state.epoch),
            stats=ProxyStats(),
            addresses=ADDR,
            synchronous="off",
            detection_bound=5.0,
        )
    )


def _health(status: dict[str, Any]) -> str:
    router = Router(Route(Backend("primary", *ADDR[P]), 0))
    return health_of(status, router)[1]["status"]


def _mirror(missing: int | None) -> HealthSample:
    return HealthSample(
        M, True, T0, 0.001, reached=True, subscription=SUB, subscription_enabled=True, missing_rows=missing
    )


@pytest.mark.parametrize(
    "state, missing, problem, health",
    [
        (st(), 0, None, "healthy"),
        # 15/16: the server does not count, pgroute does not know, nothing is shown.
        (st(), None, None, "healthy"),
        # A count from before pgroute started watching (the baseline): shown, no problem.
        (st(standby_missing=2), 2, None, "healthy"),
        (
            st(standby_missing=1, standby_skipped=1),
            1,
            f"skipped 1 update(s)/delete(s) of rows it does not have: the follower has diverged; {REPAIR_MIRROR}",
            "degraded",
        ),
        (
            st(**STALLED_ST, standby_missing=4, standby_skipped=2),
            4,
            "replication stalled: its apply worker fails; skipped 2 update(s)/delete(s)",
            "degraded",
        ),
    ],
    ids=["none", "15-16-unknown", "old-count-baseline", "diverged", "stalled-and-diverged"],
)
def test_status_shows_the_count_and_the_problem(state: State, missing, problem, health) -> None:
    body = _status(state, _mirror(missing))
    mirror = body["nodes"]["mirror"]
    assert mirror["missing_rows"] == missing
    if problem is None:
        assert mirror["problem"] is None
    else:
        assert mirror["problem"].startswith(problem), mirror["problem"]
    assert body["nodes"]["primary"]["problem"] is None
    assert _health(body) == health


def test_pgroute_status_prints_the_whole_problem_in_80_columns() -> None:
    body = _status(st(standby_missing=1, standby_skipped=1), _mirror(1))
    text = render_status(body)
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(line.strip() for line in text.splitlines())
    assert "skipped 1 update(s)/delete(s) of rows it does not have: the follower has diverged" in flat
    assert "(`pgroute rejoin --resync`)" in flat  # wrapped, not clipped: the advice survives
    assert "subscription chrispar_sub enabled; missing rows: 1" in flat


def test_diverged_events_of_one_node_are_damped() -> None:
    damper = FlapDamper(limit=3, window=300.0)
    ev = Event(1, "replication_diverged", "r", T0, T0, "ok", details=(("node", "mirror"),))
    admitted = [damper.admit(replace(ev, id=i), T0 + i) for i in range(5)]
    assert admitted == [0, 0, 0, None, None]
