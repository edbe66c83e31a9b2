"""The route record, member records and the barrier on a real 3-member etcd on
loopback: compare-and-set between two writers and against a deposed leader, an epoch
that never goes down, the state file imported once, a watcher that sees every route
in order across a killed etcd member and recovers from compacted history, member
records that vanish with their lease, name collisions, and the barrier's three
outcomes (everyone acks, one expires instead, one is still missing at the timeout).
Each test has a fresh etcd cluster (about a second to start)."""

from __future__ import annotations

import asyncio

import pytest

from pgroute.cluster.barrier import barrier
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.members import Members, Membership, MembershipLost, NameInUse
from pgroute.cluster.records import CorruptRecord
from pgroute.cluster.route import (
    EpochRegression,
    Route,
    RouteSeen,
    RouteWatcher,
    RouteWriter,
    decode_route,
    import_state_file,
)
from pgroute.cluster.store import Compare, CompareFailed, EventKind
from pgroute.control.state_store import StateFile, Stored
from pgroute.local.etcd import LocalEtcdCluster
from pgroute.model import NodeName

pytestmark = [pytest.mark.integration]

KEYS = Keys("/pgroute/test")
P, M = NodeName.PRIMARY, NodeName.MIRROR


def store_on(etcd: LocalEtcdCluster, first: int = 0, timeout: float = 10.0) -> EtcdStore:
    """A store that talks to member ``first`` first. A generous timeout: nothing here
    tests an outage of the whole store, and a call cut short on a busy machine would be
    retried and could find its own write."""
    endpoints = etcd.endpoints
    return EtcdStore([*endpoints[first:], *endpoints[:first]], timeout=timeout)


async def stored_route(store: EtcdStore) -> Route | None:
    kv = (await store.get(KEYS.route)).first
    return decode_route(KEYS.route, kv.value) if kv else None


# --------------------------------------------------------------------------- route writes


async def test_two_writers_the_stale_one_writes_nothing(etcd):
    async with store_on(etcd, 0) as one, store_on(etcd, 1) as two:
        a, b = RouteWriter(one, KEYS, "pg-a"), RouteWriter(two, KEYS, "pg-b")
        assert (await a.read()).route is None and (await b.read()).route is None
        first = await a.write(Route(epoch=1, active=P, reason="first"))
        with pytest.raises(CompareFailed) as stale:
            await b.write(Route(epoch=1, active=M, reason="stale"))
        assert stale.value.key == KEYS.route and stale.value.current is not None
        assert stale.value.current.mod_revision == first.mod_revision
        assert await stored_route(one) == first.route
        # The loser reads again and may then write.
        assert (await b.read()).route == first.route
        second = await b.write(Route(epoch=2, active=M, reason="after reading"))
        stored = await stored_route(one)
        assert stored == second.route and stored is not None
        assert (stored.epoch, stored.active, stored.leader) == (2, M, "pg-b")


async def test_a_deposed_leader_writes_nothing(etcd):
    async with store_on(etcd, 0) as one, store_on(etcd, 1) as two:
        lease_a = await one.grant(10)
        await one.create_if_absent(KEYS.leader, "pg-a", lease_a)
        a = RouteWriter(one, KEYS, "pg-a", guards=[Compare.lease_is(KEYS.leader, lease_a.id)])
        await a.read()
        await a.write(Route(epoch=1, active=P))
        # pg-a loses the leader key; pg-b takes it.
        await one.revoke(lease_a)
        lease_b = await two.grant(10)
        await two.create_if_absent(KEYS.leader, "pg-b", lease_b)
        before = await stored_route(two)
        with pytest.raises(CompareFailed) as deposed:
            await a.write(Route(epoch=2, active=M))
        assert deposed.value.key == KEYS.leader
        assert deposed.value.current is not None and deposed.value.current.lease == lease_b.id
        assert await stored_route(two) == before


async def test_the_epoch_never_goes_down(etcd):
    async with store_on(etcd) as store:
        writer = RouteWriter(store, KEYS, "pg-a")
        await writer.read()
        await writer.write(Route(epoch=5, active=M))
        await writer.write(Route(epoch=5, active=M, paused=True))  # same epoch: allowed
        with pytest.raises(EpochRegression):
            await writer.write(Route(epoch=4, active=P))
        # Another writer that reads the route refuses the same.
        other = RouteWriter(store, KEYS, "pg-b")
        await other.read()
        with pytest.raises(EpochRegression):
            await other.write(Route(epoch=0, active=P))
        stored = await stored_route(store)
        assert stored is not None and (stored.epoch, stored.active, stored.paused) == (5, M, True)


async def test_the_state_file_is_imported_once(etcd, tmp_path):
    state = StateFile(tmp_path / "a" / "state.json")
    async with store_on(etcd) as store:
        # No route, no state file: nothing is written.
        nothing = await import_state_file(store, KEYS, state, leader="pg-a")
        assert not nothing.imported and nothing.seen.route is None
        assert (await store.get(KEYS.route)).first is None
        state.save(Stored(epoch=7, active=M, active_lsn=123456))
        first = await import_state_file(store, KEYS, state, leader="pg-a")
        assert first.imported and first.seen.route is not None
        assert (first.seen.route.epoch, first.seen.route.active, first.seen.route.active_lsn) == (7, M, 123456)
        assert first.seen.route.leader == "pg-a" and str(state.path) in first.seen.route.reason
        assert await stored_route(store) == first.seen.route
        # A second start (another instance, another file) keeps etcd's route, even
        # when its file is unreadable: the file is not even read.
        other = StateFile(tmp_path / "b" / "state.json")
        other.save(Stored(epoch=9, active=P))
        second = await import_state_file(store, KEYS, other, leader="pg-b")
        assert not second.imported and second.seen.route == first.seen.route
        other.path.write_text("{not json")
        third = await import_state_file(store, KEYS, other, leader="pg-b")
        assert not third.imported and third.seen.route == first.seen.route
        assert await stored_route(store) == first.seen.route
        # A writer starting from the imported route continues its epochs.
        writer = RouteWriter(store, KEYS, "pg-a")
        assert (await writer.read()).route == first.seen.route
        with pytest.raises(EpochRegression):
            await writer.write(Route(epoch=6, active=P))


# --------------------------------------------------------------------------- route watcher


class Collected:
    """What a RouteWatcher delivered to its callback."""

    def __init__(self) -> None:
        self.seen: list[RouteSeen] = []

    def __call__(self, seen: RouteSeen) -> None:
        self.seen.append(seen)

    @property
    def epochs(self) -> list[int | None]:
        return [s.route.epoch if s.route else None for s in self.seen]


async def test_the_watcher_sees_every_route_in_order_across_a_killed_member(etcd):
    async with store_on(etcd, 0) as watched_store, store_on(etcd, 2) as writing_store:
        collected = Collected()
        watcher = RouteWatcher(watched_store, KEYS, collected)
        updates = watcher.updates()
        try:
            initial = await watcher.start()
            assert initial.route is None and initial.mod_revision == 0
            writer = RouteWriter(writing_store, KEYS, "pg-a")
            await writer.read()
            written = [await writer.write(Route(epoch=e, active=(P, M)[e % 2])) for e in (1, 2, 3)]
            await watcher.wait_for(lambda s: s.mod_revision == written[-1].mod_revision, 20)
            # Kill the member the watch streams from; the route keeps changing.
            streaming = etcd.member(watched_store.endpoint)
            assert streaming is not etcd.member(writing_store.endpoint)
            streaming.kill()
            written += [await writer.write(Route(epoch=e, active=(P, M)[e % 2])) for e in (4, 5, 6)]
            latest = await watcher.wait_for(lambda s: s.mod_revision == written[-1].mod_revision, 20)
            assert latest.route == written[-1].route and watcher.latest == latest
            assert watched_store.endpoint != streaming.endpoint
            # Every route once, in order, to the callback and to the iterator alike.
            assert collected.epochs == [None, 1, 2, 3, 4, 5, 6]
            assert [s.mod_revision for s in collected.seen[1:]] == [w.mod_revision for w in written]
            assert [s.route for s in collected.seen[1:]] == [w.route for w in written]
            from_iterator = [await asyncio.wait_for(anext(updates), 5) for _ in range(7)]
            assert from_iterator == collected.seen
        finally:
            updates.close()
            await watcher.close()


class GatedStore:
    """The store, with watches held back until the test opens the gate: the history
    they ask for can be compacted meanwhile (what a watcher cut off for a while finds)."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self.gate = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def watch_prefix(self, prefix, start_revision):
        await self.gate.wait()
        async for event in self._store.watch_prefix(prefix, start_revision):
            yield event


async def test_the_watcher_recovers_from_compacted_history(etcd):
    async with store_on(etcd) as store:
        writer = RouteWriter(store, KEYS, "pg-a")
        await writer.read()
        await writer.write(Route(epoch=1, active=P))
        gated = GatedStore(store)
        collected = Collected()
        watcher = RouteWatcher(gated, KEYS, collected)
        try:
            await watcher.start()
            for epoch in (2, 3, 4):
                last = await writer.write(Route(epoch=epoch, active=M))
            await store.compact(last.mod_revision)
            gated.gate.set()  # the watch now asks for compacted history
            await watcher.wait_for(lambda s: s.mod_revision == last.mod_revision, 20)
            # The routes in between are gone with the history; the newest arrives.
            assert collected.epochs == [1, 4]
            after = await writer.write(Route(epoch=5, active=P))
            await watcher.wait_for(lambda s: s.mod_revision == after.mod_revision, 20)
            assert collected.epochs == [1, 4, 5]
            # A corrupt record is reported as such (the follower fails closed), and the
            # writer refuses to go on from it; deleted, the route is absent again.
            corrupt = await store.put(KEYS.route, b'{"epoch": true}')
            seen = await watcher.wait_for(lambda s: s.mod_revision == corrupt, 20)
            assert seen.route is None and seen.problem is not None and KEYS.route in seen.problem
            with pytest.raises(CorruptRecord):
                await writer.read()
            deleted = await store.delete(KEYS.route)
            gone = await watcher.wait_for(lambda s: s.revision == deleted, 20)
            assert (gone.route, gone.mod_revision, gone.problem) == (None, 0, None)
        finally:
            await watcher.close()


# --------------------------------------------------------------------------- members


async def watch_for_delete(store: EtcdStore, key: str, start: int, timeout: float = 20.0) -> int:
    """The revision at which ``key`` is deleted (a bound, not a measurement)."""
    async with asyncio.timeout(timeout):
        async for event in store.watch_prefix(key, start):
            if event.kind is EventKind.DELETE and event.kv.key == key:
                return event.revision
    raise AssertionError("the watch ended")


async def test_a_member_record_lives_while_its_lease_is_kept_alive(etcd):
    async with store_on(etcd, 0) as mine, store_on(etcd, 1) as theirs:
        member = Membership(mine, KEYS, "pg-a", ttl=2, proxy="127.0.0.1:6432", api="127.0.0.1:5000", epoch=3)
        record = await member.start()
        try:
            members = Members(theirs, KEYS)
            listed = await members.list()
            assert [m.record for m in listed] == [record]
            assert listed[0].lease == member.lease.id  # type: ignore[union-attr]
            # Kept alive past its TTL: still there, and updates land.
            await asyncio.sleep(3.0)
            assert not member.lost.is_set()
            updated = await member.update(epoch=4, paused=True, health={"connect_failures": 1})
            found = await members.get("pg-a")
            assert found is not None and found.record == updated
            assert (found.record.epoch, found.record.paused, dict(found.record.health)) == (
                4,
                True,
                {"connect_failures": 1},
            )
            # One of its own writes landing after its call gave up (bound to its lease):
            # the next update writes over it.
            await mine.put(member.key, b'{"late": true}', member.lease)
            assert (await member.update(epoch=5)).epoch == 5
            found = await members.get("pg-a")
            assert found is not None and found.record.epoch == 5
            # Stop refreshing (what a crash looks like): the record vanishes with the lease.
            start = (await theirs.get(member.key)).revision + 1
            await member.close(revoke=False)
            await watch_for_delete(theirs, member.key, start)
            assert await members.list() == ()
        finally:
            await member.close()


async def test_a_second_instance_with_the_same_name_is_refused(etcd):
    async with store_on(etcd, 0) as one, store_on(etcd, 1) as two:
        first = Membership(one, KEYS, "pg-a", ttl=5, proxy="10.0.0.1:6432")
        second = Membership(two, KEYS, "pg-a", ttl=5, proxy="10.0.0.2:6432")
        await first.start()
        try:
            with pytest.raises(NameInUse) as caught:
                await second.start()
            assert KEYS.member("pg-a") in str(caught.value) and "10.0.0.1:6432" in str(caught.value)
            with pytest.raises(NameInUse):
                await Members(two, KEYS).check_name_free("pg-a")
            await Members(two, KEYS).check_name_free("pg-b")
            (only,) = await Members(two, KEYS).list()
            assert only.record.proxy == "10.0.0.1:6432"
            # Once the first is gone, the name is free.
            await first.close()
            await second.start()
            (only,) = await Members(one, KEYS).list()
            assert only.record.proxy == "10.0.0.2:6432"
            # A record that is not its own any more (another lease took the name): the
            # owner stops instead of writing over it.
            assert second.lease is not None
            await two.revoke(second.lease)
            await first.start()
            with pytest.raises(MembershipLost):
                await second.update(epoch=1)
            assert second.lost.is_set()
        finally:
            await first.close()
            await second.close()


# --------------------------------------------------------------------------- barrier


async def three_members(etcd, stores: list[EtcdStore], epoch: int, ttl: float = 5) -> list[Membership]:
    members = [Membership(stores[i], KEYS, name, ttl=ttl, epoch=epoch) for i, name in enumerate(("a", "b", "c"))]
    for member in members:
        await member.start()
    return members


async def test_barrier_reports_each_members_ack_time(etcd):
    async with store_on(etcd, 0) as s0, store_on(etcd, 1) as s1, store_on(etcd, 2) as s2:
        a, b, c = await three_members(etcd, [s0, s1, s2], epoch=4)
        try:
            waiting = asyncio.create_task(barrier(s0, KEYS, 5, timeout=20))
            await asyncio.sleep(0.2)  # the barrier has read the members (not required: late is fine)
            await a.update(epoch=5)
            await b.update(epoch=5)
            await asyncio.sleep(1.0)
            await c.update(epoch=5)
            result = await asyncio.wait_for(waiting, 30)
            assert result.complete and result.missing == () and result.expired == {}
            assert set(result.acked) == {"a", "b", "c"}
            assert result.acked["c"] >= 1.0 > 0
            assert result.acked["c"] > max(result.acked["a"], result.acked["b"])
            # Everyone already there: done at once, every ack at 0.
            again = await barrier(s1, KEYS, 5, timeout=20)
            assert again.complete and again.acked == {"a": 0.0, "b": 0.0, "c": 0.0}
        finally:
            for member in (a, b, c):
                await member.close()


async def test_barrier_counts_a_member_whose_lease_expires_as_expired(etcd):
    async with store_on(etcd, 0) as s0, store_on(etcd, 1) as s1, store_on(etcd, 2) as s2:
        a, b, c = await three_members(etcd, [s0, s1, s2], epoch=1, ttl=2)
        try:
            waiting = asyncio.create_task(barrier(s0, KEYS, 2, timeout=20))
            await a.update(epoch=2)
            await b.update(epoch=2)
            await c.close(revoke=False)  # c stops renewing: its record goes with the lease
            result = await asyncio.wait_for(waiting, 30)
            assert result.complete and result.missing == ()
            assert set(result.acked) == {"a", "b"} and set(result.expired) == {"c"}
        finally:
            for member in (a, b, c):
                await member.close()


async def test_barrier_timeout_names_the_member_still_missing(etcd):
    async with store_on(etcd, 0) as s0, store_on(etcd, 1) as s1, store_on(etcd, 2) as s2:
        a, b, c = await three_members(etcd, [s0, s1, s2], epoch=6)
        try:
            await a.update(epoch=7)
            await b.update(epoch=8)
            # c keeps its lease alive and never acknowledges.
            result = await asyncio.wait_for(barrier(s0, KEYS, 7, timeout=1.5), 30)
            assert not result.complete and result.missing == ("c",)
            assert result.acked == {"a": 0.0, "b": 0.0} and result.expired == {}
            assert result.elapsed >= 1.5
            assert "still missing" in result.describe() and "c" in result.describe()
        finally:
            for member in (a, b, c):
                await member.close()
