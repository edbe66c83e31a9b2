"""MemoryStore, the in-memory Store the cluster logic's unit tests run on: revisions,
compare-and-set, leases expiring on a ManualClock (with their keys), watches in order
from a revision, compaction, and the fault injection (a client cut off, calls hanging
until their timeout)."""

from __future__ import annotations

import asyncio

import pytest

from pgroute.cluster.clock import ManualClock
from pgroute.cluster.memory_store import MemoryServer, MemoryStore
from pgroute.cluster.store import (
    Compacted,
    Compare,
    CompareFailed,
    CompareResult,
    CompareTarget,
    Delete,
    EventKind,
    Get,
    LeaseExpired,
    Put,
    StoreUnavailable,
    WatchEvent,
)

P = "/pgroute/test/"


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def server(clock):
    server = MemoryServer(clock, timeout=2.0)
    yield server
    await server.close()


@pytest.fixture
def store(server):
    return server.client()


class Watched:
    def __init__(self, store: MemoryStore, prefix: str, start: int) -> None:
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run(store, prefix, start))

    async def _run(self, store, prefix, start):
        try:
            async for event in store.watch_prefix(prefix, start):
                self.events.append(event)
        except Exception as exc:
            self.error = exc

    def seen(self):
        return [(e.kind, e.kv.key, e.kv.text, e.revision) for e in self.events]

    async def stop(self):
        self.task.cancel()
        await asyncio.wait([self.task])


async def test_revisions_move_once_per_write_and_not_for_nothing(store, clock):
    first = await store.put(P + "a", "1")
    assert first == 2  # an empty etcd is at revision 1
    second = await store.put(P + "a", "2")
    assert second == 3
    kv = (await store.get(P + "a")).first
    assert kv is not None
    assert (kv.text, kv.create_revision, kv.mod_revision, kv.version) == ("2", 2, 3, 2)
    # A delete of nothing does not move the revision; one transaction is one revision.
    assert await store.delete(P + "missing") == 3
    result = await store.txn((), [Put(P + "b", b"x"), Put(P + "c", b"y"), Get(P, prefix=True)])
    assert result.revision == 4
    read = result.reads[2]
    assert read is not None
    assert [(k.key, k.mod_revision) for k in read.items] == [(P + "a", 3), (P + "b", 4), (P + "c", 4)]
    assert (await store.get_prefix(P)).revision == 4


async def test_compare_and_set(store):
    revision = await store.create_if_absent(P + "k", "v1")
    with pytest.raises(CompareFailed) as failed:
        await store.create_if_absent(P + "k", "v2")
    assert failed.value.current is not None and failed.value.current.text == "v1"
    with pytest.raises(CompareFailed):
        await store.put_if(P + "k", "v2", revision - 1)
    newer = await store.put_if(P + "k", "v2", revision)
    with pytest.raises(CompareFailed):
        await store.delete_if(P + "k", revision)
    await store.delete_if(P + "k", newer)
    assert (await store.get(P + "k")).first is None
    # Compares on an absent key see zeros; a VALUE compare on it fails.
    absent = P + "nothing"
    assert (await store.txn([Compare.mod_revision(absent, 0), Compare.lease_is(absent, 0)], [])).succeeded
    assert not (await store.txn([Compare.value_is(absent, b"")], [])).succeeded
    greater = Compare(P + "x", CompareTarget.VERSION, 0, CompareResult.GREATER)
    assert not (await store.txn([greater], [])).succeeded
    failure = await store.txn([greater], [Put(P + "x", b"no")], [Put(P + "x", b"yes"), Get(P + "x")])
    assert not failure.succeeded
    read = failure.reads[1]
    assert read is not None and read.first is not None and read.first.text == "yes"


async def test_a_lease_expires_on_the_clock_with_its_keys(server, store, clock):
    lease = await store.grant(1.5)
    assert lease.ttl == 2  # whole seconds, rounded up
    assert lease.deadline == clock.now() + 2
    await store.put(P + "member", "a", lease)
    revision = await store.put(P + "other", "b")
    watched = Watched(store, P, revision + 1)
    await clock.advance(1.5)
    kept = await store.keepalive(lease)
    assert kept.deadline == clock.now() + 2
    await clock.advance(1.9)  # past the first deadline, before the refreshed one
    assert (await store.get(P + "member")).first is not None
    # Nobody calls: the server still expires it on time, and the watch sees the delete.
    await clock.advance(0.2)
    assert watched.seen() == [(EventKind.DELETE, P + "member", "", revision + 1)]
    assert (await store.get(P + "member")).first is None
    assert (await store.get(P + "other")).first is not None
    with pytest.raises(LeaseExpired):
        await store.keepalive(kept)
    with pytest.raises(LeaseExpired):  # etcd: "requested lease not found"
        await store.put(P + "member", "again", kept)
    await store.revoke(kept)  # already gone: not an error
    await watched.stop()


async def test_revoke_deletes_the_lease_keys_in_one_revision(server, store):
    lease = await store.grant(10)
    await store.put(P + "a", "1", lease)
    start = await store.put(P + "b", "2", lease)
    watched = Watched(store, P, start + 1)
    await store.revoke(lease)
    await asyncio.sleep(0)
    assert watched.seen() == [(EventKind.DELETE, P + "a", "", start + 1), (EventKind.DELETE, P + "b", "", start + 1)]
    assert server.lease_ids() == set()
    await watched.stop()


async def test_a_key_rebound_to_another_lease_survives_the_first(store):
    first = await store.grant(10)
    second = await store.grant(10)
    await store.put(P + "k", "1", first)
    await store.put(P + "k", "2", second)
    await store.revoke(first)
    kv = (await store.get(P + "k")).first
    assert kv is not None and kv.lease == second.id


async def test_watch_from_a_revision_in_order_and_compaction(server, store):
    revisions = [await store.put(P + f"k{i}", str(i)) for i in range(4)]
    await store.put("/elsewhere", "x")
    watched = Watched(store, P, revisions[1])
    await asyncio.sleep(0)
    await store.delete(P + "k0")
    for _ in range(3):
        await asyncio.sleep(0)
    assert [e[3] for e in watched.seen()] == [revisions[1], revisions[2], revisions[3], revisions[3] + 2]
    assert watched.seen()[-1][0] is EventKind.DELETE
    await watched.stop()
    server.compact(revisions[3])
    with pytest.raises(Compacted):
        async for _ in store.watch_prefix(P, revisions[1]):
            pass


async def test_a_client_cut_off_fails_and_a_hung_one_times_out_on_the_clock(server, store, clock):
    other = server.client()
    store.down()
    with pytest.raises(StoreUnavailable):
        await store.get(P + "k")
    await other.put(P + "k", "still served")  # only this client is cut off
    store.down(hang=True)
    call = asyncio.create_task(store.put(P + "k", "late", timeout=1.0))
    await clock.advance(0.9)
    assert not call.done()
    await clock.advance(0.2)
    with pytest.raises(StoreUnavailable):
        await call
    assert (await other.get(P + "k")).first.text == "still served"
    # A hung call that the store answers in time goes through.
    call = asyncio.create_task(store.put(P + "k", "in time", timeout=1.0))
    await clock.advance(0.5)
    store.up()
    await call
    assert (await other.get(P + "k")).first.text == "in time"


async def test_a_watch_on_an_unreachable_store_gives_up_after_its_timeout(server, store, clock):
    watched = Watched(store, P, 1)
    await clock.settle()
    server.down(hang=True)
    await clock.advance(1.9)
    assert watched.error is None
    await clock.advance(0.2)
    assert isinstance(watched.error, StoreUnavailable)
    server.up()
    await watched.stop()


async def test_txn_delete_prefix(store):
    await store.put(P + "a", "1")
    await store.put(P + "b", "2")
    result = await store.txn((), [Delete(P, prefix=True)])
    assert (await store.get_prefix(P)).items == ()
    assert result.revision == 4
