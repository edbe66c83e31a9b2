"""EtcdStore against a real 3-member etcd on loopback (pgroute.local.etcd): leases that
expire, compare-and-set contention, watches that resume on another member, and the
failures a cluster must survive: a member killed, a member hung (SIGSTOP), all of
them gone. Each test has a fresh cluster (about a second to start)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.store import Compacted, CompareFailed, EventKind, LeaseExpired, StoreUnavailable, WatchEvent

pytestmark = [pytest.mark.integration]

P = "/pgroute/test/"


class Watched:
    """The events of one watch, collected by a task; `wait` until enough arrived."""

    def __init__(self, store: EtcdStore, prefix: str, start: int) -> None:
        self.events: list[WatchEvent] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._run(store, prefix, start))

    async def _run(self, store: EtcdStore, prefix: str, start: int) -> None:
        try:
            async for event in store.watch_prefix(prefix, start):
                self.events.append(event)
                self._new.set()
        finally:
            self._new.set()

    async def wait(self, predicate, timeout: float = 20.0) -> None:
        """Until ``predicate(events)`` holds (a bound, not a measurement: the test fails
        if it never does). A watch that ended raises its error here."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.events):
                    if self._task.done():
                        self._task.result()
                        raise AssertionError("the watch ended")
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            seen = [(e.kind.value, e.kv.key, e.kv.text, e.revision) for e in self.events]
            raise AssertionError(f"no such events within {timeout}s; the watch saw {seen}") from None

    async def stop(self) -> None:
        """Cancel the watch and wait until it has ended (before its store closes)."""
        self._task.cancel()
        await asyncio.wait([self._task])


async def drain(store: EtcdStore, prefix: str, start: int) -> None:
    """Consume a watch until it raises."""
    async for _ in store.watch_prefix(prefix, start):
        pass


# A write is (kind, key, text, the revision its call returned).
Write = tuple[EventKind, str, str, int]


def seen_all(written: list[Write]):
    return lambda events: {w[3] for w in written} <= {e.revision for e in events}


def assert_delivered(events: list[WatchEvent], written: list[Write]) -> None:
    """Every write delivered as written, in revision order, no revision twice. An
    extra event may only repeat one of the writes: a call whose attempt timed out on
    a slow member and was retried on the next can land twice (see store.py)."""
    revisions = [e.revision for e in events]
    assert revisions == sorted(set(revisions)), revisions
    by_revision = {e.revision: (e.kind, e.kv.key, e.kv.text) for e in events}
    for kind, key, text, revision in written:
        assert by_revision.get(revision) == (kind, key, text), (revision, by_revision)
    extra = set(by_revision) - {w[3] for w in written}
    assert {by_revision[r] for r in extra} <= {w[:3] for w in written}, by_revision


async def test_a_lease_not_kept_alive_expires_and_its_keys_vanish(etcd):
    async with EtcdStore(etcd.endpoints) as store:
        lease = await store.grant(2)
        assert lease.ttl == 2
        revision = await store.put(P + "member", "a", lease)
        watched = Watched(store, P, revision + 1)
        try:
            # Kept alive past its TTL, the key stays.
            kept = lease
            for _ in range(8):  # 2.4 s in all, refreshed well inside the 2 s TTL
                await asyncio.sleep(0.3)
                kept = await store.keepalive(kept)
                assert kept.deadline > lease.deadline
            assert (await store.get(P + "member")).first is not None
            # Left alone, it expires: the key is deleted by the lease, never before
            # the deadline the last refresh promised.
            await watched.wait(lambda events: any(e.kind is EventKind.DELETE for e in events))
            assert time.monotonic() >= kept.deadline
        finally:
            await watched.stop()
        assert (await store.get(P + "member")).first is None
        with pytest.raises(LeaseExpired):
            await store.keepalive(kept)
        await store.revoke(kept)  # already gone: not an error


async def test_create_if_absent_contention_has_exactly_one_winner(etcd):
    # Two instances, each talking to its own member.
    endpoints = etcd.endpoints
    async with (
        EtcdStore(endpoints) as one,
        EtcdStore([*endpoints[1:], endpoints[0]]) as two,
    ):
        leases = [await one.grant(10), await two.grant(10)]
        for round_ in range(10):
            key = f"{P}leader-{round_}"
            results = await asyncio.gather(
                one.create_if_absent(key, "one", leases[0]),
                two.create_if_absent(key, "two", leases[1]),
                return_exceptions=True,
            )
            winners = [i for i, r in enumerate(results) if isinstance(r, int)]
            losers = [r for r in results if isinstance(r, CompareFailed)]
            assert len(winners) == 1 and len(losers) == 1, results
            stored = (await one.get(key)).first
            assert stored is not None
            assert stored.text == ("one", "two")[winners[0]]
            assert stored.lease == leases[winners[0]].id
            # The loser is told who holds the key.
            assert losers[0].current == stored


async def test_compare_and_set_on_mod_revision(etcd):
    # A generous timeout: nothing fails here, and an attempt cut short on a busy
    # machine would be retried and find its own write (CompareFailed, see store.py).
    async with EtcdStore(etcd.endpoints, timeout=15.0) as store:
        first = await store.put(P + "route", "epoch 1")
        second = await store.put_if(P + "route", "epoch 2", first)
        assert second > first
        with pytest.raises(CompareFailed) as stale:
            await store.put_if(P + "route", "epoch 2 again", first)
        assert stale.value.current is not None and stale.value.current.mod_revision == second
        assert (await store.get(P + "route")).first.text == "epoch 2"  # type: ignore[union-attr]
        with pytest.raises(CompareFailed):
            await store.delete_if(P + "route", first)
        with pytest.raises(CompareFailed) as absent:
            await store.put_if(P + "absent", "x", 12345)
        assert absent.value.current is None
        await store.put_if(P + "absent", "x", 0)  # 0: the key must be absent
        await store.delete_if(P + "route", second)
        read = await store.get_prefix(P)
        assert [kv.key for kv in read.items] == [P + "absent"]
        assert read.revision > second


async def test_a_watch_sees_every_change_in_order_and_resumes_when_its_member_is_killed(etcd):
    async with EtcdStore(etcd.endpoints) as store, EtcdStore(etcd.endpoints[::-1], timeout=15.0) as writer:
        start = (await store.get_prefix(P)).revision + 1
        watched = Watched(store, P, start)
        try:
            written: list[Write] = []
            for i in range(5):
                written.append((EventKind.PUT, f"{P}k{i % 2}", f"v{i}", await writer.put(f"{P}k{i % 2}", f"v{i}")))
            written.append((EventKind.DELETE, f"{P}k0", "", await writer.delete(P + "k0")))
            await watched.wait(seen_all(written))
            # Kill the member the watch streams from; the writes go on elsewhere.
            streaming = etcd.member(store.endpoint)
            streaming.kill()
            for i in range(5, 10):
                written.append((EventKind.PUT, f"{P}k{i % 2}", f"v{i}", await writer.put(f"{P}k{i % 2}", f"v{i}")))
            await watched.wait(seen_all(written))
            marker = await writer.put(P + "end", "")  # everything before it has been delivered
            await watched.wait(lambda events: any(e.revision == marker for e in events))
        finally:
            await watched.stop()
        assert store.endpoint != streaming.endpoint
        assert_delivered([e for e in watched.events if e.kv.key != P + "end"], written)


async def test_losing_one_member_of_three_changes_nothing(etcd):
    # The leader, the worst member to lose: the others elect a new one first.
    etcd.leader().kill()
    etcd.leader()  # waits for the election (calls during it are the hung-member case)
    async with EtcdStore(etcd.endpoints, timeout=15.0) as store:
        lease = await store.grant(5)
        created = await store.create_if_absent(P + "leader", "a", lease)
        updated = await store.put_if(P + "leader", "a2", created, lease)
        lease = await store.keepalive(lease)
        watched = Watched(store, P, created)
        try:
            await watched.wait(lambda events: len(events) == 2)
        finally:
            await watched.stop()
        assert [e.revision for e in watched.events] == [created, updated]
        assert [kv.text for kv in (await store.get_prefix(P)).items] == ["a2"]
        await store.revoke(lease)
        assert (await store.get_prefix(P)).items == ()


async def test_a_hung_member_calls_and_watches_move_to_another_within_the_timeout(etcd):
    follower = etcd.followers()[0]  # a hung leader would need an election first
    others = [e for e in etcd.endpoints if e != follower.endpoint]
    async with EtcdStore([follower.endpoint, *others], timeout=3.0) as store:
        assert store.endpoint == follower.endpoint
        start = await store.put(P + "k", "before")
        watched = Watched(store, P, start)
        try:
            await watched.wait(lambda events: len(events) == 1)
            follower.pause()
            # Every call succeeds on another member within its own timeout.
            revision = await store.put(P + "k", "during", timeout=3.0)
            assert store.endpoint != follower.endpoint
            assert (await store.get(P + "k", timeout=3.0)).first.text == "during"  # type: ignore[union-attr]
            lease = await store.grant(5, timeout=3.0)
            await store.keepalive(lease, timeout=3.0)
            # The watch notices its member went quiet and resumes elsewhere.
            written: list[Write] = [
                (EventKind.PUT, P + "k", "before", start),
                (EventKind.PUT, P + "k", "during", revision),
            ]
            await watched.wait(seen_all(written))
            assert_delivered(watched.events, written)
        finally:
            await watched.stop()
            follower.resume()


async def test_a_hung_leader_calls_succeed_once_the_others_elect_a_new_one(etcd):
    leader = etcd.leader()
    async with EtcdStore([leader.endpoint, *(e for e in etcd.endpoints if e != leader.endpoint)], timeout=9.0) as store:
        lease = await store.grant(10)
        leader.pause()
        try:
            # Sent while the followers still wait for the hung leader: the call outlives
            # the election within its timeout (a retried create recognises its own lease).
            revision = await store.create_if_absent(P + "leader", "b", lease)
            found = (await store.get(P + "leader")).first
            assert found is not None and (found.text, found.lease, found.mod_revision) == ("b", lease.id, revision)
            await store.keepalive(lease)
            assert store.endpoint != leader.endpoint
        finally:
            leader.resume()


async def test_all_members_gone_is_store_unavailable_not_a_hang(etcd):
    async with EtcdStore(etcd.endpoints, timeout=1.5) as store:
        revision = await store.put(P + "k", "v")
        lease = await store.grant(10)
        # Hung: every member accepts connections and answers nothing.
        for member in etcd.members:
            member.pause()
        try:
            with pytest.raises(StoreUnavailable) as hung:
                await asyncio.wait_for(store.get(P + "k"), 15)
            for endpoint in etcd.endpoints:
                assert endpoint in str(hung.value)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.keepalive(lease), 15)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(drain(store, P, revision), 15)
        finally:
            for member in etcd.members:
                member.resume()
        # Dead: connections are refused at once; the call still waits out its timeout.
        etcd.kill()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.create_if_absent(P + "x", "v", lease), 15)


async def test_a_watch_from_compacted_history_is_an_explicit_error(etcd):
    async with EtcdStore(etcd.endpoints) as store:
        old = await store.put(P + "k", "1")
        await store.put(P + "k", "2")
        current = await store.put(P + "k", "3")
        await store.compact(current)
        with pytest.raises(Compacted) as caught:
            await asyncio.wait_for(drain(store, P, old), 15)
        assert caught.value.compact_revision == current
        # The caller's way back: read, then watch from the read's revision + 1.
        read = await store.get_prefix(P)
        watched = Watched(store, P, read.revision + 1)
        try:
            await store.put(P + "k", "4")
            await watched.wait(lambda events: len(events) == 1)
        finally:
            await watched.stop()
        assert [e.kv.text for e in watched.events] == ["4"]
