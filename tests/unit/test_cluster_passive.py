"""Passive health signals in a cluster (pgroute/cluster/passive.py): the signal's
form in a member record, a member's rate limit and clearing (`SignalBook`), which
signals make the leader probe (`SignalJudge`), and the controller's hook that
probes only the active node at its own epoch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from pgroute.cluster.keys import Keys
from pgroute.cluster.members import Members, Membership
from pgroute.cluster.memory_store import MemoryServer, MemoryStore
from pgroute.cluster.passive import (
    MAX_ERROR,
    UNREACHABLE,
    SignalBook,
    SignalJudge,
    SignalReporter,
    Unreachable,
    signal_of,
    with_signal,
)
from pgroute.control.state_store import Stored
from pgroute.model import NodeName

from .test_controller import FOLLOWING_PAIR, make, sample

P, M = NodeName.PRIMARY, NodeName.MIRROR
KEYS = Keys("/pgroute/test")
WALL = 1_800_000_000.0


def sig(node: NodeName = P, epoch: int = 3, at: float = WALL, count: int = 1) -> Unreachable:
    return Unreachable(node, epoch, since=WALL, at=at, count=count, error="connection refused")


# ----------------------------------------------------------------- the record's form


def test_a_signal_survives_the_member_record_and_keeps_other_health_entries():
    s = sig(count=4, at=WALL + 2.5)
    health = with_signal({"other": 1}, s)
    assert health == {"other": 1, UNREACHABLE: s.to_json()}
    assert signal_of(health) == s
    assert with_signal(health, None) == {"other": 1}
    assert signal_of({}) is None


@pytest.mark.parametrize(
    "raw",
    [
        "primary",
        {"node": "standby", "epoch": 1, "since": WALL, "at": WALL, "count": 1, "error": ""},
        {"node": "primary", "epoch": -1, "since": WALL, "at": WALL, "count": 1, "error": ""},
        {"node": "primary", "epoch": True, "since": WALL, "at": WALL, "count": 1, "error": ""},
        {"node": "primary", "epoch": 1, "since": "now", "at": WALL, "count": 1, "error": ""},
        {"node": "primary", "epoch": 1, "since": WALL, "at": WALL, "count": 1, "error": None},
        {"node": "primary", "epoch": 1, "since": WALL, "at": WALL},
    ],
)
def test_a_signal_that_does_not_parse_is_no_signal(raw):
    assert signal_of({UNREACHABLE: raw}) is None


async def test_a_signal_written_by_a_member_is_read_back_by_the_others():
    server = MemoryServer()
    membership = Membership(MemoryStore(server), KEYS, "b", 10.0, epoch=3)
    await membership.start()
    s = sig(count=2)
    await membership.update(health=with_signal(membership.record.health, s))
    await membership.update(epoch=4)  # an acknowledgement keeps the signal
    (member,) = await Members(MemoryStore(server), KEYS).list()
    assert member.record.epoch == 4 and signal_of(member.record.health) == s
    await membership.close()


# ----------------------------------------------------------------- a member's side


def test_the_first_failure_is_written_at_once_then_at_most_once_per_interval():
    book = SignalBook(every=1.0, quiet=5.0)
    assert book.due(0.0) is None  # nothing to say
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    assert book.due(10.0) == 0.0
    first = book.wanted(10.0)
    assert first is not None and (first.node, first.epoch, first.count) == (P, 3, 1)
    book.written(first, 10.0)
    assert book.due(10.0) == pytest.approx(5.0)  # up to date until it goes quiet
    book.failed(P, 3, "refused", now=10.2, wall=WALL + 0.2)
    assert book.due(10.2) == pytest.approx(0.8)  # changed, but written 0.2 s ago
    later = book.wanted(11.0)
    assert later is not None and later.count == 2 and later.since == WALL and later.at == WALL + 0.2
    assert book.due(11.0) == 0.0


def test_a_flood_of_failed_connects_makes_few_writes():
    book = SignalBook(every=0.2, quiet=5.0)
    writes: list[Unreachable | None] = []
    now = 100.0
    for _ in range(20_000):  # one failed connect a millisecond for 20 s
        now += 0.001
        book.failed(P, 3, "refused", now=now, wall=WALL + now)
        if book.due(now) == 0.0:
            signal = book.wanted(now)
            book.written(signal, now)
            writes.append(signal)
    assert 20 / 0.2 - 2 <= len(writes) <= 20 / 0.2 + 1
    last = writes[-1]
    assert last is not None and last.count >= 20_000 - 200 and last.since == WALL + 100.001


def test_a_signal_clears_once_connects_stop_failing():
    book = SignalBook(every=1.0, quiet=5.0)
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    book.written(book.wanted(10.0), 10.0)
    assert book.wanted(14.9) is not None
    assert book.wanted(15.0) is None
    assert book.due(15.0) == 0.0  # the record must be cleared
    book.written(None, 15.0)
    assert book.due(16.0) is None
    # A failure after the quiet period starts a new signal.
    book.failed(P, 3, "refused", now=30.0, wall=WALL + 20)
    again = book.wanted(30.0)
    assert again is not None and again.count == 1 and again.since == WALL + 20


def test_a_route_change_ends_a_signal_about_the_old_route():
    book = SignalBook(every=1.0, quiet=5.0)
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    book.moved(3, P)  # the same route: still failing
    assert book.wanted(10.0) is not None
    book.moved(4, M)  # failed over
    assert book.wanted(10.0) is None
    book.failed(M, 4, "refused", now=11.0, wall=WALL)
    book.moved(4, None)  # failed closed: no node to complain about
    assert book.wanted(11.0) is None


def test_another_node_or_epoch_starts_a_new_signal_and_errors_are_cut():
    book = SignalBook(every=1.0, quiet=5.0)
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    book.failed(P, 4, "x" * 1000, now=10.1, wall=WALL + 1)
    s = book.wanted(10.1)
    assert s is not None and (s.epoch, s.count, s.since, len(s.error)) == (4, 1, WALL + 1, MAX_ERROR)


def test_a_new_record_is_written_again():
    book = SignalBook(every=1.0, quiet=5.0)
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    book.written(book.wanted(10.0), 10.0)
    book.forget_written()  # the member record was re-created, empty
    assert book.due(11.0) == 0.0


def test_a_failed_write_is_retried_after_the_interval():
    book = SignalBook(every=1.0, quiet=5.0)
    book.failed(P, 3, "refused", now=10.0, wall=WALL)
    book.attempted(10.0)
    assert book.due(10.5) == pytest.approx(0.5)
    assert book.due(11.0) == 0.0


def test_quiet_must_outlast_the_write_interval():
    with pytest.raises(ValueError):
        SignalBook(every=1.0, quiet=1.0)


# ----------------------------------------------------------------- the leader's side


def test_a_signal_about_the_active_node_at_the_epoch_asks_for_a_probe_once():
    judge = SignalJudge("a")
    s = sig()
    assert judge.to_probe([("b", s), ("c", None)], 3, P) == [("b", s)]
    assert judge.to_probe([("b", s), ("c", None)], 3, P) == []  # acted on already
    newer = sig(at=WALL + 1, count=2)
    assert judge.to_probe([("b", newer)], 3, P) == [("b", newer)]
    assert judge.to_probe([("b", s)], 3, P) == []  # an older copy (a lagging read)


@pytest.mark.parametrize(
    ("signal", "epoch", "active"),
    [
        (sig(P, 2), 3, P),  # from before a switch
        (sig(P, 3), 4, M),  # about the node failed over from
        (sig(M, 3), 3, P),  # about the other node
        (sig(P, 3), 3, None),  # no node routed: nothing to probe
    ],
    ids=["old-epoch", "old-active", "other-node", "no-active"],
)
def test_a_signal_about_another_epoch_or_node_triggers_nothing(signal, epoch, active):
    judge = SignalJudge("a")
    assert judge.to_probe([("b", signal)], epoch, active) == []


def test_the_leaders_own_signal_is_left_to_its_controller():
    assert SignalJudge("a").to_probe([("a", sig())], 3, P) == []


def test_a_member_that_left_and_came_back_is_heard_again():
    judge = SignalJudge("a")
    s = sig()
    assert judge.to_probe([("b", s)], 3, P) == [("b", s)]
    assert judge.to_probe([], 3, P) == []
    assert judge.to_probe([("b", s)], 3, P) == [("b", s)]


# ----------------------------------------------------------------- the controller's hook


async def test_the_controller_probes_its_active_node_for_a_member_signal_at_its_epoch(tmp_path):
    ctl, _ex, mon, _router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P), retry_interval=60.0)
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    assert ctl.state.active is P and ctl.state.epoch == 3
    mon.soon.clear()
    assert not ctl.on_member_signal("b", P, 2, "refused")  # an older epoch
    assert not ctl.on_member_signal("b", M, 3, "refused")  # not the active node
    assert mon.soon == []
    assert ctl.on_member_signal("b", P, 3, "refused")
    assert mon.soon == [P]
    assert not ctl.on_member_signal("c", P, 3, "refused")  # within retry_interval of the last
    assert mon.soon == [P]
    await ctl.close()


async def test_a_member_signal_while_confirming_probes_run_changes_nothing(tmp_path):
    ctl, _ex, mon, _router = await make(tmp_path, FOLLOWING_PAIR, Stored(3, P))
    await ctl.on_sample(sample(P, True, publisher_lag_bytes=0))
    await ctl.on_sample(sample(P, False))  # a failed probe: the confirming probes run
    assert mon.confirms == [(P, 2)]
    mon.soon.clear()
    assert not ctl.on_member_signal("b", P, 3, "refused")
    assert mon.soon == []
    # A signal never fails over by itself: only the confirming probes do.
    assert ctl.state.active is P and ctl.state.epoch == 3
    await ctl.close()


# ----------------------------------------------------------------- the reporter, on a store


async def _record_signal(
    server: MemoryServer, name: str, want: Callable[[Unreachable | None], bool]
) -> Unreachable | None:
    """The member's signal once ``want(signal)`` holds (bounded: 200 yields of 10 ms)."""
    members = Members(MemoryStore(server), KEYS)
    for _ in range(200):
        member = await members.get(name)
        signal = signal_of(member.record.health) if member is not None else None
        if want(signal):
            return signal
        await asyncio.sleep(0.01)
    raise AssertionError(f"the record never showed the signal wanted (last: {signal})")


async def test_the_reporter_writes_a_flood_as_one_signal_and_clears_it_when_the_route_moves():
    server = MemoryServer()
    membership = Membership(MemoryStore(server), KEYS, "b", 10.0, epoch=3)
    await membership.start()
    current: list[Membership | None] = [membership]
    reporter = SignalReporter(SignalBook(every=0.05, quiet=60.0), lambda: current[0], timeout=1.0)
    task = asyncio.create_task(reporter.run())
    try:
        for _ in range(1000):  # one burst, no yield in between: one write
            reporter.failed(P, 3, "refused")
        s = await _record_signal(server, "b", lambda s: s is not None)
        assert s is not None and (s.node, s.epoch, s.count) == (P, 3, 1000)
        reporter.moved(4, M)
        await _record_signal(server, "b", lambda s: s is None)
        # Cut off (no record to write to): the signal waits, then goes to the new record.
        current[0] = None
        reporter.moved(4, P)
        reporter.failed(P, 4, "refused")
        await membership.close()
        fresh = Membership(MemoryStore(server), KEYS, "b", 10.0, epoch=4)
        await fresh.start()
        current[0] = fresh
        s = await _record_signal(server, "b", lambda s: s is not None)
        assert s is not None and (s.node, s.epoch, s.count) == (P, 4, 1)
        await fresh.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
