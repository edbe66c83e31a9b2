"""LeaderElection on the in-memory store with a manual clock: one winner, renewals
that keep the leadership, a leader cut off from the store that stops acting before
its lease can expire, fencing of a deposed leader's writes, hand-over on a clean
stop, a deleted leader key, and the timing rules checked at construction."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from pgroute.cluster.clock import ManualClock
from pgroute.cluster.keys import Keys
from pgroute.cluster.leader import LeaderElection, NotLeader, Term, parse_leader
from pgroute.cluster.memory_store import MemoryServer, MemoryStore
from pgroute.cluster.store import Compare, KeyValue, Put

KEYS = Keys("/pgroute/test")
TTL = 3.0  # loop_wait 1, retry_timeout 1, margin 0.5


@dataclass
class Candidate:
    """One instance: its store client, its election, and what its callbacks saw."""

    name: str
    store: MemoryStore
    election: LeaderElection
    elected: list[tuple[float, Term]] = field(default_factory=list)
    lost: list[tuple[float, Term, str, float | None]] = field(default_factory=list)


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def server(clock):
    server = MemoryServer(clock, timeout=1.0)
    yield server
    await server.close()


@pytest.fixture
async def candidates(server, clock):
    made: list[Candidate] = []

    def make(name: str, start: bool = True, **kwargs) -> Candidate:
        store = server.client()
        holder: list[Candidate] = []

        def elected(term: Term) -> None:
            holder[0].elected.append((clock.now(), term))

        def lost(term: Term, reason: str) -> None:
            # The server's own expiry of the lease, at the moment the holder stops acting.
            holder[0].lost.append((clock.now(), term, reason, server.lease_expiry(term.lease_id)))

        election = LeaderElection(
            store, KEYS, name, TTL, api=f"http://{name}:5000", on_elected=elected, on_lost=lost, clock=clock, **kwargs
        )
        candidate = Candidate(name, store, election)
        holder.append(candidate)
        made.append(candidate)
        if start:
            election.start()
        return candidate

    yield make
    for candidate in made:
        await candidate.election.close(release=False)


def leaders(cands: list[Candidate]) -> list[str]:
    return [c.name for c in cands if c.election.is_leader()]


async def advance(clock: ManualClock, seconds: float, step: float = 0.1) -> None:
    for _ in range(round(seconds / step)):
        await clock.advance(step)


async def test_one_winner_among_candidates_and_everyone_knows_it(candidates, clock):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await clock.settle()
    assert len(leaders(cands)) == 1
    (winner,) = [c for c in cands if c.election.is_leader()]
    assert len(winner.elected) == 1
    term = winner.elected[0][1]
    assert winner.election.term == term
    assert winner.election.fence() == Compare(KEYS.leader, term.fence.target, term.number)
    for other in cands:
        info = other.election.current_leader()
        assert info is not None and (info.name, info.api, info.term) == (
            winner.name,
            f"http://{winner.name}:5000",
            term.number,
        )
        if other is not winner:
            assert other.elected == [] and other.election.term is None
            with pytest.raises(NotLeader):
                other.election.fence()


async def test_renewals_keep_the_leadership_far_past_the_ttl(candidates, clock, server):
    cands = [candidates("pg1"), candidates("pg2")]
    await clock.settle()
    (winner,) = [c for c in cands if c.election.is_leader()]
    lease_id = winner.elected[0][1].lease_id
    await advance(clock, 5 * TTL)
    assert leaders(cands) == [winner.name]
    assert [len(c.elected) for c in cands].count(1) == 1 and all(not c.lost for c in cands)
    # Renewed on every loop_wait: the server's expiry is a full TTL ahead, less one loop_wait at most.
    expiry = server.lease_expiry(lease_id)
    assert expiry is not None and expiry >= clock.now() + TTL - winner.election.loop_wait


async def test_a_leader_cut_off_stops_acting_before_its_lease_can_expire(candidates, clock, server):
    first = candidates("pg1")
    await clock.settle()
    second = candidates("pg2")
    await clock.settle()
    assert leaders([first, second]) == ["pg1"]
    await advance(clock, 2.0)  # a few renewals
    # Its store hangs: renewals wait for answers that do not come.
    first.store.down(hang=True)
    await advance(clock, 2 * TTL, step=0.05)
    assert len(first.lost) == 1
    lost_at, term, reason, server_expiry = first.lost[0]
    assert "not renewed" in reason
    # It stopped acting while the server still held its lease, with the margin to spare.
    assert server_expiry is not None and lost_at <= server_expiry - first.election.margin
    assert not first.election.is_leader() and first.election.term is None
    # The other instance took over only after the lease had expired on the server.
    assert len(second.elected) == 1
    elected_at, new_term = second.elected[0]
    assert elected_at >= server_expiry > lost_at
    assert new_term.number > term.number
    assert leaders([first, second]) == ["pg2"]


async def test_a_deposed_leaders_fenced_write_fails(candidates, clock, server):
    first = candidates("pg1")
    await clock.settle()
    second = candidates("pg2")
    await clock.settle()
    old = first.elected[0][1]
    route = "/pgroute/test/route"
    assert (await first.store.txn([old.fence], [Put(route, b"by pg1")])).succeeded
    first.store.down()  # cut off: its lease runs out, pg2 takes over
    await advance(clock, 2 * TTL)
    assert leaders([first, second]) == ["pg2"]
    new = second.elected[0][1]
    # pg1 comes back with a write it had prepared during its term: fenced out.
    first.store.up()
    late = await first.store.txn([old.fence], [Put(route, b"late, by pg1")])
    assert not late.succeeded
    assert (await second.store.txn([new.fence], [Put(route, b"by pg2")])).succeeded
    kv = (await second.store.get(route)).first
    assert kv is not None and kv.text == "by pg2"
    # And pg1, back in reach, follows: its old lease revoked, no second leader.
    await advance(clock, 2 * TTL)
    assert leaders([first, second]) == ["pg2"]
    assert old.lease_id not in server.lease_ids()


async def test_a_clean_stop_hands_over_without_waiting_for_the_ttl(candidates, clock, server):
    first = candidates("pg1")
    await clock.settle()
    second = candidates("pg2")
    third = candidates("pg3")
    await clock.settle()
    old = first.elected[0][1]
    stopped_at = clock.now()
    await first.election.close()
    assert first.lost[-1][2] == "stopped" and not first.election.is_leader()
    await clock.settle()  # no time passes
    assert old.lease_id not in server.lease_ids()
    assert len(leaders([second, third])) == 1
    (heir,) = [c for c in (second, third) if c.elected]
    assert heir.elected[0][0] == stopped_at


async def test_a_crashed_leader_is_replaced_after_its_lease_expires(candidates, clock, server):
    first = candidates("pg1")
    await clock.settle()
    second = candidates("pg2")
    await clock.settle()
    lease_id = first.elected[0][1].lease_id
    await first.election.close(release=False)  # no revoke: like a killed process
    expiry = server.lease_expiry(lease_id)
    assert expiry is not None
    await advance(clock, TTL + 1)
    assert second.elected and second.elected[0][0] >= expiry


async def test_a_deleted_leader_key_deposes_its_holder_at_once(candidates, clock, server):
    cands = [candidates("pg1"), candidates("pg2")]
    await clock.settle()
    (winner,) = [c for c in cands if c.election.is_leader()]
    old = winner.elected[0][1]
    await server.client().delete(KEYS.leader)  # an operator's etcdctl del
    await clock.settle()
    assert winner.lost and winner.lost[0][2] == "the leader key was deleted"
    assert old.lease_id not in server.lease_ids()  # revoked before campaigning again
    assert len(leaders(cands)) == 1
    new = [t for c in cands for _, t in c.elected if t != old]
    assert len(new) == 1 and new[0].number > old.number


async def test_a_whole_store_outage_leaves_nobody_acting_then_a_leader_again(candidates, clock, server):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await clock.settle()
    server.down(hang=True)
    await advance(clock, 3 * TTL)
    assert leaders(cands) == []
    assert sum(len(c.elected) for c in cands) == 1  # nobody elected during the outage
    server.up()
    await advance(clock, 2 * TTL)
    assert len(leaders(cands)) == 1


def test_the_timing_rules_are_checked(server):
    store = server.client()
    with pytest.raises(ValueError, match="loop_wait \\+ 2 \\* retry_timeout"):
        LeaderElection(store, KEYS, "pg1", 3.0, loop_wait=1.5, retry_timeout=1.0)
    with pytest.raises(ValueError, match="margin"):
        LeaderElection(store, KEYS, "pg1", 3.0, margin=1.5)
    with pytest.raises(ValueError, match="not a valid instance name"):
        LeaderElection(store, KEYS, "a/b", 3.0)
    election = LeaderElection(store, KEYS, "pg1", 10.0)
    assert (election.loop_wait, election.retry_timeout, election.margin) == pytest.approx((10 / 3, 10 / 3, 1.0))


def test_a_leader_key_that_is_not_json_is_a_bare_name():
    kv = KeyValue(KEYS.leader, b"pg9", 7, 7, 1, 0)
    info = parse_leader(kv)
    assert (info.name, info.api, info.term) == ("pg9", "", 7)


async def test_is_leader_reads_the_clock_at_each_call(candidates, clock):
    first = candidates("pg1")
    await clock.settle()
    acting_until = first.election.acting_until
    assert first.election.is_leader() and acting_until is not None
    # Time jumps past the acting deadline with no task run in between (a stalled
    # event loop): is_leader() says no before the deadline timer has fired.
    clock._now = acting_until
    assert not first.election.is_leader() and first.election.term is None
    assert first.lost == []


class SwallowingStore(MemoryStore):
    """A store whose watch swallows the first cancellation, as Python 3.11's
    asyncio.wait_for can when the cancellation races with its result."""

    async def watch_prefix(self, prefix, start_revision):
        swallowed = False
        inner = super().watch_prefix(prefix, start_revision)
        while True:
            try:
                event = await anext(inner)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
                inner = super().watch_prefix(prefix, self.server.revision + 1)  # nothing to replay
                continue
            yield event


async def test_close_ends_its_tasks_even_when_a_cancellation_is_swallowed(server, clock):
    election = LeaderElection(SwallowingStore(server), KEYS, "pg1", TTL, clock=clock)
    election.start()
    await clock.settle()
    assert election.is_leader()
    await asyncio.wait_for(election.close(), 10)  # a bound for a hung test
    assert not election.is_leader()
    assert (await server.client().get(KEYS.leader)).first is None
