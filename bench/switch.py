"""Switchover and failback benchmark: the write stall clients see during planned
switches and failback cycles under a write load. Run on demand:

    .venv/bin/python bench/switch.py [--switchovers 5] [--failbacks 3] [--json results.json]

One primary + mirror pair (pgroute.local.create_pair, with a bench table created on
both nodes since logical replication copies no DDL), pgroute in its own process
(``python -m pgroute.cli run``; see common.py for why), and an asyncio writer load
through pgroute: ``--clients`` connections (default 4) each committing one INSERT
at a time at full speed, reconnecting on any error, recording the monotonic time,
(writer, seq), id and serving node of every acknowledged commit. pgbench is not used
because a pgbench client whose connection is closed (pgroute closes sessions on the
old node at every switch) is aborted for the rest of the run.

1. N switchovers back and forth (``POST /api/switchover``), each once the standby
   follows with a lag sample.
2. M failback cycles: kill -9 the primary, automatic failover, restart the primary,
   wait until it has rejoined as a subscriber of the mirror, ``POST /api/failback``.

For each switch: the stall = the longest interval without an acknowledged commit
that overlaps [request sent, response received] (a commit after the response is
awaited so the gap is closed), pgroute's own ``details.write_stall_ms`` and the
duration of each phase from the returned event. At the end every acknowledged
commit must be on the final active node.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Runs from a checkout: the repository (pgroute) and this directory (common) on the path.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import common  # noqa: E402
from common import progress  # noqa: E402

from pgroute.local import LocalPair  # noqa: E402
from pgroute.local.workload import Writer, check_acks  # noqa: E402

TARGET_STALL_S = 1.0


async def measure_switch(pg: common.PgrouteProcess, writer: Writer, kind: str, args: argparse.Namespace) -> dict:
    """POST /api/<kind> under the load; stall and phases of that one switch."""
    before = await pg.status()
    t0 = time.monotonic()
    code, body = await pg.post(kind)
    t1 = time.monotonic()
    rec: dict = {"kind": kind, "from": before.get("active"), "http": code, "duration_s": t1 - t0}
    if code != 200 or not isinstance(body, dict) or body.get("result") != "ok":
        rec["ok"] = False
        rec["error"] = f"HTTP {code}: {body}"
        return rec
    rec["ok"] = True
    rec["phases"] = body.get("phases", {})
    details = body.get("details", {})
    rec["details"] = details
    if "write_stall_ms" in details:
        rec["pgroute_write_stall_s"] = int(details["write_stall_ms"]) / 1000
    # Close the gap: wait for commits well after the response.
    after = await writer.wait_first_acked_after(t1 + args.settle, timeout=30)
    if after is None:
        rec["ok"] = False
        rec["error"] = f"no commit acknowledged within 30s after the {kind} returned"
        return rec
    gap, g0, g1 = writer.max_gap(t0, t1)
    rec["stall_s"] = gap
    rec["stall_window"] = [g0 - t0, g1 - t0]  # relative to the request
    rec["client_stall_s"] = writer.max_client_gap(t0, t1)
    rec["baseline_gap_s"] = writer.max_gap(t0 - 1.0, t0 - 0.01)[0]
    rec["client_errors"] = writer.errors_between(t0, t1 + args.settle)
    st = await pg.status()
    rec["to"] = st.get("active")
    return rec


async def failback_cycle(pg: common.PgrouteProcess, writer: Writer, pair: LocalPair, args: argparse.Namespace) -> dict:
    rec: dict = {"kind": "failback-cycle", "ok": False}
    mirror_port = pair.mirror.port
    t_wall, t0 = time.time(), time.monotonic()
    await asyncio.to_thread(pair.primary.kill)
    first = await writer.wait_first_acked_after(t0, port=mirror_port, timeout=60)
    if first is None:
        st = await pg.status()
        rec["error"] = f"no failover: state={st.get('state')} reason={st.get('reason')!r}"
        return rec
    rec["failover_recovery_s"] = first.t - t0
    await writer.wait_first_acked_after(first.t + args.settle, timeout=30)
    rec["failover_stall_s"] = writer.max_gap(t0, first.t)[0]
    st = await pg.status()
    evs = common.events_since(st, "failover", t_wall - 0.5)
    if evs:
        rec["failover_phases"] = evs[0].get("phases", {})
        rec["failover_detection_s"] = evs[0]["started_at"] - t_wall

    # The old primary comes back: fenced, then rejoined (subscriber of the mirror).
    t_wall, t_restart = time.time(), time.monotonic()
    await asyncio.to_thread(pair.primary.start)
    rec["restart_s"] = time.monotonic() - t_restart

    def rejoined(s: dict) -> bool:
        p = s["nodes"]["primary"]
        return (
            s.get("active") == "mirror"
            and s.get("replication") == "ok"
            and not s.get("operation")
            and p.get("subscription") is not None
            and p["subscription"].get("enabled")
            and p.get("lag_bytes") is not None
        )

    st = await pg.wait_status(rejoined, args.rejoin_timeout, "the old primary to rejoin")
    rec["rejoin_s"] = time.monotonic() - t_restart
    evs = common.events_since(st, "rejoin", t_wall - 0.5)
    if evs:
        rec["rejoin_phases"] = evs[-1].get("phases", {})
        rec["rejoin_details"] = evs[-1].get("details", {})
    await asyncio.sleep(args.between)
    fb = await measure_switch(pg, writer, "failback", args)
    rec["failback"] = fb
    rec["ok"] = fb["ok"]
    if not fb["ok"]:
        rec["error"] = fb.get("error")
    return rec


def phase_medians(records: list[dict], key: str = "phases") -> dict[str, float]:
    names: list[str] = []
    for r in records:
        for n in r.get(key, {}):
            if n not in names:
                names.append(n)
    return {n: statistics.median([r[key][n] for r in records if n in r.get(key, {})]) for n in names}


async def main(args: argparse.Namespace) -> int:
    health = common.health_from_args(args)
    started = time.time()
    switches: list[dict] = []
    resets: list[dict] = []
    cycles: list[dict] = []
    verify: dict = {}
    writer: Writer | None = None
    pg: common.PgrouteProcess | None = None
    pair = run_dir = None
    anomaly = False
    with common.bench_dirs(args, "switch") as (base, logs):
        try:
            progress(
                "switch benchmark: %d switchover(s), %d failback cycle(s); pgroute log in %s",
                args.switchovers,
                args.failbacks,
                logs,
            )
            pair, run_dir = common.new_pair(base, "switch", args.fsync)
            proxy_port, api_port = common.free_port_pair()
            common.write_config(
                run_dir / "pgroute.toml", pair, run_dir, proxy_port=proxy_port, api_port=api_port, health=health
            )
            pg = await common.PgrouteProcess(
                run_dir / "pgroute.toml", logs / "switch.pgroute.log", proxy_port, api_port
            ).start()
            await pg.wait_following(60)
            writer = common.new_writer(pg.proxy_dsn(), args).start()
            await writer.wait_acked(100, 30)
            await asyncio.sleep(args.warmup)
            t_load = time.monotonic()
            n_load = len(writer.acks)

            for i in range(1, args.switchovers + 1):
                await pg.wait_following(60)
                await asyncio.sleep(args.between)
                rec = await measure_switch(pg, writer, "switchover", args)
                rec["n"] = i
                switches.append(rec)
                progress(
                    "switchover %d (%s -> %s): %s",
                    i,
                    rec.get("from"),
                    rec.get("to"),
                    f"stall {rec['stall_s']:.3f}s (pgroute says {rec.get('pgroute_write_stall_s')}s), "
                    f"phases {rec['phases']}"
                    if rec["ok"]
                    else f"FAILED: {rec['error']}",
                )
                if not rec["ok"]:
                    anomaly = True
                    break

            if args.failbacks and not anomaly:
                st = await pg.wait_following(60)
                if st["active"] != "primary":
                    # The cycles kill the primary: make it active first (not counted).
                    await asyncio.sleep(args.between)
                    rec = await measure_switch(pg, writer, "switchover", args)
                    resets.append(rec)
                    progress(
                        "switchover back to the primary before the cycles: %s",
                        f"stall {rec['stall_s']:.3f}s" if rec["ok"] else f"FAILED: {rec['error']}",
                    )
                    anomaly = not rec["ok"]
                for i in range(1, args.failbacks + 1):
                    if anomaly:
                        break
                    await pg.wait_following(60)
                    await asyncio.sleep(args.between)
                    rec = await failback_cycle(pg, writer, pair, args)
                    rec["n"] = i
                    cycles.append(rec)
                    if rec["ok"]:
                        fb = rec["failback"]
                        progress(
                            "failback cycle %d: failover %.3fs, rejoin %.2fs after restart (%s), "
                            "failback stall %.3fs (pgroute says %ss), phases %s",
                            i,
                            rec["failover_recovery_s"],
                            rec["rejoin_s"],
                            (rec.get("rejoin_details") or {}).get("mode", "?"),
                            fb["stall_s"],
                            fb.get("pgroute_write_stall_s"),
                            fb["phases"],
                        )
                    else:
                        anomaly = True
                        progress("failback cycle %d: FAILED: %s", i, rec.get("error"))

            load_s = time.monotonic() - t_load
            rate = (len(writer.acks) - n_load) / load_s if load_s > 0 else 0.0
            await writer.stop()
            # Verification: every acknowledged commit is on the active node.
            st = await pg.wait_following(60) if not anomaly else await pg.status()
            active = st.get("active")
            verify["active"] = active
            verify["acked"] = len(writer.acks)
            verify["commits_per_s"] = rate
            verify["writer_errors"] = dict(writer.errors)
            verify["writer_error_samples"] = writer.error_samples()
            if active in ("primary", "mirror"):
                node = pair.primary if active == "primary" else pair.mirror
                missing, changed = await check_acks(node.dsn(pair.dbname), writer.acks, writer.workload)
                verify["missing_on_active"] = len(missing)
                verify["id_changed_on_active"] = len(changed)
                verify["missing_examples"] = [a._asdict() for a in missing[:10]]
                standby = pair.mirror if active == "primary" else pair.primary
                deadline = time.monotonic() + 30
                while True:
                    s_missing, _ = await check_acks(standby.dsn(pair.dbname), writer.acks, writer.workload)
                    if not s_missing or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                verify["missing_on_standby_after_30s"] = len(s_missing)
                if missing or changed:
                    anomaly = True
            else:
                anomaly = True
                verify["error"] = f"no active node at the end: {st.get('reason')!r}"
        except Exception as exc:
            anomaly = True
            verify["error"] = f"{type(exc).__name__}: {exc}"
            progress("FAILED: %s", verify["error"])
        finally:
            if writer is not None:
                await writer.stop()
            if pg is not None:
                pg.stop()
            if anomaly and pair is not None:
                common.save_server_logs(pair, logs, "switch")
            common.destroy_pair(pair, run_dir)

    ok_sw = [r for r in switches if r["ok"]]
    ok_fb = [c["failback"] for c in cycles if c["ok"]]
    ok_cy = [c for c in cycles if c["ok"]]
    summary = {
        "switchover": {
            "stall": common.stats([r["stall_s"] for r in ok_sw]),
            "pgroute_write_stall": common.stats(
                [r["pgroute_write_stall_s"] for r in ok_sw if "pgroute_write_stall_s" in r]
            ),
            "client_stall": common.stats([r["client_stall_s"] for r in ok_sw]),
            "baseline_gap": common.stats([r["baseline_gap_s"] for r in ok_sw]),
            "duration": common.stats([r["duration_s"] for r in ok_sw]),
            "phases_median": phase_medians(ok_sw),
            "runs": len(switches),
            "ok": len(ok_sw),
        },
        "failback": {
            "stall": common.stats([r["stall_s"] for r in ok_fb]),
            "pgroute_write_stall": common.stats(
                [r["pgroute_write_stall_s"] for r in ok_fb if "pgroute_write_stall_s" in r]
            ),
            "client_stall": common.stats([r["client_stall_s"] for r in ok_fb]),
            "baseline_gap": common.stats([r["baseline_gap_s"] for r in ok_fb]),
            "duration": common.stats([r["duration_s"] for r in ok_fb]),
            "phases_median": phase_medians(ok_fb),
            "runs": len(cycles),
            "ok": len(ok_fb),
        },
        "failover_in_cycle": {
            "recovery": common.stats([c["failover_recovery_s"] for c in ok_cy]),
            "phases_median": phase_medians(ok_cy, "failover_phases"),
        },
        "rejoin": {
            "after_restart": common.stats([c["rejoin_s"] for c in ok_cy]),
            "phases_median": phase_medians(ok_cy, "rejoin_phases"),
        },
        "verify": verify,
    }
    for k in ("switchover", "failback"):
        m = summary[k]["stall"]["median"]
        summary[k]["verdict"] = (
            "PASS" if m is not None and m <= TARGET_STALL_S and summary[k]["ok"] == summary[k]["runs"] else "FAIL"
        )

    print()
    print(
        f"pgroute switchover/failback benchmark: {args.clients} writer connection(s) at "
        f"{'full speed' if not args.pause else f'{args.pause}s pause'} through pgroute, "
        f"{verify.get('commits_per_s', 0):.0f} commits/s on average; health interval {args.interval}s, "
        f"timeout {args.timeout}s, max_retries {args.max_retries}, retry_interval {args.retry_interval}s"
    )
    print()
    rows = []
    for k, label in (("switchover", "switchover"), ("failback", "failback (after rejoin)")):
        s = summary[k]
        rows.append(
            [
                label,
                f"{s['ok']}/{s['runs']}",
                common.fmt_s(s["stall"]["median"], 3),
                common.fmt_s(s["stall"]["max"], 3),
                common.fmt_s(s["stall"]["min"], 3),
                common.fmt_s(s["client_stall"]["median"], 3),
                common.fmt_s(s["pgroute_write_stall"]["median"], 3),
                common.fmt_s(s["baseline_gap"]["median"], 3),
                common.fmt_s(s["duration"]["median"], 3),
                f"<= {TARGET_STALL_S:g}",
                s["verdict"],
            ]
        )
    print("write stall = longest interval without an acknowledged commit (any client) overlapping the switch;")
    print("per-client = longest wait of one client; pgroute stall = details.write_stall_ms (sessions")
    print("closed and old node fenced -> new route published); baseline = longest gap")
    print("in the second before the switch; request = POST round trip. Seconds.")
    print(
        common.table(
            [
                "switch",
                "ok",
                "stall med",
                "stall max",
                "stall min",
                "per-client med",
                "pgroute stall med",
                "baseline gap med",
                "request med",
                "target (median)",
                "verdict",
            ],
            rows,
        )
    )
    print()
    print("per-phase medians (seconds):")
    prow = []
    for label, ph in (
        ("switchover", summary["switchover"]["phases_median"]),
        ("failback", summary["failback"]["phases_median"]),
        ("failover (kill -9, in cycles)", summary["failover_in_cycle"]["phases_median"]),
        ("rejoin (automatic)", summary["rejoin"]["phases_median"]),
    ):
        prow.append([label, " ".join(f"{n}={v:.3f}" for n, v in ph.items()) or "-"])
    print(common.table(["operation", "phases"], prow))
    print()
    if ok_cy:
        print(
            "failback cycles: kill -9 -> first commit on the mirror median "
            f"{summary['failover_in_cycle']['recovery']['median']:.3f}s; restart -> rejoined median "
            f"{summary['rejoin']['after_restart']['median']:.2f}s"
        )
    detail = []
    for r in switches + resets:
        detail.append(
            [
                r["kind"] + ("" if r in switches else " (reset)"),
                f"{r.get('from')}->{r.get('to')}",
                common.fmt_s(r.get("stall_s"), 3),
                common.fmt_s(r.get("pgroute_write_stall_s"), 3),
                r.get("client_errors", "-"),
                " ".join(f"{n}={v:.3f}" for n, v in r.get("phases", {}).items()) or r.get("error", "")[:80],
            ]
        )
    for c in cycles:
        fb = c.get("failback", {})
        detail.append(
            [
                f"failback cycle {c['n']}",
                f"failover {common.fmt_s(c.get('failover_recovery_s'), 3)}s, "
                f"rejoin {common.fmt_s(c.get('rejoin_s'))}s "
                f"({(c.get('rejoin_details') or {}).get('mode', '?')}, divergent tx "
                f"{(c.get('rejoin_details') or {}).get('divergent_transactions', '?')})",
                common.fmt_s(fb.get("stall_s"), 3),
                common.fmt_s(fb.get("pgroute_write_stall_s"), 3),
                fb.get("client_errors", "-"),
                " ".join(f"{n}={v:.3f}" for n, v in fb.get("phases", {}).items()) or (c.get("error") or "")[:80],
            ]
        )
    print(common.table(["switch", "move", "stall s", "pgroute s", "client errors", "phases (s)"], detail))
    print()
    if "missing_on_active" in verify:
        print(
            f"verification: {verify['acked']} acknowledged commits; missing on the final active node "
            f"({verify['active']}): {verify['missing_on_active']}; with a different id: "
            f"{verify['id_changed_on_active']}; missing on the standby after 30 s: "
            f"{verify['missing_on_standby_after_30s']} -> "
            f"{'OK, no acknowledged commit lost' if not verify['missing_on_active'] else 'LOST COMMITS'}"
        )
    else:
        print(f"verification not done: {verify.get('error')}")
    print(f"pgroute log: {logs}")
    common.write_json(
        args.json,
        {
            "benchmark": "switch",
            "started_at": started,
            "health": health,
            "target_stall_s": TARGET_STALL_S,
            "client": {
                "clients": args.clients,
                "pause": args.pause,
                "connect_timeout": args.connect_timeout,
                "query_timeout": args.query_timeout,
            },
            "summary": summary,
            "switchovers": switches,
            "resets": resets,
            "failback_cycles": cycles,
            "logs": str(logs),
        },
    )
    return (
        1
        if anomaly or any(summary[k]["verdict"] != "PASS" for k in ("switchover", "failback") if summary[k]["runs"])
        else 0
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--switchovers", type=int, default=5, help="switchovers back and forth")
    p.add_argument(
        "--failbacks", type=int, default=3, help="cycles of kill -9 primary, failover, restart, rejoin, failback"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first switch")
    p.add_argument("--between", type=float, default=1.0, help="seconds of steady load before each switch")
    p.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="the stall window closes with a commit this long after the switch returned",
    )
    p.add_argument("--rejoin-timeout", type=float, default=120.0, help="seconds to wait for the rejoin")
    common.add_health_args(p)
    common.add_client_args(p, clients=4)
    common.add_common_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    common.setup_logging(args.verbose)
    sys.exit(common.run_main(lambda: main(args)))
