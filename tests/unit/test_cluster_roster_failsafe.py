"""The roster's and the failsafe's pure rules (pgroute/cluster/roster.py, failsafe.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from pgroute.cluster.failsafe import PATH, GrantBook, Request, View, ask_peers, grant_validity
from pgroute.cluster.records import CorruptRecord
from pgroute.cluster.roster import (
    Roster,
    RosterEntry,
    decode_roster,
    encode_roster,
    may_lead,
    next_roster,
    settle,
)

A, B, C = RosterEntry("a", "1", "http://a"), RosterEntry("b", "2", "http://b"), RosterEntry("c", "3", "http://c")


def test_first_roster_makes_everyone_eligible_then_newcomers_wait():
    first = next_roster(None, [B, A])
    assert first == Roster(1, (A, B), frozenset({"a", "b"}))
    assert next_roster(first, [A, B]) is None  # nothing changed
    second = next_roster(first, [A, B, C])
    assert second is not None and second.gen == 2 and second.eligible == {"a", "b"}
    assert may_lead(second, "c") is not None and "not yet acknowledged" in (may_lead(second, "c") or "")
    assert may_lead(second, "a") is None
    # A restart (same name, new incarnation) is a newcomer too.
    restarted = next_roster(second, [A, B, RosterEntry("c", "4", "http://c")])
    assert restarted is not None and restarted.gen == 3 and "c" not in restarted.eligible
    # A member that left loses its eligibility at once.
    left = next_roster(first, [A])
    assert left is not None and left.eligible == {"a"} and left.names == {"a"}
    assert may_lead(left, "b") is not None and "not on the roster" in (may_lead(left, "b") or "")
    assert may_lead(None, "anyone") is None
    assert next_roster(None, []) is None


def test_settle_needs_every_live_member_ack_and_the_wait():
    roster = next_roster(next_roster(None, [A, B]), [A, B, C])
    assert roster is not None
    assert settle(roster, {"a": 2, "b": 2, "c": 2}, waited=False) is None
    assert settle(roster, {"a": 2, "b": 1, "c": 2}, waited=True) is None  # b has not acknowledged
    settled = settle(roster, {"a": 2, "c": 2}, waited=True)  # b is not live: not awaited
    assert settled is not None and settled.gen == 2 and settled.eligible == {"a", "b", "c"} and settled.settled
    assert settle(settled, {"a": 2}, waited=True) is None  # nothing left to settle


def test_roster_round_trip_and_corrupt_records():
    roster = Roster(7, (A, C), frozenset({"a"}))
    assert decode_roster("/k", encode_roster(roster)) == roster
    for bad in (
        b"[]",
        b'{"gen": -1, "members": [], "eligible": []}',
        b'{"gen": 1, "members": [{"name": "a"}], "eligible": []}',
        b'{"gen": 1, "members": [], "eligible": ["x"]}',
        b'{"gen": 1, "members": [{"name": "a/b", "id": "", "api": ""}], "eligible": []}',
        b'{"gen": 1, "members": [{"name": "a", "id": "", "api": ""}, {"name": "a", "id": "", "api": ""}], '
        b'"eligible": []}',
    ):
        with pytest.raises(CorruptRecord, match="/k"):
            decode_roster("/k", bad)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_grant_book_confirms_only_its_own_view_and_tracks_expiry():
    clock = FakeClock()
    book = GrantBook(1.0, clock)
    mine = View(5, "primary", 2)
    members = (A, B, C)
    assert book.decide(Request("a", "1", mine), mine, members) is None
    assert "views differ" in (book.decide(Request("a", "1", View(4, "primary", 2)), mine, members) or "")
    assert "views differ" in (book.decide(Request("a", "1", View(5, "mirror", 2)), mine, members) or "")
    assert "views differ" in (book.decide(Request("a", "1", View(5, "primary", 1)), mine, members) or "")
    assert "not on this instance's roster" in (book.decide(Request("a", "9", mine), mine, members) or "")
    assert "not on this instance's roster" in (book.decide(Request("z", "1", mine), mine, members) or "")
    assert "no route" in (book.decide(Request("a", "1", mine), None, members) or "")
    # Acknowledging the same view does not wait; a newer one waits for the grant to end.
    assert book.older_outstanding(mine) == 0.0
    newer = View(6, None, 2)
    assert book.older_outstanding(newer) == pytest.approx(1.0)
    clock.now += 0.4
    # A later confirmation of a newer view to the same requester does not end the older one.
    assert book.decide(Request("a", "1", newer), newer, members) is None
    assert book.older_outstanding(newer) == pytest.approx(0.6)
    assert book.outstanding() == {"a": pytest.approx(1.0)}
    clock.now += 0.6
    assert book.older_outstanding(newer) == 0.0
    assert book.older_outstanding(View(7, None, 2)) == pytest.approx(0.4)


def test_view_and_request_json():
    view = View(3, None, 1)
    assert View.from_json(view.to_json()) == view
    request = Request("a", "x", view)
    assert Request.from_json(request.to_json()) == request
    for bad in ({}, {"name": "a", "id": "x", "epoch": True, "gen": 0}, {"name": 1, "id": "x", "epoch": 0, "gen": 0}):
        with pytest.raises(ValueError):
            Request.from_json(bad)
    with pytest.raises(ValueError):
        Request.from_json([])
    assert grant_validity(3) == 1.0 and grant_validity(1) == 0.5


async def test_ask_peers_all_must_confirm():
    answers = {"b": (200, {"confirmed": True}), "c": (409, {"confirmed": False, "error": "views differ"})}
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        who = request.match_info["who"]
        seen.append({"who": who, "auth": request.headers.get("Authorization"), "body": await request.json()})
        if who == "slow":
            await asyncio.sleep(2)
        status, body = answers.get(who, (200, {"confirmed": True}))
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/{who}" + PATH, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    request = Request("a", "1", View(1, "primary", 1))
    try:
        async with aiohttp.ClientSession() as session:
            ok = await ask_peers(session, [RosterEntry("b", "2", f"{url}/b")], request, token="t", timeout=1.0)
            assert ok.ok and ok.confirmed == ("b",)
            assert seen[0]["auth"] == "Bearer t" and seen[0]["body"]["epoch"] == 1
            peers = [
                RosterEntry("b", "2", f"{url}/b"),
                RosterEntry("c", "3", f"{url}/c"),
                RosterEntry("d", "4", ""),
                RosterEntry("slow", "5", f"{url}/slow"),
                RosterEntry("gone", "6", "http://127.0.0.1:1"),
            ]
            result = await ask_peers(session, peers, request, token="", timeout=0.3)
            assert not result.ok and result.confirmed == ("b",)
            assert result.refused["c"] == "views differ"
            assert "no API address" in result.refused["d"]
            assert "no answer within" in result.refused["slow"]
            assert "gone" in result.refused
            assert "not confirmed by" in result.describe()
            empty = await ask_peers(session, [], request, token="", timeout=0.3)
            assert empty.ok and empty.describe() == "confirmed by no peer"
    finally:
        await runner.cleanup()
