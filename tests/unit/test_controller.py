"""The Controller with fakes for the nodes (``Executor``) and the monitor: start-up,
requests, the crash path that routes nowhere on purpose, resolve, and probes that
start a failover. The real procedures are covered by the integration tests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from pgroute.config import Config
from pgroute.control.controller import Controller
from pgroute.control.procedures import Op, OpResult
from pgroute.control.state import Action, Phase
from pgroute.control.state_store import NodeView, StateFile, Stored
from pgroute.errors import ActionRefused, PgRouteError
from pgroute.model import HealthSample, NodeName, Operation
from pgroute.proxy.router import Route, Router

P, M = NodeName.PRIMARY, NodeName.MIRROR


class FakeExecutor:
    """Nodes as a dict of views; operations succeed unless told to fail or crash."""

    def __init__(self, views: dict[NodeName, NodeView]) -> None:
        self.views = dict(views)
        self.runs: list[tuple[Operation, NodeName, int]] = []
        self.stamps: list[tuple[NodeName, int, NodeName | None]] = []
        self.crash: Operation | None = None
        self.fail: dict[Operation, str] = {}
        self.route_seen_during_run: list[Route] = []
        self.router: Router | None = None

    async def run(self, op: Op, action: Action, epoch: int, active: NodeName | None) -> OpResult:
        self.runs.append((op.kind, action.target, epoch))
        if self.router is not None:
            self.route_seen_during_run.append(self.router.route)
        with op.phase("work"):
            await asyncio.sleep(0)
        if op.kind is self.crash:
            raise RuntimeError("boom in the procedure")
        if op.kind in self.fail:
            return OpResult(False, active if not op.kind.moves_role else None, epoch, self.fail[op.kind])
        if op.kind is Operation.FAILOVER:
            return OpResult(True, action.target, epoch + 1, f"epoch {epoch + 1}")
        if op.kind is Operation.PROMOTE:
            return OpResult(True, action.target, epoch, "promoted")
        return OpResult(True, active, epoch, "done")

    async def view(self, node: NodeName) -> NodeView:
        return self.views[node]

    async def stamp(self, node: NodeName, epoch: int, active: NodeName | None) -> None:
        self.stamps.append((node, epoch, active))


class FakeMonitor:
    def __init__(self) -> None:
        self.started = False
        self.confirms: list[tuple[NodeName, int]] = []
        self.soon: list[NodeName] = []

    def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        pass

    def confirm(self, node: NodeName, count: int, spacing: float) -> None:
        self.confirms.append((node, count))

    def cancel_confirm(self, node: NodeName) -> None:
        pass

    def probe_soon(self, node: NodeName, delay: float = 0.0) -> None:
        self.soon.append(node)


def config(tmp_path: Path, **health: object) -> Config:
    return Config.model_validate(
        {
            "primary": {"dsn": "postgresql://postgres@127.0.0.1:5432/chrispar"},
            "mirror": {"dsn": "postgresql://postgres@127.0.0.1:5433/chrispar"},
            "health": {"max_retries": 2, **health},
            "state": {"path": str(tmp_path / "state.json")},
        }
    )


FOLLOWING_PAIR = {P: NodeView(True, 3, "primary"), M: NodeView(True, 3, "primary", subscriber=True, read_only=False)}


async def make(
    tmp_path: Path, views: dict[NodeName, NodeView], stored: Stored | None = None, **health: object
) -> tuple[Controller, FakeExecutor, FakeMonitor, Router]:
    cfg = config(tmp_path, **health)
    if stored is not None:
        StateFile(cfg.state.path).save(stored)
    router = Router(Route(None, 0, paused=True, reason="starting"))
    ex, mon = FakeExecutor(views), FakeMonitor()
    ex.router = router
    ctl = Controller(cfg, router, executor=ex, monitor=mon)  # type: ignore[arg-type]
    await ctl.start()
    return ctl, ex, mon, router


def sample(node: NodeName, ok: bool, **kw: Any) -> HealthSample:
    return HealthSample(node=node, ok=ok, at=0.0, latency=0.001, error=None if ok else "timeout", **kw)


async def settle(ctl: Controller) -> None:
    for _ in range(50):
        if not ctl._tasks:
            return
        await asyncio.sleep(0.01)


async def test_fresh_start_routes_to_primary_stamps_it_and_persists(tmp_path):
    ctl, ex, mon, router = await make(tmp_path, {P: NodeView(True), M: NodeView(True, subscriber=True)})
    await settle(ctl)
    assert router.route.backend is not None and router.route.backend.name == "primary"
    assert not router.route.paused
    assert ex.stamps == [(P, 0, P)]
    assert json.loads((tmp_path / "state.json").read_text())["active"] == "primary"
    assert mon.started
    assert "fresh start" in ctl.state.reason


async def test_corrupt_state_file_fails_closed_and_still_monitors(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    ctl, ex, mon, router = await make(tmp_path, FOLLOWING_PAIR)
    assert router.route.backend is None
    assert "unreadable" in router.route.reason
    assert ctl.state.phase is Phase.NO_ROUTABLE_NODE
    assert mon.started and ex.runs == []


@pytest.mark.parametrize("epoch", ["1e400", "1.9", "-1", "true"])
async def test_state_file_with_a_bad_epoch_fails_closed_naming_the_file(tmp_path, epoch):
    path = tmp_path / "state.json"
    path.write_text(f'{{"epoch": {epoch}, "active": "primary"}}')
    ctl, ex, mon, router = await make(tmp_path, FOLLOWING_PAIR)
    assert router.route.backend is None
    assert str(path) in router.route.reason and "epoch" in router.route.reason
    assert "state file unreadable: corrupt state file" in router.route.reason
    assert ctl.state.phase is Phase.NO_ROUTABLE_NODE
    assert mon.started and ex.runs == []


async def test_interrupted_promotion_is_finished_before_anything_is_routed(tmp_path):
    views = {P: NodeView(False), M: NodeView(True, 4, "mirror", subscriber=True)}
    ctl, ex, _mon, router = await make(tmp_path, views, Stored(4, M))
    assert ex.runs == [(Operation.PROMOTE, M, 4)]
    # While the promotion ran, nothing was routed.
    assert ex.route_seen_during_run[0].backend is None
    assert router.route.backend is not None and router.route.backend.name == "mirror"
    assert ctl.state.phase is Phase.ACTIVE_HEALTHY


async def test_promotion_that_cannot_finish_routes_nowhere(tmp_path):
    views = {P: NodeView(False), M: NodeView(True, 4, "mirror", subscriber=True)}
    cfg = config(tmp_path)
    StateFile(cfg.state.path).save(Stored(4, M))
    router = Router(Route(None, 0, paused=True, reason="starting"))
    ex, mon = FakeExecutor(views), FakeMonitor()
    ex.fail[Operation.PROMOTE] = "could not connect"
    ctl = Controller(cfg, router, executor=ex, monitor=mon)  # type: ignore[arg-type]
    await ctl.start()
    assert router.route.backend is None
    assert "could not finish promoting mirror" in router.route.reason
    assert mon.started


async def test_requested_failover_runs_and_routes_to_the_new_epoch(tmp_path):
    ctl, ex, mon, router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    await ctl.on_sample(sample(M, True, subscription="chrispar_sub", subscription_enabled=True))
    phases: list[str] = []
    ctl.add_phase_listener(lambda op: phases.append(op.phase_name))
    result = await ctl.request("failover")
    assert ex.runs == [(Operation.FAILOVER, M, 3)]
    assert phases == ["work"]
    assert result["result"] == "ok" and result["kind"] == "failover"
    assert router.route.backend is not None and router.route.backend.name == "mirror"
    assert router.route.epoch == 4 and ctl.state.epoch == 4
    assert result["details"]["epoch"] == 4  # JSON-typed details: a number, not "4"
    assert set(mon.soon) == {P, M}  # stale samples: both probed at once


async def test_crashing_procedure_routes_nowhere_and_reports_failure(tmp_path):
    ctl, ex, _mon, router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    await ctl.on_sample(sample(M, True, subscription="chrispar_sub", subscription_enabled=True))
    ex.crash = Operation.FAILOVER
    with pytest.raises(PgRouteError, match="internal error: boom in the procedure"):
        await ctl.request("failover")
    assert router.route.backend is None
    assert ctl.state.phase is Phase.NO_ROUTABLE_NODE
    assert ctl.state.active is P  # the node holding the data is remembered
    assert ctl.events(1)[0]["result"] == "failed"
    assert ctl.operation is None


async def test_refused_request_runs_nothing(tmp_path):
    ctl, ex, _mon, router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    # The mirror was never seen following: promotion is refused.
    with pytest.raises(ActionRefused, match="failover refused: mirror is unknown"):
        await ctl.request("failover")
    assert ex.runs == []
    assert router.route.backend is not None and router.route.backend.name == "primary"


async def test_probes_confirm_then_fail_over_automatically(tmp_path):
    ctl, ex, mon, router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    await ctl.on_sample(sample(M, True, subscription="chrispar_sub", subscription_enabled=True))
    await ctl.on_sample(sample(P, False))
    assert mon.confirms == [(P, 2)]
    assert ex.runs == []
    await ctl.on_sample(sample(P, False))
    await ctl.on_sample(sample(P, False))
    await settle(ctl)
    assert ex.runs == [(Operation.FAILOVER, M, 3)]
    assert router.route.backend is not None and router.route.backend.name == "mirror"
    kinds = [e["kind"] for e in ctl.events(10)]
    assert "node_down" in kinds and "failover" in kinds


async def test_resolve_refused_while_routing(tmp_path):
    ctl, ex, _mon, _router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    with pytest.raises(ActionRefused, match="not failing closed"):
        await ctl.resolve(M)
    assert ex.stamps == []


async def test_resolve_after_fail_closed_start_stamps_above_every_epoch(tmp_path):
    views = {P: NodeView(True, 7, "primary"), M: NodeView(True, 7, "mirror")}  # claims disagree
    ctl, ex, _mon, router = await make(tmp_path, views, Stored(5, P))
    assert router.route.backend is None and "disagree" in router.route.reason
    ev = await ctl.resolve(M)
    assert ex.stamps == [(P, 8, M), (M, 8, M)]
    assert StateFile(tmp_path / "state.json").load() == Stored(8, M)
    assert router.route.backend is not None and router.route.backend.name == "mirror"
    assert router.route.epoch == 8
    assert ev["kind"] == "resolve" and "operator resolved the active node: mirror" in ctl.state.reason


def test_subscriptions_carry_the_password_pgroute_found_outside_the_dsn(tmp_path, monkeypatch):
    """The subscriber's server cannot read pgroute's PGPASSWORD or password file: the
    rejoin and switchover subscriptions get the password pgroute itself would send."""
    from pgroute.control.procedures import Context

    cfg = config(tmp_path)
    ctx = Context(cfg, Router(Route(None, 0)), StateFile(tmp_path / "s.json"), {}, lambda: False, lambda: None)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    assert "password" not in ctx.publisher_conninfo(P)
    monkeypatch.setenv("PGPASSWORD", "from-env")
    assert "password='from-env'" in ctx.publisher_conninfo(P)


async def test_a_closed_controller_no_longer_hears_the_routers_failures(tmp_path):
    # In a cluster each new term builds a Controller on the same Router: a closed one
    # must not keep probing on the proxy's failed connects.
    ctl, _ex, mon, router = await make(tmp_path, FOLLOWING_PAIR)
    await settle(ctl)
    router.report_backend_failure("primary", "connection refused")
    heard = list(mon.soon)
    assert heard, "an open controller probes the active node on a failed connect"
    await ctl.close()
    mon.soon.clear()
    ctl._last_passive = -1e9  # past the rate limit: only the closed state can stop a probe
    router.report_backend_failure("primary", "connection refused")
    assert mon.soon == []


async def test_a_command_waiting_when_the_controller_closes_is_answered(tmp_path):
    ctl, ex, _mon, _router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    await ctl.on_sample(sample(M, True, subscription="chrispar_sub", subscription_enabled=True))
    gate = asyncio.Event()
    original = ex.run

    async def slow(op, action, epoch, active):
        await gate.wait()
        return await original(op, action, epoch, active)

    ex.run = slow  # type: ignore[method-assign]
    request = asyncio.create_task(ctl.request("switchover"))
    await asyncio.sleep(0.05)
    assert not request.done()
    await ctl.close()  # in a cluster: the leader lost its key mid-operation
    with pytest.raises(PgRouteError, match="switchover interrupted"):
        await asyncio.wait_for(request, 2)


async def test_the_first_position_of_a_new_route_is_saved_at_once(tmp_path):
    ctl, _ex, _mon, _router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    path = tmp_path / "state.json"
    await ctl.on_sample(sample(P, True, wal_lsn=1000, publisher_lag_bytes=0))
    assert json.loads(path.read_text())["active_lsn"] == 1000
    await ctl.on_sample(sample(P, True, wal_lsn=2000, publisher_lag_bytes=0))  # within LSN_PERSIST_EVERY: not rewritten
    assert json.loads(path.read_text())["active_lsn"] == 1000
    # A new route (here: a failover to the mirror) saves its first position at once.
    await ctl.on_sample(sample(M, True, subscription="chrispar_sub", subscription_enabled=True))
    await ctl.request("failover")
    await ctl.on_sample(sample(M, True, wal_lsn=5000))
    saved = json.loads(path.read_text())
    assert (saved["active"], saved["active_lsn"]) == ("mirror", 5000)
