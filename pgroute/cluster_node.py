"""One pgroute instance of a cluster (``[cluster] etcd`` set): wires the etcd Store,
this instance's member record, the route watcher, the leader election and the
controller into `pgroute run`.

Owns, per process: the `EtcdStore`; the `Membership` (name, proxy and API
addresses, the epoch applied); the `RouteWatcher` whose routes drive the local
Router while this instance follows; the `LeaderElection`, and the Controller that
runs only between ``on_elected`` and ``on_lost``; the cut-off guard; and the API's
view of all that (`ClusterControl` in pgroute/cluster_control.py).

Invariants, and why they keep a single writable route:
- Only the leader writes the route, through `EtcdSharedRoute`, each write fenced to
  its term (`Term.fence`): a deposed leader's write fails and its operation stops
  with this instance routing to no node.
- A member acknowledges an epoch (writes it in its record) only after its Router
  carries that epoch's route and its older sessions are closed; the leader's
  barrier waits for those acknowledgements, or for the member's lease to expire,
  before promoting anything.
- A member whose lease is within ``margin`` of its deadline without a refresh
  either routes on in failsafe, confirmed by every other roster member
  (pgroute/cluster_failsafe.py), or has failed closed (no node, every session
  closed) before the leader could see its record vanish; it routes by etcd again
  only after re-reading the route. Its acknowledgements wait for the failsafe
  confirmations it gave others for an older view to expire.
- ``on_lost`` stops the controller at once (its next fenced write would fail
  anyway); the instance keeps following the route.
- Passive health (pgroute/cluster/passive.py): every instance's failed connects to
  the node it routes to go in its member record (rate-limited, masked); the leader,
  reading the records, only asks its controller to probe the active node now. A
  signal never switches anything: the leader's own probes decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from .cluster.etcd_store import EtcdStore
from .cluster.failsafe import View
from .cluster.keys import Keys
from .cluster.leader import LeaderElection, Term
from .cluster.members import Member, Members, Membership, MembershipLost, NameInUse, decode_member
from .cluster.passive import SignalBook, SignalJudge, SignalReporter, signal_of
from .cluster.records import CorruptRecord
from .cluster.route import RouteSeen, RouteWatcher, RouteWriter, import_state_file, route_seen
from .cluster.store import StoreError
from .cluster_control import ClusterControl, ClusterStateFile, EtcdSharedRoute
from .cluster_failsafe import NodeFailsafe
from .config import Config
from .control.controller import Controller
from .control.state_store import StateFile
from .model import NodeName
from .pg.dsn import mask_dsn
from .proxy.router import Backend, Route, Router

log = logging.getLogger(__name__)

#: Seconds between two looks at this instance's lease (the cut-off guard).
GUARD_EVERY = 0.1
#: Seconds between two reads of the member records: on a follower, and on the leader.
MEMBERS_READ_EVERY = 1.0
MEMBERS_READ_LEADING = 0.25
#: A passive signal clears this long (or 5 retry_intervals) after the last failed
#: connect: a client held by the proxy retries at least once a second.
SIGNAL_QUIET = 5.0


class ClusterNode:
    """This instance in the cluster. ``start(proxy, api)`` once the listeners are up
    (their addresses go in the member record); ``close()`` revokes the leader key
    and the member lease so that the others take over at once."""

    def __init__(self, config: Config, router: Router) -> None:
        c = config.cluster
        self.config = config
        self.router = router
        self.name = c.member_name
        self.instance_id = uuid.uuid4().hex[:12]  # this process: roster and failsafe tell restarts apart
        self.ttl = c.ttl
        self.keys = Keys(config.cluster_prefix)
        self.store = EtcdStore(list(c.etcd), timeout=max(1.0, self.ttl / 3), security=c.etcd_security)
        # Fail closed this long before the member lease's deadline: the leader's
        # barrier counts this instance gone only once the lease has expired.
        self.margin = max(0.5, self.ttl / 4)
        self.backends = {
            n: Backend(n.value, config.node_dsn(n.value).host, config.node_dsn(n.value).port) for n in NodeName
        }
        self.failsafe = NodeFailsafe(self)
        self.controller = Controller(config, router)  # dormant until elected
        self.control = ClusterControl(self)
        self.watcher = RouteWatcher(self.store, self.keys, self._on_route)
        self.membership: Membership | None = None
        self.election: LeaderElection = self._new_election("")
        self.leading = False
        self.cut_off: str | None = None
        self._proxy = ""
        self._api = ""
        self._applied = (-1, False)
        self._applied_active: str | None = None
        self._acked: tuple[int, bool, int] | None = None
        self._ack_wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lead_task: asyncio.Task[None] | None = None
        self._term: Term | None = None  # the term this instance leads in, while it does
        self._shared: EtcdSharedRoute | None = None
        self._leadership = asyncio.Lock()  # one term's start or stop at a time
        self._controller_started = False
        self._reelecting = False
        self._closed = False
        # Passive health: this instance's failed connects, written to its record at
        # most once per retry_interval; the leader's view of everyone's.
        every = config.health.retry_interval
        self.reporter = SignalReporter(
            SignalBook(every, max(SIGNAL_QUIET, 5 * every)),
            lambda: self.membership if self.cut_off is None else None,
            timeout=self.ttl / 3,
        )
        self.judge = SignalJudge(self.name)
        router.add_failure_listener(self._on_backend_failure)

    def _new_election(self, api: str) -> LeaderElection:
        return LeaderElection(
            self.store,
            self.keys,
            self.name,
            self.ttl,
            api=api,
            on_elected=self._on_elected,
            on_lost=self._on_lost,
            may_campaign=self.failsafe.may_campaign,
        )

    # ----------------------------------------------------------------- life cycle

    async def start(self, proxy: str, api: str) -> None:
        self._proxy, self._api = proxy, api
        await self.failsafe.read_roster()
        # Registered before anything is routed (the Router holds new connections until
        # the route is read): from this record on, a barrier waits for this instance.
        # Epoch 0 claims nothing: the ack loop writes the epoch once it is applied.
        self.membership = await self._register(0)
        self._acked = (0, False, 0)
        await self.watcher.start(timeout=self.ttl)  # applies the route (follower)
        self.election = self._new_election(api)
        self.election.start()
        self._spawn(self._ack_loop(), "cluster-ack")
        self._spawn(self._guard_loop(), "cluster-guard")
        self._spawn(self._members_loop(), "cluster-members")
        self._spawn(self.reporter.run(), "cluster-signal")
        log.info(
            "cluster member %s started (etcd %s, prefix %s)",
            self.name,
            ",".join(self.config.cluster.etcd),
            self.keys.prefix,
        )

    async def _register(self, epoch: int) -> Membership:
        """Create this instance's member record. A record under its name with this
        instance's own proxy and API addresses (which it has just bound, so nobody
        else serves them) is a killed predecessor's: wait, up to its TTL, for its
        lease to expire instead of refusing to start (a restart by systemd)."""
        deadline = time.monotonic() + self.ttl + 1.0
        while True:
            membership = self._membership(epoch)
            try:
                await membership.start(timeout=self.ttl)
                return membership
            except NameInUse as exc:
                record = exc.current
                mine = False
                if record is not None:
                    with contextlib.suppress(CorruptRecord):
                        held = decode_member(exc.key, record.value)
                        mine = (held.proxy, held.api) == (self._proxy, self._api)
                if not mine or time.monotonic() >= deadline:
                    raise
                log.warning(
                    "member %s: the record of a previous run at the same addresses is still held (lease %x); "
                    "waiting for it to expire",
                    self.name,
                    record.lease if record is not None else 0,
                )
                await asyncio.sleep(0.5)

    async def step_down(self) -> None:
        """Stop leading and campaigning (the leader key revoked: another instance
        leads now) while this instance keeps following the route and stays a
        member: its proxy may still drain sessions, so its record must stay until
        they are closed (a barrier counts a vanished member as done)."""
        await self.election.close(release=True)
        await self._stop_leading(self._term, "stepping down")

    async def close(self, *, release: bool = True) -> None:
        """Stop leading (controller closed, leader key revoked), stop following,
        revoke the member lease. ``release=False`` leaves both leases to expire, as
        a killed process would (tests)."""
        self._closed = True
        await self.election.close(release=release)
        await self._stop_leading(self._term, "stopped")
        if release and self.membership is not None:
            await self.failsafe.depart()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.election.close(release=release)  # one a re-election started meanwhile
        await self.watcher.close()
        if self.membership is not None:
            await self.membership.close(revoke=release, timeout=2.0)
        await self.controller.close()
        await self.failsafe.close()
        await self.store.close()

    def _membership(self, epoch: int) -> Membership:
        return Membership(
            self.store,
            self.keys,
            self.name,
            self.ttl,
            proxy=self._proxy,
            api=self._api,
            epoch=epoch,
            instance_id=self.instance_id,
        )

    def view(self) -> View | None:
        """The view this instance routes by (pgroute/cluster/failsafe.py): the epoch
        applied (the leader: or the highest it wrote), that route's node, the roster
        generation known. None before a route was applied."""
        if self._applied[0] < 0:
            return None
        epoch = max(self._applied[0], self._shared.floor if self._shared is not None and self.leading else 0)
        return View(epoch, self._applied_active, self.failsafe.gen)

    def ack_wanted(self) -> None:
        self._ack_wanted.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- following

    def _local_route(self, seen: RouteSeen) -> Route:
        route = seen.route
        if route is None:
            if seen.problem:  # corrupt: nobody can tell, fail closed until it is rewritten
                return Route(None, self.router.route.epoch, paused=False, reason=seen.problem)
            # First start: new connections wait (up to proxy.pause_timeout) for the leader.
            return Route(
                None, self.router.route.epoch, paused=True, reason="no route in etcd yet: waiting for the leader"
            )
        backend = self.backends[route.active] if route.active is not None else None
        return Route(backend, route.epoch, paused=route.paused, reason=route.reason)

    def _on_route(self, seen: RouteSeen) -> None:
        if self.cut_off is None:
            self._apply(seen)

    def _apply(self, seen: RouteSeen) -> None:
        """Route as ``seen`` says (unless this instance leads: its controller does),
        close the older epoch's sessions, then acknowledge."""
        local = self._local_route(seen)
        if not self.leading:
            self.router.publish(local)
        self.router.close_sessions(before_epoch=local.epoch, reason=f"cluster: route epoch {local.epoch}")
        self._applied = (local.epoch, local.paused)
        self._applied_active = local.backend.name if local.backend is not None else None
        self._ack_wanted.set()
        self._route_moved()

    # ----------------------------------------------------------------- passive health

    def _on_backend_failure(self, backend: str, error: str) -> None:
        """The proxy could not connect to ``backend`` (a Router failure listener, on
        the data path: no I/O here). Only failures of the node routed to now count."""
        route = self.router.route
        if route.backend is None or route.backend.name != backend or self.cut_off is not None:
            return
        self.reporter.failed(NodeName(backend), route.epoch, mask_dsn(error))

    def _route_moved(self) -> None:
        route = self.router.route
        self.reporter.moved(route.epoch, NodeName(route.backend.name) if route.backend is not None else None)

    def _judge_signals(self, members: tuple[Member, ...]) -> None:
        """Leader only: members' signals about the active node at its epoch make the
        controller probe it now (it decides; the signal alone switches nothing)."""
        if not self.leading or self.cut_off is not None:
            return
        state = self.controller.state
        fresh = self.judge.to_probe(((m.name, signal_of(m.record.health)) for m in members), state.epoch, state.active)
        for name, signal in fresh:
            if self.controller.on_member_signal(name, signal.node, signal.epoch, signal.error):
                break  # one probe is enough

    async def _ack_loop(self) -> None:
        """Write the applied epoch and the roster generation known in the member
        record, the latest ones, in order; each only once the failsafe
        confirmations this instance gave for another view have expired."""
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            membership = self.membership
            applied = (*self._applied, self.failsafe.gen)
            if membership is None or applied == self._acked or self.cut_off is not None or applied[0] < 0:
                continue
            view = self.view()
            wait = self.failsafe.grants.older_outstanding(view) if view is not None else 0.0
            if wait > 0:
                log.info(
                    "member %s: acknowledging %s in %.2fs (confirmations given last that long)",
                    self.name,
                    view.describe() if view else "?",
                    wait,
                )
                await asyncio.sleep(wait)
                self._ack_wanted.set()
                continue
            try:
                await membership.update(epoch=applied[0], paused=applied[1], gen=applied[2], timeout=self.ttl / 3)
                self._acked = applied
            except (StoreError, MembershipLost) as exc:
                log.warning("member %s: could not acknowledge epoch %d: %s", self.name, applied[0], exc)
                await asyncio.sleep(0.2)
                self._ack_wanted.set()
            except Exception:
                log.exception("member %s: acknowledgement failed", self.name)
                await asyncio.sleep(0.2)
                self._ack_wanted.set()

    # ----------------------------------------------------------------- cut off from etcd

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(GUARD_EVERY)
            try:
                membership = self.membership
                lease = membership.lease if membership is not None else None
                fine = lease is not None and membership is not None and not membership.lost.is_set()
                if fine and lease is not None and lease.remaining(time.monotonic()) >= self.margin:
                    if self.cut_off is not None or self.failsafe.state is not None:
                        await self._resync(recreate=False)
                    continue
                if self.cut_off is None and self.failsafe.state is None:
                    why = "member lease not refreshed" if fine else "member lease lost"
                    refused = await self.failsafe.enter()
                    if refused is not None:
                        self.fail_closed(f"{why}; failsafe: {refused}")
                    else:
                        self._stop_acting(f"cut off from etcd: {why}")
                if not fine:
                    await self._resync(recreate=True)
            except StoreError as exc:
                log.info("member %s: still cut off from etcd (%s)", self.name, exc)
                await asyncio.sleep(0.2)
            except Exception:  # the loop that fails this instance closed must survive
                log.exception("member %s: cut-off guard failed", self.name)

    def fail_closed(self, why: str) -> None:
        reason = f"cut off from etcd: {why}"
        self.failsafe.end()
        self.cut_off = reason
        epoch = self.router.route.epoch
        log.error("member %s: %s; routing to no node and closing every session", self.name, reason)
        # Every session, not only the active node's: the leader may fail over once
        # the lease expires, and this instance cannot hear about it.
        self.router.publish(Route(None, epoch, paused=False, reason=reason))
        self.router.close_sessions(reason=reason)
        self._stop_acting(reason)

    def _stop_acting(self, reason: str) -> None:
        term = self._term
        if term is not None:
            # A leader cut off stops acting now, not only when its own lease's
            # deadline comes: its controller would route again at its next decision.
            if self._shared is not None:
                self._shared.revoke(reason)
            self._spawn(self._restart_election(term, reason), "cluster-reelect")

    async def _resync(self, *, recreate: bool) -> None:
        """etcd answers again: re-read the route, apply it, then (if the lease is
        gone) register anew at that epoch. StoreError: still cut off."""
        read = await self.store.get(self.keys.route, timeout=self.ttl / 3)
        seen = route_seen(self.keys.route, read.first, read.revision)
        latest = self.watcher.latest
        if latest is not None and latest.revision > seen.revision:
            seen = latest
        if recreate:
            old = self.membership
            if old is not None:
                await old.close(revoke=False)
            local = self._local_route(seen)
            membership = self._membership(local.epoch)
            await membership.start(timeout=self.ttl / 3)
            self.membership = membership
            self._acked = (local.epoch, False, 0)
        self.failsafe.end()
        self.cut_off = None
        self._apply(seen)
        log.info("member %s: etcd answers again; following the route (epoch %d)", self.name, self._applied[0])

    # ----------------------------------------------------------------- leading

    def _on_elected(self, term: Term) -> None:
        log.info("cluster: %s is the leader (term %d)", self.name, term.number)
        self._term = term
        self.leading = True
        self._lead_task = self._spawn(self._lead(term), "cluster-lead")

    def _on_lost(self, term: Term, reason: str) -> None:
        log.warning("cluster: %s is no longer the leader (term %d): %s", self.name, term.number, reason)
        # At once, before the controller is closed: its writes stop here (they
        # would fail the term's fence in etcd anyway).
        if self._shared is not None:
            self._shared.revoke(f"{self.name} is no longer the leader (term {term.number}): {reason}")
        self._spawn(self._stop_leading(term, reason), "cluster-unlead")

    async def _lead(self, term: Term) -> None:
        """Import the state file on the first cluster start, read the route, then
        start a controller whose writes are fenced to ``term``."""
        if self.cut_off is not None:
            # Elected while failing closed (etcd answers, this member's lease is being
            # re-created): lead only once following again.
            log.warning("cluster: %s elected while %s; giving the leadership up", self.name, self.cut_off)
            self._spawn(self._restart_election(term, "elected while cut off"), "cluster-reelect")
            return
        try:
            async with self._leadership:
                if self._term is not term:
                    return
                await import_state_file(
                    self.store,
                    self.keys,
                    StateFile(self.config.state.path),
                    leader=self.name,
                    guards=(term.fence,),
                    timeout=self.ttl / 3,
                )
                writer = RouteWriter(self.store, self.keys, self.name, guards=(term.fence,))
                seen = await writer.read(timeout=self.ttl / 3)
                shared = EtcdSharedRoute(self.store, self.keys, writer, barrier_timeout=self.ttl + 2)
                if self._controller_started:  # a closed controller does not start again
                    await self.controller.close()
                    self.controller = Controller(self.config, self.router)
                    self.control.attach(self.controller)
                controller = self.controller
                controller.state_file = ClusterStateFile(self.config.state.path, seen, on_save=shared.saved)
                controller.ctx.state_file = controller.state_file
                controller.ctx.shared = shared
                self._shared = shared
                self._controller_started = True
                await controller.start()
            log.info("cluster: %s leads: controller started (term %d)", self.name, term.number)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A leader without a controller decides nothing: give the key up.
            log.exception("cluster: %s could not start leading; releasing the leader key", self.name)
            self._spawn(self._restart_election(term, "could not start leading"), "cluster-reelect")

    async def _restart_election(self, term: Term, reason: str) -> None:
        """Give the leader key up (revoked) and campaign again a second later."""
        old = self.election
        if self._reelecting or (old.term is not term and self._term is not term):
            return  # under way, or that term has ended already (the election campaigns on)
        self._reelecting = True
        try:
            await old.close(release=True)
            await self._stop_leading(term, reason)
            await asyncio.sleep(1.0)
            if not self._closed:
                self.election = self._new_election(self._api)
                self.election.start()
        finally:
            self._reelecting = False

    async def _stop_leading(self, term: Term | None, reason: str) -> None:
        """End ``term``'s leadership here: its controller closed (an operation in
        flight is cancelled), then follow the route. A later term is left alone."""
        if term is None or self._term is not term:
            return
        self._term = None
        self.leading = False
        task, self._lead_task = self._lead_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait([task], timeout=5.0)
        async with self._leadership:
            await self.controller.close()
        log.info("cluster: %s follows again (%s)", self.name, reason)
        latest = self.watcher.latest
        if latest is not None and self.cut_off is None and self.failsafe.state is None and not self.leading:
            self._apply(latest)

    # ----------------------------------------------------------------- status

    def cluster_status(self) -> dict[str, Any]:
        leader = self.election.current_leader()
        return {
            "name": self.name,
            "leader": leader.name if leader is not None else None,
            "leader_api": leader.api if leader is not None else None,
            "role": "leader" if self.leading else "follower",
            "cut_off": self.cut_off,
            "members": list(self._members),
            **self.failsafe.status(),
        }

    _members: tuple[dict[str, Any], ...] = ()

    async def _members_loop(self) -> None:
        """Read every member record once a second (the leader: four times, since the
        members' passive health signals reach it this way; a bench measured the
        once-a-second read adding 0.16 s to a failover seen first by a follower),
        for /api/status, the roster and the signals."""
        while True:
            try:
                members = await Members(self.store, self.keys).list(timeout=self.ttl / 3)
                await self.failsafe.read_roster()
                self.failsafe.observe_members(members)
                term = self._term
                if self.leading and term is not None and self.cut_off is None:
                    await self.failsafe.keep_roster(members, term)
                self._members = tuple(
                    {
                        "name": m.name,
                        "epoch": m.record.epoch,
                        "paused": m.record.paused,
                        "proxy": m.record.proxy,
                        "api": m.record.api,
                        "unreachable": signal.to_json() if (signal := signal_of(m.record.health)) else None,
                        "roster_gen": m.record.gen,
                    }
                    for m in members
                )
                self._judge_signals(members)
            except StoreError as exc:
                log.debug("member records not read: %s", exc)
            except Exception:
                log.exception("member records not read")
            await asyncio.sleep(MEMBERS_READ_LEADING if self.leading else MEMBERS_READ_EVERY)
