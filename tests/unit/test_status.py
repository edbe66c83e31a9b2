"""``/api/status`` as a pure function (pgroute.control.status): table tests of the
state name, replication health, node roles and lag, and masking."""

from __future__ import annotations

from typing import Any

import pytest

from pgroute.control.state import Phase, Policy, Standby, State
from pgroute.control.status import StatusInputs, build_status, replication_health, state_name
from pgroute.model import HealthSample, NodeName
from pgroute.proxy.router import Backend, ProxyStats, Route

P, M = NodeName.PRIMARY, NodeName.MIRROR
ADDR = {P: ("127.0.0.1", 5432), M: ("127.0.0.1", 5433)}


def st(**kw: Any) -> State:
    base: dict[str, Any] = {
        "active": P,
        "epoch": 2,
        "phase": Phase.ACTIVE_HEALTHY,
        "standby": Standby.FOLLOWING,
        "active_up": True,
        "lag_bytes": 0,
    }
    base.update(kw)
    return State(**base)


@pytest.mark.parametrize(
    "state, name",
    [
        (st(), "primary_active"),
        (st(active=M), "mirror_active"),
        (st(active=None, phase=Phase.NO_ROUTABLE_NODE), "no_routable_node"),
        (st(phase=Phase.NO_ROUTABLE_NODE), "no_routable_node"),
        (st(phase=Phase.FAILING_OVER), "failing_over"),
        (st(phase=Phase.SWITCHING), "switching"),
        (st(paused=True), "paused"),
        (st(phase=Phase.ACTIVE_SUSPECT), "primary_suspect"),
        (st(phase=Phase.ACTIVE_DOWN), "primary_down"),
        (st(standby=Standby.DOWN), "primary_active_mirror_down"),
        (st(standby=Standby.FENCED), "primary_active_mirror_fenced"),
        (st(standby=Standby.UNFENCED), "primary_active_mirror_fenced"),
        (st(active=M, standby=Standby.REJOINING), "mirror_active_primary_rejoining"),
    ],
)
def test_state_name(state: State, name: str) -> None:
    assert state_name(state) == name


@pytest.mark.parametrize(
    "state, health",
    [
        (st(), "ok"),
        (st(lag_bytes=Policy().max_lag_bytes + 1), "lagging"),
        (st(lag_bytes=None), "ok"),
        (st(standby=Standby.NOT_FOLLOWING), "broken"),
        (st(standby=Standby.DOWN), "none"),
        (st(standby=Standby.FENCED), "none"),
        (st(standby=Standby.UNKNOWN), "none"),
        (st(active=None), "none"),
    ],
)
def test_replication_health(state: State, health: str) -> None:
    assert replication_health(state) == health


def sample(node: NodeName, ok: bool = True, **kw: Any) -> HealthSample:
    return HealthSample(node=node, ok=ok, at=1_700_000_000.0, latency=0.0012, **kw)


def build(state: State, samples: dict[NodeName, HealthSample], route: Route | None = None) -> dict[str, Any]:
    route = route or Route(Backend(state.active.value, *ADDR[state.active]) if state.active else None, state.epoch)
    return build_status(
        StatusInputs(
            state=state,
            samples=samples,
            route=route,
            stats=ProxyStats(),
            addresses=ADDR,
            synchronous="off",
            detection_bound=5.0,
        )
    )


def test_roles_and_lag_come_from_the_active_nodes_sample() -> None:
    body = build(
        st(),
        {
            P: sample(P, publisher_lag_bytes=128, publisher_lag_seconds=0.5),
            M: sample(M, subscription="chrispar_sub", subscription_enabled=True),
        },
    )
    assert body["active"] == "primary" and body["epoch"] == 2
    assert body["nodes"]["primary"]["role"] == "active"
    assert body["nodes"]["primary"]["lag_bytes"] is None
    mirror = body["nodes"]["mirror"]
    assert mirror["role"] == "standby" and mirror["lag_bytes"] == 128 and mirror["lag_seconds"] == 0.5
    assert mirror["subscription"] == {"name": "chrispar_sub", "enabled": True}
    assert mirror["port"] == 5433 and mirror["latency_ms"] == 1.2
    assert mirror["last_probe"].startswith("2023-11-14T22:13:20")


@pytest.mark.parametrize(
    "state, samples, mirror_role",
    [
        (st(standby=Standby.FENCED), {M: sample(M, read_only=True)}, "fenced"),
        (st(standby=Standby.REJOINING), {M: sample(M)}, "fenced"),
        (st(standby=Standby.DOWN), {M: sample(M, ok=False, error="timeout")}, "down"),
        (st(standby=Standby.NOT_FOLLOWING), {M: sample(M)}, "standby"),
        (st(active=None, phase=Phase.NO_ROUTABLE_NODE), {}, "unknown"),
    ],
)
def test_standby_roles(state: State, samples: dict[NodeName, HealthSample], mirror_role: str) -> None:
    assert build(state, samples)["nodes"]["mirror"]["role"] == mirror_role


def test_active_node_declared_down_is_shown_down() -> None:
    assert build(st(phase=Phase.ACTIVE_DOWN), {P: sample(P, ok=False, error="x")})["nodes"]["primary"]["role"] == "down"


def test_during_a_switch_the_role_holder_is_reported_while_new_connections_wait() -> None:
    s = st(phase=Phase.SWITCHING)
    body = build(s, {}, Route(None, 2, paused=True, reason="switchover in progress"))
    assert body["active"] == "primary" and body["paused"] is True
    body = build(s, {}, Route(None, 2, paused=False, reason="failed"))
    assert body["active"] is None


def test_passwords_are_masked_in_reason_and_errors() -> None:
    secret = "postgresql://app:hunter2@10.0.0.1/db"
    body = build(st(reason=f"could not reach {secret}"), {M: sample(M, ok=False, error=f"connect {secret} failed")})
    text = repr(body)
    assert "hunter2" not in text and "***" in text
