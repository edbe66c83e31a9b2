"""Cluster benchmark: what a client and the cluster see when a pgroute instance, the
leader instance, or the primary dies, with three `pgroute run` instances on a local
3-member etcd. Run on demand:

    .venv/bin/python bench/cluster.py [--runs 5] [--scenarios instance leader primary] [--ttl 3]

Scenarios (medians, min and max over ``--runs`` runs each):

- ``instance``: a client on the libpq multi-host DSN (psycopg, ``target_session_attrs=
  read-write``, a follower instance listed first) commits one INSERT at a time; the
  instance it is connected to gets SIGKILL; the result is the time from the kill to
  the next committed write (the client reconnects to the next host). Target <= 1 s.
- ``leader``: the leader instance gets SIGKILL; the result is the time until another
  instance says it leads in /api/status (``cluster.role``) and its controller has
  probed a node since the kill (``nodes.*.last_probe``: the controller runs). Also
  printed: when a survivor first names the new leader (the leader key changed) and
  the longest gap of a writer through the survivors. Target <= ttl + 1 s.
- ``primary``: kill -9 of the primary, time to the first write committed by the
  mirror, with one instance (no ``[cluster]``) and with three (the barrier: every
  instance acknowledges the pause before the promotion), alternating in each round,
  each on a fresh pair; the writer goes through a follower (``--via leader``: the
  leader). Target <= 3 s with three instances; the ratio is what the cluster costs,
  split into detection and the failover operation (which holds the barrier).

The instances are `pgroute run` processes from pgroute.local.instances (the same
code as `pgroute demo --cluster`), with the tests' fast health settings by default;
the servers come from pgroute.local, etcd from pgroute.local.etcd. Every process is
stopped on exit, on Ctrl-C and on SIGTERM. No timing is asserted: figures, targets
and verdicts are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Runs from a checkout: the repository (pgroute) and this directory (common) on the path.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import common  # noqa: E402
import psycopg  # noqa: E402
from common import progress  # noqa: E402

from pgroute.local.etcd import LocalEtcdCluster, create_etcd_cluster  # noqa: E402
from pgroute.local.instances import LocalInstance, LocalInstances, new_instance  # noqa: E402
from pgroute.local.workload import EVENTS_TABLE  # noqa: E402

SCENARIOS = ("instance", "leader", "primary")
FAST_HEALTH = {"interval": 0.5, "max_retries": 2, "retry_interval": 0.2, "timeout": 1.0}  # the tests'
INSERT = f"INSERT INTO {EVENTS_TABLE} (writer, seq) VALUES (%s, %s) RETURNING inet_server_port()"


# --------------------------------------------------------------------------- the client


class Ack(NamedTuple):
    t: float  # time.monotonic() when the commit was acknowledged
    instance: int  # the port of the pgroute instance the connection went through
    server: int  # inet_server_port() of the PostgreSQL node that committed it


class LibpqWriter:
    """One libpq connection (psycopg, as an application would) on ``dsn``,
    committing one INSERT at a time and reconnecting on any error; every
    acknowledged commit is recorded with the instance and the node."""

    _ids = 1000

    def __init__(self, dsn: str, args: argparse.Namespace) -> None:
        LibpqWriter._ids += 1
        self.id = LibpqWriter._ids
        self.dsn = dsn
        self.connect_timeout = max(2, round(args.connect_timeout))  # libpq: whole seconds, at least 2
        self.query_timeout = args.query_timeout
        self.retry_sleep = args.retry_sleep
        self.acks: list[Ack] = []
        self.errors = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    def start(self) -> LibpqWriter:
        self._task = asyncio.create_task(self._run(), name=f"libpq-writer-{self.id}")
        return self

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        seq = 0
        try:
            while not self._stop:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self.dsn, autocommit=True, connect_timeout=self.connect_timeout
                        )
                    seq += 1
                    cur = await asyncio.wait_for(conn.execute(INSERT, (self.id, seq)), self.query_timeout)
                    row = await cur.fetchone()
                    assert row is not None
                    self.acks.append(Ack(time.monotonic(), conn.info.port, row[0]))
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {str(exc)[:160]}"
                    if conn is not None:
                        await _close_quietly(conn)
                    conn = None
                    await asyncio.sleep(self.retry_sleep)
        finally:
            if conn is not None:
                await _close_quietly(conn)

    def first_after(self, t: float, server: int | None = None, not_via: int | None = None) -> Ack | None:
        """The first commit acknowledged after ``t`` (by the node on port ``server``;
        through an instance not on port ``not_via``)."""
        return next(
            (
                a
                for a in acks_after(self.acks, t)
                if (server is None or a.server == server) and (not_via is None or a.instance != not_via)
            ),
            None,
        )

    async def wait_first_after(
        self, t: float, server: int | None = None, timeout: float = 60.0, not_via: int | None = None
    ) -> Ack | None:
        deadline = time.monotonic() + timeout
        while True:
            ack = self.first_after(t, server, not_via)
            if ack is not None or time.monotonic() > deadline:
                return ack
            await asyncio.sleep(0.005)

    async def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        target = len(self.acks) + count
        deadline = time.monotonic() + timeout
        while len(self.acks) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer: {count} more commits not acknowledged in {timeout}s ({self.last_error})")
            await asyncio.sleep(0.01)

    def max_gap(self, t0: float, t1: float) -> float:
        """The longest stretch without an acknowledged commit overlapping [t0, t1]."""
        times = [a.t for a in self.acks]
        gaps = [b - a for a, b in itertools.pairwise(times) if b >= t0 and a <= t1]
        return max(gaps, default=0.0)


def acks_after(acks: list[Ack], t: float) -> list[Ack]:
    """The acks after monotonic time ``t``, oldest first (scanning from the end)."""
    i = len(acks)
    while i > 0 and acks[i - 1].t > t:
        i -= 1
    return acks[i:]


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except Exception:
        conn.pgconn.finish()


# --------------------------------------------------------------------------- helpers


def wall(iso: str | None) -> float | None:
    return datetime.datetime.fromisoformat(iso).timestamp() if iso else None


def following(st: dict[str, Any] | None) -> bool:
    """The leader's controller saw the standby follow with a lag sample (before that
    an automatic failover is refused)."""
    if not st or st.get("active") not in ("primary", "mirror") or st.get("replication") != "ok":
        return False
    standby = "mirror" if st["active"] == "primary" else "primary"
    return st["nodes"][standby]["lag_bytes"] is not None


async def wait_for_status(instance: LocalInstance, ok: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = await asyncio.to_thread(instance.status)
        if st is not None and ok(st):
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"pgroute {instance.name}: no {what} within {timeout}s")
        await asyncio.sleep(0.1)


def followers_first(instances: LocalInstances) -> list[str]:
    leader = instances.leader()
    names = [i.name for i in instances]
    return [n for n in names if leader is None or n != leader.name] + ([leader.name] if leader else [])


def restart(instance: LocalInstance, instances: LocalInstances, ttl: float) -> None:
    """Start a killed instance again (its name is free once its lease expired)."""
    instance.start_again(timeout=ttl + 30)
    instances.wait_settled(60)


# --------------------------------------------------------------------------- scenarios


async def instance_kill(args: argparse.Namespace, instances: LocalInstances, index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"scenario": "instance", "run": index, "ok": False}
    instances.wait_settled(60)
    dsn = instances.multi_host_dsn(order=followers_first(instances))
    writer = LibpqWriter(dsn, args).start()
    victim: LocalInstance | None = None
    try:
        await writer.wait_acked(30, 30)
        port = writer.acks[-1].instance
        victim = next(i for i in instances if i.proxy_port == port)
        leader = instances.leader()
        result["killed"] = f"{victim.name} ({'leader' if victim is leader else 'follower'})"
        t0 = time.monotonic()
        victim.kill()
        # Through another instance: a commit in flight through the victim can still
        # be acknowledged while the kill is delivered.
        ack = await writer.wait_first_after(t0, timeout=args.deadline, not_via=victim.proxy_port)
        if ack is None:
            result["error"] = f"no commit within {args.deadline}s after the kill ({writer.last_error})"
            return result
        result.update(ok=True, took_s=ack.t - t0, errors=writer.errors)
        result["next"] = next(i.name for i in instances if i.proxy_port == ack.instance)
        progress(
            "instance %d: killed %s; next commit %.3fs later through %s",
            index,
            result["killed"],
            result["took_s"],
            result["next"],
        )
        return result
    finally:
        await writer.stop()
        if victim is not None:
            restart(victim, instances, args.ttl)


async def leader_kill(args: argparse.Namespace, instances: LocalInstances, index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"scenario": "leader", "run": index, "ok": False}
    instances.wait_settled(60)
    old = instances.leader()
    assert old is not None
    survivors = [i for i in instances if i is not old]
    dsn = instances.multi_host_dsn(order=[i.name for i in survivors])
    writer = LibpqWriter(dsn, args).start()
    try:
        await writer.wait_acked(30, 30)
        t_wall = time.time()
        t0 = time.monotonic()
        old.kill()
        named = acting = None
        deadline = t0 + args.ttl + args.deadline
        while acting is None and time.monotonic() < deadline:
            statuses = await asyncio.gather(*(asyncio.to_thread(i.status, 1.0) for i in survivors))
            for i, st in zip(survivors, statuses, strict=True):
                cluster = (st or {}).get("cluster") or {}
                if named is None and cluster.get("leader") not in (None, old.name):
                    named = time.monotonic()
                probes = [wall(n.get("last_probe")) for n in (st or {}).get("nodes", {}).values()]
                if cluster.get("role") == "leader" and any(p is not None and p > t_wall for p in probes):
                    acting = (time.monotonic(), i.name)
            await asyncio.sleep(0.02)
        if acting is None:
            result["error"] = f"no instance led with a running controller within {args.ttl + args.deadline}s"
            return result
        await writer.wait_acked(10, 30)
        result.update(
            ok=True,
            took_s=acting[0] - t0,
            named_s=named - t0 if named is not None else None,
            new_leader=acting[1],
            killed=old.name,
            writer_gap_s=writer.max_gap(t0, acting[0]),
            errors=writer.errors,
        )
        progress(
            "leader %d: killed %s; %s named after %ss, leading with its controller after %.3fs; writer gap %.3fs",
            index,
            old.name,
            acting[1],
            common.fmt_s(result["named_s"], 3),
            result["took_s"],
            result["writer_gap_s"],
        )
        return result
    finally:
        await writer.stop()
        restart(old, instances, args.ttl)


async def primary_kill(
    args: argparse.Namespace, base: Path, logs: Path, etcd: LocalEtcdCluster, mode: str, index: int
) -> dict[str, Any]:
    """kill -9 of the primary under a writer, with one instance or three."""
    stem = f"primary-{mode}-{index}"
    result: dict[str, Any] = {"scenario": "primary", "mode": mode, "run": index, "ok": False}
    pair = run_dir = None
    instances: LocalInstances | None = None
    single: LocalInstance | None = None
    writer: LibpqWriter | None = None
    try:
        pair, run_dir = common.new_pair(base, stem, args.fsync)
        health = common.health_from_args(args)
        if mode == "single":
            single = new_instance("single", run_dir / "single", pair, health)
            single.start()
            leader, dsn = single, single.dsn()
        else:
            instances = LocalInstances(run_dir, pair, etcd.endpoints, ttl=args.ttl, health=health)
            instances.start()
            found = instances.leader()
            assert found is not None
            order = followers_first(instances)
            if args.via == "leader":
                order.reverse()
            leader, dsn = found, instances.multi_host_dsn(order=order)
        await wait_for_status(leader, following, 60, "standby following with a lag sample")
        writer = LibpqWriter(dsn, args).start()
        await writer.wait_acked(30, 30)
        await asyncio.sleep(random.uniform(0, args.interval))  # anywhere in the probe cycle
        t_wall = time.time()
        t0 = time.monotonic()
        await asyncio.to_thread(pair.primary.kill)
        ack = await writer.wait_first_after(t0, server=pair.mirror.port, timeout=args.deadline)
        st = await asyncio.to_thread(leader.status, 10.0)
        events = common.events_since(st or {}, "failover", t_wall - 0.5)
        if events:
            ev = events[0]
            result["detection_s"] = ev["started_at"] - t_wall
            if ev.get("ended_at"):
                result["operation_s"] = ev["ended_at"] - ev["started_at"]
            result["barrier"] = (ev.get("details") or {}).get("barrier")
        if ack is None:
            result["error"] = f"no commit by the mirror within {args.deadline}s ({writer.last_error})"
            return result
        result.update(ok=True, took_s=ack.t - t0, errors=writer.errors)
        progress(
            "primary %s %d: first mirror commit %.3fs after kill -9 (detection %s s, failover op %s s)%s",
            mode,
            index,
            result["took_s"],
            common.fmt_s(result.get("detection_s"), 3),
            common.fmt_s(result.get("operation_s"), 3),
            f"; barrier: {result['barrier']}" if result.get("barrier") else "",
        )
        return result
    finally:
        if writer is not None:
            await writer.stop()
        if instances is not None:
            instances.stop()
            keep_logs(instances.instances, logs, stem)
        if single is not None:
            single.stop()
            keep_logs([single], logs, stem)
        common.destroy_pair(pair, run_dir)


# --------------------------------------------------------------------------- output


def summary_row(label: str, values: list[float], runs: int, target: float | None) -> list[Any]:
    s = common.stats(values)
    verdict = "-" if target is None else ("PASS" if s["median"] is not None and s["median"] <= target else "FAIL")
    return [
        label,
        f"{s['n']}/{runs}",
        common.fmt_s(s["median"], 3),
        common.fmt_s(s["min"], 3),
        common.fmt_s(s["max"], 3),
        "-" if target is None else f"<= {target:g}",
        verdict,
    ]


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    h = common.health_from_args(args)
    print()
    print(
        f"pgroute cluster benchmark: 3 `pgroute run` instances, local 3-member etcd, ttl {args.ttl:g} s; "
        f"health interval {h['interval']:g}s, timeout {h['timeout']:g}s, max_retries {h['max_retries']}, "
        f"retry_interval {h['retry_interval']:g}s (detection bound {common.detection_bound(h):.2f} s)"
    )
    print()
    rows, summary = [], {}

    def ok(scenario: str, mode: str | None = None, key: str = "took_s") -> list[float]:
        return [
            r[key]
            for r in results
            if r["scenario"] == scenario and r["ok"] and r.get(key) is not None and r.get("mode", mode) == mode
        ]

    def runs(scenario: str, mode: str | None = None) -> int:
        return sum(1 for r in results if r["scenario"] == scenario and r.get("mode", mode) == mode)

    if "instance" in args.scenarios:
        rows.append(
            summary_row("instance SIGKILL -> next commit (multi-host DSN)", ok("instance"), runs("instance"), 1.0)
        )
        summary["instance"] = common.stats(ok("instance"))
    if "leader" in args.scenarios:
        rows.append(
            summary_row(
                "leader SIGKILL -> new leader, controller running", ok("leader"), runs("leader"), args.ttl + 1.0
            )
        )
        rows.append(
            summary_row("  (new leader named by a survivor)", ok("leader", key="named_s"), runs("leader"), None)
        )
        rows.append(
            summary_row("  (writer's longest gap meanwhile)", ok("leader", key="writer_gap_s"), runs("leader"), None)
        )
        summary["leader"] = common.stats(ok("leader"))
    if "primary" in args.scenarios:
        one, three = ok("primary", "single"), ok("primary", "cluster")
        rows.append(summary_row("primary kill -9 -> mirror commit, 1 instance", one, runs("primary", "single"), None))
        rows.append(
            summary_row("primary kill -9 -> mirror commit, 3 instances", three, runs("primary", "cluster"), 3.0)
        )
        for mode, n in (("single", 1), ("cluster", 3)):
            for key, what in (("detection_s", "kill -> failover started"), ("operation_s", "failover operation")):
                rows.append(summary_row(f"  ({n}: {what})", ok("primary", mode, key), runs("primary", mode), None))
                summary[f"primary_{mode}_{key}"] = common.stats(ok("primary", mode, key))
        summary["primary_single"], summary["primary_cluster"] = common.stats(one), common.stats(three)
    print(common.table(["seconds", "runs ok", "median", "min", "max", "target (median)", "verdict"], rows))

    def median(key: str) -> float | None:
        return summary.get(key, {}).get("median")

    m1, m3 = median("primary_single"), median("primary_cluster")
    if m1 and m3:
        print(f"\n3 instances / 1 instance = {m3 / m1:.2f}x (+{m3 - m1:.3f} s, medians)", end="")
        d1, d3 = median("primary_single_detection_s"), median("primary_cluster_detection_s")
        o1, o3 = median("primary_single_operation_s"), median("primary_cluster_operation_s")
        if None not in (d1, d3, o1, o3):
            assert d1 is not None and d3 is not None and o1 is not None and o3 is not None
            print(f": detection {d3 - d1:+.3f} s, operation (barrier, etcd writes) {o3 - o1:+.3f} s", end="")
        print()
    print()
    per_run = [
        [
            r["scenario"] + (f" ({r['mode']})" if "mode" in r else ""),
            r["run"],
            common.fmt_s(r.get("took_s"), 3),
            r.get("killed", "-"),
            r.get("next") or r.get("new_leader") or "-",
            common.fmt_s(r.get("detection_s"), 3),
            common.fmt_s(r.get("operation_s"), 3),
            r.get("errors", "-"),
            (r.get("barrier") or r.get("error") or "ok")[:60],
        ]
        for r in results
    ]
    print(
        common.table(
            ["scenario", "run", "seconds", "killed", "then", "detect s", "op s", "client errors", "barrier / result"],
            per_run,
        )
    )
    return summary


# --------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    results: list[dict[str, Any]] = []
    started = time.time()
    with common.bench_dirs(args, "cluster") as (base, logs):
        etcd = create_etcd_cluster(3, base=base / "etcd")
        instances: LocalInstances | None = None
        pair = run_dir = None
        try:
            progress(
                "cluster benchmark: etcd %s; %d run(s) of %s", ", ".join(etcd.endpoints), args.runs, args.scenarios
            )
            if "instance" in args.scenarios or "leader" in args.scenarios:
                pair, run_dir = common.new_pair(base, "kills", args.fsync)
                instances = LocalInstances(
                    run_dir, pair, etcd.endpoints, ttl=args.ttl, health=common.health_from_args(args)
                )
                instances.start()
                for scenario, run in (("instance", instance_kill), ("leader", leader_kill)):
                    if scenario in args.scenarios:
                        for i in range(1, args.runs + 1):
                            results.append(await _safely(run(args, instances, i), scenario, i))
                instances.stop()
                keep_logs(instances.instances, logs, "kills")
                common.destroy_pair(pair, run_dir)
                instances = pair = None
            if "primary" in args.scenarios:
                for i in range(1, args.runs + 1):
                    # Alternate which goes first: neither always runs on a warmer machine.
                    for mode in ("single", "cluster") if i % 2 else ("cluster", "single"):
                        results.append(await _safely(primary_kill(args, base, logs, etcd, mode, i), "primary", i, mode))
        finally:
            if instances is not None:
                instances.stop()
                keep_logs(instances.instances, logs, "kills")
            common.destroy_pair(pair, run_dir)
            etcd.destroy()
    summary = report(args, results)
    common.write_json(
        args.json,
        {
            "benchmark": "cluster",
            "started_at": started,
            "ttl": args.ttl,
            "health": common.health_from_args(args),
            "summary": summary,
            "runs": results,
        },
    )
    return 0 if all(r["ok"] for r in results) else 1


async def _safely(run: Any, scenario: str, index: int, mode: str | None = None) -> dict[str, Any]:
    """A run's result; an exception is a failed run (the next runs still go)."""
    try:
        return dict(await run)
    except Exception as exc:
        progress("%s %d: FAILED: %s: %s", scenario, index, type(exc).__name__, exc)
        failed: dict[str, Any] = {"scenario": scenario, "run": index, "ok": False, "error": f"{type(exc).__name__}"}
        if mode is not None:
            failed["mode"] = mode
        return failed


def keep_logs(instances: list[LocalInstance], logs: Path, stem: str) -> None:
    """Copy the instances' logs to the kept log directory (their own goes with the run)."""
    for instance in instances:
        with contextlib.suppress(OSError):
            shutil.copy(instance.logfile, logs / f"{stem}.pgroute-{instance.name}.log")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="runs per scenario (primary: per mode)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--ttl", type=float, default=3.0, help="[cluster] ttl, seconds (leases of leader and members)")
    p.add_argument("--deadline", type=float, default=30.0, help="give up on a run after this many seconds")
    p.add_argument(
        "--via",
        choices=["follower", "leader"],
        default="follower",
        help="primary, 3 instances: the writer's first host is a follower or the leader",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for the kill's offset in the probe cycle")
    common.add_health_args(p)
    p.set_defaults(**FAST_HEALTH)
    common.add_client_args(p, connect_timeout=2.0, query_timeout=2.0)
    common.add_common_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    common.setup_logging(args.verbose)
    sys.exit(common.run_main(lambda: main(args)))
