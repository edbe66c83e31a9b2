"""`pgroute demo`: a local primary + mirror + pgroute in one process, no Docker.

Owns the first-run experience. ``main(tour=False)`` starts two real PostgreSQL
servers from the binaries on this machine (``pgroute.local``), the seed's
``chrispar`` database on both with logical replication from the primary to the
mirror, writes a demo configuration file, and runs pgroute (proxy, monitor, API)
in this process. Interactive mode prints what to connect to and what to try, then
waits for Ctrl-C; ``tour=True`` runs a scripted crash, failover, rejoin and failback
under a writer and checks that no acknowledged write was lost.

Invariants:

- Everything lives in one directory (``.pgroute-demo/demo-*`` under the current
  directory, else under the system temporary directory), and Ctrl-C, SIGTERM or
  the end of the tour destroys both servers and that directory. A run killed with
  SIGKILL leaves it behind; the next run removes it (``local.cleanup_abandoned``).
- The demo configuration ignores the process environment: a ``DATABASE_URL`` in the
  shell must not point the demo's pgroute at somebody's real database.
- Blocking server management (start, kill, psql) runs in threads so the proxy and
  the monitor keep running while a node is crashed or restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import local
from .errors import LocalClusterError, PgRouteError

log = logging.getLogger(__name__)

DEMO_DIR = ".pgroute-demo"
RUN_PREFIX = "demo-"
DBNAME = "chrispar"
PUBLICATION = "chrispar_pub"
SUBSCRIPTION = "chrispar_sub"
PROXY_PORT = 6432
API_PORT = 5000

HEALTH = {"interval": 1.0, "max_retries": 2, "retry_interval": 0.3, "timeout": 1.0}

SEED_SQL = """\
INSERT INTO usuarios (nombre, email) VALUES
    ('Ana', 'ana@chrispar.example'),
    ('Luis', 'luis@chrispar.example'),
    ('Marta', 'marta@chrispar.example');
INSERT INTO empleados (nombre, usuario_id) VALUES ('Ana', 1), ('Luis', 2);
INSERT INTO pedidos (usuario_id, total) VALUES (1, 120.50), (2, 42.00), (3, 7.25);
SELECT setval('folio_seq', 100);
"""

TOUR_WRITES_BEFORE_KILL = 100
TOUR_REJOIN_TIMEOUT = 120.0


# --------------------------------------------------------------------------- output


def _say(text: str = "", err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    print(text, file=stream, flush=True)


def _pgroute_command() -> str:
    """How the user invokes this pgroute, to print commands they can paste."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "pgroute":
        on_path = shutil.which("pgroute")
        if on_path and Path(on_path).resolve() == Path(argv0).resolve():
            return "pgroute"
        rel = os.path.relpath(argv0)
        return shlex.quote(os.path.abspath(argv0) if rel.startswith("..") else rel)
    on_path = shutil.which("pgroute")
    if on_path:
        return "pgroute"
    return f"{shlex.quote(sys.executable)} -m pgroute.cli"


# --------------------------------------------------------------------------- setup


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The proxy and the API bind with SO_REUSEADDR: a TIME_WAIT leftover is fine.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int, avoid: set[int]) -> int:
    if preferred not in avoid and _port_free(preferred):
        return preferred
    while True:
        port = local.free_port()
        if port not in avoid:
            return port


def _make_demo_dir() -> Path:
    """``./.pgroute-demo/demo-XXXX`` when the server user can reach it, else a
    directory under the system temporary directory."""
    parent = Path.cwd() / DEMO_DIR
    created_parent = False
    try:
        if not parent.exists():
            parent.mkdir(mode=0o755)
            created_parent = True
        local.cleanup_abandoned(RUN_PREFIX, parent)
        return local.make_base_dir(RUN_PREFIX, parent)
    except (OSError, LocalClusterError) as exc:
        log.info("cannot use %s (%s); using the temporary directory", parent, exc)
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()
    tmp_parent = Path(tempfile.gettempdir()) / DEMO_DIR
    tmp_parent.mkdir(mode=0o755, exist_ok=True)
    tmp_parent.chmod(0o755)
    local.cleanup_abandoned(RUN_PREFIX, tmp_parent)
    return local.make_base_dir(RUN_PREFIX, tmp_parent)


def _remove_demo_dir(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(OSError):
        base.parent.rmdir()  # only when no other demo runs there


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(path: Path, pair: local.LocalPair, proxy_port: int, api_port: int,
                 state_dir: Path) -> None:
    """The demo's configuration file: a complete, commented pgroute.toml."""
    lines = [
        "# pgroute demo configuration (written by `pgroute demo`; removed when it stops).",
        "# A real deployment: see config/pgroute.example.toml.",
        "",
        "[proxy]",
        f"listen = {_toml_str(f'127.0.0.1:{proxy_port}')}",
        "connect_timeout = 2.0",
        "pause_timeout = 15.0",
        "",
        "[primary]",
        f"dsn = {_toml_str(pair.primary_dsn())}",
        "",
        "[mirror]",
        f"dsn = {_toml_str(pair.mirror_dsn())}",
        "",
        "[replication]",
        f"publication = {_toml_str(pair.publication)}",
        f"subscription = {_toml_str(pair.subscription)}",
        "",
        "[health]",
        "# Much faster than the seed's 30 s x 3 retries: a killed primary is declared",
        "# down within interval + timeout + max_retries * retry_interval + timeout.",
        f"interval = {HEALTH['interval']}",
        f"max_retries = {HEALTH['max_retries']}",
        f"retry_interval = {HEALTH['retry_interval']}",
        f"timeout = {HEALTH['timeout']}",
        "",
        "[api]",
        f"listen = {_toml_str(f'127.0.0.1:{api_port}')}",
        "",
        "[state]",
        f"path = {_toml_str(str(state_dir / 'pgroute-state.json'))}",
        f"recovery_dir = {_toml_str(str(state_dir / 'recovery'))}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


@dataclass
class Demo:
    base: Path
    pair: local.LocalPair
    config_path: Path
    config: Any
    pgroute: str = field(default_factory=_pgroute_command)

    @property
    def api_url(self) -> str:
        return f"http://{self.config.api.listen}"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.config.proxy.listen}/{DBNAME}"


def _prepare(base: Path) -> Demo:
    from .config import load_config

    pair = local.create_pair(base, dbname=DBNAME, publication=PUBLICATION,
                             subscription=SUBSCRIPTION, seed_sql=SEED_SQL)
    avoid = {pair.primary.port, pair.mirror.port}
    proxy_port = _pick_port(PROXY_PORT, avoid)
    api_port = _pick_port(API_PORT, avoid | {proxy_port})
    config_path = base / "pgroute.toml"
    write_config(config_path, pair, proxy_port, api_port, base)
    # environ={}: the shell's DATABASE_URL & co. must not redirect the demo.
    config = load_config(config_path, environ={})
    return Demo(base, pair, config_path, config)


# --------------------------------------------------------------------------- entry point


def main(tour: bool = False) -> int:
    """Run the demo; returns the exit status (0 ok, 1 failed or lost writes, 130 interrupted)."""
    previous_term = _sigterm_as_interrupt()
    base: Path | None = None
    demo: Demo | None = None
    try:
        try:
            local.find_binaries()
            base = _make_demo_dir()
            _say(f"pgroute demo: starting a primary and a mirror in {base} ...")
            started = time.monotonic()
            demo = _prepare(base)
        except LocalClusterError as exc:
            _say(f"pgroute demo: {exc}", err=True)
            return 1
        except PgRouteError as exc:  # ConfigError: a bug in write_config, say it plainly
            _say(f"pgroute demo: {exc}", err=True)
            return 1
        _say(f"pgroute demo: primary and mirror ready in {time.monotonic() - started:.1f} s")

        from .proxy.loop import install_event_loop_policy

        install_event_loop_policy()
        if tour:
            from .logs import setup_logging

            # The tour tells its own story; pgroute's log shows only what went wrong.
            setup_logging("WARNING")
            return asyncio.run(_tour(demo))
        from .logs import setup_logging

        setup_logging("INFO")
        logging.getLogger("pgroute.local").setLevel(logging.WARNING)
        return asyncio.run(_interactive(demo))
    except KeyboardInterrupt:
        _say("pgroute demo: interrupted", err=True)
        return 130
    finally:
        # Cleanup must finish: a second Ctrl-C here would leave servers behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if demo is not None:
                demo.pair.destroy()
            if base is not None:
                _remove_demo_dir(base)
                if demo is not None:
                    _say(f"pgroute demo: primary and mirror destroyed, {base} removed")
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, previous_term)


def _sigterm_as_interrupt():
    """SIGTERM during the (blocking) setup ends it like Ctrl-C, so cleanup runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGTERM)
    return signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- interactive


def _orphan_zombies(keep: set[int]) -> list[int]:
    """Zombie postgres processes re-parented to us (backends of a postmaster the user
    killed with kill -9: we are their subreaper, see pgroute.local)."""
    if not os.path.isdir("/proc"):
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.find("(") + 1: text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1 and fields[0] == "Z" and int(fields[1]) == me and name == "postgres":
            found.append(int(entry))
    return found


def _reap_orphans(pair: local.LocalPair) -> None:
    keep = {p for p in (pair.primary.postmaster_pid(), pair.mirror.postmaster_pid()) if p}
    for pid in _orphan_zombies(keep):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


async def _interactive(demo: Demo) -> int:
    from .app import start

    pair = demo.pair
    try:
        running = await start(demo.config)
    except OSError as exc:  # a port taken between the check and the bind
        _say(f"pgroute demo: cannot start pgroute: {exc}", err=True)
        return 1
    stop = asyncio.Event()
    restart = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, restart.set)
    stdin_watched = False
    if sys.stdin is not None and sys.stdin.isatty():

        def on_stdin() -> None:
            if sys.stdin.readline():
                restart.set()
            else:  # Ctrl-D: stop listening (EOF would fire forever)
                loop.remove_reader(sys.stdin.fileno())

        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            loop.add_reader(sys.stdin.fileno(), on_stdin)
            stdin_watched = True
    try:
        try:
            await _wait_following(running.controller)
        except TimeoutError:
            _say("pgroute demo: pgroute has not seen the mirror following yet; "
                 "an automatic failover waits for that (see `status`)", err=True)
        _print_welcome(demo, stdin_watched)
        pids = {c.name: c.postmaster_pid() for c in (pair.primary, pair.mirror)}
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(stop, restart), 0.5)
            _reap_orphans(pair)
            for cluster in (pair.primary, pair.mirror):
                pid = cluster.postmaster_pid()
                if pids.get(cluster.name) and pid is None:
                    how = "press Enter or run" if stdin_watched else "run"
                    _say(f"\n>>> {cluster.name} (pid {pids[cluster.name]}) is gone. "
                         f"pgroute notices within {demo.config.health.detection_bound:.1f} s.\n"
                         f">>> To start it again: {how} `kill -USR1 {os.getpid()}`.")
                pids[cluster.name] = pid
            if restart.is_set() and not stop.is_set():
                restart.clear()
                await _restart_stopped(demo, pids)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        if stdin_watched:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(sys.stdin.fileno())
        _say("\npgroute demo: stopping pgroute ...")
        await running.stop()
    return 0


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _restart_stopped(demo: Demo, pids: dict[str, int | None]) -> None:
    stopped = [c for c in (demo.pair.primary, demo.pair.mirror) if not c.is_running()]
    if not stopped:
        _say(">>> both servers are running; nothing to start")
        return
    for cluster in stopped:
        _reap_orphans(demo.pair)
        try:
            await asyncio.to_thread(_start_with_retries, cluster)
        except LocalClusterError as exc:
            _say(f">>> could not start {cluster.name}: {exc}", err=True)
            continue
        pids[cluster.name] = cluster.postmaster_pid()
        _say(f">>> {cluster.name} started again (pid {pids[cluster.name]}, port {cluster.port}).")
        if cluster is demo.pair.primary:
            _say(">>> If the mirror is active, pgroute fences the primary (read-only), recovers its\n"
                 ">>> commits the mirror never got, and makes it follow the mirror. Then:\n"
                 f">>>   {demo.pgroute} status --api {demo.api_url}\n"
                 f">>>   {demo.pgroute} failback --yes --api {demo.api_url}")


def _start_with_retries(cluster: local.LocalCluster, attempts: int = 5) -> None:
    # Backends of a killed postmaster take a moment to notice and exit; until then
    # the new postmaster may refuse the data directory.
    for attempt in range(attempts):
        try:
            cluster.start()
            return
        except LocalClusterError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


def _print_welcome(demo: Demo, stdin_watched: bool) -> None:
    pair, cfg, cmd, api = demo.pair, demo.config, demo.pgroute, demo.api_url
    primary_pid, mirror_pid = pair.primary.postmaster_pid(), pair.mirror.postmaster_pid()
    enter = " (or press Enter here)" if stdin_watched else ""
    tries = [
        ("where pgroute routes, node health, lag, connections", f"{cmd} status --api {api}"),
        ("manual switch to the mirror (the seed's failover_to_mirror.ps1)",
         f"{cmd} failover --yes --api {api}"),
        ("crash the primary: pgroute fails over to the mirror by itself", f"kill -9 {primary_pid}"),
        (f"start a killed server again{enter}: pgroute fences it and makes it follow",
         f"kill -USR1 {os.getpid()}"),
        ("back to the primary, replication restored (the seed's failback_to_primary.ps1)",
         f"{cmd} failback --yes --api {api}"),
        ("planned move of the active role, no commit lost", f"{cmd} switchover --yes --api {api}"),
        ("the seed's health check, same answer", f"curl -s {api}/api/health"),
    ]
    _say(f"""
pgroute demo is running (Ctrl-C stops it and removes everything).

Point your application at pgroute:
  DATABASE_URL=postgresql://postgres@{cfg.proxy.listen}/{DBNAME}
  psql postgresql://postgres@{cfg.proxy.listen}/{DBNAME} -c 'SELECT * FROM usuarios'

  health   {api}/api/health
  status   {api}/api/status
  metrics  {api}/metrics
  config   {demo.config_path}
  primary  {pair.primary.host}:{pair.primary.port} (pid {primary_pid})
  mirror   {pair.mirror.host}:{pair.mirror.port} (pid {mirror_pid}), subscription {pair.subscription}

Things to try, in another terminal:""")
    for comment, command in tries:
        _say(f"  # {comment}\n  {command}")
    _say()


# --------------------------------------------------------------------------- tour


@dataclass(frozen=True)
class Ack:
    table: str
    id: int
    nombre: str
    started: float   # monotonic, when the INSERT was sent
    acked: float     # monotonic, when its commit was acknowledged


class TourWriter:
    """Inserts through pgroute, alternating a serial and an identity table, and
    records every acknowledged commit; reconnects after any error."""

    def __init__(self, dsn: str, tag: str = "tour", pause: float = 0.005) -> None:
        self.dsn = dsn
        self.tag = tag
        self.pause = pause
        self.acked: list[Ack] = []
        self.errors = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._n = 0

    def start(self) -> "TourWriter":
        self._task = asyncio.create_task(self._run(), name="demo-writer")
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    def first_ack_started_after(self, t: float) -> Ack | None:
        return next((a for a in self.acked if a.started >= t), None)

    async def wait_acked(self, count: int, timeout: float = 60.0) -> None:
        target = len(self.acked) + count
        await _wait_for(lambda: len(self.acked) >= target, timeout, f"{count} more acknowledged writes")

    async def _run(self) -> None:
        import asyncpg

        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=5)
                self._n += 1
                name = f"{self.tag}-{self._n}"
                started = time.monotonic()
                if self._n % 2:
                    table = "usuarios"
                    rid = await conn.fetchval(
                        "INSERT INTO usuarios (nombre, email) VALUES ($1, $2) RETURNING id",
                        name, f"{name}@example.com", timeout=5)
                else:
                    table = "empleados"
                    rid = await conn.fetchval(
                        "INSERT INTO empleados (nombre) VALUES ($1) RETURNING id", name, timeout=5)
                self.acked.append(Ack(table, rid, name, started, time.monotonic()))
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.errors += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(self.pause)
        if conn is not None:
            conn.terminate()


async def missing(dsn: str, acked: list[Ack]) -> list[Ack]:
    """Acknowledged writes that are not on the node at ``dsn``."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        out = []
        for table in ("usuarios", "empleados"):
            have = {(r["id"], r["nombre"]) for r in await conn.fetch(f"SELECT id, nombre FROM {table}")}
            out += [a for a in acked if a.table == table and (a.id, a.nombre) not in have]
        return out
    finally:
        await conn.close()


async def _wait_for(predicate: Callable[[], Any], timeout: float, what: str,
                    interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f} s] "
        _say(textwrap.fill(text, 80, initial_indent=stamp, subsequent_indent=" " * len(stamp),
                           break_long_words=False, break_on_hyphens=False))


def _indent(lines: list[str] | str, prefix: str = "           ", width: int = 80) -> str:
    """Indent (and wrap to ``width``) lines printed under a tour step."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = []
    for line in lines:
        if len(prefix + line) <= width:
            out.append(prefix + line if line else "")
            continue
        lead = line[: len(line) - len(line.lstrip())]
        out.append(textwrap.fill(line.strip(), width, initial_indent=prefix + lead,
                                 subsequent_indent=prefix + lead + "  ", break_long_words=False,
                                 break_on_hyphens=False))
    return "\n".join(out)


async def _tour(demo: Demo) -> int:
    from .app import start

    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    running = None
    try:
        running = await start(demo.config)
        return await _tour_steps(demo, running)
    except asyncio.CancelledError:
        _say("pgroute demo: tour interrupted", err=True)
        return 130
    except Exception as exc:  # the tour's one catch-all: say what broke, then clean up
        log.debug("tour failed", exc_info=True)
        _say(f"pgroute demo: tour failed: {type(exc).__name__}: {exc}", err=True)
        if running is not None:
            from .cli import render_status

            _say(render_status(running.controller.status()), err=True)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if running is not None:
            await running.stop()


async def _tour_steps(demo: Demo, running) -> int:
    from .cli import render_event, render_status

    pair, cfg, ctl = demo.pair, demo.config, running.controller
    clock = _Clock()
    status = ctl.status
    say = clock.say
    say(f"pgroute: proxy {cfg.proxy.listen}, API {demo.api_url}; health probe every "
        f"{cfg.health.interval:g} s, a dead primary is declared down within "
        f"{cfg.health.detection_bound:.1f} s")
    say(f"primary {pair.primary.host}:{pair.primary.port} (pid {pair.primary.postmaster_pid()}) "
        f"-> mirror {pair.mirror.host}:{pair.mirror.port} (subscription {pair.subscription})")

    await _wait_following(ctl)
    writer = TourWriter(demo.database_url).start()
    say(f"writer: inserting into usuarios (serial) and empleados (identity) through {demo.database_url}")
    try:
        await writer.wait_acked(TOUR_WRITES_BEFORE_KILL)

        # -- crash -----------------------------------------------------------------------
        pid = pair.primary.postmaster_pid()
        acked_before = len(writer.acked)
        say(f"{acked_before} writes acknowledged; kill -9 the primary (pid {pid})")
        await asyncio.to_thread(pair.primary.kill)
        t_kill, wall_kill = time.monotonic(), time.time()
        first = await _wait_for(lambda: writer.first_ack_started_after(t_kill), 60,
                                "a write acknowledged after the kill")
        failover_s = first.acked - t_kill
        await _wait_for(lambda: _ended(ctl, "failover"), 30, "the failover event")
        ev = _ended(ctl, "failover")
        detected_s = max(ev["started_at"] - wall_kill, 0.0)
        say(f"first write acknowledged by the mirror {failover_s:.2f} s after the kill "
            f"(primary declared down after {detected_s:.2f} s)")
        _say(_indent(render_event(ev)))
        if ev["result"] != "ok" or status()["active"] != "mirror":
            say("FAILOVER did not complete: see above")
            return 1
        await writer.wait_acked(20)
        say("`pgroute status` now:")
        _say(f"\n{render_status(status())}\n")

        # -- return ------------------------------------------------------------------------
        say("starting the old primary again ...")
        await asyncio.to_thread(_start_with_retries, pair.primary)
        t_back = time.monotonic()
        say(f"primary is back (pid {pair.primary.postmaster_pid()}); pgroute fences it, recovers "
            "its commits the mirror never got, and makes it follow the mirror")
        try:
            await _wait_for(lambda: _rejoined(ctl), TOUR_REJOIN_TIMEOUT, "the primary to rejoin", 0.1)
        except TimeoutError:
            say("the primary did not rejoin in time:")
            _say(f"\n{render_status(status())}\n")
            return 1
        rejoin = _ended(ctl, "rejoin")
        say(f"primary rejoined in {time.monotonic() - t_back:.1f} s")
        if rejoin is not None:
            _say(_indent(render_event(rejoin)))

        # -- failback ----------------------------------------------------------------------
        await writer.wait_acked(20)
        say("FAILBACK to the primary (what `pgroute failback --yes` asks for) ...")
        failback = await _request_with_retries(ctl, "failback")
        _say(_indent(render_event(failback)))
        stall_ms = failback.get("details", {}).get("write_stall_ms", "?")
        await writer.wait_acked(20)
    finally:
        await writer.stop()
    say(f"writer stopped: {len(writer.acked)} writes acknowledged, {writer.errors} errors retried")

    # -- verify ----------------------------------------------------------------------------
    say("checking every acknowledged write on both nodes ...")
    await asyncio.to_thread(pair.wait_synced, 60)
    lost_primary = await missing(pair.primary_dsn(), writer.acked)
    lost_mirror = await missing(pair.mirror_dsn(), writer.acked)
    lost = {(a.table, a.id) for a in lost_primary + lost_mirror}
    # Show a status probed after the failback, not the samples taken before it.
    since = time.time()
    with contextlib.suppress(TimeoutError):
        await _wait_for(lambda: _probed_since(status(), since), 10, "fresh probes", 0.1)
    st = status()
    say("`pgroute status` at the end:")
    _say(f"\n{render_status(st)}")
    _say(f"""
summary
  writes acknowledged: {len(writer.acked)}
  lost: {len(lost)} (missing on the primary: {len(lost_primary)}, on the mirror: {len(lost_mirror)})
  failover time (kill -9 to first acknowledged write): {failover_s:.2f} s
  failback write stall: {stall_ms} ms
  active node: {st['active']}, epoch {st['epoch']}, replication {st['replication']}
""")
    if lost:
        for a in (lost_primary + lost_mirror)[:10]:
            _say(f"  LOST: {a.table} id {a.id} ({a.nombre})", err=True)
        return 1
    return 0


async def _wait_following(ctl, timeout: float = 30.0) -> None:
    """Until pgroute has seen the mirror following with a known lag: before that an
    automatic failover is refused (the mirror's lag is unknown)."""
    def following() -> bool:
        st = ctl.status()
        return st["replication"] == "ok" and st["nodes"]["mirror"]["lag_bytes"] is not None

    await _wait_for(following, timeout, "the mirror to be seen following", 0.1)


def _ended(ctl, kind: str) -> dict | None:
    """The newest finished event of ``kind``."""
    return next((e for e in ctl.events(200) if e["kind"] == kind and e["ended_at"]), None)


def _probed_since(st: dict, since: float) -> bool:
    from datetime import datetime

    for info in st["nodes"].values():
        when = info.get("last_probe")
        if not when or datetime.fromisoformat(when).timestamp() < since:
            return False
    return True


def _rejoined(ctl) -> bool:
    st = ctl.status()
    return (st["active"] == "mirror" and st["replication"] == "ok"
            and st["nodes"]["primary"]["subscription"] is not None)


async def _request_with_retries(ctl, kind: str, attempts: int = 10) -> dict:
    from .errors import ActionRefused

    for attempt in range(attempts):
        try:
            return await ctl.request(kind)
        except ActionRefused as exc:
            if attempt == attempts - 1:
                raise
            log.info("%s refused (%s); retrying", kind, exc)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")
