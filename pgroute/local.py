"""Local PostgreSQL servers started from the binaries on this machine.

This module owns everything `pgroute demo` and the integration tests need to run
real servers without Docker: finding the binaries, creating data directories
(initdb), starting, stopping, crashing (SIGKILL) and hanging (SIGSTOP) servers,
and building a primary + logical-replication mirror pair.

Invariants:
- A server this process starts is its direct child (``postgres`` is run
  directly, not through ``pg_ctl``), so this process can reap it. A killed
  postmaster nobody reaps stays a zombie whose pid still "exists", and PostgreSQL
  then refuses to start on that data directory ("lock file already exists").
  For the same reason this process becomes a child subreaper on Linux: the
  backends of a killed postmaster are re-parented to it and reaped by `kill()`.
- Every server this process starts is in a registry until it is stopped;
  `stop_all()` (registered with atexit) kills what is left, so an interrupted
  run leaves no postgres processes behind. A process killed with SIGKILL runs
  no atexit: `cleanup_abandoned()` finds its directories (created by
  `make_base_dir`, which records the creator's pid) and kills their servers.
- When running as root, initdb and postgres run as the ``postgres`` OS user
  (both refuse root) and the directories they need are chowned to that user.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import glob
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from pgroute.errors import LocalClusterError

log = logging.getLogger(__name__)

SERVER_USER = "postgres"
"""OS user the servers run as when this process is root."""

SEARCH_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",  # Debian / Ubuntu
    "/usr/pgsql-*/bin",  # RHEL / Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # macOS, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # macOS, Intel
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
"""Where to look for server binaries when they are not on PATH."""

INSTALL_HINT = (
    "install the PostgreSQL server: Debian/Ubuntu: apt-get install postgresql; "
    "macOS: brew install postgresql@15; any platform: pip install pgserver"
)

_REQUIRED = ("initdb", "pg_ctl", "postgres")

DEFAULT_SCHEMA = """\
CREATE TABLE usuarios (
    id serial PRIMARY KEY,
    nombre text,
    email text UNIQUE
);
CREATE TABLE empleados (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    nombre text,
    usuario_id int
);
CREATE TABLE pedidos (
    id bigserial PRIMARY KEY,
    usuario_id int,
    total numeric,
    creado timestamptz DEFAULT now()
);
-- Owned by no column: promotion must move it too, not only serial/identity ones.
CREATE SEQUENCE folio_seq;
"""
"""The seed's "chrispar" example. Every table has a primary key, which logical
replication needs to replicate UPDATE and DELETE."""


# --------------------------------------------------------------------------- binaries


@dataclasses.dataclass(frozen=True)
class PgBinaries:
    """A directory holding initdb, pg_ctl and postgres (and usually psql)."""

    bindir: Path

    def tool(self, name: str) -> Path:
        """Path of a PostgreSQL program: from bindir, else from PATH."""
        path = self.bindir / name
        if path.is_file():
            return path
        found = shutil.which(name)
        if found:
            return Path(found)
        raise LocalClusterError(f"{name} not found in {self.bindir} or on PATH; {INSTALL_HINT}")

    @functools.cached_property
    def version(self) -> int:
        """Major version of the server, e.g. 15."""
        out = subprocess.run(
            [str(self.tool("postgres")), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if not match:
            raise LocalClusterError(f"cannot read the version of {self.tool('postgres')}: {out!r}")
        return int(match.group(1))


def find_binaries() -> PgBinaries:
    """Find the server binaries: PATH, then `pg_config --bindir`, then the usual
    install directories (highest version first), then the pgserver package."""
    for bindir in _candidate_bindirs():
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED):
            log.debug("PostgreSQL binaries found in %s", bindir)
            return PgBinaries(bindir)
    raise LocalClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, "
        f"through pg_config, or in {', '.join(SEARCH_GLOBS)}; {INSTALL_HINT}"
    )


def _candidate_bindirs():
    initdb = shutil.which("initdb")
    if initdb:
        # Debian puts symlinks on PATH; the real directory also holds psql of the same version.
        yield Path(os.path.realpath(initdb)).parent
        yield Path(initdb).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield Path(out)
    for pattern in SEARCH_GLOBS:
        yield from sorted((Path(p) for p in glob.glob(pattern)), key=_version_key, reverse=True)
    pgserver = _pgserver_bindir()
    if pgserver:
        yield pgserver


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


def _pgserver_bindir() -> Path | None:
    """The binaries bundled by the `pgserver` wheel, without importing it."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


@functools.cache
def _default_binaries() -> PgBinaries:
    return find_binaries()


# --------------------------------------------------------------------------- OS helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now.

    It is picked below the kernel's ephemeral range: outgoing connections take
    their local ports from that range, and one could otherwise grab the port of
    a killed server before it restarts."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 49152  # the IANA range, used by macOS and Windows
    return low if low > 3072 else 49152


@functools.cache
def _server_account():
    """The pwd entry of the OS user to run servers as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise LocalClusterError(
            f"running as root, but PostgreSQL refuses root and there is no {SERVER_USER!r} OS user "
            f"to run it as: create one (useradd --system --create-home {SERVER_USER}) "
            "or run as an ordinary user"
        ) from None


def _as_server() -> dict:
    """subprocess keyword arguments that run a program as the server user."""
    account = _server_account()
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _env(**extra: str) -> dict[str, str]:
    """Our environment minus PG* variables (a stray PGDATA or PGPORT must not redirect
    a command), plus the server user's identity when we switch to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    account = _server_account()
    if account is not None:
        env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    env.update(extra)
    return env


def _give_to_server(path: Path) -> None:
    account = _server_account()
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _check_reachable(path: Path) -> None:
    """Fail early, with advice, when the server user cannot traverse to `path`
    (pytest's tmp_path lives under a 0700 root directory, for example)."""
    account = _server_account()
    if account is None:
        return
    import stat

    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue  # created later by us, with a traversable mode
        if st.st_uid == account.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise LocalClusterError(
                f"{directory} (mode {oct(st.st_mode & 0o777)}) is not accessible to the "
                f"{SERVER_USER!r} OS user the servers run as; put the data directories "
                "under a directory it can reach, e.g. pgroute.local.make_base_dir()"
            )


def make_base_dir(prefix: str = "pgroute-", parent: Path | str | None = None) -> Path:
    """A new empty directory the server user can use (for data directories and logs).

    It records the creating process id in `.owner`, so `cleanup_abandoned()` can
    recognise directories whose creator died without cleaning up."""
    if parent is not None:
        _check_reachable(Path(parent))
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    (path / ".owner").write_text(f"{os.getpid()}\n")
    _give_to_server(path)
    _check_reachable(path)
    return path


def cleanup_abandoned(prefix: str = "pgroute-", parent: Path | str | None = None) -> int:
    """Kill the servers in, and remove, directories made by `make_base_dir(prefix)`
    whose creating process no longer exists (a run killed with SIGKILL).
    Returns the number of directories removed."""
    removed = 0
    for base in Path(parent or tempfile.gettempdir()).glob(prefix + "*"):
        try:
            owner = int((base / ".owner").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pidfile in list(base.glob("**/postmaster.pid")):
            LocalCluster(pidfile.parent, port=_pidfile_port(pidfile)).kill()
        shutil.rmtree(base, ignore_errors=True)
        log.warning("removed abandoned local clusters in %s (owner pid %d is gone)", base, owner)
        removed += 1
    return removed


def _pidfile_port(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if not os.path.isdir("/proc"):
        return True
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _is_postgres(pid: int) -> bool:
    """Guard against a reused pid in a stale postmaster.pid (Linux only; elsewhere: trust it)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() in ("postgres", "postmaster")
    except FileNotFoundError:
        return not os.path.isdir("/proc")
    except OSError:
        return True


def _children(pid: int) -> list[int]:
    if os.path.isdir("/proc"):
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _proc_stat(int(entry))
                if fields is not None and int(fields[1]) == pid:
                    kids.append(int(entry))
        return kids
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _signal(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap(pid: int, deadline: float) -> None:
    """Wait until `pid` is gone: reap it if it is our child, else wait until it
    is a zombie of someone else or gone."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not _pid_alive(pid):
                return
        if time.monotonic() > deadline:
            raise LocalClusterError(f"process {pid} did not exit after SIGKILL")
        time.sleep(0.01)


_subreaper_lock = threading.Lock()
_subreaper = False


def _become_subreaper() -> None:
    """Make orphaned backends of a killed postmaster our children, so we can reap
    them: this machine's init, like many container inits, never does."""
    global _subreaper
    with _subreaper_lock:
        if _subreaper or not sys.platform.startswith("linux"):
            return
        _subreaper = True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
                log.debug("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.debug("cannot become a child subreaper: %s", exc)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _conf_literal(value: object) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


# --------------------------------------------------------------------------- registry

_registry_lock = threading.Lock()
_running: set[LocalCluster] = set()
_owner_pid = os.getpid()


def stop_all() -> None:
    """Kill every server this process started and did not stop (atexit safety net)."""
    if os.getpid() != _owner_pid:
        return  # a forked child must not kill its parent's servers
    with _registry_lock:
        clusters = list(_running)
    for cluster in clusters:
        try:
            cluster.kill()
        except Exception:  # noqa: BLE001 - best effort at exit; keep killing the others
            log.exception("could not kill local cluster %s", cluster.name)


atexit.register(stop_all)


# --------------------------------------------------------------------------- one server


class _PortInUse(LocalClusterError):
    pass


class LocalCluster:
    """One PostgreSQL server: a data directory, a port, and its postmaster.

    Attributes: name (also the server's cluster_name, shown by `ps`), datadir,
    port, host ("127.0.0.1", the only address it listens on; no Unix socket),
    logfile (next to datadir, "<datadir>.log"). Trust authentication for user
    postgres on loopback, including replication connections.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        datadir: Path | str,
        port: int | None = None,
        name: str = "pg",
        settings: dict[str, str] | None = None,
        fast: bool = True,
        binaries: PgBinaries | None = None,
    ) -> None:
        self.name = name
        self.datadir = Path(datadir).absolute()
        # An automatically chosen port may be taken by someone else before we bind
        # it; until the first successful start we may pick another.
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.settings = dict(settings or {})
        self.fast = fast
        self.logfile = self.datadir.with_name(self.datadir.name + ".log")
        self._binaries = binaries
        self._proc: subprocess.Popen | None = None
        self._paused = False

    def __repr__(self) -> str:
        return f"LocalCluster({self.name!r}, port={self.port}, datadir={str(self.datadir)!r})"

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = _default_binaries()
        return self._binaries

    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    # ----------------------------------------------------------------- creation

    def init(self) -> LocalCluster:
        """Create the data directory (initdb) and write our settings and pg_hba.conf."""
        if self.initialized:
            raise LocalClusterError(f"{self.name}: {self.datadir} is already initialized")
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise LocalClusterError(f"{self.name}: {self.datadir} exists and is not empty")
        _check_reachable(self.datadir.parent)
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        _give_to_server(self.datadir)
        cmd = [
            str(self.binaries.tool("initdb")),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--no-locale",
        ]  # fmt: skip
        if self.fast:
            cmd.append("--no-sync")
        started = time.monotonic()
        result = subprocess.run(
            cmd, capture_output=True, text=True, cwd="/", env=_env(), **_as_server(), check=False
        )
        if result.returncode != 0:
            raise LocalClusterError(
                f"{self.name}: initdb failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
        self._write(
            "pg_hba.conf",
            "# written by pgroute.local: trust on loopback, including replication\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
            "host replication all ::1/128 trust\n",
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'pgroute.conf'\n")
        self._write_conf()
        log.info("%s: initialized %s in %.2fs", self.name, self.datadir, time.monotonic() - started)
        return self

    def _server_settings(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "listen_addresses": self.host,
            "port": self.port,
            # No Unix socket: /var/run/postgresql may not exist or be writable.
            "unix_socket_directories": "",
            "cluster_name": self.name,  # shows in `ps`, tells the servers apart
            "wal_level": "logical",
            "max_wal_senders": 20,
            "max_replication_slots": 20,
            "max_logical_replication_workers": 8,
            "max_worker_processes": 16,
            # Notice a dead or hung peer in seconds, not the default minute.
            "wal_sender_timeout": "10s",
            "wal_receiver_timeout": "10s",
            # Restart a failed apply worker after 1 s instead of 5 s.
            "wal_retrieve_retry_interval": "1s",
        }
        if self.fast:
            # Safe against killed processes (the OS keeps the page cache), not
            # against a machine crash: disposable test and demo data only.
            settings.update(fsync="off", full_page_writes="off", shared_buffers="32MB")
        settings.update(self.settings)
        return settings

    def _write_conf(self) -> None:
        lines = ["# written by pgroute.local; ALTER SYSTEM settings override these"]
        lines += [f"{k} = {_conf_literal(v)}" for k, v in self._server_settings().items()]
        self._write("pgroute.conf", "\n".join(lines) + "\n")

    def _write(self, filename: str, text: str) -> None:
        path = self.datadir / filename
        path.write_text(text)
        _give_to_server(path)

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections; no-op if running."""
        if self.is_running():
            return
        if not self.initialized:
            raise LocalClusterError(f"{self.name}: {self.datadir} is not initialized; call init()")
        for attempt in range(3):
            try:
                self._start_once(timeout)
                break
            except _PortInUse:
                if not self._auto_port or attempt == 2:
                    raise
                old, self.port = self.port, free_port()
                log.info("%s: port %d was taken, retrying on %d", self.name, old, self.port)
                self._write_conf()
        self._auto_port = False
        with _registry_lock:
            _running.add(self)

    def _start_once(self, timeout: float) -> None:
        _become_subreaper()
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        with open(self.logfile, "ab") as logf:
            proc = subprocess.Popen(
                [str(self.binaries.tool("postgres")), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_env(),
                start_new_session=True,  # a ^C in the terminal is for us, not for the server
                **_as_server(),
            )
        self._proc = proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._proc = None
                tail = self.log_tail(offset=offset)
                if "could not create any TCP/IP sockets" in tail:
                    raise _PortInUse(f"{self.name}: port {self.port} is in use:\n{tail}")
                raise LocalClusterError(
                    f"{self.name}: postgres exited with status {proc.returncode} while starting:\n{tail}"
                )
            pid, status = self._read_pidfile()
            if pid == proc.pid and status in ("ready", "standby"):
                log.info("%s: started on port %d (pid %d)", self.name, self.port, pid)
                return
            if time.monotonic() > deadline:
                self._kill_tree(proc.pid)
                self._proc = None
                raise LocalClusterError(
                    f"{self.name}: not ready after {timeout}s:\n{self.log_tail(offset=offset)}"
                )
            time.sleep(0.02)

    def _read_pidfile(self) -> tuple[int | None, str | None]:
        """(pid, status) from postmaster.pid; status is 'starting', 'ready', ... (line 8)."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None, None
        return pid, (lines[7].strip() if len(lines) > 7 else None)

    def postmaster_pid(self) -> int | None:
        """Pid of the running postmaster (ours or one started by another process), else None."""
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None  # exited on its own; now reaped
        pid, _ = self._read_pidfile()
        if pid is not None and _pid_alive(pid) and _is_postgres(pid):
            return pid
        return None

    def is_running(self) -> bool:
        """True while the postmaster process exists (also when paused)."""
        return self.postmaster_pid() is not None

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut down (smart: wait for clients; fast: disconnect them; immediate:
        no checkpoint, recovery at next start); no-op if not running."""
        signals = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        if mode not in signals:
            raise ValueError(f"stop mode must be one of {', '.join(signals)}, not {mode!r}")
        pid = self.postmaster_pid()
        if pid is None:
            self._forget()
            return
        if self._paused:
            self.resume()
        os.kill(pid, signals[mode])
        deadline = time.monotonic() + timeout
        while self.postmaster_pid() == pid:
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{self.name}: did not stop ({mode}) within {timeout}s")
            time.sleep(0.02)
        self._forget()
        log.info("%s: stopped (%s)", self.name, mode)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and all its children, reap
        them, and wait until the port is closed. No-op if not running."""
        pid = self.postmaster_pid()
        if pid is not None:
            self._kill_tree(pid)
            log.info("%s: killed (pid %d)", self.name, pid)
        self._forget()

    def _kill_tree(self, pid: int) -> None:
        # Freeze the postmaster first so it cannot fork replacements while we
        # collect its children; SIGKILL works on stopped processes.
        _signal([pid], signal.SIGSTOP)
        children = _children(pid)
        _signal([pid, *children], signal.SIGKILL)
        deadline = time.monotonic() + 10
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise LocalClusterError(f"{self.name}: postmaster {pid} survived SIGKILL") from None
        else:
            _reap(pid, deadline)
        # Once the postmaster is gone its children are re-parented (to us, as
        # subreaper), so reaping them here leaves no zombies behind.
        for child in children:
            _reap(child, deadline)
        while self.port and _port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{self.name}: port {self.port} still open after kill")
            time.sleep(0.02)

    def _forget(self) -> None:
        self._proc = None
        self._paused = False
        with _registry_lock:
            _running.discard(self)

    def pause(self) -> None:
        """Hang the server: SIGSTOP the postmaster and its children. TCP connects
        still succeed (the kernel completes them), nothing answers."""
        pid = self.postmaster_pid()
        if pid is None:
            raise LocalClusterError(f"{self.name}: cannot pause, not running")
        _signal([pid], signal.SIGSTOP)  # first, so no new child appears meanwhile
        _signal(_children(pid), signal.SIGSTOP)
        self._paused = True
        log.info("%s: paused (SIGSTOP)", self.name)

    def resume(self) -> None:
        """Undo pause(): SIGCONT the children, then the postmaster."""
        pid = self.postmaster_pid()
        if pid is None:
            self._paused = False
            return
        _signal(_children(pid), signal.SIGCONT)
        _signal([pid], signal.SIGCONT)
        self._paused = False
        log.info("%s: resumed (SIGCONT)", self.name)

    def destroy(self) -> None:
        """Stop (immediate) and remove the data directory and log; never raises."""
        try:
            try:
                self.stop("immediate", timeout=10)
            except (LocalClusterError, OSError):
                self.kill()
        except (LocalClusterError, OSError) as exc:
            log.warning("%s: could not stop while destroying: %s", self.name, exc)
        shutil.rmtree(self.datadir, ignore_errors=True)
        try:
            self.logfile.unlink(missing_ok=True)
        except OSError:
            pass

    # ----------------------------------------------------------------- access

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def sql(self, query: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run SQL through psql over TCP and return its output (unaligned, tuples
        only, stripped). Statements run one by one, so CREATE DATABASE and
        CREATE SUBSCRIPTION work; the first error stops it and raises."""
        cmd = [
            str(self.binaries.tool("psql")),
            "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1",
            "-d", self.dsn(dbname),
            "-f", "-",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                cmd,
                input=query,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_env(PGCONNECT_TIMEOUT="10"),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LocalClusterError(f"{self.name}: query timed out after {timeout}s: {query[:200]}") from None
        if result.returncode != 0:
            raise LocalClusterError(f"{self.name}: {result.stderr.strip() or 'psql failed'}")
        return result.stdout.strip()

    def set_settings(self, **settings: object) -> None:
        """Change server settings like ALTER SYSTEM (postgresql.auto.conf, which
        overrides the settings given to the constructor) and reload when running.
        Settings that need a restart apply at the next restart()."""
        for name in settings:
            if not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"invalid setting name {name!r}")
        if not settings:
            return
        if self.is_running():
            statements = [f"ALTER SYSTEM SET {k} = {_conf_literal(v)};" for k, v in settings.items()]
            self.sql("\n".join([*statements, "SELECT pg_reload_conf();"]))
        else:
            # What ALTER SYSTEM would write; the last line for a name wins, and the
            # next ALTER SYSTEM rewrites the file without the duplicates.
            with open(self.datadir / "postgresql.auto.conf", "a") as auto:
                auto.writelines(f"{k} = {_conf_literal(v)}\n" for k, v in settings.items())

    def log_tail(self, lines: int = 40, offset: int = 0) -> str:
        """The last lines of the server log (from byte `offset`), for error messages."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- a pair


@dataclasses.dataclass(eq=False)
class LocalPair:
    """A primary and a mirror subscribed to it with logical replication."""

    primary: LocalCluster
    mirror: LocalCluster
    dbname: str
    publication: str
    subscription: str

    def primary_dsn(self) -> str:
        return self.primary.dsn(self.dbname)

    def mirror_dsn(self) -> str:
        return self.mirror.dsn(self.dbname)

    def wait_tables_ready(self, timeout: float = 30) -> None:
        """Wait until the subscription's initial table copy is done (all tables 'r')."""
        _wait_for(
            self.mirror,
            "SELECT count(*) FILTER (WHERE srsubstate <> 'r') = 0 FROM pg_subscription_rel",
            self.dbname,
            timeout,
            "the initial table copy",
        )

    def wait_synced(self, timeout: float = 30) -> None:
        """Wait until the mirror confirmed everything up to the primary's current
        WAL position (the subscription's slot on the primary, named like the
        subscription, reports a confirmed_flush_lsn at least that far)."""
        target = self.primary.sql("SELECT pg_current_wal_lsn()", self.dbname)
        slot = "'" + self.subscription.replace("'", "''") + "'"
        try:
            _wait_for(
                self.primary,
                f"SELECT coalesce(bool_and(confirmed_flush_lsn >= '{target}'), false) "
                f"FROM pg_replication_slots WHERE slot_name = {slot}",
                self.dbname,
                timeout,
                f"the mirror to confirm WAL {target}",
            )
        except LocalClusterError as exc:
            state = self.primary.sql(
                "SELECT active, confirmed_flush_lsn FROM pg_replication_slots "
                f"WHERE slot_name = {slot}",
                self.dbname,
            )
            raise LocalClusterError(f"{exc}; slot (active|confirmed_flush_lsn): {state or 'missing'}") from None

    def destroy(self) -> None:
        """Destroy both servers (mirror first: its apply worker would otherwise
        log reconnect errors against the dying primary); never raises."""
        self.mirror.destroy()
        self.primary.destroy()


def _wait_for(cluster: LocalCluster, query: str, dbname: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while cluster.sql(query, dbname) != "t":
        if time.monotonic() > deadline:
            raise LocalClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def create_pair(
    base_dir: Path | str,
    *,
    dbname: str = "chrispar",
    publication: str = "chrispar_pub",
    subscription: str = "chrispar_sub",
    schema_sql: str | None = DEFAULT_SCHEMA,
    seed_sql: str | None = None,
    settings: dict[str, str] | None = None,
    fast: bool = True,
) -> LocalPair:
    """Start a primary (base_dir/primary) and a mirror (base_dir/mirror) on free
    ports, create `dbname` and the schema on both (logical replication copies no
    DDL), the seed on the primary, then publication and subscription; return once
    the initial copy is done and the mirror is caught up. On failure, destroys
    whatever it started before raising."""
    base = Path(base_dir).absolute()
    _check_reachable(base)
    if not base.exists():
        base.mkdir(parents=True)
        base.chmod(0o755)
        _give_to_server(base)
    started = time.monotonic()
    pair = LocalPair(
        primary=LocalCluster(base / "primary", name="primary", settings=settings, fast=fast),
        mirror=LocalCluster(base / "mirror", name="mirror", settings=settings, fast=fast),
        dbname=dbname,
        publication=publication,
        subscription=subscription,
    )
    try:

        def prepare(cluster: LocalCluster) -> None:
            cluster.init().start()
            cluster.sql(f"CREATE DATABASE {_ident(dbname)}")
            if schema_sql:
                cluster.sql(schema_sql, dbname)

        # initdb and CREATE DATABASE dominate the cost: both nodes in parallel.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(prepare, (pair.primary, pair.mirror)))
        if seed_sql:
            pair.primary.sql(seed_sql, dbname)
        pair.primary.sql(f"CREATE PUBLICATION {_ident(publication)} FOR ALL TABLES", dbname)
        conninfo = "'" + pair.primary_dsn().replace("'", "''") + "'"
        pair.mirror.sql(
            f"CREATE SUBSCRIPTION {_ident(subscription)} CONNECTION {conninfo} "
            f"PUBLICATION {_ident(publication)}",
            dbname,
        )
        pair.wait_tables_ready()
        pair.wait_synced()
    except BaseException:
        pair.destroy()
        raise
    log.info(
        "pair ready in %.2fs: primary port %d, mirror port %d",
        time.monotonic() - started,
        pair.primary.port,
        pair.mirror.port,
    )
    return pair
