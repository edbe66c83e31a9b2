"""The route record: its JSON form and validation (a corrupt record is an error naming
the key, never "no route"), and RouteWriter's refusals that need no store (an epoch
going down, a write before any read) and its reading of a failed compare-and-set."""

from __future__ import annotations

import json

import pytest

from pgroute.cluster.keys import Keys
from pgroute.cluster.records import CorruptRecord
from pgroute.cluster.route import (
    EpochRegression,
    Route,
    RouteSeen,
    RouteWriter,
    _put_guarded,
    decode_route,
    encode_route,
    route_seen,
)
from pgroute.cluster.store import Compare, CompareFailed, KeyValue, Read, TxnResult
from pgroute.model import NodeName

KEYS = Keys("/pgroute/test")
KEY = KEYS.route


def raw(**fields) -> bytes:
    data = {"epoch": 3, "active": "mirror", "paused": False}
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_a_route_survives_its_encoding():
    route = Route(
        epoch=2**63 - 1,
        active=NodeName.MIRROR,
        paused=True,
        reason="failover: primary down",
        active_lsn=2**64 - 1,
        updated_at=1700000000.5,
        leader="pg-a",
    )
    assert decode_route(KEY, encode_route(route)) == route
    nowhere = Route(epoch=0, active=None)
    assert decode_route(KEY, encode_route(nowhere)) == nowhere
    assert json.loads(encode_route(nowhere))["active"] is None


def test_optional_fields_default_and_unknown_fields_are_ignored():
    route = decode_route(KEY, raw(future_field={"x": 1}))
    assert route == Route(epoch=3, active=NodeName.MIRROR)


@pytest.mark.parametrize(
    "value, why",
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (raw(epoch=...), "epoch is missing"),
        (raw(epoch=True), "epoch True is not an integer"),
        (raw(epoch=1.0), "epoch 1.0 is not an integer"),
        (raw(epoch=-1), "epoch -1 is not an integer"),
        (raw(epoch=2**63), f"epoch {2**63} is not an integer"),
        (raw(epoch="3"), "epoch '3' is not an integer"),
        (raw(active=...), "active is missing"),
        (raw(active="standby"), "active 'standby' is not a node"),
        (raw(paused=...), "paused is missing"),
        (raw(paused=0), "paused 0 is not true or false"),
        (raw(active_lsn=-5), "active_lsn -5 is not a WAL position"),
        (raw(active_lsn=2**64), "is not a WAL position"),
        (raw(updated_at=True), "updated_at True is not a time"),
        (raw(leader=7), "leader 7 is not a string"),
        (raw(reason=None), "reason None is not a string"),
    ],
)
def test_a_corrupt_route_is_an_error_naming_the_key(value, why):
    with pytest.raises(CorruptRecord) as caught:
        decode_route(KEY, value)
    assert caught.value.key == KEY
    assert KEY in str(caught.value) and why in str(caught.value)


def test_routes_that_cannot_be_stored_are_refused_when_built():
    for bad in (True, -1, 2**63, 1.5):
        with pytest.raises(ValueError, match="epoch"):
            Route(epoch=bad, active=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="active_lsn"):
        Route(epoch=1, active=None, active_lsn=-1)
    with pytest.raises(ValueError, match="updated_at"):
        Route(epoch=1, active=None, updated_at=float("nan"))


def test_a_reader_reports_a_corrupt_route_instead_of_an_absent_one():
    absent = route_seen(KEY, None, 10)
    assert absent == RouteSeen(None, 0, 10)
    corrupt = route_seen(KEY, KeyValue(KEY, b"{", 5, 7, 2), 10)
    assert corrupt.route is None and corrupt.mod_revision == 7
    assert corrupt.problem is not None and KEY in corrupt.problem


class NoStore:
    """Any call is a failure of the test: the refusals happen before I/O."""

    def __getattr__(self, name):
        raise AssertionError(f"store.{name} called")


async def test_the_writer_refuses_a_lower_epoch_before_any_write():
    writer = RouteWriter(NoStore(), KEYS, "pg-a")
    with pytest.raises(RuntimeError, match="before read"):
        await writer.write(Route(epoch=1, active=NodeName.PRIMARY))
    writer._seen = RouteSeen(Route(epoch=5, active=NodeName.MIRROR), 40, 41)
    with pytest.raises(EpochRegression, match="epoch 4: the route is already at epoch 5"):
        await writer.write(Route(epoch=4, active=NodeName.PRIMARY))


class OneTxn:
    """A store whose one transaction fails with the given reads (failure branch)."""

    def __init__(self, *reads: KeyValue | None) -> None:
        self.reads = reads

    async def txn(self, compares, success, failure=(), *, timeout=None) -> TxnResult:
        assert len(failure) == len(self.reads)
        return TxnResult(False, 99, tuple(Read((kv,) if kv else (), 99) for kv in self.reads))


async def test_a_failed_write_names_the_key_whose_compare_failed():
    leader = KEYS.leader
    checks = (Compare.mod_revision(KEY, 40), Compare.lease_is(leader, 7))
    moved = KeyValue(KEY, b"other", 1, 45, 3)
    with pytest.raises(CompareFailed) as route_moved:
        await _put_guarded(OneTxn(moved, None), KEY, b"mine", checks, None)  # type: ignore[arg-type]
    assert route_moved.value.key == KEY and route_moved.value.current == moved
    unchanged = KeyValue(KEY, b"old", 1, 40, 2)
    someone_else = KeyValue(leader, b"pg-b", 50, 50, 1, lease=8)
    with pytest.raises(CompareFailed) as deposed:
        await _put_guarded(OneTxn(unchanged, someone_else), KEY, b"mine", checks, None)  # type: ignore[arg-type]
    assert deposed.value.key == leader and deposed.value.current == someone_else
    # A retried attempt that finds its own bytes: the first attempt was applied.
    mine = KeyValue(KEY, b"mine", 1, 46, 3)
    assert await _put_guarded(OneTxn(mine, None), KEY, b"mine", checks, None) == 46  # type: ignore[arg-type]


def test_a_hold_keeps_the_route_it_holds_and_a_successor_starts_from_it(tmp_path):
    from pgroute.cluster_control import ClusterStateFile
    from pgroute.control.state_store import Stored

    hold = Route(epoch=8, active=None, paused=True, active_lsn=1234, held_active=NodeName.PRIMARY, held_epoch=7)
    assert decode_route(KEY, encode_route(hold)) == hold
    assert hold.is_hold and hold.holding() == (NodeName.PRIMARY, 7)
    assert "held_active" not in json.loads(encode_route(Route(epoch=1, active=NodeName.MIRROR)))
    with pytest.raises(CorruptRecord, match="held_active"):
        decode_route(KEY, raw(held_active="elsewhere"))
    path = str(tmp_path / "state.json")
    # A hold claims the route it held, at that route's epoch, with its WAL position.
    assert ClusterStateFile(path, RouteSeen(hold, 5, 5)).load() == Stored(7, NodeName.PRIMARY, 1234)
    # A hold that holds nothing (a first switch) is no claim; a route is its own.
    bare = Route(epoch=8, active=None, paused=True)
    assert ClusterStateFile(path, RouteSeen(bare, 5, 5)).load() is None
    routed = Route(epoch=8, active=NodeName.MIRROR, active_lsn=9)
    assert ClusterStateFile(path, RouteSeen(routed, 5, 5)).load() == Stored(8, NodeName.MIRROR, 9)
    saved: list[Stored] = []
    state = ClusterStateFile(path, RouteSeen(routed, 5, 5), on_save=saved.append)
    state.save(Stored(8, NodeName.MIRROR, 10))
    assert saved == [Stored(8, NodeName.MIRROR, 10)]


async def test_write_if_refuses_when_the_route_moved_meanwhile():
    from pgroute.cluster.route import RouteChanged

    writer = RouteWriter(NoStore(), KEYS, "pg-a")
    paused = Route(epoch=5, active=NodeName.MIRROR, paused=True)
    writer._seen = RouteSeen(paused, 40, 41)
    with pytest.raises(RouteChanged):
        await writer.write_if(Route(epoch=5, active=NodeName.MIRROR), Route(epoch=5, active=NodeName.MIRROR))
