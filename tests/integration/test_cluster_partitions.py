"""Randomized partitions of a pgroute cluster (issue 14 item 9): many trials, bounded
in time, each cutting instances off from etcd, from their peers' APIs and from the
active PostgreSQL node while a writer through every instance commits.

Setup: a real pair, a real 3-member etcd, three in-process instances a, b, c (TTL 2 s,
fast health). Each instance reaches each etcd member, each PostgreSQL node (its proxy,
its controller, and a subscription its controller creates) and its peers reach its API
(``[cluster] advertise_api``) only through relays of its own (pgroute/local/
relay.py); a frozen relay holds its sockets and forwards nothing, as dropped packets
would. A writer through each instance (plain connections, reconnecting on error)
inserts rows whose server-side defaults record the node that took them
(``inet_server_port()``) and when (``clock_timestamp()``: both servers run on this
machine, one clock). The test's own watch on the route key, straight to etcd, records
every route the leaders wrote.

A trial picks at random: which instances are cut off from etcd (none, some, all; each
from every member or from one or two), for how long (0 .. 2 TTL), whether the leader is
among them (forced in half of the "some" draws; reported), an action during the
partition (nothing; a switchover asked through a random instance's API, forwarded to
the leader; rarely a kill -9 of the active node, then started again, rejoined by the
leader and failed back before the next trial), which instances lose their path to the
active node (mostly the leader: it sees the node die while others still reach it),
which API relays are frozen, and whether the heal delivers the held traffic or closes
it. Then it heals, waits until the cluster is stable (one leader, every instance
routing where the route record says at its epoch, none paused, cut off or in
failsafe) and checks, with and without the failsafe (PGROUTE_PARTITION_FAILSAFE=0):

- one writable node at a time: order every acknowledged write of the run so far by the
  server's ``clock_timestamp()`` at its INSERT and merge consecutive writes on the same
  node into runs. The runs' nodes must be a subsequence of the route history's active
  nodes (the route record at every revision, "no node" left out, equal neighbours
  merged), matched in order from the first route: a change of node in the writes needs
  a switch of the route to that node in between, and A..B..A needs two, so two nodes
  taking writes over one interval (interleaved) is a violation. It holds when pgroute
  is right: an acknowledged write committed before the barrier closed its session (or
  its instance failed closed), and the next node is promoted only after the barrier.
- no acknowledged commit lost: every acknowledged write of the run so far is on the
  node active at the end of the trial (after its heal and any rejoin and failback).

A violation fails the test at once, naming the trial, its random choices and the seed
(printed; set it with PGROUTE_PARTITION_SEED); PGROUTE_PARTITION_TRIALS sets the count
(default 50), PGROUTE_PARTITION_LOG a file for every pgroute log line. Liveness is
waited for with generous bounds; a trial that does not recover by itself (no failover,
a command with no answer, a standby that does not follow) is recorded, recovered the
way an operator would, and printed at the end; it fails the test with
PGROUTE_PARTITION_LIVENESS=strict.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from pgroute import app
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.route import RouteSeen, RouteWatcher
from pgroute.cluster_node import ClusterNode
from pgroute.local import DEFAULT_SCHEMA
from pgroute.local.relay import Relay
from pgroute.local.workload import Ack, Row, Workload, check_acks, wait_until

from .harness import Writer, api_async, make_config, proxy_dsn

pytestmark = [pytest.mark.integration]

TTL = 2.0
TABLE = "partition_writes"
SCHEMA = (
    DEFAULT_SCHEMA
    + f"""
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    port int NOT NULL DEFAULT inet_server_port(),
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
)
NAMES = ("a", "b", "c")
# 0: every instance fails closed as soon as it is cut off from etcd (no failsafe).
FAILSAFE = os.environ.get("PGROUTE_PARTITION_FAILSAFE", "1") != "0"
STABLE_TIMEOUT = 60.0
TRIALS = int(os.environ.get("PGROUTE_PARTITION_TRIALS") or 50)


class Stamped(Workload):
    """One row per write, named ``<instance>-<client>-<seq>``; remembers the server's
    timestamp of each acknowledged one (RETURNING)."""

    def __init__(self, tag: str, stamps: dict[str, datetime.datetime]) -> None:
        self.tag = tag
        self.stamps = stamps

    async def insert(self, conn: asyncpg.Connection, client: int, seq: int, timeout: float) -> Row:
        name = f"{self.tag}-{client}-{seq}"
        row = await conn.fetchrow(
            f"INSERT INTO {TABLE} (name) VALUES ($1) RETURNING id, port, at", name, timeout=timeout
        )
        self.stamps[name] = row["at"]
        return Row(TABLE, row["id"], name, row["port"])

    async def present(self, conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
        return {(TABLE, r["name"]): r["id"] for r in await conn.fetch(f"SELECT id, name FROM {TABLE}")}


@dataclass
class Trial:
    number: int
    cut: dict[str, tuple[int, ...]]  # instance -> indexes of the etcd members it loses
    duration: float
    action: str  # nothing | switchover | kill
    via: str  # the instance asked (switchover)
    at: float  # seconds into the partition
    heal: str  # thaw | close
    api_cut: tuple[str, ...]
    pg_cut: tuple[str, ...] = ()  # instances whose path to the node active at the start is frozen
    cut_at: dict[str, float] = field(default_factory=dict)  # seconds into the trial each etcd cut starts
    leader: str = ""
    t0: float = 0.0
    t1: float = 0.0
    outcome: str = ""
    switches: int = 0
    problems: list[str] = field(default_factory=list)  # liveness: reported, the run goes on

    def describe(self, seed: int) -> str:
        cut = ",".join(
            f"{n}{'' if len(m) == 3 else ':' + ''.join(map(str, m))}"
            + (f"@{self.cut_at[n]:.2f}" if self.cut_at.get(n) else "")
            for n, m in sorted(self.cut.items())
        )
        text = (
            f"trial {self.number} (seed {seed}): cut [{cut or '-'}] for {self.duration:.2f}s, "
            f"leader {self.leader} {'cut' if self.leader in self.cut else 'not cut'}, action {self.action}"
        )
        if self.action != "nothing":
            text += f" at +{self.at:.2f}s" + (f" via {self.via}" if self.action == "switchover" else "")
        if self.pg_cut:
            text += f", active node unreachable from [{','.join(self.pg_cut)}]"
        if self.api_cut:
            text += f", api relays frozen [{','.join(self.api_cut)}]"
        return text + f", heal {self.heal}"


@dataclass
class Cluster:
    pair: Any
    runs: list[app.Running]
    etcd_relays: dict[str, list[Relay]]
    api_relays: dict[str, Relay]
    pg_relays: dict[str, dict[str, Relay]] = field(default_factory=dict)  # instance -> node -> relay
    ports: dict[int, str] = field(default_factory=dict)  # each server's port -> its node
    history: list[tuple[int, int, str | None]] = field(default_factory=list)  # revision, epoch, active
    watcher: RouteWatcher | None = None

    def node(self, name: str) -> ClusterNode:
        running = self.runs[NAMES.index(name)]
        assert running.cluster is not None
        return running.cluster

    def leaders(self) -> list[str]:
        return [n for n in NAMES if self.node(n).leading]

    def routed(self, name: str) -> tuple[str | None, int]:
        route = self.runs[NAMES.index(name)].router.route
        return (route.backend.name if route.backend else None, route.epoch)

    def on_route(self, seen: RouteSeen) -> None:
        if seen.route is not None:
            active = seen.route.active.value if seen.route.active is not None else None
            self.history.append((seen.revision, seen.route.epoch, active))

    def stable(self) -> tuple[str, int, str] | None:
        """(node, epoch, leader) when exactly one instance leads and every one routes, not
        paused nor cut off, where the route record says."""
        leaders = self.leaders()
        if len(leaders) != 1 or self.watcher is None or self.watcher.latest is None:
            return None
        routes = {self.routed(n) for n in NAMES}
        if len(routes) != 1:
            return None
        ((node, epoch),) = routes
        record = self.watcher.latest.route
        if node is None or record is None or record.paused or record.epoch != epoch:
            return None
        if record.active is None or record.active.value != node:
            return None
        for name, running in zip(NAMES, self.runs, strict=True):
            node_ = self.node(name)
            if running.router.route.paused or node_.cut_off or node_.failsafe.state is not None:
                return None
        return node, epoch, leaders[0]

    def leader_status(self) -> dict[str, Any] | None:
        leaders = self.leaders()
        return self.node(leaders[0]).control.status() if len(leaders) == 1 else None

    def following(self) -> bool:
        status = self.leader_status()
        if status is None or status.get("replication") != "ok" or status.get("active") not in ("primary", "mirror"):
            return False
        standby = "mirror" if status["active"] == "primary" else "primary"
        return status["nodes"][standby]["lag_bytes"] is not None

    def describe(self) -> str:
        """Who leads, what each instance routes, what the leader's controller says."""
        status = self.leader_status()
        text = f"leaders {self.leaders()}; routes " + ", ".join(f"{n} {self.routed(n)}" for n in NAMES)
        if self.watcher is not None and self.watcher.latest is not None:
            text += f"; record {self.watcher.latest.route}"
        if status is not None:
            nodes = {n: {k: v.get(k) for k in ("role", "up", "error", "lag_bytes", "subscription")}
                     for n, v in status["nodes"].items()}  # fmt: skip
            text += f"; leader: state {status['state']}, replication {status['replication']}, nodes {nodes}"
        return text

    def dsn(self, node: str) -> str:
        return self.pair.primary_dsn() if node == "primary" else self.pair.mirror_dsn()

    def server(self, node: str) -> Any:
        return self.pair.primary if node == "primary" else self.pair.mirror


@contextlib.asynccontextmanager
async def partitioned_cluster(pair, etcd, tmp_path):
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(pair, [], {}, {})
    cluster.ports = {pair.primary.port: "primary", pair.mirror.port: "mirror"}
    store = EtcdStore(etcd.endpoints, timeout=2.0)
    relays: list[Relay] = []
    try:
        cluster.watcher = RouteWatcher(store, Keys(prefix), cluster.on_route)
        for name in NAMES:
            mine = []
            for m in etcd.members:
                mine.append(await Relay(m.host, m.client_port, f"{name}->{m.name}").start())
            cluster.etcd_relays[name] = mine
            relays += mine
            settings: dict[str, Any] = {
                "etcd": [r.endpoint for r in mine],
                "name": name,
                "prefix": prefix,
                "ttl": TTL,
            }
            # Its proxy and its controller reach each node through its own relay too (a
            # subscription its controller creates as well: it follows the same path).
            cluster.pg_relays[name] = {}
            dsns: dict[str, dict[str, str]] = {}
            for node, server in (("primary", pair.primary), ("mirror", pair.mirror)):
                relay = await Relay(server.host, server.port, f"{name}->{node}").start()
                relays.append(relay)
                cluster.pg_relays[name][node] = relay
                dsns[node] = {"dsn": server.dsn(pair.dbname).replace(f":{server.port}/", f":{relay.port}/")}
            # Its peers reach its API (failsafe confirmations, forwarded commands)
            # through a relay too; its target, the API's port, is known once started.
            api_relay = await Relay("127.0.0.1", 0, f"->{name}.api").start()
            relays.append(api_relay)
            cluster.api_relays[name] = api_relay
            settings["advertise_api"] = f"http://{api_relay.endpoint}"
            if not FAILSAFE:
                settings["failsafe_max"] = 0
            state = tmp_path / name
            state.mkdir()
            running = await app.start(make_config(pair, state, cluster=settings, **dsns))
            cluster.runs.append(running)
            api_relay.target = ("127.0.0.1", running.api_port)
            if name == "a":
                await wait_until(lambda: cluster.node("a").leading, 30, what="a leads")
        await cluster.watcher.start(timeout=10)
        yield cluster
    finally:
        for running in cluster.runs:
            with contextlib.suppress(Exception):
                await running.stop()
        if cluster.watcher is not None:
            await cluster.watcher.close()
        for relay in relays:
            await relay.close()
        await store.close()


def pick_trial(rng: random.Random, number: int, leader: str) -> Trial:
    kind = rng.choices(["none", "some", "all"], [0.15, 0.6, 0.25])[0]
    if kind == "none":
        cut_names: list[str] = []
    elif kind == "all":
        cut_names = list(NAMES)
    else:
        cut_names = rng.sample(NAMES, rng.choice([1, 1, 2]))
        # Half of these trials cut the leader off, whatever the draw.
        if rng.random() < 0.5 and leader not in cut_names:
            cut_names[0] = leader
    cut: dict[str, tuple[int, ...]] = {}
    for name in cut_names:
        # Mostly from every etcd member; sometimes from one or two (a quorum stays reachable).
        cut[name] = (0, 1, 2) if rng.random() < 0.75 else tuple(sorted(rng.sample(range(3), rng.choice([1, 2]))))
    duration = rng.uniform(0.0, 2 * TTL)
    # Half the etcd cuts start later than the rest: an instance that stops hearing
    # etcd just before a switch is what the barrier must wait for.
    cut_at = {n: 0.0 if rng.random() < 0.5 else rng.uniform(0.0, duration) for n in cut}
    action = rng.choices(["nothing", "switchover", "kill"], [0.47, 0.45, 0.08])[0]
    api_cut = tuple(sorted(n for n in NAMES if rng.random() < 0.3))
    pg_cut: tuple[str, ...] = ()
    if rng.random() < 0.35:
        # Mostly the leader's path: it then sees the active node die while others
        # (maybe cut off from etcd) still reach it, the split a barrier must prevent.
        chosen = {leader} if rng.random() < 0.7 else set()
        chosen |= {n for n in NAMES if rng.random() < 0.3}
        pg_cut = tuple(sorted(chosen or {rng.choice(NAMES)}))
    return Trial(
        number=number,
        cut=cut,
        duration=duration,
        action=action,
        via=rng.choice(NAMES),
        at=rng.uniform(0.0, duration),
        heal=rng.choice(["thaw", "close"]),
        api_cut=api_cut,
        pg_cut=pg_cut,
        cut_at=cut_at,
        leader=leader,
    )


def switches(history: list[tuple[int, int, str | None]], start: int) -> int:
    """Changes of the route's active node in ``history[start:]`` ("no node" left out),
    counting one into ``history[start]`` from the node before it."""
    count = 0
    last = next((h[2] for h in reversed(history[:start]) if h[2] is not None), None)
    for _, _, active in history[start:]:
        if active is not None:
            count += last is not None and active != last
            last = active
    return count


def check_one_writable(
    writes: list[tuple[datetime.datetime, str, Ack]], history: list[tuple[int, int, str | None]]
) -> str | None:
    """The first run of writes whose node the route history cannot account for, as a
    message; None when the runs' nodes are a subsequence of the route's active nodes."""
    routes: list[str] = []
    for _, _, active in history:
        if active is not None and (not routes or routes[-1] != active):
            routes.append(active)
    runs: list[tuple[str, int, int]] = []  # node, first index, last index in writes
    for i, (_, node, _) in enumerate(writes):
        if runs and runs[-1][0] == node:
            runs[-1] = (node, runs[-1][1], i)
        else:
            runs.append((node, i, i))
    j = 0
    for k, (node, first, _) in enumerate(runs):
        while j < len(routes) and routes[j] != node:
            j += 1
        if j == len(routes):
            around = runs[max(0, k - 2) : k + 2]
            lines = [
                f"  {n}: {last_ - first_ + 1} writes {writes[first_][0].time()}..{writes[last_][0].time()} "
                f"({writes[first_][2].name}..{writes[last_][2].name})"
                for n, first_, last_ in around
            ]
            return (
                f"writes on {node} from {writes[first][0].time()} ({writes[first][2].name}) are not accounted "
                f"for by the route history {routes}; the runs around it:\n" + "\n".join(lines)
            )
    return None


# Bounded per trial (a stuck one costs up to about 90 s); about 4 s per trial when all is well.
@pytest.mark.timeout(120 + 30 * TRIALS)
async def test_random_partitions_keep_one_writable_node_and_every_ack(pair_factory, etcd, tmp_path):
    seed = int(os.environ.get("PGROUTE_PARTITION_SEED") or random.randrange(1 << 32))
    count = TRIALS
    rng = random.Random(seed)
    print(f"\npartition test: seed {seed} (PGROUTE_PARTITION_SEED), {count} trials, ttl {TTL}s, failsafe "
          f"{'on' if FAILSAFE else 'off'} (PGROUTE_PARTITION_FAILSAFE)")  # fmt: skip
    if os.environ.get("PGROUTE_PARTITION_LOG"):  # every pgroute log line of the run, for a post-mortem
        handler = logging.FileHandler(os.environ["PGROUTE_PARTITION_LOG"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pgroute").addHandler(handler)
        logging.getLogger("pgroute").setLevel(logging.DEBUG)
    pair = pair_factory(schema_sql=SCHEMA)
    stamps: dict[str, datetime.datetime] = {}
    t_start = time.monotonic()
    trials: list[Trial] = []
    async with partitioned_cluster(pair, etcd, tmp_path) as cluster:
        ports = cluster.ports
        writers = {n: Writer(proxy_dsn(cluster.runs[i]), Stamped(n, stamps), connect_timeout=3.0,
                             query_timeout=3.0, pause=0.02).start()
                   for i, n in enumerate(NAMES)}  # fmt: skip
        try:
            await wait_until(cluster.stable, STABLE_TIMEOUT, what="a stable cluster")
            await wait_until(cluster.following, STABLE_TIMEOUT, what="the standby following")
            for w in writers.values():
                await w.wait_acked(5)
            for number in range(1, count + 1):
                _, _, leader = await wait_until(cluster.stable, STABLE_TIMEOUT, what="a stable cluster")
                trial = pick_trial(rng, number, leader)
                trials.append(trial)
                await run_trial(cluster, trial, rng, seed)
                acks = [a for w in writers.values() for a in w.acks]
                await check_trial(cluster, trial, seed, acks, stamps, ports)
                print(
                    f"{trial.describe(seed)}: {trial.outcome}, {trial.switches} switches; "
                    f"{trial.t1 - trial.t0:.1f}s, {len(acks)} acks"
                    + "".join(f"\n  LIVENESS: {p}" for p in trial.problems)
                )
        finally:
            for w in writers.values():
                await w.stop()
        # The writes acknowledged while the writers stopped, checked too.
        acks = [a for w in writers.values() for a in w.acks]
        final = trials[-1] if trials else Trial(0, {}, 0, "nothing", "a", 0, "thaw", ())
        await check_trial(cluster, final, seed, acks, stamps, ports)
    elapsed = time.monotonic() - t_start
    summarize(trials, acks, ports, cluster.history, elapsed, writers)
    stuck = [f"{t.describe(seed)}: {p}" for t in trials for p in t.problems]
    if stuck and os.environ.get("PGROUTE_PARTITION_LIVENESS") != "strict":
        # Safety (the two asserts of every trial) fails the test at once; a trial
        # that needed an operator's hand is printed and counted, and fails it only
        # with PGROUTE_PARTITION_LIVENESS=strict: about one trial in fifty still
        # does after the fixes it found (see the issue 14 closing note), and the
        # suite must not fail at random on them.
        print("LIVENESS (not failing; PGROUTE_PARTITION_LIVENESS=strict to fail):\n" + "\n".join(stuck))
        return
    assert not stuck, "the cluster did not recover by itself:\n" + "\n".join(stuck)


async def run_trial(cluster: Cluster, trial: Trial, rng: random.Random, seed: int) -> None:
    trial.t0 = time.monotonic()
    history_at = len(cluster.history)
    active, _, _ = cluster.stable() or (None, 0, "")
    assert active is not None, f"{trial.describe(seed)}: not stable at the start"
    # (seconds into the trial, what happens then), in order.
    steps: list[tuple[float, str, list[Relay]]] = [
        (trial.cut_at.get(n, 0.0), "freeze", [cluster.etcd_relays[n][i] for i in members])
        for n, members in trial.cut.items()
    ]
    steps.append((0.0, "freeze", [cluster.api_relays[n] for n in trial.api_cut]))
    steps.append((0.0, "freeze", [cluster.pg_relays[n][active] for n in trial.pg_cut]))
    if trial.action != "nothing":
        steps.append((trial.at, trial.action, []))
    steps.sort(key=lambda step: step[0])
    frozen: list[Relay] = []
    action_task: asyncio.Task[Any] | None = None
    try:
        for at, step, relays in steps:
            await asyncio.sleep(max(0.0, trial.t0 + at - time.monotonic()))
            for relay in relays:
                relay.freeze()
                frozen.append(relay)
            if step == "switchover":
                via = cluster.runs[NAMES.index(trial.via)]
                action_task = asyncio.create_task(api_async(via, "/api/switchover", "POST"))
            elif step == "kill":
                await asyncio.to_thread(cluster.server(active).kill)
        await asyncio.sleep(max(0.0, trial.t0 + trial.duration - time.monotonic()))
    finally:
        for relay in frozen:
            if trial.heal == "close":
                relay.cut()
            relay.thaw()
    outcome = "healed"
    if action_task is not None:
        try:
            code, body = await asyncio.wait_for(action_task, 90)
            error = body.get("error", body) if isinstance(body, dict) else body
            outcome = "switchover " + ("ok" if code == 200 else f"{code} {str(error)[:90]}")
        except TimeoutError:  # the client's own (60 s) or this bound
            outcome = "switchover: no answer"
            trial.problems.append("a switchover asked during the partition got no answer within 60s")
    if trial.action == "kill":
        outcome = await recover_from_kill(cluster, trial, active, rng, seed)
    await wait_until(cluster.stable, STABLE_TIMEOUT, what=f"{trial.describe(seed)}: a stable cluster after the heal")
    try:
        await wait_until(cluster.following, 30, what="the standby following")
    except TimeoutError:
        trial.problems.append(f"the standby not following 30s after the heal: {cluster.describe()}")
    trial.switches = switches(cluster.history, history_at)
    trial.outcome = outcome
    trial.t1 = time.monotonic()


async def recover_from_kill(cluster: Cluster, trial: Trial, killed: str, rng: random.Random, seed: int) -> str:
    """After a kill -9 of the active node: the failover (forced through the API, as an
    operator would, when the leader does not fail over by itself: a liveness problem),
    the killed node started again and rejoined by the leader, then a failback when the
    mirror is left active. What happened, in a few words."""
    what = trial.describe(seed)
    other = "mirror" if killed == "primary" else "primary"

    def failed_over() -> bool:
        return (cluster.stable() or ("",))[0] == other

    outcome = f"{killed} killed, failed over"
    try:
        await wait_until(failed_over, 30, what=f"{what}: failover")
    except TimeoutError:
        trial.problems.append(f"no failover within 30s of the heal: {cluster.describe()}")
        code, body = await api_async(cluster.runs[0], "/api/failover", "POST", {"force": True})
        await wait_until(failed_over, STABLE_TIMEOUT, what=f"{what}: a forced failover ({code} {body})")
        outcome = f"{killed} killed, failover FORCED"
    server = cluster.server(killed)
    await asyncio.to_thread(server.start)
    for relays in cluster.pg_relays.values():  # started on another port if its was taken
        relays[killed].target = (server.host, server.port)
    cluster.ports[server.port] = killed
    await wait_until(cluster.following, 120, what=f"{what}: {killed} rejoined")
    outcome += ", rejoined"
    if other == "mirror":
        via = cluster.runs[NAMES.index(rng.choice(NAMES))]
        code, body = await api_async(via, "/api/failback", "POST", {})
        if code == 200:
            outcome += ", failed back"
        else:
            trial.problems.append(f"failback refused: {code} {body}")
    return outcome


async def check_trial(
    cluster: Cluster,
    trial: Trial,
    seed: int,
    acks: list[Ack],
    stamps: dict[str, datetime.datetime],
    ports: dict[int, str],
) -> None:
    what = trial.describe(seed)
    writes = sorted((stamps[a.name], ports[a.port], a) for a in acks)
    problem = check_one_writable(writes, cluster.history)
    if problem:
        pytest.fail(f"two writable nodes, {what}:\n{problem}\n(the route history: {cluster.history[-12:]})")
    node, epoch, _ = await wait_until(cluster.stable, STABLE_TIMEOUT, what=f"{what}: a stable cluster")
    result = await check_acks(cluster.dsn(node), acks, Stamped("", {}))
    if result.absent:
        times = sorted(a.t for a in acks)
        lines = [f"  {a.name} on {ports[a.port]} at {stamps[a.name].time()}" for a in result.absent[:10]]
        pytest.fail(
            f"{len(result.absent)} acknowledged writes lost, not on {node} (epoch {epoch}) after {what}"
            f" (of {len(times)}):\n" + "\n".join(lines)
        )
    assert not result.changed, f"{what}: rows under another id on {node}: {[a.name for a in result.changed[:10]]}"


def summarize(
    trials: list[Trial],
    acks: list[Ack],
    ports: dict[int, str],
    history: list[tuple[int, int, str | None]],
    elapsed: float,
    writers: dict[str, Writer],
) -> None:
    n = len(trials) or 1
    actions = {a: sum(1 for t in trials if t.action == a) for a in ("nothing", "switchover", "kill")}
    kinds = {
        "none": sum(1 for t in trials if not t.cut),
        "some": sum(1 for t in trials if 0 < len(t.cut) < 3),
        "all": sum(1 for t in trials if len(t.cut) == 3),
    }
    partial = sum(1 for t in trials if any(len(m) < 3 for m in t.cut.values()))
    leader_cut = sum(1 for t in trials if t.leader in t.cut)
    ok_switch = sum(1 for t in trials if t.outcome.startswith("switchover ok"))
    per_node = {node: sum(1 for a in acks if ports[a.port] == node) for node in ("primary", "mirror")}
    print(
        f"\ntotals: {len(trials)} trials in {elapsed:.1f}s ({elapsed / n:.1f}s per trial); "
        f"acknowledged writes {len(acks)} (primary {per_node['primary']}, mirror {per_node['mirror']}), "
        f"errors {sum(w.error_count for w in writers.values())}; route switches {switches(history, 0)}; "
        f"0 moments with two writable nodes, 0 acknowledged writes lost; "
        f"trials with a liveness problem {sum(1 for t in trials if t.problems)}"
    )
    print(
        "actions: " + ", ".join(f"{a} {c} ({100 * c / n:.0f}%)" for a, c in actions.items())
        + f"; switchovers ok {ok_switch}; cut: "
        + ", ".join(f"{k} {c} ({100 * c / n:.0f}%)" for k, c in kinds.items())
        + f"; partly cut {partial}; leader cut {leader_cut} ({100 * leader_cut / n:.0f}%)"
        + f"; api relays frozen in {sum(1 for t in trials if t.api_cut)}"
    )  # fmt: skip


def test_the_checks_own_logic():
    """check_one_writable and switches on made-up histories (no servers)."""
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def writes(nodes: str) -> list[tuple[datetime.datetime, str, Ack]]:
        out = []
        for i, ch in enumerate(nodes):
            node = "primary" if ch == "P" else "mirror"
            out.append((base + datetime.timedelta(milliseconds=i), node, Ack(i, i, 1, i, TABLE, i, f"w-{i}", 0)))
        return out

    p_m_p = [(1, 1, "primary"), (2, 2, None), (3, 2, "mirror"), (4, 3, None), (5, 3, "primary")]
    assert check_one_writable(writes("PPMMPP"), p_m_p) is None
    assert check_one_writable(writes("PPPP"), p_m_p) is None
    assert check_one_writable(writes("MM"), p_m_p) is None  # the first writes came later
    assert switches(p_m_p, 0) == 2 and switches(p_m_p, 3) == 1 and switches(p_m_p, 4) == 1
    aborted = [(1, 1, "primary"), (2, 2, None), (3, 3, "primary")]
    assert switches(aborted, 0) == 0
    # Interleaved: more changes of node than the route made.
    problem = check_one_writable(writes("PPMPMP"), p_m_p)
    assert problem is not None and "writes on mirror" in problem, problem
    problem = check_one_writable(writes("PMP"), aborted)
    assert problem is not None and "not accounted for" in problem, problem
