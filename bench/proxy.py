"""Proxy benchmark: pgroute side by side with HAProxy and PgBouncer, against direct.

Owns: one local PostgreSQL server (pgroute.local, initialised once with
``pgbench -i -s SCALE``) and up to three proxies in front of it, each in its own
process on a free port: pgroute (``--serve`` mode of this script: a ProxyServer on
uvloop, with kernel splicing when the kernel allows it), pgroute-pipe (the same with
``splice="off"``: every byte through the event loop), HAProxy (``mode tcp``) and PgBouncer (``pool_mode = session``,
``auth_type = trust``). HAProxy and PgBouncer are used when their programs are on
PATH; this script installs nothing (``apt-get install haproxy pgbouncer``).

Measurements, each against every target ("direct" is pgbench straight to the
server), in alternating rounds whose target order rotates every round:

- ``tps``      pgbench -S -c CLIENTS -j THREADS -T SECONDS: median TPS, ratio to direct.
- ``latency``  pgbench -S -c 1 -j 1 -T SECONDS: median average latency; the proxies'
               added microseconds per query.
- ``connect``  pgbench -S -C -c CLIENTS -j THREADS -T SECONDS (a new connection per
               transaction): median TPS, ratio to direct.
- ``copy``     psql ``COPY pgbench_accounts TO STDOUT`` (about 100 MB at scale 10)
               into /dev/null: median throughput, ratio to direct.
- ``memory``   RSS growth of the proxy process per idle proxied connection, with
               IDLE connections open (each through its startup, idle in a session);
               pgroute gets a fresh process for it.

It prints one table (ratios to direct, a verdict per target) and ``--out FILE``
writes it as Markdown. ``--baseline DIR`` adds the pgroute package of another source
tree as one more target in the same rounds (before/after). Not a test: run on demand
(``make bench``); bench/README.md has results and how to read them.

Why separate processes: pgbench and the proxies must not share an event loop or a
GIL with each other, and production runs the proxy on its own. Each proxy also gets
its own session: with autogroup scheduling a session is a scheduling group, and a
proxy sharing the benchmark's group competes with pgbench inside it. Why
alternating rounds: the machine is shared (2 cores), so drift in background load
hits every target alike; the median of several rounds discards the outliers.

Invariants: the server and every proxy process are stopped on normal exit, on an
exception and on Ctrl-C; the data directory and the generated configurations are
removed.

    .venv/bin/python bench/proxy.py --seconds 10 --rounds 5 --out results.md
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The pgroute tree to import: this checkout, or in a --serve process started for
# --baseline, the baseline's tree (named by --src before anything imports pgroute).
_SRC = sys.argv[sys.argv.index("--src") + 1] if "--serve" in sys.argv and "--src" in sys.argv else None
sys.path[:0] = [_SRC or str(Path(__file__).resolve().parent.parent)]

from pgroute import local  # noqa: E402

log = logging.getLogger("bench.proxy")

_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)

MEASURES = ("tps", "latency", "connect", "copy", "memory")
TARGETS = ("direct", "pgroute", "pgroute-pipe", "haproxy", "pgbouncer")

# Targets of the issue "Proxy speed: beat HAProxy and PgBouncer on the same machine".
GOAL_TPS_RATIO = 0.80
GOAL_ADDED_LATENCY_US = 40.0
GOAL_CONNECT_RATIO = 0.90
GOAL_COPY_RATIO = 0.95
GOAL_MEMORY_KIB = 16.0

INSTALL_HINT = (
    "HAProxy and PgBouncer are compared when installed "
    "(Debian/Ubuntu: apt-get install haproxy pgbouncer); this script installs nothing."
)


# --------------------------------------------------------------------------- pgroute process
def serve(backend_host: str, backend_port: int, loop_name: str, splice: str = "auto") -> None:
    """Run a ProxyServer until SIGTERM/SIGINT; print ``PORT <n> LOOP <name>`` once ready."""
    from pgroute.proxy.loop import install_event_loop_policy
    from pgroute.proxy.router import Backend, Route, Router
    from pgroute.proxy.server import ProxyServer

    used = install_event_loop_policy(prefer_uvloop=loop_name == "uvloop")

    async def main() -> None:
        router = Router(Route(Backend("primary", backend_host, backend_port), 1))
        # A --baseline tree may predate proxy.splice.
        kwargs: dict[str, Any] = {"splice": splice} if "splice" in inspect.signature(ProxyServer).parameters else {}
        server = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=1.0, **kwargs)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        spliced = "yes" if getattr(server, "splicing", False) else "no"
        print(f"PORT {server.port} LOOP {used} SPLICE {spliced}", flush=True)
        await stop.wait()
        await server.close()
        s = router.stats
        print(
            f"STATS connections={s.connections_total} rejected={s.rejected} "
            f"c2s={s.bytes_client_to_server} s2c={s.bytes_server_to_client}",
            file=sys.stderr,
            flush=True,
        )

    asyncio.run(main())


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None  # None: the server itself ("direct")
    note: str = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def start_pgroute(cluster: local.LocalCluster, loop_name: str, src: str | None = None, splice: str = "auto") -> Target:
    """pgroute in its own process; ``src``: another source tree (the baseline);
    ``splice``: proxy.splice (``off`` is the user-space pipe, target "pgroute-pipe")."""
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            "--backend-port",
            str(cluster.port),
            "--backend-host",
            cluster.host,
            "--loop",
            loop_name,
            "--splice",
            splice,
            *(["--src", src] if src else []),
        ],
        # Its own session, like HAProxy and PgBouncer below: with the kernel's
        # autogroup scheduling (sched_autogroup_enabled, on by default) a session
        # is a scheduling group, and a proxy left in the benchmark's session
        # competes with pgbench inside one group (measured: 0.48 instead of 0.33
        # involuntary context switches per transaction, about 4% fewer TPS).
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 6 or line[0] != "PORT":
        proc.kill()
        raise RuntimeError(f"pgroute did not start: {line!r}")
    note = f"uvloop={line[3] == 'uvloop'}, kernel splicing={line[5]}"
    if src:
        return Target("baseline", int(line[1]), proc, f"from {src}, {note}")
    return Target("pgroute-pipe" if splice == "off" else "pgroute", int(line[1]), proc, note)


def _wait_listening(proc: subprocess.Popen, port: int, what: str, errfile: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{errfile.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"{what} is not listening on {port} after {timeout}s") from None
            time.sleep(0.05)


def start_haproxy(exe: str, cluster: local.LocalCluster, workdir: Path) -> Target:
    """HAProxy in TCP mode with its packaged defaults (nbthread = CPUs)."""
    port = local.free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(f"""\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend pg
    bind 127.0.0.1:{port}
    default_backend pg
backend pg
    server pg {cluster.host}:{cluster.port}
""")
    err = workdir / "haproxy.log"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [exe, "-db", "-f", str(cfg)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _wait_listening(proc, port, "haproxy", err)
    version = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout.split()
    return Target("haproxy", port, proc, version[2] if len(version) > 2 else "")


def _as_postgres_user() -> dict:
    """PgBouncer refuses to run as root: run it as the server's OS user then."""
    if os.geteuid() != 0:
        return {}
    import pwd

    account = pwd.getpwnam(local.SERVER_USER)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def start_pgbouncer(exe: str, cluster: local.LocalCluster, workdir: Path, pool: int) -> Target:
    """PgBouncer in session mode, trust authentication (users from an auth_file)."""
    port = local.free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(f"""\
[databases]
* = host={cluster.host} port={cluster.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = session
max_client_conn = 4096
default_pool_size = {pool}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
""")
    err = workdir / "pgbouncer.log"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [exe, str(ini)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
            **_as_postgres_user(),
        )
    _wait_listening(proc, port, "pgbouncer", err)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    return Target("pgbouncer", port, proc, version[1] if len(version) > 1 else "")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- clients
def pgbench(cluster: local.LocalCluster, port: int, *args: str) -> str:
    cmd = [
        str(cluster.binaries.tool("pgbench")),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        "postgres",
        *args,
        "postgres",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return result.stdout


def run_select(
    cluster: local.LocalCluster, port: int, clients: int, threads: int, seconds: int, *extra: str
) -> tuple[float, float]:
    """One ``pgbench -S`` run: (tps, average latency in ms)."""
    out = pgbench(cluster, port, "-S", "-n", "-c", str(clients), "-j", str(threads), "-T", str(seconds), *extra)
    tps, lat = _TPS.search(out), _LATENCY.search(out)
    if not tps or not lat:
        raise RuntimeError(f"cannot parse pgbench output:\n{out}")
    return float(tps.group(1)), float(lat.group(1))


COPY_QUERY = "COPY pgbench_accounts TO STDOUT"


def run_copy(cluster: local.LocalCluster, port: int) -> float:
    """Seconds for psql to receive the whole COPY into /dev/null."""
    cmd = [
        str(cluster.binaries.tool("psql")),
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atc",
        COPY_QUERY,
    ]
    started = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode().strip()}")
    return elapsed


def copy_bytes(cluster: local.LocalCluster) -> int:
    cmd = [
        str(cluster.binaries.tool("psql")),
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        str(cluster.port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atc",
        COPY_QUERY,
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_idle_sessions(port: int, count: int) -> list[socket.socket]:
    """``count`` sessions through their startup (trust auth) to ReadyForQuery, left idle."""
    from pgroute.proxy.startup import startup_message

    packet = startup_message({"user": "postgres", "database": "postgres"})
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
            s.sendall(packet)
            data = b""
            while True:
                while len(data) < 5 or len(data) < 1 + struct.unpack_from("!I", data, 1)[0]:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise RuntimeError("connection closed during startup")
                    data += chunk
                kind = data[:1]
                length = struct.unpack_from("!I", data, 1)[0]
                data = data[1 + length :]
                if kind == b"E":
                    raise RuntimeError("server refused an idle session")
                if kind == b"Z":
                    break
    except BaseException:
        close_sessions(socks)
        raise
    return socks


def close_sessions(socks: list[socket.socket]) -> None:
    terminate = b"X\0\0\0\x04"
    for s in socks:
        try:
            s.sendall(terminate)
        except OSError:
            pass
        s.close()


def memory_per_connection(pid: int, port: int, count: int) -> float:
    """KiB of RSS the process at ``pid`` grows by per idle proxied session."""
    close_sessions(open_idle_sessions(port, 8))  # warm up (lazy imports, pools)
    time.sleep(0.3)
    before = rss_kib(pid)
    socks = open_idle_sessions(port, count)
    try:
        time.sleep(0.5)
        after = rss_kib(pid)
    finally:
        close_sessions(socks)
    time.sleep(1.0)  # let the server's backends exit before the next target
    return (after - before) / count


# --------------------------------------------------------------------------- rounds
@dataclass
class Results:
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, measure: str, target: str, value: float) -> None:
        self.runs.setdefault(measure, {}).setdefault(target, []).append(value)

    def median(self, measure: str, target: str) -> float | None:
        values = self.runs.get(measure, {}).get(target)
        return statistics.median(values) if values else None


def alternate(
    targets: list[Target], rounds: int, measure: str, unit: str, run: Callable[[Target], float], results: Results
) -> None:
    for r in range(rounds):
        # Rotate who goes first each round so a trend in background load is shared.
        k = r % len(targets)
        for t in targets[k:] + targets[:k]:
            value = run(t)
            results.add(measure, t.name, value)
            print(f"  {measure:8} round {r + 1}/{rounds}  {t.name:10} {value:12.1f} {unit}", flush=True)


# --------------------------------------------------------------------------- report
def _ratio(value: float | None, direct: float | None) -> str:
    return f"{value / direct:.2f}x" if value is not None and direct else "-"


def build_table(
    res: Results, names: list[str], args: argparse.Namespace, copy_mb: float | None
) -> tuple[str, dict[str, str]]:
    """The Markdown table (one row per measurement, one column per target) and the
    verdict of each goal."""
    proxies = [n for n in names if n != "direct"]
    head = "| measurement | direct | " + " | ".join(proxies) + " | goal (pgroute) | verdict |"
    rows = [head, "|" + "---|" * (len(proxies) + 4)]
    verdicts: dict[str, str] = {}

    def cells(fmt: Callable[[str], str]) -> str:
        return " | ".join(fmt(n) for n in proxies)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("PASS" if ok else "FAIL")

    if "tps" in res.runs:
        d = res.median("tps", "direct")
        ratios = {n: (res.median("tps", n) or 0) / d for n in proxies if d and res.median("tps", n)}
        ok = None
        if "pgroute" in ratios:
            ok = ratios["pgroute"] >= GOAL_TPS_RATIO and all(
                ratios["pgroute"] >= v for n, v in ratios.items() if n in ("haproxy", "pgbouncer")
            )
        verdicts["tps"] = verdict(ok)
        rows.append(
            f"| TPS `pgbench -S -c {args.clients} -j {args.threads}` | {d:,.0f} tps | "
            + cells(lambda n: f"{_ratio(res.median('tps', n), d)} ({res.median('tps', n) or 0:,.0f})")
            + f" | >= {GOAL_TPS_RATIO:.2f}x and >= the others | {verdicts['tps']} |"
        )
    if "latency" in res.runs:
        d = res.median("latency", "direct")  # microseconds
        medians = {n: res.median("latency", n) for n in proxies}
        added = {n: m - d for n, m in medians.items() if d is not None and m is not None}
        ok = added["pgroute"] <= GOAL_ADDED_LATENCY_US if "pgroute" in added else None
        verdicts["latency"] = verdict(ok)
        rows.append(
            f"| latency `-c 1`, added per query | {d:.1f} us | "
            + cells(lambda n: f"+{added[n]:.1f} us" if n in added else "-")
            + f" | <= {GOAL_ADDED_LATENCY_US:.0f} us | {verdicts['latency']} |"
        )
    if "connect" in res.runs:
        d = res.median("connect", "direct")
        p = res.median("connect", "pgroute")
        ok = p / d >= GOAL_CONNECT_RATIO if p and d else None
        verdicts["connect"] = verdict(ok)
        rows.append(
            f"| connection set-up `pgbench -S -C -c {args.clients} -j {args.threads}` | {d:,.0f} tps | "
            + cells(lambda n: f"{_ratio(res.median('connect', n), d)} ({res.median('connect', n) or 0:,.0f})")
            + f" | >= {GOAL_CONNECT_RATIO:.2f}x | {verdicts['connect']} |"
        )
    if "copy" in res.runs:
        # Stored as MB/s.
        d = res.median("copy", "direct")
        p = res.median("copy", "pgroute")
        ok = p / d >= GOAL_COPY_RATIO if p and d else None
        verdicts["copy"] = verdict(ok)
        size = f" ({copy_mb:.0f} MB)" if copy_mb else ""
        rows.append(
            f"| bulk `{COPY_QUERY}`{size} | {d:,.0f} MB/s | "
            + cells(lambda n: f"{_ratio(res.median('copy', n), d)} ({res.median('copy', n) or 0:,.0f})")
            + f" | >= {GOAL_COPY_RATIO:.2f}x | {verdicts['copy']} |"
        )
    if "memory" in res.runs:
        p = res.median("memory", "pgroute")
        ok = p <= GOAL_MEMORY_KIB if p is not None else None
        verdicts["memory"] = verdict(ok)
        rows.append(
            f"| RSS per idle proxied connection ({args.idle} open) | - | "
            + cells(lambda n: f"{res.median('memory', n):.1f} KiB" if res.median("memory", n) is not None else "-")
            + f" | <= {GOAL_MEMORY_KIB:.0f} KiB | {verdicts['memory']} |"
        )
    return "\n".join(rows), verdicts


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=INSTALL_HINT + " Example: %(prog)s --seconds 10 --rounds 5 --out bench/results.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default %(default)s)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default %(default)s)")
    parser.add_argument(
        "--idle", type=int, default=500, help="idle connections for the memory measurement (default %(default)s)"
    )
    parser.add_argument(
        "--measure",
        default=",".join(MEASURES),
        help="comma-separated subset of: " + ", ".join(MEASURES) + " (default: all)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of: "
        + ", ".join(TARGETS)
        + " (default: all; haproxy and pgbouncer only when installed)",
    )
    parser.add_argument(
        "--haproxy",
        default=shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin"),
        help="haproxy executable (default: from PATH or /usr/sbin)",
    )
    parser.add_argument(
        "--pgbouncer",
        default=shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin"),
        help="pgbouncer executable (default: from PATH or /usr/sbin)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the pgroute process (default %(default)s)",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure the pgroute package of another source tree (e.g. "
        "`git archive HEAD | tar -x -C DIR`) as target 'baseline', in the same "
        "alternating rounds: a before/after comparison in one run",
    )
    parser.add_argument("--out", help="write the table (Markdown) to this file")
    parser.add_argument("--json", help="also write every run's numbers to this file")
    # Internal: the proxy process.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend-host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--splice", choices=("auto", "on", "off"), default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        serve(args.backend_host, args.backend_port, args.loop, args.splice)
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    measures = [m for m in args.measure.split(",") if m]
    wanted = [t for t in args.targets.split(",") if t]
    for m in measures:
        if m not in MEASURES:
            parser.error(f"unknown measurement {m!r}")
    for t in wanted:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}")
    if args.baseline and not (Path(args.baseline) / "pgroute" / "proxy" / "server.py").is_file():
        parser.error(f"--baseline {args.baseline}: no pgroute/proxy/server.py there")
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    if "direct" not in wanted:
        wanted.insert(0, "direct")
    for name in ("haproxy", "pgbouncer"):
        if name in wanted and not getattr(args, name):
            print(f"{name} not found: skipped. {INSTALL_HINT}", flush=True)
            wanted.remove(name)

    local.cleanup_abandoned("pgroute-bench-proxy-")
    base = local.make_base_dir("pgroute-bench-proxy-")
    work = base / "conf"
    work.mkdir()
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        import pwd

        account = pwd.getpwnam(local.SERVER_USER)
        os.chown(work, account.pw_uid, account.pw_gid)
    # Room for the idle connections of the memory test plus PgBouncer's pool.
    max_conn = max(100, args.idle + 4 * args.clients + 50)
    cluster = local.LocalCluster(
        base / "data", name="bench-proxy", settings={"max_connections": str(max_conn), "shared_buffers": "256MB"}
    )
    targets: list[Target] = []
    results = Results()
    command = "python bench/proxy.py " + shlex.join(sys.argv[1:])
    try:
        cluster.init()
        cluster.start()
        started = time.monotonic()
        pgbench(cluster, cluster.port, "-i", "-q", "-s", str(args.scale))
        print(f"pgbench -i -s {args.scale}: {time.monotonic() - started:.1f}s", flush=True)
        targets.append(Target("direct", cluster.port, None, "PostgreSQL"))
        if "pgroute" in wanted:
            targets.append(start_pgroute(cluster, args.loop))
        if "pgroute-pipe" in wanted:
            targets.append(start_pgroute(cluster, args.loop, splice="off"))
        if args.baseline:
            targets.append(start_pgroute(cluster, args.loop, src=args.baseline))
        if "haproxy" in wanted:
            targets.append(start_haproxy(args.haproxy, cluster, work))
        if "pgbouncer" in wanted:
            targets.append(start_pgbouncer(args.pgbouncer, cluster, work, pool=args.idle + 50))
        for t in targets:
            print(f"  {t.name:10} port {t.port:5}  pid {t.pid or cluster.postmaster_pid()}  {t.note}", flush=True)
        print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)

        # Warm up every path (connections, caches) before measuring.
        for t in targets:
            run_select(cluster, t.port, args.clients, args.threads, 2)

        if "tps" in measures:
            print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.seconds}:", flush=True)
            alternate(
                targets,
                args.rounds,
                "tps",
                "tps",
                lambda t: run_select(cluster, t.port, args.clients, args.threads, args.seconds)[0],
                results,
            )
        if "latency" in measures:
            print(f"pgbench -S -c 1 -j 1 -T {args.seconds} (average latency):", flush=True)
            alternate(
                targets,
                args.rounds,
                "latency",
                "us",
                lambda t: run_select(cluster, t.port, 1, 1, args.seconds)[1] * 1000,
                results,
            )
        if "connect" in measures:
            print(f"pgbench -S -C -c {args.clients} -j {args.threads} -T {args.seconds}:", flush=True)
            alternate(
                targets,
                args.rounds,
                "connect",
                "tps",
                lambda t: run_select(cluster, t.port, args.clients, args.threads, args.seconds, "-C")[0],
                results,
            )
        copy_mb = None
        if "copy" in measures:
            copy_mb = copy_bytes(cluster) / 1e6
            print(f"{COPY_QUERY} ({copy_mb:.0f} MB) into /dev/null:", flush=True)
            run_copy(cluster, cluster.port)  # warm the table into the caches
            alternate(targets, args.rounds, "copy", "MB/s", lambda t: copy_mb / run_copy(cluster, t.port), results)
        if "memory" in measures:
            print(f"RSS per idle connection, {args.idle} open:", flush=True)
            for t in targets:
                if t.name == "direct":
                    continue
                if t.name in ("pgroute", "pgroute-pipe", "baseline"):
                    # A fresh process: what earlier runs allocated must not hide the cost.
                    fresh = start_pgroute(
                        cluster,
                        args.loop,
                        src=args.baseline if t.name == "baseline" else None,
                        splice="off" if t.name == "pgroute-pipe" else "auto",
                    )
                    assert fresh.proc is not None  # start_pgroute always starts a process
                    try:
                        kib = memory_per_connection(fresh.proc.pid, fresh.port, args.idle)
                    finally:
                        stop_process(fresh.proc)
                else:
                    assert t.proc is not None  # only "direct" has no process of its own
                    kib = memory_per_connection(t.proc.pid, t.port, args.idle)
                results.add("memory", t.name, kib)
                print(f"  memory   {t.name:10} {kib:8.1f} KiB per connection", flush=True)

        for t in targets:  # now, so that their exit messages come before the table
            if t.proc is not None:
                stop_process(t.proc)
        names = [t.name for t in targets]
        table, verdicts = build_table(results, names, args, copy_mb)
        header = (
            f"Command: `{command}`  \n"
            f"Machine: {os.cpu_count()} CPUs, PostgreSQL {cluster.binaries.version}, scale "
            f"{args.scale}, {args.rounds} rounds of {args.seconds}s, medians; "
            + "; ".join(f"{t.name} {t.note}" for t in targets if t.note and t.name != "direct")
            + f"; load average at the end {os.getloadavg()[0]:.2f}"
        )
        print()
        print(header)
        print()
        print(table)
        if args.out:
            Path(args.out).write_text(header + "\n\n" + table + "\n")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"command": command, "runs": results.runs, "verdicts": verdicts}, indent=2) + "\n"
            )
        return 0
    finally:
        for t in targets:
            if t.proc is not None:
                stop_process(t.proc)
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
