"""The barrier's bookkeeping, pure: who is awaited, who acknowledged when, who
vanished, and the conservative cases (corrupt records, members that appear or come
back with an older epoch, an acknowledgement taken back)."""

from __future__ import annotations

from pgroute.cluster.barrier import BarrierTracker, applied_epoch
from pgroute.cluster.keys import Keys
from pgroute.cluster.members import MemberRecord, encode_member
from pgroute.cluster.store import KeyValue

KEYS = Keys("/pgroute/test")


def test_members_already_at_the_epoch_ack_at_zero_and_the_rest_are_awaited():
    tracker = BarrierTracker(5, started=100.0)
    tracker.snapshot({"a": 5, "b": 6, "c": 4}, now=100.0)
    assert tracker.awaited == {"c"} and not tracker.done
    tracker.record("c", 5, now=101.5)
    assert tracker.done
    result = tracker.result(now=102.0)
    assert result.complete and result.missing == ()
    assert result.acked == {"a": 0.0, "b": 0.0, "c": 1.5}
    assert result.expired == {} and result.elapsed == 2.0


def test_a_member_whose_record_vanishes_is_expired_not_acked():
    tracker = BarrierTracker(5, started=0.0)
    tracker.snapshot({"a": 4, "b": 4}, now=0.0)
    tracker.record("a", 5, now=0.5)
    tracker.vanished("b", now=3.0)
    result = tracker.result(now=3.0)
    assert result.complete
    assert result.acked == {"a": 0.5} and result.expired == {"b": 3.0}
    # Leaving after acknowledging changes nothing.
    tracker.vanished("a", now=4.0)
    assert tracker.result(now=4.0).acked == {"a": 0.5}


def test_at_the_timeout_the_result_names_the_missing_members():
    tracker = BarrierTracker(9, started=0.0)
    tracker.snapshot({"a": 8, "b": 8, "c": 8}, now=0.0)
    tracker.record("a", 9, now=0.1)
    result = tracker.result(now=2.0)
    assert not result.complete and result.missing == ("b", "c")
    assert "still missing after 2.00s: b, c" in result.describe()
    assert "acked a 0.10s" in result.describe()


def test_an_unreadable_record_is_awaited():
    tracker = BarrierTracker(2, started=0.0)
    tracker.snapshot({"a": None}, now=0.0)
    assert tracker.awaited == {"a"}
    tracker.record("a", None, now=1.0)
    assert tracker.awaited == {"a"}
    tracker.record("a", 2, now=2.0)
    assert tracker.done


def test_members_that_appear_or_return_with_an_older_epoch_are_awaited():
    tracker = BarrierTracker(3, started=0.0)
    tracker.snapshot({"a": 3}, now=0.0)
    assert tracker.done
    tracker.record("new", 2, now=0.5)  # joined during the wait, not yet at epoch 3
    assert tracker.awaited == {"new"}
    tracker.vanished("new", now=1.0)
    tracker.record("new", 1, now=1.5)  # back under a new lease, still old
    assert tracker.awaited == {"new"} and tracker.result(1.5).expired == {}
    tracker.record("new", 3, now=2.0)
    assert tracker.done and tracker.result(2.0).acked["new"] == 2.0


def test_an_acknowledgement_taken_back_is_awaited_again_and_rewrites_keep_the_first_time():
    tracker = BarrierTracker(3, started=0.0)
    tracker.snapshot({"a": 2}, now=0.0)
    tracker.record("a", 3, now=1.0)
    tracker.record("a", 4, now=2.0)  # a later rewrite (health, paused): same ack
    assert tracker.result(2.0).acked == {"a": 1.0}
    tracker.record("a", 2, now=3.0)  # restarted with an older epoch
    assert tracker.awaited == {"a"}


def test_a_re_read_finds_awaited_members_gone():
    tracker = BarrierTracker(3, started=0.0)
    tracker.snapshot({"a": 2, "b": 2}, now=0.0)
    tracker.snapshot({"a": 3}, now=1.0)  # after the watch lost history: b is gone
    result = tracker.result(1.0)
    assert result.complete and result.acked == {"a": 1.0} and result.expired == {"b": 1.0}


def test_applied_epoch_of_member_keys():
    kv = KeyValue(KEYS.member("a"), encode_member(MemberRecord("a", 7)), 1, 2, 1)
    assert applied_epoch(KEYS, kv) == ("a", 7)
    assert applied_epoch(KEYS, KeyValue(KEYS.member("a"), b"junk", 1, 2, 1)) == ("a", None)
    assert applied_epoch(KEYS, KeyValue(KEYS.route, b"{}", 1, 2, 1)) is None
