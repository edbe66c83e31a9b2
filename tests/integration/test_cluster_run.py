"""`pgroute run` as a cluster: three in-process instances on one real pair and a real
3-member etcd (pgroute.local.etcd), short lease TTL. All route to the primary with one
leader; kill -9 of the primary with a writer through a follower fails over through
the barrier (every instance acknowledges, nothing acknowledged after the kill lost);
`pgroute run` processes, the leader's killed with SIGKILL: a new leader within about
the TTL while a writer through a survivor keeps committing; a switchover waits at the
barrier for a member that never applies the epoch and aborts back to the primary; an
instance cut off from etcd (its only etcd member SIGSTOPped), a follower or the leader,
fails closed (57P03, sessions closed) before its lease deadline while the others keep
routing (a new leader among them when the leader was cut off), and routes again once
etcd answers.

Durations are printed (run with -s), asserted only against generous bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgroute import app
from pgroute.api.http import FORWARDED_HEADER
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.leader import parse_leader
from pgroute.cluster.members import Member, Members, Membership
from pgroute.cluster.route import Route as SharedRoute
from pgroute.cluster.route import RouteWriter, decode_route
from pgroute.cluster_node import ClusterNode
from pgroute.local.processes import free_port
from pgroute.local.relay import Relay
from pgroute.local.workload import wait_until
from pgroute.model import NodeName

from .harness import FAST_HEALTH, Writer, api_async, make_config, missing, proxy_dsn, wait_following, write_config_file

pytestmark = [pytest.mark.integration]

TTL = 3.0
REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def three_instances(
    pair,
    etcd,
    tmp_path,
    endpoints: dict[str, list[str]] | None = None,
    relays: dict[str, Relay] | None = None,
    prefix: str | None = None,
):
    """Instances a, b, c; ``endpoints``: the etcd members an instance is given
    (default: all three). a starts first and, in practice, leads. With ``relays``
    (an empty dict, filled here), each instance advertises its API through a relay
    (``[cluster] advertise_api``): freezing one cuts the others off from it."""
    prefix = prefix or f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    runs: list[app.Running] = []
    try:
        for name in ("a", "b", "c"):
            state = tmp_path / name
            state.mkdir(exist_ok=True)
            given = (endpoints or {}).get(name, etcd.endpoints)
            cluster: dict[str, Any] = {"etcd": given, "name": name, "prefix": prefix, "ttl": TTL}
            if relays is not None:
                relays[name] = relay = await Relay().start()
                cluster["advertise_api"] = f"http://{relay.address}"
            runs.append(await app.start(make_config(pair, state, cluster=cluster)))
            if relays is not None:
                relays[name].target = ("127.0.0.1", runs[-1].api_port)
            if name == "a":
                await wait_until(lambda: member(runs[0]).leading, 30, what="a leads")
        yield runs
    finally:
        for running in runs:
            with contextlib.suppress(Exception):
                await running.stop()
        for relay in (relays or {}).values():
            await relay.close()


def forwarded_post(running: app.Running, path: str) -> tuple[int, Any]:
    """A POST as a follower forwards it (blocking; run it in a thread)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{running.api_port}{path}", method="POST", headers={FORWARDED_HEADER: "test"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def member(running: app.Running) -> ClusterNode:
    assert running.cluster is not None
    return running.cluster


def leaders(runs: list[app.Running]) -> list[app.Running]:
    return [r for r in runs if r.cluster is not None and r.cluster.leading]


def routed(running: app.Running) -> tuple[str | None, int]:
    route = running.router.route
    return (route.backend.name if route.backend else None, route.epoch)


async def test_three_instances_one_leader_then_failover_through_the_barrier(pair, etcd, tmp_path):
    async with three_instances(pair, etcd, tmp_path) as runs:
        # (a) one leader; everyone routes to the primary; member records carry the epoch.
        await wait_until(lambda: len(leaders(runs)) == 1, 30, what="one leader")
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        epoch0 = routed(runs[0])[1]
        assert {routed(r)[1] for r in runs} == {epoch0}
        node = runs[0].cluster
        assert node is not None
        await wait_until(
            lambda: (
                len(node.cluster_status()["members"]) == 3
                and all(m["epoch"] == epoch0 for m in node.cluster_status()["members"])
            ),
            10,
            what="member records at the epoch",
        )
        leader = leaders(runs)[0]
        follower = next(r for r in runs if r is not leader)
        print(f"leader {member(leader).name}; members {node.cluster_status()['members']}")
        status = node.control.status()
        assert status["cluster"]["leader"] == member(leader).name

        # (b) kill -9 the primary with a writer through a follower.
        writer = Writer(proxy_dsn(follower)).start()
        try:
            await writer.wait_acked(20)
            pair.wait_synced()
            t_kill = time.monotonic()
            at_kill = len(writer.acks)
            pair.primary.kill()
            await wait_until(
                lambda: all(routed(r) == ("mirror", epoch0 + 1) for r in runs), 60, what="all route to the mirror"
            )
            first = await writer.wait_first_acked_after(t_kill, timeout=60)
            assert first is not None
            print(f"first write through the follower after the kill: {first.t - t_kill:.2f}s")
        finally:
            await writer.stop()
        lost = await missing(pair.mirror_dsn(), writer.acks)
        assert not [m for m in lost if writer.acks.index(m) >= at_kill], lost
        events = member(leader).controller.events(20)
        failover = next(e for e in events if e["kind"] == "failover" and e.get("result") == "ok")
        details = failover["details"]
        print(f"barrier: {details['barrier']}")
        acks = {k for k in details if k.startswith("barrier_ack_")}
        assert acks == {f"barrier_ack_{n}_s" for n in ("a", "b", "c")}, details


@pytest.mark.parametrize("cut", ["c", "a"], ids=["follower", "leader"])
async def test_instance_cut_off_from_etcd_and_peers_fails_closed_then_resyncs(pair, etcd, tmp_path, cut):
    # An etcd follower: hanging the raft leader would also hold every instance's
    # keep-alives for an election (a loaded CI run lost a lease to that), which is
    # test_etcd_store.py's case, not this one.
    only = (await asyncio.to_thread(etcd.followers))[0]
    relays: dict[str, Relay] = {}
    # The others are given the two members that stay up: every API relay is frozen
    # below, so a busy machine's slow switch away from the hung member would leave
    # them without etcd and without peers too (a failure of the test, not of pgroute:
    # a hung member is test_etcd_store.py's case).
    others = [m.endpoint for m in etcd.members if m is not only]
    endpoints = {name: [only.endpoint] if name == cut else others for name in ("a", "b", "c")}
    async with three_instances(pair, etcd, tmp_path, endpoints=endpoints, relays=relays) as runs:
        a, b, c = runs
        victim = {"a": a, "c": c}[cut]
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        if cut == "c":
            # Each instance reads the member records once a second (for its status).
            await wait_until(lambda: len(member(b).cluster_status()["members"]) == 3, 10, what="3 members")
            # The cluster section on every instance.
            code, body = await api_async(b, "/api/status")
            assert code == 200 and body["cluster"]["leader"] == "a" and body["cluster"]["role"] == "follower", body
            assert {m["name"] for m in body["cluster"]["members"]} == {"a", "b", "c"}
            # etcd's seconds left on each member's lease (refreshed every ttl/3).
            assert all(0 < (m["lease_ttl_s"] or 0) <= TTL for m in body["cluster"]["members"]), body
            # A follower forwards commands to the leader, once.
            code, body = await api_async(b, "/api/pause", "POST")
            assert code == 200, body
            await wait_until(lambda: all(r.router.route.paused for r in runs), 10, what="all paused")
            code, body = await api_async(c, "/api/resume", "POST")
            assert code == 200, body
            await wait_until(lambda: not any(r.router.route.paused for r in runs), 10, what="all resumed")
            code, body = await asyncio.to_thread(forwarded_post, b, "/api/pause")
            assert code == 409 and body["error"] == f"not the leader: use http://{relays['a'].address}", body
        code, _ = await api_async(victim, "/api/health")
        assert code == 200

        held = await asyncpg.connect(proxy_dsn(victim))
        writer = Writer(proxy_dsn(b)).start()
        try:
            await writer.wait_acked(10)
            t_pause = time.monotonic()
            # Cut off from etcd and from its peers (every API relay frozen: the others
            # keep etcd and need no peer), so that the failsafe cannot keep it routing.
            for relay in relays.values():
                relay.freeze()
            only.pause()
            try:
                await wait_until(lambda: routed(victim)[0] is None, TTL + 5, what=f"{cut} fails closed")
                t_closed = time.monotonic()
                membership = member(victim).membership
                lease = membership.lease if membership is not None else None
                assert lease is not None  # still its own: it fails closed before losing it
                deadline = lease.deadline
                print(
                    f"{cut} failed closed {t_closed - t_pause:.2f}s after the pause, "
                    f"{deadline - t_closed:.2f}s before its lease deadline"
                )
                assert t_closed < deadline
                assert "cut off from etcd" in victim.router.route.reason
                with pytest.raises(asyncpg.CannotConnectNowError, match="cut off from etcd"):
                    await asyncpg.connect(proxy_dsn(victim))
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                    await held.fetchval("SELECT 1")
                code, _ = await api_async(victim, "/api/health")
                assert code == 503
                if cut == "a":
                    others = [b, c]
                    await wait_until(
                        lambda: any(member(r).leading for r in others), TTL + 10, what="a new leader among b, c"
                    )
                    assert not member(a).leading
                    print(
                        f"new leader {member(leaders(others)[0]).name} "
                        f"{time.monotonic() - t_pause:.2f}s after the pause"
                    )
                # The others keep routing.
                before = len(writer.acks)
                await writer.wait_acked(before + 20)
                assert all(routed(r)[0] == "primary" for r in runs if r is not victim)
            finally:
                only.resume()
                for relay in relays.values():
                    relay.thaw()
            t_resume = time.monotonic()
            await wait_until(lambda: routed(victim)[0] == "primary", 30, what=f"{cut} routes again")
            print(f"{cut} routes again {time.monotonic() - t_resume:.2f}s after etcd answers")
            conn = await asyncpg.connect(proxy_dsn(victim))
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            await wait_until(
                lambda: {m["name"] for m in member(b).cluster_status()["members"]} == {"a", "b", "c"},
                10,
                what=f"{cut}'s record back",
            )
            assert writer.error_count == 0, list(writer.error_log)
        finally:
            await writer.stop()
            with contextlib.suppress(Exception):
                held.terminate()


async def test_switchover_waits_for_every_member_and_aborts_without_one(pair, etcd, tmp_path, caplog):
    async with three_instances(pair, etcd, tmp_path) as runs:
        a = runs[0]
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        epoch0 = routed(a)[1]
        await wait_following(a)  # the leader's controller (a's first) has seen both nodes
        node = member(a)
        # A member that keeps its lease alive and never applies a route (a hung
        # instance whose keep-alive still runs): the barrier cannot pass it.
        stuck = Membership(node.store, node.keys, "stuck", TTL, epoch=epoch0)
        await stuck.start()
        try:
            code, body = await api_async(a, "/api/switchover", "POST")
            assert code == 500 and "not every instance applied" in body["error"], body
            print(f"switchover refused: {body['error']}")
            # Aborted back to the primary at a higher epoch, on every instance.
            await wait_until(
                lambda: all(routed(r) == ("primary", epoch0 + 2) for r in runs), 30, what="back on the primary"
            )
            # Its log says which operation was aborted (it said FAILOVER before).
            assert "SWITCHOVER aborted" in caplog.text and "FAILOVER aborted" not in caplog.text
        finally:
            await stuck.close()
        # Without it, the switchover goes through the barrier.
        await wait_following(a)
        code, body = await api_async(a, "/api/switchover", "POST")
        assert code == 200, body
        print(f"switchover: {body['details']['barrier']}")
        assert {k for k in body["details"] if k.startswith("barrier_ack_")} == {
            f"barrier_ack_{n}_s" for n in ("a", "b", "c")
        }
        await wait_until(lambda: all(routed(r) == ("mirror", epoch0 + 3) for r in runs), 30, what="on the mirror")


async def test_leader_process_killed_new_leader_traffic_through_survivor_continues(pair, etcd, tmp_path):
    """`pgroute run` processes; the leader's gets SIGKILL (nothing revoked)."""
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    configs: dict[str, Path] = {}
    store = EtcdStore(etcd.endpoints, timeout=2.0)

    def launch(name: str) -> None:
        with open(tmp_path / name / "pgroute.log", "ab") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pgroute.cli", "run", "--config", str(configs[name])],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
            )

    try:
        for name in ("a", "b", "c"):
            state = tmp_path / name
            state.mkdir()
            # Fixed ports: the killed instance is started again on the same ones.
            configs[name] = write_config_file(
                state / "pgroute.toml",
                pair.primary_dsn(),
                pair.mirror_dsn(),
                proxy={"listen": f"127.0.0.1:{free_port()}", "connect_timeout": 2.0, "pause_timeout": 15.0},
                replication={"publication": pair.publication, "subscription": pair.subscription},
                health=dict(FAST_HEALTH),
                api={"listen": f"127.0.0.1:{free_port()}"},
                state={"path": str(state / "state.json"), "recovery_dir": str(state / "recovery")},
                cluster={"etcd": etcd.endpoints, "name": name, "prefix": prefix, "ttl": TTL},
            )
            launch(name)

        async def settled() -> dict[str, Member] | None:
            for name, proc in procs.items():
                assert proc.poll() is None, (tmp_path / name / "pgroute.log").read_text()[-3000:]
            route = (await store.get(keys.route)).first
            members = {m.name: m for m in await Members(store, keys).list()}
            if route is None or len(members) < 3:
                return None
            decoded = decode_route(keys.route, route.value)
            if decoded.active is not NodeName.PRIMARY or any(m.record.epoch != decoded.epoch for m in members.values()):
                return None
            return members

        members = await wait_until(settled, 60, what="3 members at the route's epoch")
        leader_kv = (await store.get(keys.leader)).first
        assert leader_kv is not None
        old = parse_leader(leader_kv).name
        survivor = next(n for n in members if n != old)
        host, port = members[survivor].record.proxy.rsplit(":", 1)
        writer = Writer(f"postgresql://postgres@{host}:{port}/chrispar").start()
        try:
            await writer.wait_acked(20)
            t_kill = time.monotonic()
            procs[old].kill()
            procs[old].wait()

            async def new_leader() -> str | None:
                kv = (await store.get(keys.leader)).first
                name = parse_leader(kv).name if kv is not None else None
                return name if name not in (None, old) else None

            leader = await wait_until(new_leader, TTL + 10, what="a new leader")
            took = time.monotonic() - t_kill
            print(f"leader {old} killed (SIGKILL); new leader {leader} after {took:.2f}s (ttl {TTL}s)")
            assert took < TTL + 5  # generous: the target is ttl + 1 s
            await writer.wait_acked(20)
            gap = writer.max_gap(t_kill, time.monotonic())
            print(f"writer through {survivor}: max gap {gap[0]:.3f}s, errors {writer.error_count}")
            assert writer.error_count == 0, list(writer.error_log)
        finally:
            await writer.stop()
        route_kv = (await store.get(keys.route)).first
        assert route_kv is not None and decode_route(keys.route, route_kv.value).active is NodeName.PRIMARY

        # Killed and started again at once on the same addresses (systemd's Restart=):
        # its killed run's record is still held; it waits for that lease to expire
        # instead of exiting 1 with "name in use".
        x = survivor
        dead = members[x].record
        procs[x].kill()
        procs[x].wait()
        held = await Members(store, keys).get(x)
        assert held is not None and held.record.id == dead.id  # still there
        launch(x)

        async def back() -> Member | None:
            assert procs[x].poll() is None, (tmp_path / x / "pgroute.log").read_text()[-3000:]
            m = await Members(store, keys).get(x)
            return m if m is not None and m.record.id != dead.id else None

        again = await wait_until(back, TTL + 15, what=f"{x} registered again")
        assert (again.record.proxy, again.record.api) == (dead.proxy, dead.api)
        assert "waiting for it to expire" in (tmp_path / x / "pgroute.log").read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await store.close()


async def test_losing_one_etcd_member_changes_nothing(pair, etcd, tmp_path):
    async with three_instances(pair, etcd, tmp_path) as runs:
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        before = [routed(r) for r in runs]
        leader = next(r for r in runs if member(r).leading)
        writer = Writer(proxy_dsn(runs[2])).start()
        try:
            await writer.wait_acked(10)
            # etcd's raft leader, the worst member to lose; then well past every lease.
            lost = await asyncio.to_thread(etcd.leader)
            lost.kill()
            await asyncio.sleep(2 * TTL)
            await writer.wait_acked(20)
            assert [routed(r) for r in runs] == before
            assert all(member(r).cut_off is None and member(r).failsafe.state is None for r in runs)
            assert member(leader).leading and sum(member(r).leading for r in runs) == 1
            assert writer.error_count == 0, list(writer.error_log)
            # The leader still switches: a switchover goes through the barrier.
            await wait_following(leader)
            code, body = await api_async(leader, "/api/switchover", "POST")
            assert code == 200, body
            await wait_until(lambda: all(routed(r)[0] == "mirror" for r in runs), 30, what="all on the mirror")
        finally:
            await writer.stop()
        assert await missing(pair.mirror_dsn(), writer.acks) == []


async def test_leader_died_after_the_barrier_with_the_primary_down_successor_fails_over(pair, etcd, tmp_path):
    """What a leader killed between its barrier and the promotion leaves behind (the
    route "paused, no node, epoch N+1", the primary dead, the mirror not promoted):
    the next leader starts from the route the hold stood for, as a single
    instance's state file would, and fails over by itself (no `resolve`)."""
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    async with three_instances(pair, etcd, tmp_path, prefix=prefix) as runs:
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        await wait_following(runs[0])
        epoch = routed(runs[0])[1]
        keys = Keys(prefix)
        store = member(runs[0]).store
        # A commit the mirror applies, and the primary's WAL position after it: the
        # successor measures the mirror's lag against the recorded position.
        conn = await asyncpg.connect(proxy_dsn(runs[1]))
        try:
            await conn.execute("INSERT INTO empleados (nombre) VALUES ('before-the-hold')")
        finally:
            await conn.close()
        primary = await asyncpg.connect(pair.primary_dsn())
        try:
            after = int(await primary.fetchval("SELECT pg_current_wal_lsn() - '0/0'"))
        finally:
            await primary.close()

        async def on_mirror() -> bool:
            mirror = await asyncpg.connect(pair.mirror_dsn())
            try:
                return bool(await mirror.fetchval("SELECT count(*) FROM empleados WHERE nombre = 'before-the-hold'"))
            finally:
                await mirror.close()

        await wait_until(on_mirror, 20, what="the commit on the mirror")

        async def lsn_recorded() -> bool:
            kv = (await store.get(keys.route)).first
            lsn = decode_route(keys.route, kv.value).active_lsn if kv is not None else None
            return lsn is not None and lsn >= after

        # The leader keeps the primary's WAL position in the route record (every 5 s),
        # as a single instance keeps it in its state file.
        await wait_until(lsn_recorded, 20, what="the primary's WAL position in the route record")
    async with EtcdStore(etcd.endpoints) as store:
        writer = RouteWriter(store, keys, "dead-leader")
        seen = await writer.read()
        assert seen.route is not None and seen.route.active is NodeName.PRIMARY
        await writer.write(
            SharedRoute(
                epoch=epoch + 1,
                active=None,
                paused=True,
                reason="FAILOVER to mirror: barrier",
                active_lsn=seen.route.active_lsn,
                held_active=NodeName.PRIMARY,
                held_epoch=epoch,
            )
        )
    pair.primary.kill()
    async with three_instances(pair, etcd, tmp_path, prefix=prefix) as runs:
        await wait_until(
            lambda: all(routed(r)[0] == "mirror" for r in runs), 60, what="the successor fails over to the mirror"
        )
        assert all(routed(r)[1] > epoch + 1 for r in runs)
        conn = await asyncpg.connect(proxy_dsn(runs[1]))
        try:
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
            await conn.execute("INSERT INTO empleados (nombre) VALUES ('after-successor')")
        finally:
            await conn.close()
