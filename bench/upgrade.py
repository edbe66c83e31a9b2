"""Upgrade benchmark: the write stall of a cross-version switchover (old -> new) and of
its rollback (new -> old), next to the same switches between two servers of the old
version, measured in the same run. Run on demand:

    .venv/bin/python bench/upgrade.py [--from 15] [--to 18] [--switches 5] [--json results.json]

Two pairs, one after the other, each built the way bench/switch.py builds its pair
(common.new_pair, pgroute in its own process, ``--clients`` writer connections, 4 by
default, committing at full speed through pgroute): first both nodes on ``--from``
(the same-version reference), then primary on ``--from`` and mirror on ``--to`` (the
upgrade). On each pair, ``--switches`` rounds of: ``POST /api/switchover`` (primary ->
mirror: the upgrade), then ``POST /api/failback`` (mirror -> primary: the rollback of
the README's recipe), each once the other node follows with a lag sample. Each switch
is measured by switch.measure_switch: the longest interval without an acknowledged
commit overlapping the request, the longest wait of one client, and pgroute's own
``details.write_stall_ms``. At the end every acknowledged commit must be on the final
active node. Defaults for the versions: the oldest and newest installed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Runs from a checkout: the repository (pgroute) and this directory (common) on the path.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import common  # noqa: E402
from common import progress  # noqa: E402
from switch import TARGET_STALL_S, measure_switch, phase_medians  # noqa: E402

from pgroute.demo.upgrade import choose_versions  # noqa: E402
from pgroute.errors import LocalClusterError  # noqa: E402
from pgroute.local.workload import check_acks  # noqa: E402

RDS_BLUE_GREEN = "typically under one minute (AWS RDS Blue/Green deployments documentation)"


async def run_pair(args: argparse.Namespace, base: Path, logs: Path, name: str, versions: tuple[int, int]) -> dict:
    """Switchover and failback rounds on one pair under the writer load; the records."""
    health = common.health_from_args(args)
    out: dict = {"name": name, "versions": list(versions), "switchover": [], "failback": [], "verify": {}}
    pair = run_dir = pg = writer = None
    try:
        pair, run_dir = common.new_pair(base, name, args.fsync, *versions)
        proxy_port, api_port = common.free_port_pair()
        common.write_config(
            run_dir / "pgroute.toml", pair, run_dir, proxy_port=proxy_port, api_port=api_port, health=health
        )
        pg = await common.PgrouteProcess(
            run_dir / "pgroute.toml", logs / f"{name}.pgroute.log", proxy_port, api_port
        ).start()
        await pg.wait_following(60)
        writer = common.new_writer(pg.proxy_dsn(), args).start()
        await writer.wait_acked(100, 30)
        await asyncio.sleep(args.warmup)
        t_load, n_load = time.monotonic(), len(writer.acks)
        for i in range(1, args.switches + 1):
            for kind in ("switchover", "failback"):
                await pg.wait_following(60)
                await asyncio.sleep(args.between)
                rec = await measure_switch(pg, writer, kind, args)
                rec["n"] = i
                out[kind].append(rec)
                progress(
                    "%s %s %d (%s -> %s): %s",
                    name,
                    kind,
                    i,
                    rec.get("from"),
                    rec.get("to"),
                    f"stall {rec['stall_s']:.3f}s (pgroute says {rec.get('pgroute_write_stall_s')}s)"
                    if rec["ok"]
                    else f"FAILED: {rec['error']}",
                )
                if not rec["ok"]:
                    out["verify"]["error"] = rec["error"]
                    return out
        load_s = time.monotonic() - t_load
        await writer.stop()
        st = await pg.wait_following(60)
        node = pair.primary if st["active"] == "primary" else pair.mirror
        missing, changed = await check_acks(node.dsn(pair.dbname), writer.acks, writer.workload)
        out["verify"] = {
            "active": st["active"],
            "acked": len(writer.acks),
            "commits_per_s": (len(writer.acks) - n_load) / load_s if load_s > 0 else 0.0,
            "missing_on_active": len(missing),
            "id_changed_on_active": len(changed),
            "writer_errors": dict(writer.errors),
        }
    except Exception as exc:
        out["verify"]["error"] = f"{type(exc).__name__}: {exc}"
        progress("%s FAILED: %s", name, out["verify"]["error"])
    finally:
        if writer is not None:
            await writer.stop()
        if pg is not None:
            pg.stop()
        if out["verify"].get("error") and pair is not None:
            common.save_server_logs(pair, logs, name)
        common.destroy_pair(pair, run_dir)
    return out


def _ok(out: dict) -> bool:
    v = out["verify"]
    return not v.get("error") and v.get("missing_on_active") == 0 and v.get("id_changed_on_active") == 0


def _row(label: str, records: list[dict], runs: int) -> list[str]:
    ok = [r for r in records if r["ok"]]
    stall = common.stats([r["stall_s"] for r in ok])
    client = common.stats([r["client_stall_s"] for r in ok])
    pgr = common.stats([r["pgroute_write_stall_s"] for r in ok if "pgroute_write_stall_s" in r])
    request = common.stats([r["duration_s"] for r in ok])
    return [
        label,
        f"{len(ok)}/{runs}",
        common.fmt_s(stall["median"], 3),
        common.fmt_s(stall["max"], 3),
        common.fmt_s(stall["min"], 3),
        common.fmt_s(client["median"], 3),
        common.fmt_s(pgr["median"], 3),
        common.fmt_s(request["median"], 3),
    ]


async def main(args: argparse.Namespace) -> int:
    try:
        old, new = choose_versions(args.from_version, args.to_version)
    except LocalClusterError as exc:
        print(f"upgrade benchmark: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    results: list[dict] = []
    with common.bench_dirs(args, "upgrade") as (base, logs):
        progress(
            "upgrade benchmark: PostgreSQL %d -> %d and %d -> %d, %d switchover(s) and failback(s) each; "
            "pgroute logs in %s",
            old,
            old,
            old,
            new,
            args.switches,
            logs,
        )
        for name, versions in ((f"same-{old}-{old}", (old, old)), (f"cross-{old}-{new}", (old, new))):
            out = await run_pair(args, base, logs, name, versions)
            results.append(out)
            if not _ok(out):
                break

    print()
    print(
        f"pgroute upgrade benchmark: {args.clients} writer connection(s) at full speed through pgroute; "
        f"{args.switches} switchover(s) and failback(s) per pair; seconds"
    )
    print("stall = longest interval without an acknowledged commit (any client) overlapping the request;")
    print("per-client = longest wait of one client; pgroute = details.write_stall_ms; request = POST round trip")
    rows = []
    for out in results:
        p, m = out["versions"]
        rows.append(_row(f"switchover {p} -> {m}", out["switchover"], args.switches))
        rows.append(_row(f"failback {m} -> {p}" + (" (rollback)" if p != m else ""), out["failback"], args.switches))
    headers = ["switch", "ok", "stall med", "stall max", "stall min", "per-client med", "pgroute med", "request med"]
    print(common.table(headers, rows))
    print()
    prow = []
    for out in results:
        for kind in ("switchover", "failback"):
            ph = phase_medians([r for r in out[kind] if r["ok"]])
            prow.append([f"{out['name']} {kind}", " ".join(f"{n}={v:.3f}" for n, v in ph.items()) or "-"])
    print("per-phase medians (seconds):")
    print(common.table(["pair / switch", "phases"], prow))
    print()
    for out in results:
        v = out["verify"]
        if "missing_on_active" in v:
            print(
                f"{out['name']}: {v['acked']} acknowledged commits ({v['commits_per_s']:.0f}/s); missing on the "
                f"final active node ({v['active']}): {v['missing_on_active']}, with another id: "
                f"{v['id_changed_on_active']}"
            )
        else:
            print(f"{out['name']}: not verified: {v.get('error')}")
    print(f"for comparison: RDS Blue/Green switchover {RDS_BLUE_GREEN}")
    print(f"pgroute logs: {logs}")
    common.write_json(
        args.json,
        {
            "benchmark": "upgrade",
            "started_at": started,
            "versions": {"from": old, "to": new},
            "health": common.health_from_args(args),
            "clients": args.clients,
            "pairs": results,
        },
    )
    all_ok = len(results) == 2 and all(_ok(o) for o in results)
    slow = any(
        (common.stats([r["stall_s"] for r in o[k] if r["ok"]])["median"] or 0.0) > TARGET_STALL_S
        for o in results
        for k in ("switchover", "failback")
    )
    return 0 if all_ok and not slow else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--from", dest="from_version", type=int, help="old major version (default: oldest installed)")
    p.add_argument("--to", dest="to_version", type=int, help="new major version (default: newest installed)")
    p.add_argument("--switches", type=int, default=5, help="switchovers (and as many failbacks) per pair")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first switch")
    p.add_argument("--between", type=float, default=1.0, help="seconds of steady load before each switch")
    p.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="the stall window closes with a commit this long after the switch returned",
    )
    common.add_health_args(p)
    common.add_client_args(p, clients=4)
    common.add_common_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    common.setup_logging(args.verbose)
    sys.exit(common.run_main(lambda: main(args)))
