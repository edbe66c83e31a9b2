"""One local PostgreSQL server: a data directory, a port, and its postmaster.

Owns initdb, the server settings pgroute's tools rely on (logical WAL, loopback
only, trust authentication, fast failure detection), starting, stopping, crashing
(SIGKILL), hanging (SIGSTOP) and resuming a server, and running SQL through psql.

Invariants:
- A server this process starts is its direct child (``postgres`` is run directly,
  not through ``pg_ctl``), so this process can reap it when it kills it (see
  `processes`); it is in the registry from a successful start until it stops.
- A killed server's port is closed and its processes reaped before `kill()` returns.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from pgroute.errors import LocalClusterError

from .binaries import PgBinaries, default_binaries
from .processes import (
    as_server,
    become_subreaper,
    check_reachable,
    children,
    free_port,
    give_to_server,
    is_postgres,
    pid_alive,
    port_open,
    reap,
    register,
    server_env,
    signal_pids,
    unregister,
)

log = logging.getLogger(__name__)


def _conf_literal(value: object) -> str:
    """A value as written in postgresql.conf (and accepted by ALTER SYSTEM SET):
    booleans as on/off, everything quoted. Not SQL quoting (pgroute.pg.naming)."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class _PortInUse(LocalClusterError):
    """postgres could not bind its port (someone took it since we picked it)."""


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    def __repr__(self) -> str:
        return f"LocalCluster({self.name!r}, port={self.port}, datadir={str(self.datadir)!r})"

    @property
    def binaries(self) -> PgBinaries:
        """The binaries this server runs (found on first use unless given)."""
        if self._binaries is None:
            self._binaries = default_binaries()
        return self._binaries

    @property
    def initialized(self) -> bool:
        """True once initdb has created the data directory."""
        return (self.datadir / "PG_VERSION").exists()

    # ----------------------------------------------------------------- creation

    def init(self) -> LocalCluster:
        """Create the data directory (initdb) and write our settings and pg_hba.conf."""
        if self.initialized:
            raise LocalClusterError(f"{self.name}: {self.datadir} is already initialized")
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise LocalClusterError(f"{self.name}: {self.datadir} exists and is not empty")
        check_reachable(self.datadir.parent)
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        give_to_server(self.datadir)
        cmd = [
            str(self.binaries.tool("initdb")),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--no-locale",
            # Data checksums on every version: initdb's default from 18 only (15 and
            # 16 default to off), so a mixed pair's nodes would otherwise differ; on,
            # as a production server should have them.
            "--data-checksums",
        ]  # fmt: skip
        if self.fast:
            cmd.append("--no-sync")
        started = time.monotonic()
        result = subprocess.run(
            cmd, capture_output=True, text=True, cwd="/", env=server_env(), **as_server(), check=False
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
        give_to_server(path)

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
        register(self)

    def _start_once(self, timeout: float) -> None:
        become_subreaper()
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        with open(self.logfile, "ab") as logf:
            proc = subprocess.Popen(
                [str(self.binaries.tool("postgres")), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=server_env(),
                start_new_session=True,  # a ^C in the terminal is for us, not for the server
                **as_server(),
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
                raise LocalClusterError(f"{self.name}: not ready after {timeout}s:\n{self.log_tail(offset=offset)}")
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
        if pid is not None and pid_alive(pid) and is_postgres(pid):
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
        """Stop (fast), then start."""
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
        signal_pids([pid], signal.SIGSTOP)
        kids = children(pid)
        signal_pids([pid, *kids], signal.SIGKILL)
        deadline = time.monotonic() + 10
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise LocalClusterError(f"{self.name}: postmaster {pid} survived SIGKILL") from None
        else:
            reap(pid, deadline)
        # Once the postmaster is gone its children are re-parented (to us, as
        # subreaper), so reaping them here leaves no zombies behind.
        for child in kids:
            reap(child, deadline)
        while self.port and port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{self.name}: port {self.port} still open after kill")
            time.sleep(0.02)

    def _forget(self) -> None:
        self._proc = None
        self._paused = False
        unregister(self)

    def pause(self) -> None:
        """Hang the server: SIGSTOP the postmaster and its children. TCP connects
        still succeed (the kernel completes them), nothing answers."""
        pid = self.postmaster_pid()
        if pid is None:
            raise LocalClusterError(f"{self.name}: cannot pause, not running")
        signal_pids([pid], signal.SIGSTOP)  # first, so no new child appears meanwhile
        signal_pids(children(pid), signal.SIGSTOP)
        self._paused = True
        log.info("%s: paused (SIGSTOP)", self.name)

    def resume(self) -> None:
        """Undo pause(): SIGCONT the children, then the postmaster."""
        pid = self.postmaster_pid()
        if pid is None:
            self._paused = False
            return
        signal_pids(children(pid), signal.SIGCONT)
        signal_pids([pid], signal.SIGCONT)
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
                env=server_env(PGCONNECT_TIMEOUT="10"),
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
