"""Proxy throughput and latency benchmark: pgbench direct vs through pgroute.

Owns: one local PostgreSQL server (pgroute.local, initialised once with
``pgbench -i -s SCALE``), one pgroute proxy in a separate process (``--serve`` mode of
this script: a ProxyServer on uvloop pointing at that server), and alternating
rounds of ``pgbench -S -c 8 -j 2 -T SECONDS`` directly and through the proxy.
Prints the median TPS of each, their ratio, and the latency added at one client
(``-c 1``). Not a test: run on demand (``make bench``).

Why a separate process for the proxy: pgbench and the proxy must not share an event
loop or a GIL, and production runs the proxy on its own. Why alternating rounds:
the machine is shared (2 cores), so drift in background load hits both sides alike;
the median of several rounds discards the outliers.

Invariants: the server and the proxy process are stopped on normal exit, on an
exception and on Ctrl-C; the data directory is removed.

    .venv/bin/python bench/proxy.py --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from pgroute import local  # noqa: E402

log = logging.getLogger("bench.proxy")

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


# --------------------------------------------------------------------------- proxy process
def serve(backend_host: str, backend_port: int, loop_name: str) -> None:
    """Run a ProxyServer until SIGTERM/SIGINT; print ``PORT <n> LOOP <name>`` once ready."""
    from pgroute.proxy.loop import install_event_loop_policy
    from pgroute.proxy.router import Backend, Route, Router
    from pgroute.proxy.server import ProxyServer

    used = install_event_loop_policy(prefer_uvloop=loop_name == "uvloop")

    async def main() -> None:
        router = Router(Route(Backend("primary", backend_host, backend_port), 1))
        server = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=1.0)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"PORT {server.port} LOOP {used}", flush=True)
        await stop.wait()
        await server.close()
        s = router.stats
        print(f"STATS connections={s.connections_total} rejected={s.rejected} "
              f"c2s={s.bytes_client_to_server} s2c={s.bytes_server_to_client}",
              file=sys.stderr, flush=True)

    asyncio.run(main())


def start_proxy(cluster: local.LocalCluster, loop_name: str) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--backend-port", str(cluster.port),
         "--backend-host", cluster.host, "--loop", loop_name],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 4 or line[0] != "PORT":
        proc.kill()
        raise RuntimeError(f"proxy did not start: {line!r}")
    return proc, int(line[1]), line[3]


def stop_proxy(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- pgbench
def pgbench(cluster: local.LocalCluster, port: int, *args: str) -> str:
    cmd = [str(cluster.binaries.tool("pgbench")), "-h", "127.0.0.1", "-p", str(port),
           "-U", "postgres", *args, "postgres"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return result.stdout


def run_select(cluster: local.LocalCluster, port: int, clients: int, threads: int,
               seconds: int) -> tuple[float, float]:
    """One ``pgbench -S`` run: (tps, average latency in ms)."""
    out = pgbench(cluster, port, "-S", "-n", "-c", str(clients), "-j", str(threads),
                  "-T", str(seconds))
    tps, lat = _TPS.search(out), _LATENCY.search(out)
    if not tps or not lat:
        raise RuntimeError(f"cannot parse pgbench output:\n{out}")
    return float(tps.group(1)), float(lat.group(1))


def alternate(cluster, proxy_port: int, rounds: int, clients: int, threads: int,
              seconds: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "pgroute": []}
    targets = [("direct", cluster.port), ("pgroute", proxy_port)]
    for r in range(rounds):
        # Swap who goes first each round so a trend in background load is shared.
        for name, port in (targets if r % 2 == 0 else targets[::-1]):
            tps, lat = run_select(cluster, port, clients, threads, seconds)
            results[name].append((tps, lat))
            print(f"  round {r + 1}/{rounds} -c {clients:<2} {name:8} "
                  f"tps {tps:10.1f}  latency {lat:.3f} ms", flush=True)
    return results


def median(values: list[tuple[float, float]], i: int) -> float:
    return statistics.median(v[i] for v in values)


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop of the proxy process (default %(default)s)")
    parser.add_argument("--json", help="also write the results to this file")
    # Internal: the proxy process.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend-host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        serve(args.backend_host, args.backend_port, args.loop)
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    local.cleanup_abandoned("pgroute-bench-proxy-")
    base = local.make_base_dir("pgroute-bench-proxy-")
    cluster = local.LocalCluster(base / "data", name="bench-proxy",
                                 settings={"max_connections": "100"})
    proxy = None
    try:
        cluster.init()
        cluster.start()
        started = time.monotonic()
        pgbench(cluster, cluster.port, "-i", "-q", "-s", str(args.scale))
        print(f"pgbench -i -s {args.scale}: {time.monotonic() - started:.1f}s", flush=True)
        proxy, proxy_port, loop_name = start_proxy(cluster, args.loop)
        print(f"pgroute proxy pid {proxy.pid} on port {proxy_port} ({loop_name}); "
              f"server on port {cluster.port}; {os.cpu_count()} CPUs", flush=True)

        # Warm up both paths (connections, caches) before measuring.
        run_select(cluster, cluster.port, args.clients, args.threads, 2)
        run_select(cluster, proxy_port, args.clients, args.threads, 2)

        print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.seconds}, "
              f"{args.rounds} rounds:", flush=True)
        many = alternate(cluster, proxy_port, args.rounds, args.clients, args.threads, args.seconds)
        print(f"pgbench -S -c 1 -j 1 -T {args.seconds}, {args.rounds} rounds:", flush=True)
        one = alternate(cluster, proxy_port, args.rounds, 1, 1, args.seconds)

        d_tps, p_tps = median(many["direct"], 0), median(many["pgroute"], 0)
        d_lat1, p_lat1 = median(one["direct"], 1), median(one["pgroute"], 1)
        summary = {
            "clients": args.clients, "threads": args.threads, "seconds": args.seconds,
            "rounds": args.rounds, "scale": args.scale, "loop": loop_name,
            "tps_direct": d_tps, "tps_pgroute": p_tps, "ratio": p_tps / d_tps,
            "latency_ms_direct_c1": d_lat1, "latency_ms_pgroute_c1": p_lat1,
            "added_latency_us_c1": (p_lat1 - d_lat1) * 1000,
            "tps_direct_c1": median(one["direct"], 0), "tps_pgroute_c1": median(one["pgroute"], 0),
            "runs": {"c": many, "c1": one},
        }
        print()
        print(f"median TPS  -c {args.clients}:  direct {d_tps:10.1f}   pgroute {p_tps:10.1f}"
              f"   ratio {p_tps / d_tps:.2f}x")
        print(f"latency     -c 1:  direct {d_lat1 * 1000:7.1f} us   pgroute {p_lat1 * 1000:7.1f} us"
              f"   added {(p_lat1 - d_lat1) * 1000:.1f} us per query")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    finally:
        if proxy is not None:
            stop_proxy(proxy)
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
