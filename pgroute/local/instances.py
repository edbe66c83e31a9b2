"""Local pgroute instances: `pgroute run` processes on loopback in front of a local
pair, alone or as the members of one cluster on a local etcd, for
`pgroute demo --cluster` and the cluster benchmarks (bench/cluster.py).

Owns an instance's pgroute.toml (the pair, fast health settings, free ports, and a
``[cluster]`` section when it has an etcd); starting ``python -m pgroute.cli run
--config FILE`` as a child process; waiting until its API and proxy answer; reading
its /api/status; stopping (SIGTERM), crashing (SIGKILL) and starting it again; and
`LocalInstances`, the N instances of one cluster with the libpq multi-host DSN that
lists them.

Why processes and not `app.start` in this process: an instance must be killable on
its own (SIGKILL is what the benchmarks measure and what the demo invites), and a
measurement must not share an event loop with what it measures.

Invariants (as for servers in `processes` and etcd members in `etcd`):
- Every instance started here is registered until it stops; `stop_all_instances`
  (atexit) stops what is left. One started from the main thread dies with this
  process even on SIGKILL (PR_SET_PDEATHSIG). A forked child never stops its
  parent's instances.
- An instance runs in its own session: a Ctrl-C in the terminal is for the caller,
  which then stops the instances itself.
- The child's environment has no variable that overrides the configuration file
  (``DATABASE_URL``, ``PGROUTE_*``, ...): the shell must not redirect a local
  instance to somebody's real database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pgroute
from pgroute.errors import LocalClusterError

from .etcd import _die_with_parent
from .pair import LocalPair
from .processes import Leftovers, free_port, port_open

log = logging.getLogger(__name__)

#: The package's parent directory: on the child's PYTHONPATH, so that a checkout
#: runs without being installed.
_SOURCE_ROOT = Path(pgroute.__file__).resolve().parent.parent

#: Variables the configuration loader reads (pgroute/config.py): never passed on.
_OVERRIDES = ("DATABASE_URL", "MIRROR_DATABASE_URL", "AUTO_FAILOVER_ENABLED")
_OVERRIDE_PREFIXES = ("PGROUTE_", "HEALTH_CHECK_")


def instance_env() -> dict[str, str]:
    """This process's environment without configuration overrides, with the source
    of this pgroute on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OVERRIDE_PREFIXES) and k not in _OVERRIDES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_config(path: Path, sections: dict[str, dict[str, Any]], header: str = "") -> Path:
    """A pgroute.toml from ``{section: {key: value}}`` (``header``: comment lines)."""
    lines = [f"# {line}" for line in header.splitlines()]
    if lines:
        lines.append("")
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class LocalInstance:
    """One `pgroute run` process: a name, a directory (config, state, log) and two
    ports on 127.0.0.1."""

    host = "127.0.0.1"

    def __init__(
        self,
        name: str,
        directory: Path,
        config_path: Path,
        proxy_port: int,
        api_port: int,
        clustered: bool = False,
        rewrite: Callable[[int, int], None] | None = None,
    ) -> None:
        self.name = name
        self.clustered = clustered
        self.directory = directory
        self.config_path = config_path
        self.proxy_port = proxy_port
        self.api_port = api_port
        self.logfile = directory / "pgroute.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Until it first runs, a port someone else took since it was picked moves
        # (`rewrite` writes the configuration for new ports); after that, clients
        # know the ports, and they stay.
        self._rewrite = rewrite
        self._log_start = 0

    def __repr__(self) -> str:
        return f"LocalInstance({self.name!r}, proxy={self.proxy_port}, api={self.api_port})"

    @property
    def proxy(self) -> str:
        return f"{self.host}:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def is_running(self) -> bool:
        return self.pid is not None

    def dsn(self, dbname: str = "chrispar", user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.proxy}/{dbname}"

    # ----------------------------------------------------------------- lifecycle

    def launch(self) -> None:
        """Start the process and return at once (see `wait_ready`). No-op if running."""
        if self.is_running():
            return
        with open(self.logfile, "ab") as out:
            self._log_start = out.tell()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pgroute.cli", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.directory),
                env=instance_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        _left.add(self)
        log.info("pgroute %s: started (pid %d, proxy %s, API %s)", self.name, self._proc.pid, self.proxy, self.api_url)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the API answers /api/health (200 or 503), the proxy accepts
        connections and, in a cluster, the instance has registered its member record
        (its status lists members: the API and the proxy are up before that, and an
        instance whose name is still held exits then). LocalClusterError, with the
        log's tail, when it exits first."""
        deadline = time.monotonic() + timeout
        moves = 0
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                self._forget()
                if self._rewrite is not None and moves < 3 and "address already in use" in self._this_run_log():
                    moves += 1
                    self._move_ports()
                    self.launch()
                    continue
                raise LocalClusterError(f"pgroute {self.name}: exited (status {code}):\n{self.log_tail()}")
            if self._api_answers() and port_open(self.host, self.proxy_port) and self._registered():
                self._rewrite = None
                return
            if time.monotonic() > deadline:
                raise LocalClusterError(f"pgroute {self.name}: not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _this_run_log(self) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _move_ports(self) -> None:
        assert self._rewrite is not None
        old = (self.proxy_port, self.api_port)
        self.proxy_port, self.api_port = _two_free_ports(set(old))
        self._rewrite(self.proxy_port, self.api_port)
        log.info("pgroute %s: a port of %s was taken, moving to %s", self.name, old, (self.proxy_port, self.api_port))

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def start_again(self, timeout: float = 30.0) -> None:
        """Start after a crash. Its member record may outlive the process by up to
        the lease's TTL ("instance name in use"): retry until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.start(max(1.0, deadline - time.monotonic()))
                return
            except LocalClusterError as exc:
                if "name in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        """Crash it: SIGKILL, reaped before returning (nothing revoked in etcd)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
            log.info("pgroute %s: killed (pid %d)", self.name, proc.pid)
        self._forget()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (leader key given up, sessions drained), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pgroute %s: ignored SIGTERM for %ss: SIGKILL", self.name, timeout)
                proc.kill()
                proc.wait(10)
        self._forget()

    def _forget(self) -> None:
        _left.discard(self)

    # ----------------------------------------------------------------- API

    def _api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + "/api/health", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 503: up, no routable node yet
        except (OSError, ValueError):
            return False

    def _registered(self) -> bool:
        if not self.clustered:
            return True
        st = self.status()
        return bool(st and (st.get("cluster") or {}).get("members"))

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """/api/status, or None when it does not answer."""
        try:
            with urllib.request.urlopen(self.api_url + "/api/status", timeout=timeout) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def config_sections(
    pair: LocalPair,
    directory: Path,
    proxy_port: int,
    api_port: int,
    health: dict[str, Any],
    cluster: dict[str, Any] | None = None,
    recovery_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """An instance's configuration in front of ``pair``; ``cluster``: its [cluster];
    ``recovery_dir``: default ``directory/recovery``."""
    sections: dict[str, dict[str, Any]] = {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}", "connect_timeout": 2.0, "pause_timeout": 15.0},
        "primary": {"dsn": pair.primary_dsn()},
        "mirror": {"dsn": pair.mirror_dsn()},
        "replication": {"publication": pair.publication, "subscription": pair.subscription},
        "health": dict(health),
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "state": {"path": str(directory / "state.json"), "recovery_dir": str(recovery_dir or directory / "recovery")},
    }
    if cluster is not None:
        sections["cluster"] = dict(cluster)
    return sections


def new_instance(
    name: str,
    directory: Path,
    pair: LocalPair,
    health: dict[str, Any],
    cluster: dict[str, Any] | None = None,
    ports: tuple[int, int] | None = None,
    header: str = "",
    recovery_dir: Path | None = None,
) -> LocalInstance:
    """An instance (not started) with its configuration in ``directory`` (created),
    on ``ports`` (proxy, API) or free ones."""
    directory.mkdir(parents=True, exist_ok=True)
    proxy_port, api_port = ports if ports is not None else _two_free_ports()
    path = directory / "pgroute.toml"

    def rewrite(proxy: int, api: int) -> None:
        write_config(path, config_sections(pair, directory, proxy, api, health, cluster, recovery_dir), header)

    rewrite(proxy_port, api_port)
    return LocalInstance(name, directory, path, proxy_port, api_port, clustered=cluster is not None, rewrite=rewrite)


def _two_free_ports(avoid: set[int] | None = None) -> tuple[int, int]:
    taken = set(avoid or ())
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports[0], ports[1]


class LocalInstances:
    """The instances of one cluster (default a, b, c) on ``pair`` and the etcd
    ``endpoints``, under ``base``, with a fresh key prefix (a new route)."""

    def __init__(
        self,
        base: Path,
        pair: LocalPair,
        endpoints: list[str],
        *,
        names: tuple[str, ...] = ("a", "b", "c"),
        ttl: float = 3.0,
        health: dict[str, Any],
        prefix: str | None = None,
        ports: list[tuple[int, int]] | None = None,
        header: str = "",
        recovery_dir: Path | None = None,
    ) -> None:
        self.base = base
        self.ttl = ttl
        self.prefix = prefix or f"/pgroute/local-{uuid.uuid4().hex[:8]}"
        self.instances = [
            new_instance(
                name,
                base / name,
                pair,
                health,
                cluster={"etcd": list(endpoints), "name": name, "prefix": self.prefix, "ttl": ttl},
                ports=ports[i] if ports is not None else None,
                header=header,
                recovery_dir=recovery_dir,
            )
            for i, name in enumerate(names)
        ]

    def __iter__(self) -> Any:
        return iter(self.instances)

    def __getitem__(self, name: str) -> LocalInstance:
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise KeyError(name)

    def start(self, timeout: float = 60.0) -> None:
        """Start every instance and wait until one leads and every one routes to a
        node at the same epoch. The first started, in practice, leads."""
        try:
            for instance in self.instances:
                instance.launch()
            for instance in self.instances:
                instance.wait_ready(timeout)
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise

    def multi_host_dsn(self, dbname: str = "chrispar", user: str = "postgres", order: list[str] | None = None) -> str:
        """The libpq multi-host DSN listing every instance (in ``order`` of names)."""
        chosen = [self[n] for n in order] if order is not None else self.instances
        hosts = ",".join(i.proxy for i in chosen)
        return f"postgresql://{user}@{hosts}/{dbname}?target_session_attrs=read-write"

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {i.name: i.status() if i.is_running() else None for i in self.instances}

    def leader(self) -> LocalInstance | None:
        """The running instance whose /api/status says it leads (role ``leader``)."""
        for name, st in self.statuses().items():
            if st is not None and (st.get("cluster") or {}).get("role") == "leader":
                return self[name]
        return None

    def wait_settled(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Until exactly one running instance leads and each routes to the same node
        at the same epoch; the statuses then."""
        deadline = time.monotonic() + timeout
        last: dict[str, dict[str, Any] | None] = {}
        while True:
            for instance in self.instances:
                if instance._proc is not None and instance._proc.poll() is not None:
                    raise LocalClusterError(f"pgroute {instance.name}: exited:\n{instance.log_tail()}")
            last = {n: s for n, s in self.statuses().items() if self[n].is_running()}
            if last and all(s is not None for s in last.values()):
                done = {n: s for n, s in last.items() if s is not None}
                roles = [(s.get("cluster") or {}).get("role") for s in done.values()]
                routes = {(s.get("active"), s.get("epoch")) for s in done.values()}
                if roles.count("leader") == 1 and len(routes) == 1 and next(iter(routes))[0] is not None:
                    return done
            if time.monotonic() > deadline:
                seen = {n: (s or {}).get("cluster", {}).get("role") for n, s in last.items()}
                raise LocalClusterError(f"the instances did not settle within {timeout}s (roles {seen})")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every instance (SIGTERM, then SIGKILL); never raises."""
        for instance in self.instances:
            with contextlib.suppress(Exception):
                if instance.is_running():
                    instance._proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for instance in self.instances:
            try:
                instance.stop()
            except Exception as exc:
                log.warning("pgroute %s: could not stop: %s", instance.name, exc)


# --------------------------------------------------------------------------- registry

_left: Leftovers[LocalInstance] = Leftovers("pgroute instance", lambda instance: instance.stop(timeout=10))


def stop_all_instances() -> None:
    """Stop every instance this process started and did not stop (atexit safety net)."""
    _left.finish_all()
