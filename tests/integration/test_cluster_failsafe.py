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
import contextlib
import time
import uuid

import aiohttp
import pytest

from pgroute import app
from pgroute.api.http import stop_api
from pgroute.cluster.keys import Keys
from pgroute.cluster.roster import Roster, decode_roster
from pgroute.local.processes import free_port
from pgroute.local.workload import Chrispar, wait_until

from .harness import Writer, api_async, make_config, missing, proxy_dsn
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
    # An etcd follower: hanging the raft leader would also hold every instance's
    # keep-alives for an election (a loaded CI run lost a lease to that), which is
    # test_etcd_store.py's case, not this one.
    only = (await asyncio.to_thread(etcd.followers))[0]
    others = [m.endpoint for m in etcd.members if m is not only]  # a and b never wait on the hung member
    endpoints = {"a": others, "b": others, "c": [only.endpoint]}
    async with three_instances(pair, etcd, tmp_path, endpoints=endpoints) as runs:
        a, b, c = runs
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        await wait_until(
            lambda: all(roster_size(r) == 3 for r in runs),
            15,
            what="every instance knows the 3-member roster",
        )
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


async def test_a_newcomer_whose_leader_died_before_settling_leads_once_every_live_member_acked(pair, etcd, tmp_path):
    """The roster lists a newcomer (d) that may not lead yet, and the only instance
    that may (a) dies before settling it: d checks the settle condition itself
    (every live member acknowledged the generation, a confirmation's lifetime
    passed) and leads, instead of waiting failsafe_max for a leader."""
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    started: list[app.Running] = []

    async def start(name: str) -> app.Running:
        state = tmp_path / name
        state.mkdir()
        cfg = make_config(pair, state, cluster={"etcd": etcd.endpoints, "name": name, "prefix": prefix, "ttl": TTL})
        started.append(await app.start(cfg))
        return started[-1]

    try:
        a = await start("a")
        await wait_until(lambda: member(a).leading, 30, what="a leads")
        await wait_until(lambda: roster_size(a) == 1, 15, what="roster {a}")
        store = member(a).store

        async def roster() -> Roster | None:
            kv = (await store.get(keys.roster)).first
            return decode_roster(keys.roster, kv.value) if kv is not None else None

        d = await start("d")
        listed = await wait_until(
            lambda: _listed_not_eligible(roster(), "d"), 15, what="d on the roster, not eligible", interval=0.01
        )
        # a dies (its leases left to expire) before it can settle d.
        # (A clean stop would record its departure, which lets anyone lead.)
        await member(a).close(release=False)
        t_dead = time.monotonic()
        print(f"a killed with d listed in roster generation {listed.gen}, not yet eligible")
        await wait_until(lambda: member(d).leading, TTL + 15, what="d leads")
        print(f"d leads {time.monotonic() - t_dead:.2f}s after a died (ttl {TTL}s)")
        assert routed(d)[0] == "primary"
    finally:
        for running in started:
            with contextlib.suppress(Exception):
                await running.stop()


async def _listed_not_eligible(roster_read, name: str) -> Roster | None:
    roster = await roster_read
    if roster is not None and name in roster.names and name not in roster.eligible:
        return roster
    return None


async def test_an_instance_restarted_on_its_addresses_leads_when_the_others_died(pair, etcd, tmp_path):
    """a and b on the roster; both killed (leases left to expire); a started again at
    once on the same addresses, with a new incarnation the roster does not list, and
    no leader left to update the roster. The roster's entry for a is served by the
    new process (it bound a's API address: the old one is gone), so it may lead."""
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    ports = {n: (free_port(), free_port()) for n in ("a", "b")}
    started: list[app.Running] = []

    async def start(name: str, attempt: int = 0) -> app.Running:
        state = tmp_path / f"{name}{attempt}"
        state.mkdir()
        proxy, api = ports[name]
        cfg = make_config(
            pair,
            state,
            proxy={"listen": f"127.0.0.1:{proxy}"},
            api={"listen": f"127.0.0.1:{api}"},
            cluster={"etcd": etcd.endpoints, "name": name, "prefix": prefix, "ttl": TTL},
        )
        started.append(await app.start(cfg))
        return started[-1]

    async def kill(running: app.Running) -> None:
        """What SIGKILL leaves: leases to expire, no departure recorded, ports freed."""
        await member(running).close(release=False)
        await running.proxy.close()
        await stop_api(running.api_runner)
        started.remove(running)

    try:
        a = await start("a")
        await wait_until(lambda: member(a).leading, 30, what="a leads")
        b = await start("b")
        await wait_until(
            lambda: roster_size(a) == 2 and getattr(member(a).failsafe.roster, "settled", False),
            15,
            what="roster {a, b}",
        )
        old_id = member(a).instance_id
        await kill(b)
        await kill(a)
        t_dead = time.monotonic()
        a2 = await start("a", 1)  # waits for the killed run's member lease (same addresses)
        assert member(a2).instance_id != old_id
        roster = member(a2).failsafe.roster
        entry = roster.entry("a") if roster is not None else None
        assert entry is not None and entry.id == old_id  # nobody updated it
        await wait_until(lambda: member(a2).leading, TTL + 15, what="a, started again, leads")
        print(f"a leads again {time.monotonic() - t_dead:.2f}s after both died")
        assert routed(a2)[0] == "primary"
    finally:
        for running in list(started):
            with contextlib.suppress(Exception):
                await running.stop()
