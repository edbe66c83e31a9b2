"""LeaderElection on a real 3-member etcd (pgroute.local.etcd), each candidate with its
own EtcdStore as if in its own process: one leader among three; a killed leader
replaced once its lease has expired; a clean stop handed over at once; all of etcd
hung (SIGSTOP): the leader stops acting before its lease deadline and nobody else
takes over until etcd is back; one etcd member lost: nothing changes.

Durations are printed (run with -s), not asserted, except generous bounds; what is
asserted are orderings on the monotonic clock, which the lease discipline
guarantees whatever the machine's load."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.leader import LeaderElection, Term

pytestmark = [pytest.mark.integration]

TTL = 3.0  # loop_wait 1 s, retry_timeout 1 s, margin 0.5 s


@dataclass
class Candidate:
    name: str
    store: EtcdStore
    election: LeaderElection
    elected: list[tuple[float, Term]] = field(default_factory=list)
    lost: list[tuple[float, Term, str, float | None]] = field(default_factory=list)


@pytest.fixture
async def candidates(etcd):
    """``make(name, endpoints=None, ttl=TTL)``: a started candidate on its own store."""
    made: list[Candidate] = []
    keys = Keys(f"/pgroute/test-{uuid.uuid4().hex[:6]}")

    def make(name: str, endpoints: list[str] | None = None, ttl: float = TTL) -> Candidate:
        store = EtcdStore(endpoints or etcd.endpoints, timeout=2.0)
        holder: list[Candidate] = []

        def elected(term: Term) -> None:
            holder[0].elected.append((time.monotonic(), term))

        def lost(term: Term, reason: str) -> None:
            now = time.monotonic()
            holder[0].lost.append((now, term, reason, holder[0].election.last_lease_deadline))

        election = LeaderElection(store, keys, name, ttl, api=f"http://{name}:5000", on_elected=elected, on_lost=lost)
        candidate = Candidate(name, store, election)
        holder.append(candidate)
        made.append(candidate)
        election.start()
        return candidate

    yield make
    for member in etcd.members:  # a test may leave etcd paused
        if member.paused:
            member.resume()
    for candidate in made:
        await candidate.election.close(release=False)
        await candidate.store.close()


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Until ``predicate()`` holds; a bound for a hung test, not a measurement."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def acting(cands: list[Candidate]) -> list[Candidate]:
    return [c for c in cands if c.election.is_leader()]


async def test_three_candidates_elect_exactly_one_leader(candidates):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await wait_until(lambda: len(acting(cands)) == 1, 5 * TTL, "a leader")
    (leader,) = acting(cands)
    await wait_until(
        lambda: all((c.election.current_leader() or c).name == leader.name for c in cands), TTL, "all agree"
    )
    await asyncio.sleep(TTL)  # a few renewals later: still the one leader, one term
    assert acting(cands) == [leader]
    assert sum(len(c.elected) for c in cands) == 1
    assert not any(c.lost for c in cands)
    info = cands[0].election.current_leader()
    assert info is not None and info.term == leader.elected[0][1].number and info.api == f"http://{leader.name}:5000"


async def test_a_killed_leader_is_replaced_once_its_lease_has_expired(candidates):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await wait_until(lambda: len(acting(cands)) == 1, 5 * TTL, "a leader")
    (old,) = acting(cands)
    await asyncio.sleep(1.5)  # at least one renewal
    deadline = old.election.lease_deadline
    assert deadline is not None
    killed_at = time.monotonic()
    await old.election.close(release=False)  # its tasks end, its lease is not revoked
    rest = [c for c in cands if c is not old]
    await wait_until(lambda: len(acting(rest)) == 1, 3 * TTL, "a new leader")
    (new,) = acting(rest)
    elected_at = new.elected[0][0]
    print(f"\nleader killed -> new leader acting: {elected_at - killed_at:.2f}s (ttl {TTL:g}s)")
    # etcd cannot have expired the lease before its deadline: no overlap.
    assert elected_at >= deadline
    assert new.elected[0][1].number > old.elected[0][1].number


async def test_a_clean_stop_hands_over_before_the_lease_could_expire(candidates):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await wait_until(lambda: len(acting(cands)) == 1, 5 * TTL, "a leader")
    (old,) = acting(cands)
    deadline = old.election.lease_deadline
    assert deadline is not None
    stopped_at = time.monotonic()
    await old.election.close()  # revokes the lease
    assert old.lost[-1][2] == "stopped"
    rest = [c for c in cands if c is not old]
    await wait_until(lambda: len(acting(rest)) == 1, 3 * TTL, "a new leader")
    (new,) = acting(rest)
    elected_at = new.elected[0][0]
    print(f"\nclean stop -> new leader acting: {elected_at - stopped_at:.3f}s (ttl {TTL:g}s)")
    assert elected_at < deadline  # the watch, not the TTL, started the campaign


async def test_all_of_etcd_hung_the_leader_stops_acting_before_its_deadline_and_nobody_takes_over(etcd, candidates):
    cands = [candidates(f"pg{i}") for i in range(1, 4)]
    await wait_until(lambda: len(acting(cands)) == 1, 5 * TTL, "a leader")
    (leader,) = acting(cands)
    await asyncio.sleep(1.2)
    for member in etcd.members:
        member.pause()
    paused_at = time.monotonic()
    try:
        await wait_until(lambda: bool(leader.lost), 2 * TTL, "the leader steps down")
        lost_at, term, reason, deadline = leader.lost[0]
        assert deadline is not None
        print(f"\netcd hung -> leader stopped acting after {lost_at - paused_at:.2f}s, ", end="")
        print(f"{deadline - lost_at:.2f}s before its lease deadline")
        assert lost_at < deadline
        assert "not renewed" in reason
        await asyncio.sleep(max(deadline - time.monotonic(), 0) + 1.0)  # past the deadline
        assert acting(cands) == []
    finally:
        resumed_at = time.monotonic()
        for member in etcd.members:
            member.resume()
    assert sum(len(c.elected) for c in cands) == 1  # nobody was elected during the outage
    await wait_until(lambda: len(acting(cands)) == 1, 5 * TTL, "a leader after etcd resumed")
    (new,) = acting(cands)
    print(f"etcd resumed -> a leader acting after {new.elected[-1][0] - resumed_at:.2f}s ({new.name})")
    assert new.elected[-1][1].number > term.number


@pytest.mark.parametrize("which", ["follower", "raft-leader"])
async def test_losing_one_etcd_member_changes_nothing(etcd, candidates, which):
    raft_leader = etcd.leader()
    victim = raft_leader if which == "raft-leader" else etcd.followers()[0]
    # Every candidate talks to the victim first, so each has to fail over.
    endpoints = [victim.endpoint] + [e for e in etcd.endpoints if e != victim.endpoint]
    # Killing the raft leader costs an etcd election (about a second at etcd's
    # defaults) during which no renewal succeeds: a longer TTL absorbs it, as the
    # default TTL of 10 s does in production.
    ttl = TTL if which == "follower" else 6.0
    cands = [candidates(f"pg{i}", endpoints, ttl) for i in range(1, 4)]
    await wait_until(lambda: len(acting(cands)) == 1, 5 * ttl, "a leader")
    (leader,) = acting(cands)
    await asyncio.sleep(1.0)
    victim.kill()
    await asyncio.sleep(ttl + 1.0)
    assert acting(cands) == [leader]
    assert sum(len(c.elected) for c in cands) == 1
    assert not any(c.lost for c in cands)
