"""Local etcd members and clusters on loopback, for the tests (and later the demo).

Owns finding the ``etcd`` binary (and saying what to install when it is absent),
starting a member on free loopback ports with its data in a temporary directory,
and stopping, crashing (SIGKILL), hanging (SIGSTOP) and resuming it; and
`LocalEtcdCluster`, the members of one cluster started together, optionally
serving clients over TLS (`etcd_tls`) and with authentication enabled
(`LocalEtcdCluster.enable_auth`).

Invariants (as for PostgreSQL in `cluster` and `processes`):
- A member this process starts is its direct child and is reaped when it stops or
  is killed; a killed member's client port is closed before `kill()` returns.
- Every running member is registered until it stops; `stop_all_etcd()` (registered
  with atexit) kills what is left. A forked child never kills its parent's members.
- A member started from the main thread dies with this process even when it is
  killed with SIGKILL (PR_SET_PDEATHSIG), since no atexit runs then. (The signal
  follows the starting *thread*, so members started from other threads rely on
  atexit only.)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pgroute.errors import LocalClusterError

from .directories import make_base_dir, scratch_parent
from .etcd_tls import EtcdTls
from .processes import Leftovers, free_port, port_open

log = logging.getLogger(__name__)

ETCD_INSTALL_HINT = "apt-get install etcd-server"

# Fast, disposable members: the defaults (100 ms heartbeat, 1 s election timeout)
# are kept, so that a busy test machine does not trigger elections by itself.
_FLAGS = (
    "--logger=zap",
    "--log-outputs=stderr",
    "--snapshot-count=10000",
)


def find_etcd() -> Path:
    """The etcd server binary (PGROUTE_ETCD_BIN, else PATH, else /usr/bin/etcd)."""
    explicit = os.environ.get("PGROUTE_ETCD_BIN")
    if explicit:
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise LocalClusterError(f"PGROUTE_ETCD_BIN={explicit} is not an executable file")
        return path
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if found is None:
        raise LocalClusterError(f"etcd is not installed (no etcd on PATH): {ETCD_INSTALL_HINT}")
    return Path(found)


class LocalEtcd:
    """One etcd member: a name, a data directory, a client and a peer port on 127.0.0.1."""

    host = "127.0.0.1"

    def __init__(
        self,
        name: str,
        datadir: Path,
        client_port: int,
        peer_port: int,
        binary: Path | None = None,
        tls: EtcdTls | None = None,
        flags: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.tls = tls  # clients over https (peers stay on http)
        self.flags = flags  # more etcd options (e.g. --auth-token-ttl)
        self.datadir = Path(datadir).absolute()
        self.client_port = client_port
        self.peer_port = peer_port
        self.logfile = self.datadir.with_name(self.datadir.name + ".log")
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.initial_cluster = f"{name}={self.peer_url}"

    def __repr__(self) -> str:
        return f"LocalEtcd({self.name!r}, client_port={self.client_port})"

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client port, as pgroute's configuration writes it
        (``https://host:port`` when the member serves TLS)."""
        return self.client_url if self.tls is not None else f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.client_port}"

    def post(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any] | None:
        """POST to the member's JSON gateway (with its TLS client pair); None when it
        does not answer with a JSON object."""
        context = self.tls.client_context() if self.tls is not None else None
        headers = {"Authorization": token} if token else {}
        request = urllib.request.Request(
            f"{self.client_url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                data = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                data = json.loads(exc.read())
            except ValueError:
                return None
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def is_running(self) -> bool:
        """True while the process exists (also when paused)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        return self._paused

    # ----------------------------------------------------------------- lifecycle

    def launch(self) -> None:
        """Start the process and return at once: a member of a new cluster cannot be
        ready before a quorum of its peers runs (see `wait_ready`). No-op if running."""
        if self.is_running():
            return
        binary = self._binary or find_etcd()
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        new = not (self.datadir / "member").exists()
        cmd = [
            str(binary),
            f"--name={self.name}",
            f"--data-dir={self.datadir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-state={'new' if new else 'existing'}",
            f"--initial-cluster-token=pgroute-{os.getpid()}-{self.datadir.parent.name}",
            *_FLAGS,
            *(self.tls.server_flags() if self.tls is not None else ()),
            *self.flags,
        ]
        with open(self.logfile, "ab") as logf:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,  # a ^C in the terminal is for us, not for etcd
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        _left.add(self)
        log.info("etcd %s: started on %s (pid %d)", self.name, self.endpoint, self._proc.pid)

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until the member answers /health with a leader (its cluster has quorum)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                status = None if self._proc is None else self._proc.returncode
                self._forget()
                raise LocalClusterError(f"etcd {self.name}: exited (status {status}):\n{self.log_tail()}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise LocalClusterError(f"etcd {self.name}: not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        """True when the member answers /health with ``"health": "true"``."""
        context = self.tls.client_context() if self.tls is not None else None
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1, context=context) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """Shut down cleanly (SIGTERM); SIGKILL after ``timeout``. No-op if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._forget()
            return
        if self._paused:
            self.resume()
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("etcd %s: did not stop within %ss, killing it", self.name, timeout)
            self.kill()
            return
        self._forget()
        log.info("etcd %s: stopped", self.name)

    def kill(self) -> None:
        """Crash the member: SIGKILL, reap, wait until its client port is closed."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # works on a stopped (paused) process too
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                raise LocalClusterError(f"etcd {self.name}: pid {proc.pid} survived SIGKILL") from None
            deadline = time.monotonic() + 10
            while port_open(self.host, self.client_port):
                if time.monotonic() > deadline:
                    raise LocalClusterError(f"etcd {self.name}: port {self.client_port} still open after kill")
                time.sleep(0.02)
            log.info("etcd %s: killed (pid %d)", self.name, proc.pid)
        self._forget()

    def pause(self) -> None:
        """Hang the member (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        pid = self.pid
        if pid is None:
            raise LocalClusterError(f"etcd {self.name}: cannot pause, not running")
        os.kill(pid, signal.SIGSTOP)
        self._paused = True
        log.info("etcd %s: paused (SIGSTOP)", self.name)

    def resume(self) -> None:
        """Undo pause() (SIGCONT)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
            log.info("etcd %s: resumed (SIGCONT)", self.name)
        self._paused = False

    def _forget(self) -> None:
        self._proc = None
        self._paused = False
        _left.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LocalEtcdCluster:
    """The members of one local etcd cluster (3 by default) under one base directory."""

    def __init__(
        self,
        base: Path | str | None = None,
        size: int = 3,
        binary: Path | None = None,
        tls: EtcdTls | None = None,
        flags: tuple[str, ...] = (),
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster has at least one member")
        self._binary = binary or find_etcd()  # fail early, naming the package
        self.tls = tls
        self.flags = flags
        self._own_base = base is None
        self.base = Path(base) if base is not None else make_base_dir("pgroute-etcd-", scratch_parent())
        self.members = [self._member(i) for i in range(1, size + 1)]
        self._started = False
        self._link()

    def _member(self, i: int) -> LocalEtcd:
        return LocalEtcd(
            f"etcd{i}", self.base / f"etcd{i}", free_port(), free_port(), self._binary, self.tls, self.flags
        )

    def _link(self) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    def __repr__(self) -> str:
        return f"LocalEtcdCluster({', '.join(m.endpoint for m in self.members)})"

    def __enter__(self) -> LocalEtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member, in order."""
        return [m.endpoint for m in self.members]

    def member(self, endpoint: str) -> LocalEtcd:
        """The member serving ``endpoint`` (``host:port``)."""
        for member in self.members:
            if member.endpoint == endpoint:
                return member
        raise KeyError(endpoint)

    def start(self, timeout: float = 30) -> None:
        """Start every member not running and wait until each is ready. A port taken
        by someone else since it was picked (first start only): the members start
        over on new ports."""
        for attempt in range(3):
            for member in self.members:
                member.launch()
            try:
                for member in self.members:
                    member.wait_ready(timeout)
            except LocalClusterError as exc:
                if self._started or attempt == 2 or "address already in use" not in str(exc):
                    raise
                log.info("etcd: a port was taken, starting the cluster over on new ports")
                self.kill()
                for member in self.members:
                    shutil.rmtree(member.datadir, ignore_errors=True)
                self.members = [self._member(i) for i in range(1, len(self.members) + 1)]
                self._link()
                continue
            self._started = True
            return

    def leader(self, timeout: float = 15) -> LocalEtcd:
        """The member that is the raft leader, waiting up to ``timeout`` for an
        election (asked over HTTP; paused members are not asked)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = {}
            for member in self.members:
                if member.is_running() and not member.paused:
                    status = member.post("/v3/maintenance/status", {})
                    if status is not None:
                        statuses[member.name] = status
            leader_ids = {s.get("leader") for s in statuses.values()} - {None, "0"}
            for member in self.members:
                header = statuses.get(member.name, {}).get("header")
                if isinstance(header, dict) and header.get("member_id") in leader_ids:
                    return member
            if time.monotonic() > deadline:
                raise LocalClusterError(f"no running etcd member became the leader within {timeout}s")
            time.sleep(0.1)

    def enable_auth(self, password: str, user: str = "root") -> None:
        """Turn etcd's authentication on with ``user`` (granted the root role), as
        ``etcdctl user add`` and ``auth enable`` would (over the JSON gateway: etcdctl
        is not always installed)."""
        member = self.leader()
        for path, body in (
            ("/v3/auth/role/add", {"name": "root"}),
            ("/v3/auth/user/add", {"name": user, "password": password}),
            ("/v3/auth/user/grant", {"user": user, "role": "root"}),
            ("/v3/auth/enable", {}),
        ):
            answer = member.post(path, body)
            if answer is None or "error" in answer:
                raise LocalClusterError(f"etcd {member.name}: {path} failed: {answer}")

    def followers(self) -> list[LocalEtcd]:
        """The running members that are not the leader."""
        leader = self.leader()
        return [m for m in self.members if m is not leader and m.is_running()]

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def destroy(self) -> None:
        """Stop every member (killing the ones that do not stop) and remove the data; never raises."""
        for member in self.members:
            try:
                member.stop(timeout=5)
            except (LocalClusterError, OSError) as exc:
                log.warning("etcd %s: could not stop while destroying: %s", member.name, exc)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            for member in self.members:
                shutil.rmtree(member.datadir, ignore_errors=True)
                try:
                    member.logfile.unlink(missing_ok=True)
                except OSError:
                    pass


def create_etcd_cluster(size: int = 3, base: Path | str | None = None, timeout: float = 30) -> LocalEtcdCluster:
    """A started local etcd cluster of ``size`` members (destroy() it when done)."""
    cluster = LocalEtcdCluster(base, size)
    try:
        cluster.start(timeout)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


# --------------------------------------------------------------------------- registry

_left: Leftovers[LocalEtcd] = Leftovers("etcd member", lambda member: member.kill())


def stop_all_etcd() -> None:
    """Kill every etcd member this process started and did not stop (atexit safety net)."""
    _left.finish_all()
