"""Member records: their JSON form and validation, immutability, and the name
collision error's message."""

from __future__ import annotations

import json

import pytest

from pgroute.cluster.keys import Keys
from pgroute.cluster.members import MemberRecord, NameInUse, decode_member, encode_member, member_of
from pgroute.cluster.records import CorruptRecord
from pgroute.cluster.store import KeyValue

KEYS = Keys("/pgroute/test")


def test_a_member_record_survives_its_encoding():
    record = MemberRecord(
        "pg-a",
        7,
        paused=True,
        proxy="10.0.0.1:6432",
        api="10.0.0.1:5000",
        started_at=1700000000.0,
        updated_at=1700000001.25,
        health={"connect_failures": {"primary": 3}},
    )
    assert decode_member(KEYS.member("pg-a"), encode_member(record), "pg-a") == record
    assert json.loads(encode_member(MemberRecord("b", 0)))["health"] == {}


def test_a_record_is_immutable_health_included():
    record = MemberRecord("pg-a", 1, health={"x": 1})
    with pytest.raises(TypeError):
        record.health["x"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        record.epoch = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, why",
    [
        ({"name": "pg-b", "epoch": 1, "paused": False}, "name 'pg-b' is not the key's ('pg-a')"),
        ({"epoch": 1, "paused": False}, "name is missing"),
        ({"name": "pg-a", "epoch": True, "paused": False}, "epoch True is not an integer"),
        ({"name": "pg-a", "epoch": -1, "paused": False}, "epoch -1 is not an integer"),
        ({"name": "pg-a", "paused": False}, "epoch is missing"),
        ({"name": "pg-a", "epoch": 1, "paused": "no"}, "paused 'no' is not true or false"),
        ({"name": "pg-a", "epoch": 1, "paused": False, "health": []}, "health [] is not an object"),
        ({"name": "pg-a", "epoch": 1, "paused": False, "proxy": 6432}, "proxy 6432 is not a string"),
        ({"name": "pg-a", "epoch": 1, "paused": False, "started_at": -1}, "started_at -1 is not a time"),
    ],
)
def test_a_corrupt_member_record_is_an_error_naming_the_key(data, why):
    key = KEYS.member("pg-a")
    with pytest.raises(CorruptRecord) as caught:
        decode_member(key, json.dumps(data).encode(), "pg-a")
    assert caught.value.key == key and why in str(caught.value)


def test_member_of_reads_member_keys_only():
    record = MemberRecord("pg-a", 2)
    kv = KeyValue(KEYS.member("pg-a"), encode_member(record), 5, 9, 3, lease=0x1F)
    member = member_of(KEYS, kv)
    assert member is not None and (member.name, member.mod_revision, member.lease) == ("pg-a", 9, 0x1F)
    assert member_of(KEYS, KeyValue(KEYS.leader, b"x", 1, 1, 1)) is None
    with pytest.raises(CorruptRecord):
        member_of(KEYS, KeyValue(KEYS.member("pg-a"), b"{}", 1, 1, 1))


def test_the_name_collision_error_says_who_holds_the_name():
    key = KEYS.member("pg-a")
    record = MemberRecord("pg-a", 2, proxy="10.0.0.2:6432", api="10.0.0.2:5000", started_at=1700000000)
    error = NameInUse(key, KeyValue(key, encode_member(record), 5, 9, 3, lease=0xAB))
    text = str(error)
    assert key in text and "lease ab" in text and "10.0.0.2:6432" in text and "[cluster] name" in text
    assert "unreadable record" in str(NameInUse(key, KeyValue(key, b"?", 5, 9, 3, lease=1)))
