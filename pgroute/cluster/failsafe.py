"""The failsafe: keep routing through an etcd outage only while every peer confirms.

Owns the view an instance holds (`View`: route epoch, active node, roster
generation), the granting side (`GrantBook`: which confirmations this instance gave
and until when; when it may acknowledge a newer view), the asking side
(`ask_peers`: one round of confirmations over the peers' HTTP API) and the wire
format of ``POST /api/cluster/failsafe``.

The rules, and why no switch can happen while a failsafe instance still routes:
- An instance whose member lease nears its deadline (etcd unreachable) asks every
  other member of the roster it knows to confirm its view. Only if all confirm does
  it keep routing, until ``sent + validity`` (measured from the send: the
  confirmer counts from its receipt, later); it asks again well before then. One
  refusal or silence, and it fails closed at once.
- A member confirms only a view equal to its own (same epoch, active node and
  roster generation) and records the confirmation until ``received + validity``.
- A member acknowledges a newer view in etcd (the barrier's ack) only after every
  confirmation it gave for another view has expired, and refuses that older view
  from the moment it holds the newer one.
- The leader is an eligible roster member (pgroute/cluster/roster.py), so a
  failsafe instance asks it too; a switch publishes epoch N+1 and waits at the
  barrier for every live member's ack, the leader's own included: by then no
  confirmation of epoch N is valid anywhere, and a failsafe instance asking for
  one is refused.
A whole-etcd outage leaves every instance asking the others; nobody can write a
new epoch, so every view stays equal and traffic continues. No switch happens
without etcd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from .roster import RosterEntry

log = logging.getLogger(__name__)

PATH = "/api/cluster/failsafe"


def grant_validity(ttl: float) -> float:
    """How long one confirmation lasts: a third of the lease TTL, so that a failsafe
    instance asks three times per TTL and a barrier waits at most this long for the
    confirmations given before it."""
    return max(0.5, ttl / 3)


@dataclass(frozen=True, slots=True)
class View:
    """What an instance routes by: the route epoch it applied, the node that route
    names (None: no node) and the roster generation it knows."""

    epoch: int
    active: str | None
    gen: int

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "active": self.active, "gen": self.gen}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> View:
        """ValueError when a field is missing or of the wrong type."""
        epoch, active, gen = data.get("epoch"), data.get("active"), data.get("gen")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError("epoch must be a non-negative integer")
        if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
            raise ValueError("gen must be a non-negative integer")
        if active is not None and not isinstance(active, str):
            raise ValueError("active must be a node name or null")
        return cls(epoch, active, gen)

    def describe(self) -> str:
        return f"epoch {self.epoch}, active {self.active or 'none'}, roster generation {self.gen}"


@dataclass(frozen=True, slots=True)
class Request:
    """A confirmation asked for: who asks (name, incarnation id) and its view."""

    name: str
    id: str
    view: View

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, **self.view.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> Request:
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        name, ident = data.get("name"), data.get("id")
        if not isinstance(name, str) or not isinstance(ident, str):
            raise ValueError("name and id must be strings")
        return cls(name, ident, View.from_json(data))


class GrantBook:
    """The confirmations this instance gave: (requester, view) -> expiry. Keyed by
    view too: a newer confirmation to the same requester does not end an older one,
    which that requester may still be routing by."""

    def __init__(self, validity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.validity = validity
        self._clock = clock
        self._given: dict[tuple[str, View], float] = {}

    def decide(self, request: Request, mine: View | None, members: Sequence[RosterEntry]) -> str | None:
        """Confirm (None, and remember until when) or say why not."""
        if mine is None:
            return "this instance has no route applied yet"
        entry = next((m for m in members if m.name == request.name), None)
        if entry is None or entry.id != request.id:
            return f"{request.name} (incarnation {request.id}) is not on this instance's roster"
        if request.view != mine:
            return f"views differ: asked for {request.view.describe()}, this instance has {mine.describe()}"
        self._given[(request.name, mine)] = self._clock() + self.validity
        return None

    def older_outstanding(self, view: View) -> float:
        """Seconds until every confirmation given for a view other than ``view`` has
        expired (0.0: none is left): acknowledging ``view`` waits that long."""
        now = self._clock()
        for key in [k for k, expiry in self._given.items() if expiry <= now]:
            del self._given[key]
        return max((expiry - now for (_, given), expiry in self._given.items() if given != view), default=0.0)

    def outstanding(self) -> dict[str, float]:
        """Requester -> seconds its confirmation still lasts (for status)."""
        now = self._clock()
        left: dict[str, float] = {}
        for (name, _), expiry in self._given.items():
            if expiry > now:
                left[name] = round(max(left.get(name, 0.0), expiry - now), 3)
        return left


@dataclass(frozen=True, slots=True)
class Round:
    """One round of asking: when it was sent, who confirmed, who did not and why."""

    sent: float
    confirmed: tuple[str, ...]
    refused: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return not self.refused

    def describe(self) -> str:
        if self.ok:
            return f"confirmed by {', '.join(self.confirmed) or 'no peer'}"
        return "not confirmed by " + "; ".join(f"{n} ({why})" for n, why in sorted(self.refused.items()))


async def ask_peers(
    session: aiohttp.ClientSession,
    peers: Sequence[RosterEntry],
    request: Request,
    *,
    token: str,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> Round:
    """Ask every peer at once; a peer with no API URL, that does not answer within
    ``timeout``, or that answers anything but a confirmation, refuses."""
    sent = clock()
    body = request.to_json()
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(peer: RosterEntry) -> str | None:
        if not peer.api:
            return "no API address in its record"
        try:
            async with (
                asyncio.timeout(timeout),
                session.post(peer.api.rstrip("/") + PATH, json=body, headers=headers) as resp,
            ):
                data = await resp.json(content_type=None)
        except TimeoutError:
            return f"no answer within {timeout:.1f}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        if resp.status == 200 and isinstance(data, dict) and data.get("confirmed") is True:
            return None
        reason = data.get("error") if isinstance(data, dict) else None
        return str(reason or f"HTTP {resp.status}")[:300]

    answers = await asyncio.gather(*(one(p) for p in peers))
    refused = {p.name: why for p, why in zip(peers, answers, strict=True) if why is not None}
    confirmed = tuple(p.name for p, why in zip(peers, answers, strict=True) if why is None)
    return Round(sent, confirmed, refused)
