"""The procedures' routing seam (control/procedures/context.py): alone, the Router
only and a no-op barrier; with a shared route (a cluster), the shared write first,
never below its epoch floor, and a failed write routes to no node and raises."""

from __future__ import annotations

import pytest

from pgroute.config import Config
from pgroute.control.procedures.context import Context, Op
from pgroute.control.state_store import StateFile
from pgroute.model import Detail, NodeName, Operation
from pgroute.proxy.router import Backend, Route, Router


class FakeShared:
    def __init__(self, floor: int = 0, *, fail: bool = False, complete: bool = True) -> None:
        self._floor = floor
        self.fail = fail
        self.complete = complete
        self.writes: list[tuple[int, NodeName | None, bool, str]] = []

    @property
    def floor(self) -> int:
        return self._floor

    async def publish(self, epoch: int, active: NodeName | None, *, paused: bool, reason: str) -> None:
        if self.fail:
            raise RuntimeError("deposed")
        self.writes.append((epoch, active, paused, reason))
        self._floor = max(self._floor, epoch)

    async def barrier(self, epoch: int, reason: str) -> tuple[bool, dict[str, Detail]]:
        await self.publish(epoch, None, paused=True, reason=reason)
        return self.complete, {"barrier": f"epoch {epoch}"}


def _context(tmp_path, shared: FakeShared | None) -> tuple[Context, Router]:
    config = Config.model_validate(
        {
            "primary": {"dsn": "postgresql://postgres@127.0.0.1:1/chrispar"},
            "mirror": {"dsn": "postgresql://postgres@127.0.0.1:2/chrispar"},
        }
    )
    router = Router(Route(None, 0, paused=True, reason="starting"))
    backends = {n: Backend(n.value, "127.0.0.1", 1 if n is NodeName.PRIMARY else 2) for n in NodeName}
    ctx = Context(
        config,
        router,
        StateFile(tmp_path / "state.json"),
        backends,
        is_paused=lambda: False,
        sequences=lambda: None,
        shared=shared,
    )
    return ctx, router


async def test_alone_the_router_only_and_no_barrier(tmp_path) -> None:
    ctx, router = _context(tmp_path, None)
    op = Op(kind=Operation.FAILOVER)
    assert await ctx.barrier(op, 5, "x") is True
    assert op.phases == [] and op.details == {}
    await ctx.route_to(NodeName.MIRROR, 5)
    assert router.route.backend is not None and router.route.backend.name == "mirror" and router.route.epoch == 5


async def test_shared_written_first_and_never_below_its_floor(tmp_path) -> None:
    shared = FakeShared(floor=7)
    ctx, router = _context(tmp_path, shared)
    await ctx.route_to(NodeName.PRIMARY, 6, "abort")  # a failure path after a barrier at 7
    assert shared.writes == [(7, NodeName.PRIMARY, False, "abort")]
    assert router.route.epoch == 7
    await ctx.hold(7, "switching")
    assert shared.writes[-1] == (7, None, True, "switching")
    assert router.route == Route(None, 7, paused=True, reason="switching")


async def test_barrier_reports_and_says_incomplete(tmp_path) -> None:
    shared = FakeShared(complete=False)
    ctx, router = _context(tmp_path, shared)
    op = Op(kind=Operation.SWITCHOVER)
    assert await ctx.barrier(op, 3, "waiting") is False
    assert op.details["barrier"] == "epoch 3"
    assert [name for name, _ in op.phases] == ["barrier"]
    assert shared.writes == [(3, None, True, "waiting")]
    assert router.route.epoch == 3 and router.route.backend is None


async def test_failed_shared_write_routes_nowhere_and_raises(tmp_path) -> None:
    shared = FakeShared(fail=True)
    ctx, router = _context(tmp_path, shared)
    with pytest.raises(RuntimeError, match="deposed"):
        await ctx.route_to(NodeName.MIRROR, 4)
    assert router.route.backend is None
    assert "cluster route not written" in router.route.reason
    op = Op(kind=Operation.FAILOVER)
    assert await ctx.barrier(op, 5, "waiting") is False
    assert str(op.details["barrier"]).startswith("not done")
