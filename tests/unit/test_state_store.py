"""The persisted routing state (``StateFile``) and start-up resolution (``resolve_start``).

resolve_start is pure: each case gives the state file's content (or None) and what
pgroute could read from each node, and asserts the active node, the epoch and the
reason. Fail closed: when it cannot tell which node is current, active is None.
"""

from __future__ import annotations

import json
import os

import pytest

from pgroute.control import state_store
from pgroute.control.state_store import NodeView, Resolution, StateFile, Stored, resolve_start
from pgroute.model import NodeName

P, M = NodeName.PRIMARY, NodeName.MIRROR


# -- StateFile ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [Stored(0, P), Stored(7, M), Stored(3, None)],
    ids=["primary-epoch-0", "mirror-epoch-7", "no-node-epoch-3"],
)
def test_state_file_round_trip(tmp_path, stored):
    f = StateFile(tmp_path / "pgroute-state.json")
    f.save(stored)
    assert f.load() == stored
    assert StateFile(str(tmp_path / "pgroute-state.json")).load() == stored
    data = json.loads((tmp_path / "pgroute-state.json").read_text())
    assert data["epoch"] == stored.epoch
    assert data["active"] == (stored.active.value if stored.active else None)


def test_state_file_missing_is_none(tmp_path):
    assert StateFile(tmp_path / "absent.json").load() is None


def test_state_file_save_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "pgroute-state.json"
    f = StateFile(path)
    f.save(Stored(1, M))
    first_inode = path.stat().st_ino
    f.save(Stored(2, P))
    # A new file renamed over the old one, never an in-place rewrite.
    assert path.stat().st_ino != first_inode
    assert f.load() == Stored(2, P)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgroute-state.json"]


def test_state_file_fsyncs_file_before_rename_and_directory_after(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(state_store.os, "fsync", fsync)
    monkeypatch.setattr(state_store.os, "replace", replace)
    StateFile(tmp_path / "s.json").save(Stored(1, M))
    assert calls == ["fsync-file", "replace", "fsync-dir"]


def test_state_file_failed_save_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "pgroute-state.json"
    f = StateFile(path)
    f.save(Stored(1, M))

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_store.os, "replace", boom)
    with pytest.raises(OSError):
        f.save(Stored(2, P))
    assert f.load() == Stored(1, M)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgroute-state.json"]


def test_state_file_creates_its_directory(tmp_path):
    f = StateFile(tmp_path / "var" / "lib" / "pgroute" / "state.json")
    f.save(Stored(4, M))
    assert f.load() == Stored(4, M)


def test_state_file_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = StateFile("pgroute-state.json")
    f.save(Stored(5, P))
    assert f.load() == Stored(5, P)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgroute-state.json"]


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        "",
        '{"epoch": 1, "active": "mir',
        b"\xff\xfe\x00garbage",
        '{"epoch": "one", "active": "mirror"}',
        '{"epoch": 1, "active": "replica"}',
        '{"active": "mirror"}',
        '[1, "mirror"]',
        "null",
        '{"epoch": null, "active": "mirror"}',
        '{"epoch": 1e400, "active": "mirror"}',
        '{"epoch": 1.9, "active": "mirror"}',
        '{"epoch": 2.0, "active": "mirror"}',
        '{"epoch": -1, "active": "mirror"}',
        '{"epoch": true, "active": "mirror"}',
        '{"epoch": "3", "active": "mirror"}',
        '{"epoch": 9223372036854775808, "active": "mirror"}',
        '{"epoch": 3, "active": 1}',
        '{"epoch": 3, "active": "mirror", "active_lsn": -1}',
        '{"epoch": 3, "active": "mirror", "active_lsn": 1.5}',
        '{"epoch": 3, "active": "mirror", "active_lsn": true}',
        '{"epoch": 3, "active": "mirror", "active_lsn": "0/16B3748"}',
        '{"epoch": 3, "active": "mirror", "active_lsn": 18446744073709551616}',
    ],
    ids=[
        "garbage",
        "empty",
        "truncated",
        "binary",
        "epoch-not-a-number",
        "unknown-node",
        "missing-epoch",
        "json-list",
        "json-null",
        "epoch-null",
        "epoch-overflows",
        "epoch-fraction",
        "epoch-float",
        "epoch-negative",
        "epoch-bool",
        "epoch-string",
        "epoch-past-bigint",
        "active-number",
        "lsn-negative",
        "lsn-fraction",
        "lsn-bool",
        "lsn-text",
        "lsn-past-64-bits",
    ],
)
def test_state_file_corrupt_raises_value_error(tmp_path, content):
    """A corrupt file is not a fresh start: load raises ValueError (the documented
    contract), whatever the corruption, so the caller can fail closed with a reason."""
    path = tmp_path / "pgroute-state.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError) as exc:
        StateFile(path).load()
    assert str(path) in str(exc.value)


def test_state_file_that_is_a_fifo_is_corrupt_not_a_hang(tmp_path):
    import os

    path = tmp_path / "pgroute-state.json"
    os.mkfifo(path)
    with pytest.raises(ValueError, match="FIFO"):
        StateFile(path).load()


def test_state_file_with_large_valid_values_loads(tmp_path):
    path = tmp_path / "pgroute-state.json"
    path.write_text('{"epoch": 9223372036854775807, "active": null, "active_lsn": 18446744073709551615}')
    assert StateFile(path).load() == Stored(2**63 - 1, None, 2**64 - 1)


# -- resolve_start --------------------------------------------------------------------------------

UNREACHABLE = NodeView(reachable=False)
FRESH = NodeView(reachable=True)  # no stamp, writable, no subscription
FRESH_SUBSCRIBER = NodeView(reachable=True, subscriber=True)


def stamp(epoch: int, active: str, *, subscriber: bool = False, read_only: bool = False) -> NodeView:
    return NodeView(reachable=True, epoch=epoch, active=active, subscriber=subscriber, read_only=read_only)


def views(primary: NodeView, mirror: NodeView) -> dict[NodeName, NodeView]:
    return {P: primary, M: mirror}


# (id, stored, primary view, mirror view, expected active, expected epoch, reason words)
RESOLVE = [
    ("fresh-start-both-reachable", None, FRESH, FRESH_SUBSCRIBER, P, 0, ["fresh start", "primary is active"]),
    ("fresh-start-mirror-not-yet-subscribed", None, FRESH, FRESH, P, 0, ["fresh start"]),
    (
        "fresh-start-mirror-unreachable",
        None,
        FRESH,
        UNREACHABLE,
        None,
        0,
        ["no state file and no epoch stamp", "mirror unreachable", "cannot tell"],
    ),
    (
        "fresh-start-primary-unreachable",
        None,
        UNREACHABLE,
        FRESH_SUBSCRIBER,
        None,
        0,
        ["primary unreachable", "cannot tell"],
    ),
    (
        "fresh-start-both-unreachable",
        None,
        UNREACHABLE,
        UNREACHABLE,
        None,
        0,
        ["primary, mirror unreachable", "cannot tell"],
    ),
    (
        "fresh-start-primary-is-subscriber",
        None,
        FRESH_SUBSCRIBER,
        FRESH,
        None,
        0,
        ["primary is a subscriber or read-only", "cannot tell"],
    ),
    ("fresh-start-primary-read-only", None, NodeView(True, read_only=True), FRESH, None, 0, ["cannot tell"]),
    ("file-only-no-stamps", Stored(0, P), FRESH, FRESH_SUBSCRIBER, P, 0, ["epoch 0: primary is active"]),
    (
        "file-mirror-epoch-1-stamps-agree",
        Stored(1, M),
        stamp(1, "mirror", subscriber=True, read_only=True),
        stamp(1, "mirror"),
        M,
        1,
        ["epoch 1: mirror is active", "state file", "stamp on primary", "stamp on mirror"],
    ),
    (
        "file-mirror-epoch-1-primary-down",
        Stored(1, M),
        UNREACHABLE,
        stamp(1, "mirror"),
        M,
        1,
        ["epoch 1: mirror is active"],
    ),
    (
        "file-mirror-epoch-1-mirror-down-still-routes-to-mirror",
        Stored(1, M),
        stamp(1, "mirror", read_only=True),
        UNREACHABLE,
        M,
        1,
        ["mirror is active"],
    ),
    (
        "file-deleted-highest-stamp-wins",
        None,
        stamp(0, "primary", read_only=True),
        stamp(1, "mirror"),
        M,
        1,
        ["epoch 1: mirror is active", "stamp on mirror"],
    ),
    (
        "file-deleted-primary-unstamped-mirror-stamped",
        None,
        NodeView(True, read_only=True),
        stamp(1, "mirror"),
        M,
        1,
        ["epoch 1: mirror is active"],
    ),
    (
        "file-deleted-mirror-unreachable",
        None,
        stamp(0, "primary"),
        UNREACHABLE,
        None,
        0,
        ["state file missing", "mirror unreachable", "cannot tell"],
    ),
    (
        "file-deleted-primary-unreachable",
        None,
        UNREACHABLE,
        stamp(1, "mirror"),
        None,
        1,
        ["state file missing", "primary unreachable", "cannot tell"],
    ),
    (
        "stale-file-newer-stamp-wins",
        Stored(1, M),
        stamp(2, "primary"),
        stamp(2, "primary", subscriber=True, read_only=True),
        P,
        2,
        ["epoch 2: primary is active"],
    ),
    (
        "stale-file-newer-stamp-on-one-node",
        Stored(1, M),
        stamp(2, "primary"),
        stamp(1, "mirror", subscriber=True),
        P,
        2,
        ["epoch 2: primary is active"],
    ),
    (
        "newer-file-than-stamps",
        Stored(3, P),
        stamp(2, "mirror", read_only=True, subscriber=True),
        stamp(2, "mirror"),
        P,
        3,
        ["epoch 3: primary is active", "state file"],
    ),
    (
        "same-epoch-file-and-stamp-disagree",
        Stored(2, P),
        stamp(2, "primary"),
        stamp(2, "mirror"),
        None,
        2,
        ["epoch 2 claims disagree", "cannot tell"],
    ),
    (
        "same-epoch-stamps-disagree",
        None,
        stamp(1, "primary"),
        stamp(1, "mirror"),
        None,
        1,
        ["epoch 1 claims disagree", "stamp on primary", "stamp on mirror"],
    ),
    # pgroute was killed between fencing the active node and promoting the other:
    # every claim agrees and the other node still follows, so nothing was promoted.
    (
        "winner-left-fenced-by-a-switch-that-promoted-nothing",
        Stored(1, M),
        stamp(1, "mirror", subscriber=True),
        stamp(1, "mirror", read_only=True),
        M,
        1,
        ["mirror is active", "left fenced by a switch that promoted nothing", "unfencing it"],
    ),
    (
        "winner-fenced-other-unreachable",
        Stored(1, M),
        UNREACHABLE,
        stamp(1, "mirror", read_only=True),
        None,
        1,
        ["mirror is active but it is fenced", "primary is unreachable", "cannot tell"],
    ),
    (
        "winner-fenced-other-not-following",
        Stored(1, M),
        stamp(1, "mirror"),
        stamp(1, "mirror", read_only=True),
        None,
        1,
        ["mirror is active but it is fenced", "primary does not follow it", "cannot tell"],
    ),
    (
        "winner-fenced-older-claim-disagrees",
        Stored(1, M),
        stamp(0, "primary", subscriber=True),
        stamp(1, "mirror", read_only=True),
        None,
        1,
        ["mirror is active but it is fenced", "older epoch names another node", "cannot tell"],
    ),
    # pgroute stopped after stamping the mirror and before detaching its subscription:
    # the newer stamp wins and the controller finishes the (idempotent) promotion.
    (
        "winner-still-subscriber-interrupted-promotion",
        Stored(0, P),
        stamp(0, "primary", read_only=True),
        stamp(1, "mirror", subscriber=True),
        M,
        1,
        ["epoch 1: mirror is active", "stamp on mirror"],
    ),
    (
        "epoch-routes-to-no-node",
        Stored(4, None),
        stamp(4, "none"),
        stamp(4, "none"),
        None,
        4,
        ["epoch 4 routes to no node"],
    ),
]


@pytest.mark.parametrize(
    "stored, primary, mirror, active, epoch, reason", [pytest.param(*c[1:], id=c[0]) for c in RESOLVE]
)
def test_resolve_start(stored, primary, mirror, active, epoch, reason):
    res = resolve_start(stored, views(primary, mirror))
    assert isinstance(res, Resolution)
    assert res.active == active, res.reason
    assert res.epoch == epoch, res.reason
    for words in reason:
        assert words in res.reason, f"{words!r} not in {res.reason!r}"


def test_only_the_agreed_fenced_winner_is_unfenced():
    agreed = resolve_start(Stored(1, M), views(stamp(1, "mirror", subscriber=True), stamp(1, "mirror", read_only=True)))
    assert agreed.unfence and agreed.active is M
    plain = resolve_start(Stored(1, M), views(stamp(1, "mirror", subscriber=True), stamp(1, "mirror")))
    assert not plain.unfence and plain.active is M


def test_resolve_start_is_pure():
    v = views(stamp(0, "primary"), stamp(1, "mirror"))
    before = dict(v)
    assert resolve_start(None, v) == resolve_start(None, v)
    assert v == before
