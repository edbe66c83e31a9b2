"""Failover benchmark: time from a dead (kill -9) or hung (SIGSTOP) primary to the
first write acknowledged by the mirror through pgroute. Run on demand:

    .venv/bin/python bench/failover.py [--runs 5] [--json results.json]

Per run: a fresh primary + mirror (pgroute.local.create_pair), pgroute in its own
process (``python -m pgroute.cli run``; see common.py for why), a writer through
pgroute committing one INSERT at a time (1 s connect and query timeouts, reconnect
on any error, monotonic time of every acknowledged commit and the port of the node
that committed it). Once /api/status shows replication "ok" with a lag sample, the
primary is killed (or paused) at a random point of the probe interval; the result is
the time from just before the signal to the first commit acknowledged by the mirror.
The failover event from /api/status splits it into detection (signal -> failover
started), the failover operation, and the client's reconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Runs from a checkout: the repository (pgroute) and this directory (common) on the path.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import common  # noqa: E402
from common import progress  # noqa: E402

from pgroute.local.workload import Writer, check_acks  # noqa: E402

TARGETS = {"kill9": 3.0, "sigstop": 5.0}
LABELS = {"kill9": "kill -9 primary", "sigstop": "SIGSTOP primary"}


async def one_run(args: argparse.Namespace, base: Path, logs: Path, scenario: str, index: int) -> dict:
    stem = f"{scenario}-{index}"
    result: dict = {"scenario": scenario, "run": index, "ok": False}
    pair = run_dir = None
    pg: common.PgrouteProcess | None = None
    writer: Writer | None = None
    anomaly = False
    try:
        # Synchronous on purpose: nothing else runs yet, and a Ctrl-C meanwhile
        # still reaches the finally below once it returns.
        pair, run_dir = common.new_pair(base, stem, args.fsync)
        proxy_port, api_port = common.free_port_pair()
        health = common.health_from_args(args)
        common.write_config(
            run_dir / "pgroute.toml", pair, run_dir, proxy_port=proxy_port, api_port=api_port, health=health
        )
        pg = await common.PgrouteProcess(
            run_dir / "pgroute.toml", logs / f"{stem}.pgroute.log", proxy_port, api_port
        ).start()
        await pg.wait_following(60)
        writer = common.new_writer(pg.proxy_dsn(), args).start()
        await writer.wait_acked(50, 30)
        # Sample the kill's position in the probe cycle uniformly.
        await asyncio.sleep(random.uniform(0, args.interval))
        primary_port, mirror_port = pair.primary.port, pair.mirror.port
        acked_before = len(writer.acks)
        t_wall = time.time()
        t0 = time.monotonic()
        if scenario == "kill9":
            await asyncio.to_thread(pair.primary.kill)
        else:
            await asyncio.to_thread(pair.primary.pause)
        result["signal_call_s"] = time.monotonic() - t0
        first = await writer.wait_first_acked_after(t0, port=mirror_port, timeout=args.deadline)
        st = await pg.status()
        evs = common.events_since(st, "failover", t_wall - 0.5)
        ev = evs[0] if evs else None
        result.update(active=st.get("active"), epoch=st.get("epoch"), state=st.get("state"))
        if ev is not None:
            result["event"] = ev
            result["detection_s"] = ev["started_at"] - t_wall
            if ev.get("ended_at"):
                result["operation_s"] = ev["ended_at"] - ev["started_at"]
            result["phases"] = ev.get("phases", {})
        if first is None:
            anomaly = True
            result["error"] = (
                f"no write acknowledged by the mirror within {args.deadline}s; "
                f"active={st.get('active')} state={st.get('state')} reason={st.get('reason')!r}"
            )
            progress("%s: FAILED: %s", stem, result["error"])
            return result
        result["ok"] = True
        result["recovery_s"] = first.t - t0
        if ev is not None and ev.get("ended_at"):
            result["client_after_route_s"] = (first.t - t0) - (ev["ended_at"] - t_wall)
        # Let the writer commit a little more on the mirror, then check the record.
        await writer.wait_acked(20, 30)
        await writer.stop()
        result["writer_errors"] = dict(writer.errors)
        result["writer_error_samples"] = writer.error_samples()
        after = [a for a in writer.acks[acked_before:] if a.t > t0]
        # The signal call takes a few ms (kill(): SIGSTOP the postmaster, list its
        # children, SIGKILL them all), during which backends still commit.
        result["acked_on_primary_during_signal"] = sum(1 for a in after if a.port == primary_port)
        missing, changed = await check_acks(pair.mirror_dsn(), writer.acks, writer.workload)
        # Asynchronous replication: commits the primary acknowledged may be missing
        # on the mirror (recovered when the old primary rejoins; see bench/switch.py).
        # A commit the mirror acknowledged must be there.
        result["missing_primary_acks"] = sum(1 for a in missing if a.port == primary_port)
        result["missing_mirror_acks"] = sum(1 for a in missing if a.port != primary_port)
        result["id_changed"] = len(changed)
        if result["missing_mirror_acks"] or changed:
            anomaly = True
        progress(
            "%s: first mirror commit %.3fs after the signal (detection %s s, failover op %s s, "
            "client %s s); %d writer errors",
            stem,
            result["recovery_s"],
            common.fmt_s(result.get("detection_s"), 3),
            common.fmt_s(result.get("operation_s"), 3),
            common.fmt_s(result.get("client_after_route_s"), 3),
            sum(writer.errors.values()),
        )
        return result
    except Exception as exc:
        anomaly = True
        result["error"] = f"{type(exc).__name__}: {exc}"
        progress("%s: FAILED: %s", stem, result["error"])
        return result
    finally:
        if writer is not None:
            await writer.stop()
        if pair is not None and scenario == "sigstop":
            pair.primary.resume()
        if pg is not None:
            pg.stop()
        if anomaly and pair is not None:
            common.save_server_logs(pair, logs, stem)
            result["logs"] = str(logs)
        common.destroy_pair(pair, run_dir)


def summarize(results: list[dict], scenario: str) -> dict:
    mine = [r for r in results if r["scenario"] == scenario]
    ok = [r for r in mine if r["ok"]]
    s: dict[str, Any] = {
        **common.stats([r["recovery_s"] for r in ok]),
        "runs": len(mine),
        "failed": len(mine) - len(ok),
        "target_s": TARGETS[scenario],
        "detection": common.stats([r["detection_s"] for r in ok if "detection_s" in r]),
        "operation": common.stats([r["operation_s"] for r in ok if "operation_s" in r]),
        "client": common.stats([r["client_after_route_s"] for r in ok if "client_after_route_s" in r]),
    }
    s["verdict"] = (
        "PASS" if not s["failed"] and s["median"] is not None and s["median"] <= TARGETS[scenario] else "FAIL"
    )
    return s


async def main(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    health = common.health_from_args(args)
    bound = common.detection_bound(health)
    scenarios = [s for s in ("kill9", "sigstop") if s in args.scenarios]
    results: list[dict] = []
    started = time.time()
    with common.bench_dirs(args, "failover") as (base, logs):
        progress("failover benchmark: %d run(s) of %s; pgroute logs in %s", args.runs, ", ".join(scenarios), logs)
        for scenario in scenarios:
            for i in range(1, args.runs + 1):
                results.append(await one_run(args, base, logs, scenario, i))
    summary = {s: summarize(results, s) for s in scenarios}

    print()
    print(
        f"pgroute failover benchmark: health interval {args.interval}s, timeout {args.timeout}s, "
        f"max_retries {args.max_retries}, retry_interval {args.retry_interval}s; "
        f"{args.clients} writer(s), client timeouts {args.connect_timeout}s/{args.query_timeout}s"
    )
    print("time from the signal to the first write acknowledged by the mirror through pgroute (seconds)")
    print()
    rows = []
    for s in scenarios:
        m = summary[s]
        rows.append(
            [
                LABELS[s],
                f"{m['runs'] - m['failed']}/{m['runs']}",
                common.fmt_s(m["median"]),
                common.fmt_s(m["max"]),
                common.fmt_s(m["min"]),
                common.fmt_s(m["detection"]["median"]),
                common.fmt_s(m["operation"]["median"]),
                common.fmt_s(m["client"]["median"]),
                f"<= {m['target_s']:g}",
                m["verdict"],
            ]
        )
    print(
        common.table(
            [
                "scenario",
                "runs ok",
                "median",
                "max",
                "min",
                "detect med",
                "failover op med",
                "client med",
                "target (median)",
                "verdict",
            ],
            rows,
        )
    )
    print()
    print(
        f"detection bound from the settings: interval + timeout + max_retries*retry_interval + timeout "
        f"= {args.interval:g} + {args.timeout:g} + {args.max_retries}*{args.retry_interval:g} + {args.timeout:g}"
        f" = {bound:.2f} s"
    )
    print(
        "detect = signal -> failover event started; failover op = event duration; "
        "client = route switched -> first commit on the mirror"
    )
    print()
    per_run = []
    for r in results:
        per_run.append(
            [
                r["scenario"],
                r["run"],
                common.fmt_s(r.get("recovery_s"), 3),
                common.fmt_s(r.get("detection_s"), 3),
                common.fmt_s(r.get("operation_s"), 3),
                " ".join(f"{k}={v:.3f}" for k, v in r.get("phases", {}).items()) or "-",
                sum((r.get("writer_errors") or {}).values()),
                r.get("acked_on_primary_during_signal", "-"),
                r.get("missing_primary_acks", "-"),
                r.get("missing_mirror_acks", "-"),
                r.get("error", "ok")[:70],
            ]
        )
    print(
        common.table(
            [
                "scenario",
                "run",
                "total s",
                "detect s",
                "op s",
                "phases (s)",
                "client errors",
                "primary acks in signal",
                "missing P-acks",
                "missing M-acks",
                "result",
            ],
            per_run,
        )
    )
    print()
    print("primary acks in signal: commits the primary acknowledged while the kill/pause call ran (backends")
    print("run until they get the signal). missing P-acks: commits acknowledged by the primary, absent from")
    print("the mirror (asynchronous replication; recovered when the old primary rejoins). missing M-acks:")
    print("commits acknowledged by the mirror, absent from it: must be 0.")
    print(f"pgroute logs: {logs}")
    common.write_json(
        args.json,
        {
            "benchmark": "failover",
            "started_at": started,
            "health": health,
            "detection_bound_s": bound,
            "targets_s": {s: TARGETS[s] for s in scenarios},
            "client": {
                "clients": args.clients,
                "connect_timeout": args.connect_timeout,
                "query_timeout": args.query_timeout,
            },
            "summary": summary,
            "runs": results,
            "logs": str(logs),
        },
    )
    bad = any(summary[s]["verdict"] != "PASS" for s in scenarios)
    lost = any(r.get("missing_mirror_acks") or r.get("id_changed") for r in results)
    return 1 if bad or lost else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="runs per scenario")
    p.add_argument("--scenarios", nargs="+", choices=["kill9", "sigstop"], default=["kill9", "sigstop"])
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        help="give up on a run when the mirror acknowledged nothing this long after the signal",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for the kill's offset in the probe cycle")
    common.add_health_args(p)
    common.add_client_args(p)
    common.add_common_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    common.setup_logging(args.verbose)
    sys.exit(common.run_main(lambda: main(args)))
