"""The failsafe on real servers: three in-process instances, a real pair, a real
3-member etcd, ``ttl = 3``.

- All of etcd hangs (every member SIGSTOPped) while the instances see each other:
  each one, its lease about to lapse, asks the two others to confirm its route and
  keeps routing; writers through all three commit on, nothing switches (a
  switchover asked for is refused); when etcd answers again every instance leaves
  the failsafe and follows the store, with one leader.
- One instance cut off from etcd only (its one etcd member SIGSTOPped; its peers
  reachable): it keeps routing on its peers' confirmations; the leader then runs a
  switchover, and the instance has failed closed before the mirror is promoted
  (the leader refuses to confirm the old epoch; the barrier waits for its own
  confirmations to expire and for the cut-off instance's lease).
- A peer asked for a confirmation of another view, or by a stranger, refuses.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from pgroute.local.workload import Chrispar, wait_until

from .harness import Writer, api_async, missing, proxy_dsn
from .test_cluster_run import TTL, member, routed, three_instances

pytestmark = [pytest.mark.integration]


def roster_size(running) -> int:
    roster = member(running).failsafe.roster
    return len(roster.names) if roster is not None else 0


async def _confirm(api_port: int, body: dict) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{api_port}/api/cluster/failsafe", json=body) as resp,
    ):
        return resp.status, await resp.json()


async def test_all_of_etcd_hung_traffic_continues_and_nothing_switches(pair, etcd, tmp_path):
    async with three_instances(pair, etcd, tmp_path) as runs:
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        # The roster (written by the leader once a second) lists all three.
        await wait_until(
            lambda: all(roster_size(r) == 3 for r in runs),
            15,
            what="every instance knows the 3-member roster",
        )
        epoch = routed(runs[0])[1]
        writers = [Writer(proxy_dsn(r), Chrispar(f"fs{i}")).start() for i, r in enumerate(runs)]
        try:
            for w in writers:
                await w.wait_acked(5)
            t_hang = time.monotonic()
            for m in etcd.members:
                m.pause()
            try:
                await wait_until(
                    lambda: all(member(r).failsafe.state is not None for r in runs), TTL + 5, what="all in failsafe"
                )
                print(f"every instance in failsafe {time.monotonic() - t_hang:.2f}s after etcd hung")
                # Well past every lease: they route on, at the same epoch, on confirmations.
                await asyncio.sleep(2 * TTL)
                for w in writers:
                    await w.wait_acked(20, timeout=10)
                assert [routed(r) for r in runs] == [("primary", epoch)] * 3
                assert all(member(r).cut_off is None for r in runs)
                code, body = await api_async(runs[1], "/api/status")
                assert code == 200 and body["cluster"]["failsafe"] is not None, body
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{runs[1].api_port}/metrics") as resp,
                ):
                    metrics = await resp.text()
                assert "\npgroute_cluster_failsafe 1.0\n" in metrics
                assert "\npgroute_cluster_failsafe_confirming 2.0\n" in metrics
                # No switch without etcd: nobody leads, and a command is refused.
                assert not any(member(r).leading for r in runs)
                code, body = await api_async(runs[2], "/api/switchover", "POST")
                assert code != 200, body
                assert [routed(r) for r in runs] == [("primary", epoch)] * 3
                held_for = time.monotonic() - t_hang
            finally:
                for m in etcd.members:
                    m.resume()
            t_back = time.monotonic()
            await wait_until(
                lambda: all(member(r).failsafe.state is None and member(r).cut_off is None for r in runs),
                TTL + 10,
                what="every instance back on etcd",
            )
            await wait_until(lambda: sum(member(r).leading for r in runs) == 1, 3 * TTL + 10, what="one leader again")
            print(
                f"etcd hung {held_for:.1f}s with traffic on; failsafe left {time.monotonic() - t_back:.2f}s "
                "after etcd answered; one leader again"
            )
            for w in writers:
                await w.wait_acked(10, timeout=10)
            assert [routed(r) for r in runs] == [("primary", epoch)] * 3
            for w in writers:
                assert w.error_count == 0, list(w.error_log)
        finally:
            for w in writers:
                await w.stop()


async def test_failsafe_instance_fails_closed_before_the_leaders_switch_promotes(pair, etcd, tmp_path):
    only = etcd.members[2]
    async with three_instances(pair, etcd, tmp_path, endpoints={"c": [only.endpoint]}) as runs:
        a, b, c = runs
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        await wait_until(
            lambda: all(roster_size(r) == 3 for r in runs),
            15,
            what="every instance knows the 3-member roster",
        )
        # A leader whose etcd member is not the one hung (a's etcd endpoints are all three).
        assert member(a).leading
        writer = Writer(proxy_dsn(c)).start()
        try:
            await writer.wait_acked(5)
            only.pause()
            try:
                await wait_until(lambda: member(c).failsafe.state is not None, TTL + 5, what="c in failsafe")
                await writer.wait_acked(10, timeout=10)  # c routes on
                assert routed(c)[0] == "primary"

                closed_at: list[float] = []

                def watch() -> None:
                    if routed(c)[0] is None and not closed_at:
                        closed_at.append(time.monotonic())

                async def poll() -> None:
                    while not closed_at:
                        watch()
                        await asyncio.sleep(0.005)

                poller = asyncio.create_task(poll())
                code, body = await api_async(a, "/api/switchover", "POST")
                t_done = time.monotonic()
                assert code == 200, body
                await asyncio.wait_for(poller, 5)
                print(f"c failed closed {t_done - closed_at[0]:.2f}s before the switchover finished")
                assert closed_at[0] < t_done
                assert "failsafe" in (member(c).cut_off or ""), member(c).cut_off
                barrier = body["details"]["barrier"]
                assert "expired c" in barrier, barrier
                assert routed(a)[0] == routed(b)[0] == "mirror"
            finally:
                only.resume()
            await wait_until(lambda: routed(c)[0] == "mirror", 30, what="c follows the mirror")
        finally:
            await writer.stop()
        # A switchover loses nothing: every write acknowledged through c is on the mirror.
        assert await missing(pair.mirror_dsn(), writer.acks) == []


async def test_confirmation_refused_for_another_view_or_a_stranger(pair, etcd, tmp_path):
    async with three_instances(pair, etcd, tmp_path) as runs:
        a, b, _ = runs
        await wait_until(lambda: roster_size(b) == 3, 15, what="roster")
        view = member(b).view()
        assert view is not None
        ident = member(a).instance_id
        ok = {"name": "a", "id": ident, **view.to_json()}
        code, body = await _confirm(b.api_port, ok)
        assert code == 200 and body["confirmed"] is True, body
        assert "a" in member(b).failsafe.grants.outstanding()
        code, body = await _confirm(b.api_port, {**ok, "epoch": view.epoch + 1})
        assert code == 409 and "views differ" in body["error"], body
        code, body = await _confirm(b.api_port, {**ok, "active": "mirror"})
        assert code == 409 and "views differ" in body["error"], body
        code, body = await _confirm(b.api_port, {**ok, "gen": view.gen + 1})
        assert code == 409 and "views differ" in body["error"], body
        code, body = await _confirm(b.api_port, {**ok, "id": "someone-else"})
        assert code == 409 and "not on this instance's roster" in body["error"], body
        code, body = await _confirm(b.api_port, {"name": "a"})
        assert code == 400, body
