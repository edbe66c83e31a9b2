"""Shared helpers for the failover and switchover benchmarks (run on demand, not tests).

Owns: where benchmark servers live and how they are always cleaned up, the pgroute
daemon run as a separate process (``python -m pgroute.cli run --config FILE``), its
HTTP API, and the writer's settings (the writer itself, which records the monotonic
time, id and serving node of every acknowledged commit, is
``pgroute.local.workload.Writer`` with its ``Events`` rows).

Why pgroute runs in its own process: the writer, the timers and the kill/pause
calls of a benchmark must not share an event loop (or a GIL) with the proxy and
the controller they measure. In-process, a slow writer callback delays the
monitor's probes and the proxy's byte pipe, and a blocking call of the benchmark
(LocalCluster.kill() reaps processes and polls a port) stalls pgroute itself; both
would end up in the numbers. A separate process is also what production runs.

Invariants: every PostgreSQL server and pgroute process a benchmark starts is
stopped on normal exit, on an exception, on Ctrl-C and on SIGTERM (the servers also
through ``pgroute.local.stop_all`` at exit; directories left by a run killed with
SIGKILL are removed by the next run via ``cleanup_abandoned``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from pgroute import local
from pgroute.local.instances import instance_env
from pgroute.local.workload import EVENTS_SCHEMA, Events, Writer

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
PREFIX = "pgroute-bench-"

SCHEMA = local.DEFAULT_SCHEMA + EVENTS_SCHEMA
"""Logical replication copies no DDL: create_pair creates this on both nodes."""

DEFAULT_HEALTH = {"interval": 1.0, "max_retries": 3, "retry_interval": 0.3, "timeout": 1.0}


# --------------------------------------------------------------------------- arguments


def add_health_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pgroute [health] settings")
    g.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_HEALTH["interval"],
        help="health.interval, seconds between probes (default %(default)s)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=DEFAULT_HEALTH["max_retries"],
        help="health.max_retries, confirming probes (default %(default)s)",
    )
    g.add_argument(
        "--retry-interval",
        type=float,
        default=DEFAULT_HEALTH["retry_interval"],
        help="health.retry_interval, seconds (default %(default)s)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HEALTH["timeout"],
        help="health.timeout, seconds per probe (default %(default)s)",
    )


def add_client_args(
    parser: argparse.ArgumentParser, *, clients: int = 1, connect_timeout: float = 1.0, query_timeout: float = 1.0
) -> None:
    g = parser.add_argument_group("writer")
    g.add_argument("--clients", type=int, default=clients, help="concurrent writer connections (default %(default)s)")
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=connect_timeout,
        help="writer connect timeout, seconds (default %(default)s)",
    )
    g.add_argument(
        "--query-timeout",
        type=float,
        default=query_timeout,
        help="writer INSERT timeout, seconds (default %(default)s)",
    )
    g.add_argument(
        "--retry-sleep",
        type=float,
        default=0.02,
        help="sleep after an error before reconnecting, seconds (default %(default)s)",
    )
    g.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="sleep between commits per client, seconds (default %(default)s: full speed)",
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--log-dir", metavar="DIR", help="keep pgroute's logs here; empty: a new /tmp/pgroute-bench-logs-* directory"
    )
    parser.add_argument(
        "--tmpdir", metavar="DIR", help="parent of the servers' data directories (default /dev/shm when it has room)"
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="run the servers with fsync on (default: off, like the tests; "
        "safe against killed processes, not against a machine crash)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (bench and pgroute.local)")


def health_from_args(args: argparse.Namespace) -> dict[str, float]:
    return {
        "interval": args.interval,
        "max_retries": args.max_retries,
        "retry_interval": args.retry_interval,
        "timeout": args.timeout,
    }


def detection_bound(h: dict[str, float]) -> float:
    """pgroute's worst case from a crash to 'down', from HealthConfig itself."""
    from pgroute.config import HealthConfig

    return HealthConfig(
        interval=h["interval"],
        timeout=h["timeout"],
        max_retries=int(h["max_retries"]),
        retry_interval=h["retry_interval"],
    ).detection_bound


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # asyncpg's background cancel requests to a dead/hung node are noise here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def progress(msg: str, *args: Any) -> None:
    """One line on stderr per step (the tables go to stdout)."""
    print(time.strftime("%H:%M:%S ") + (msg % args if args else msg), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- directories


@contextlib.contextmanager
def bench_dirs(args: argparse.Namespace, name: str) -> Iterator[tuple[Path, Path]]:
    """(base directory for servers, directory for kept logs). The base directory and
    every server still running are removed/killed on the way out."""
    parent = local.scratch_parent(args.tmpdir)
    for place in {parent, None}:
        local.cleanup_abandoned(PREFIX, place)
    base = local.make_base_dir(PREFIX + name + "-", parent)
    if args.log_dir:
        logs = Path(args.log_dir)
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs = Path(f"/tmp/pgroute-bench-logs-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        logs.mkdir(parents=True, exist_ok=True)
    try:
        yield base, logs
    finally:
        stop_all_pgroutes()
        local.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def new_pair(
    base: Path, name: str, fsync: bool, primary_version: int | None = None, mirror_version: int | None = None
) -> tuple[local.LocalPair, Path]:
    """A fresh primary + mirror under base/<name>-*, with the bench table on both; each
    node on the given PostgreSQL major version (None: the default binaries)."""
    d = local.make_base_dir(name + "-", parent=base)
    pair = local.create_pair(
        d / "pair",
        schema_sql=SCHEMA,
        fast=not fsync,
        primary_version=primary_version,
        mirror_version=mirror_version,
    )
    return pair, d


def save_server_logs(pair: local.LocalPair, dest: Path, stem: str) -> None:
    """Copy the servers' logs next to pgroute's (before destroy removes them)."""
    for cluster in (pair.primary, pair.mirror):
        with contextlib.suppress(OSError):
            shutil.copy(cluster.logfile, dest / f"{stem}.{cluster.name}.log")


def destroy_pair(pair: local.LocalPair | None, d: Path | None) -> None:
    if pair is not None:
        for cluster in (pair.primary, pair.mirror):
            with contextlib.suppress(Exception):
                cluster.resume()  # a SIGSTOPped server ignores the stop signals
        pair.destroy()
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- pgroute process


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string for our values


def write_config(
    path: Path,
    pair: local.LocalPair,
    run_dir: Path,
    *,
    proxy_port: int,
    api_port: int,
    health: dict[str, Any],
    **sections: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
        "primary": {"dsn": pair.primary_dsn()},
        "mirror": {"dsn": pair.mirror_dsn()},
        "replication": {"publication": pair.publication, "subscription": pair.subscription},
        "health": dict(health),
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "state": {"path": str(run_dir / "state.json"), "recovery_dir": str(run_dir / "recovery")},
        "log": {"level": "INFO"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return data


def free_port_pair() -> tuple[int, int]:
    a = local.free_port()
    b = local.free_port()
    while b == a:
        b = local.free_port()
    return a, b


_live: set[PgrouteProcess] = set()


def stop_all_pgroutes() -> None:
    for p in list(_live):
        p.stop()


atexit.register(stop_all_pgroutes)


class ApiError(RuntimeError):
    pass


class PgrouteProcess:
    """`python -m pgroute.cli run --config FILE` in its own session (a Ctrl-C in the
    terminal is for the benchmark, which then stops it with SIGTERM)."""

    def __init__(self, config_path: Path, log_path: Path, proxy_port: int, api_port: int) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proxy_port = proxy_port
        self.api_port = api_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.base = f"http://127.0.0.1:{api_port}"

    async def start(self, timeout: float = 30.0) -> PgrouteProcess:
        # Blocking on purpose (a few ms, before the writer starts): with no await
        # between the fork and `_live.add`, a Ctrl-C or SIGTERM (a cancellation)
        # cannot leave a started pgroute unknown to stop_all_pgroutes, which
        # asyncio.to_thread would allow.
        with open(self.log_path, "ab") as logf:  # noqa: ASYNC230 (see above)
            self.proc = subprocess.Popen(  # noqa: ASYNC220 (see above)
                [sys.executable, "-m", "pgroute.cli", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
                env=_pgroute_env(),
                start_new_session=True,
            )
        _live.add(self)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ApiError(f"pgroute exited with status {self.proc.returncode} while starting:\n" + self.log_tail())
            try:
                async with self.session.get(self.base + "/api/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    await resp.read()
                if _port_open(self.proxy_port):
                    return self
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ApiError(f"pgroute did not answer on {self.base} within {timeout}s:\n" + self.log_tail())
            await asyncio.sleep(0.1)

    def proxy_dsn(self, dbname: str = "chrispar") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.proxy_port}/{dbname}"

    async def status(self) -> dict:
        assert self.session is not None
        async with self.session.get(self.base + "/api/status", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.json()

    async def post(self, kind: str, body: dict | None = None) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.post(self.base + f"/api/{kind}", json=body or {}) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")

    async def wait_status(
        self, predicate: Callable[[dict], bool], timeout: float, what: str, interval: float = 0.05
    ) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while True:
            try:
                last = await self.status()
                if predicate(last):
                    return last
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise ApiError(f"pgroute exited ({self.proc.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise ApiError(
                    f"timed out after {timeout}s waiting for {what}; state={last.get('state')!r} "
                    f"reason={last.get('reason')!r} active={last.get('active')!r}"
                )
            await asyncio.sleep(interval)

    async def wait_following(self, timeout: float = 60.0) -> dict:
        """Until replication is 'ok' and the monitor has a lag sample of the standby."""

        def ok(s: dict) -> bool:
            active = s.get("active")
            if active not in ("primary", "mirror") or s.get("replication") != "ok" or s.get("operation"):
                return False
            standby = "mirror" if active == "primary" else "primary"
            return s["nodes"][standby]["lag_bytes"] is not None

        return await self.wait_status(ok, timeout, "the standby following with a lag sample")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL; synchronous so it also works from finally/atexit."""
        _live.discard(self)
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pgroute (pid %d) ignored SIGTERM for %ss: SIGKILL", proc.pid, timeout)
                proc.kill()
                proc.wait(10)
        session, self.session = self.session, None
        if session is not None and not session.closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.create_task(session.close())


def _pgroute_env() -> dict[str, str]:
    """Our environment without variables that would override the config file, and
    with the checkout on PYTHONPATH (pgroute need not be installed): the same as
    the cluster benchmark's and the demo's instances get."""
    return instance_env()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def events_since(status: dict, kind: str, since_wall: float) -> list[dict]:
    """Finished-or-not events of `kind` that started at or after `since_wall`, oldest first."""
    evs = [e for e in status.get("events", []) if e["kind"] == kind and e["started_at"] >= since_wall]
    return sorted(evs, key=lambda e: e["started_at"])


# --------------------------------------------------------------------------- writer


def new_writer(dsn: str, args: argparse.Namespace) -> Writer:
    """The benchmarks' writer (`Events` rows, see pgroute.local.workload) with the
    client settings of `add_client_args`; not started."""
    return Writer(
        dsn,
        Events(),
        clients=args.clients,
        connect_timeout=args.connect_timeout,
        query_timeout=args.query_timeout,
        retry_sleep=args.retry_sleep,
        pause=args.pause,
    )


# --------------------------------------------------------------------------- statistics / output


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "max": None, "min": None}
    return {"n": len(values), "median": statistics.median(values), "max": max(values), "min": min(values)}


def fmt_s(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        progress("results written to %s", path)


def run_main(main: Callable[[], Awaitable[int]]) -> int:
    """asyncio.run with SIGTERM treated like Ctrl-C: the main task is cancelled, so
    every `finally` (servers, pgroute process) runs."""

    async def wrapper() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    try:
        return asyncio.run(wrapper())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: servers and pgroute stopped", file=sys.stderr)
        return 130
