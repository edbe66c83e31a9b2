"""One instance's side of the failsafe and of the roster (see pgroute/cluster/failsafe.py
and pgroute/cluster/roster.py for the rules and why they are safe).

Owns, per process: the roster as last read from etcd (and, on the leader, keeping
it in step with the live members: newcomers, departures, settling), whether this
instance may campaign for the leader key, the confirmations it gives its peers
(`confirm`, behind ``POST /api/cluster/failsafe``), and its own failsafe: entered
when its member lease nears its deadline without a refresh, kept while every other
roster member confirms its view, ended by etcd answering again or by one refusal
(then the node fails closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from .cluster.failsafe import GrantBook, Request, Round, ask_peers, grant_validity
from .cluster.members import Member
from .cluster.records import CorruptRecord
from .cluster.roster import Roster, RosterEntry, decode_roster, encode_roster, may_lead, next_roster, settle
from .cluster.store import Compare, Get, Put, StoreError

if TYPE_CHECKING:
    from .cluster.leader import Term
    from .cluster_node import ClusterNode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Failsafe:
    """This instance routes without etcd: since when, until when its peers'
    confirmations last, and the last round's outcome."""

    since: float
    until: float
    last: str


class NodeFailsafe:
    """The failsafe and roster of one `ClusterNode`."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node
        self.max = node.config.cluster.failsafe_max
        self.validity = grant_validity(node.ttl)
        self.grants = GrantBook(self.validity)
        self.roster: Roster | None = None
        self.roster_problem: str | None = None
        self._roster_revision = 0
        self._roster_seen: tuple[int, float] = (0, 0.0)  # (gen, monotonic time first seen)
        self._roster_gone_since: float | None = time.monotonic()  # no roster member live
        self.state: Failsafe | None = None
        self.closing = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def gen(self) -> int:
        return self.roster.gen if self.roster is not None else 0

    @property
    def horizon(self) -> float:
        """After this long with no roster member live, no instance can still be in
        failsafe on that roster (each stops after ``failsafe_max``)."""
        return self.max + self._node.ttl + self.validity

    async def close(self) -> None:
        self.end()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- the roster

    async def read_roster(self) -> None:
        """Re-read the roster record (StoreError: etcd did not answer)."""
        node = self._node
        kv = (await node.store.get(node.keys.roster, timeout=node.ttl / 3)).first
        if kv is None:
            self._set_roster(None, 0)
            return
        try:
            roster = decode_roster(kv.key, kv.value)
        except CorruptRecord as exc:
            if self.roster_problem != str(exc):
                log.error("%s; nobody new may lead until it is rewritten or deleted", exc)
            self.roster_problem = str(exc)
            return
        self.roster_problem = None
        self._set_roster(roster, kv.mod_revision)

    def _set_roster(self, roster: Roster | None, revision: int) -> None:
        self._roster_revision = revision
        if roster is not None and roster.gen != self._roster_seen[0]:
            self._roster_seen = (roster.gen, time.monotonic())
        changed = (self.roster.gen if self.roster else 0) != (roster.gen if roster else 0)
        self.roster = roster
        if changed:
            self._node.ack_wanted()

    def observe_members(self, members: tuple[Member, ...]) -> None:
        roster = self.roster
        live = {m.name for m in members}
        if roster is None or roster.names & live:
            self._roster_gone_since = None
        elif self._roster_gone_since is None:
            self._roster_gone_since = time.monotonic()

    async def keep_roster(self, members: tuple[Member, ...], term: Term) -> None:
        """Leader only: write the roster the live members call for, or settle it."""
        node = self._node
        if self.roster_problem is not None:
            return
        live = [RosterEntry(m.name, m.record.id, m.record.api) for m in members]
        new = next_roster(self.roster, live)
        if new is None and self.roster is not None:
            waited = (
                self._roster_seen[0] == self.roster.gen and time.monotonic() - self._roster_seen[1] >= self.validity
            )
            new = settle(self.roster, {m.name: m.record.gen for m in members}, waited=waited)
        if new is None:
            return
        key = node.keys.roster
        result = await node.store.txn(
            [Compare.mod_revision(key, self._roster_revision), term.fence],
            [Put(key, encode_roster(new))],
            [Get(key)],
            timeout=node.ttl / 3,
        )
        if not result.succeeded:
            await self.read_roster()
            return
        log.info(
            "roster generation %d: %s (may lead: %s)",
            new.gen,
            ", ".join(sorted(new.names)),
            ", ".join(sorted(new.eligible)) or "nobody yet",
        )
        self._set_roster(new, result.revision)

    async def may_campaign(self) -> str | None:
        """Whether this instance may take a vacant leader key (LeaderElection's gate)."""
        node = self._node
        if node.cut_off is not None or self.state is not None:
            return "cut off from etcd"
        try:
            await self.read_roster()
            departed = await node.store.get_prefix(node.keys.prefix + "/departed/", timeout=node.ttl / 3)
        except StoreError as exc:
            return f"cannot read the roster: {exc}"
        if self.roster_problem is not None:
            return self.roster_problem
        roster = self.roster
        why = may_lead(roster, node.name)
        if roster is None:
            return None
        entry = roster.entry(node.name)
        if why is None and entry is not None and entry.id == node.instance_id:
            return None
        gone = {(kv.key.rsplit("/", 1)[-1], kv.text) for kv in departed.items}
        if any((m.name, m.id) in gone for m in roster.members):
            # A member of this roster stopped cleanly: it confirms nothing any more,
            # so nobody can be in failsafe on this roster.
            return None
        since = self._roster_gone_since
        if since is not None and time.monotonic() - since >= self.horizon:
            log.warning("no roster member has been live for %.0fs: %s may lead", time.monotonic() - since, node.name)
            return None
        return why or f"{node.name} restarted: roster generation {roster.gen} lists its previous incarnation"

    async def depart(self) -> None:
        """A clean stop: confirm nothing more, let the confirmations given expire,
        then record this incarnation as departed (see `may_campaign`)."""
        node = self._node
        self.closing = True
        left = max(self.grants.outstanding().values(), default=0.0)
        if left > 0:
            await asyncio.sleep(left)
        try:
            await node.store.put(node.keys.departed(node.name), node.instance_id, timeout=node.ttl / 3)
        except StoreError as exc:
            log.info("member %s: departure not recorded (%s)", node.name, exc)

    # ----------------------------------------------------------------- confirming for peers

    def confirm(self, body: Any) -> tuple[int, dict[str, Any]]:
        """A peer asks: (HTTP status, answer)."""
        try:
            request = Request.from_json(body)
        except ValueError as exc:
            return 400, {"confirmed": False, "error": f"bad request: {exc}"}
        node = self._node
        if self.closing:
            why: str | None = f"{node.name} is stopping"
        else:
            roster = self.roster
            why = self.grants.decide(request, node.view(), roster.members if roster is not None else ())
        if why is not None:
            log.info("failsafe: not confirming %s: %s", request.name, why)
            return 409, {"confirmed": False, "name": node.name, "error": why}
        return 200, {"confirmed": True, "name": node.name, "valid_for": self.validity}

    # ----------------------------------------------------------------- this instance's failsafe

    def _refusal(self) -> str | None:
        node = self._node
        if self.max <= 0:
            return "the failsafe is off ([cluster] failsafe_max = 0)"
        if self.roster is None:
            return "no roster yet (the failsafe needs one)"
        entry = self.roster.entry(node.name)
        if entry is None or entry.id != node.instance_id:
            return "this instance is not on the roster yet"
        if node.view() is None:
            return "no route applied yet"
        return None

    async def _ask(self) -> Round:
        node = self._node
        view = node.view()
        roster = self.roster
        assert view is not None and roster is not None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        peers = [m for m in roster.members if m.name != node.name]
        return await ask_peers(
            self._session,
            peers,
            Request(node.name, node.instance_id, view),
            token=node.config.api.token,
            timeout=min(self.validity / 3, node.margin / 2),
        )

    async def enter(self) -> str | None:
        """Try to keep routing without etcd: None when every peer confirmed (the
        failsafe runs), else why not (the caller fails closed)."""
        why = self._refusal()
        if why is not None:
            return why
        try:
            result = await self._ask()
        except Exception as exc:  # the caller must fail closed, whatever went wrong
            log.exception("failsafe: asking the peers failed")
            return f"asking the peers failed: {exc}"
        if not result.ok:
            return result.describe()
        now = time.monotonic()
        self.state = Failsafe(now, result.sent + self.validity, result.describe())
        view = self._node.view()
        log.warning(
            "member %s: cut off from etcd: FAILSAFE: routing on at %s while every peer confirms (%s)",
            self._node.name,
            view.describe() if view else "?",
            result.describe(),
        )
        self._task = asyncio.create_task(self._keep(), name="cluster-failsafe")
        return None

    def end(self) -> None:
        """etcd answers again (or the node fails closed): the failsafe stops."""
        if self.state is not None:
            log.info("member %s: failsafe ended after %.1fs", self._node.name, time.monotonic() - self.state.since)
        self.state = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _keep(self) -> None:
        """Ask again every third of the validity; fail closed at the first round that
        is not confirmed in time, or after ``failsafe_max``."""
        node = self._node
        with contextlib.suppress(asyncio.CancelledError):
            while (state := self.state) is not None:
                await asyncio.sleep(self.validity / 3)
                if self.state is not state:
                    return
                now = time.monotonic()
                why: str | None = None
                if now - state.since >= self.max:
                    why = f"failsafe lasted failsafe_max ({self.max:g}s)"
                else:
                    try:
                        async with asyncio.timeout(max(0.0, state.until - now)):
                            result = await self._ask()
                    except TimeoutError:
                        why = "the peers' confirmations ran out"
                    except Exception as exc:
                        why = f"asking the peers failed: {exc}"
                    else:
                        if result.ok and self.state is state:
                            self.state = Failsafe(state.since, result.sent + self.validity, result.describe())
                            continue
                        why = result.describe()
                if self.state is state:
                    self.state = None
                    self._task = None
                    node.fail_closed(f"failsafe ended: {why}")
                return

    def gauges(self) -> tuple[float | None, int]:
        """For the metrics: seconds in failsafe (None: not in it), peers confirmed."""
        state = self.state
        return (None if state is None else time.monotonic() - state.since), len(self.grants.outstanding())

    def status(self) -> dict[str, Any]:
        state = self.state
        roster = self.roster
        return {
            "failsafe": None
            if state is None
            else {"since_s": round(time.monotonic() - state.since, 1), "last": state.last},
            "roster": None
            if roster is None
            else {"gen": roster.gen, "members": sorted(roster.names), "may_lead": sorted(roster.eligible)},
            "confirming": self.grants.outstanding(),
        }
