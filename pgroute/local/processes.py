"""Operating-system side of local servers: ports, the server OS user, process ids,
reaping, and the registry of running servers.

Invariants:
- A killed postmaster nobody reaps stays a zombie whose pid still "exists", and
  PostgreSQL then refuses to start on that data directory ("lock file already
  exists"). So this process reaps what it kills (`reap`), and on Linux becomes a
  child subreaper (`become_subreaper`): the backends of a killed postmaster are
  re-parented to it and reaped too.
- Every server this process starts is registered until it is stopped; `stop_all()`
  (registered with atexit) kills what is left, so an interrupted run leaves no
  postgres processes behind. A forked child never kills its parent's servers.
- When running as root, initdb and postgres run as the ``postgres`` OS user (both
  refuse root); `as_server`, `server_env` and `give_to_server` are how.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pgroute.errors import LocalClusterError

if TYPE_CHECKING:
    import pwd

    from .cluster import LocalCluster

log = logging.getLogger(__name__)

SERVER_USER = "postgres"
"""OS user the servers run as when this process is root."""


# --------------------------------------------------------------------------- ports


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


# --------------------------------------------------------------------------- the server user


@functools.cache
def _server_account() -> pwd.struct_passwd | None:
    """The pwd entry of the OS user to run servers as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd  # Unix only, like running as root

    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise LocalClusterError(
            f"running as root, but PostgreSQL refuses root and there is no {SERVER_USER!r} OS user "
            f"to run it as: create one (useradd --system --create-home {SERVER_USER}) "
            "or run as an ordinary user"
        ) from None


def as_server() -> dict[str, Any]:
    """subprocess keyword arguments that run a program as the server user."""
    account = _server_account()
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def server_env(**extra: str) -> dict[str, str]:
    """Our environment minus PG* variables (a stray PGDATA or PGPORT must not redirect
    a command), plus the server user's identity when we switch to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    account = _server_account()
    if account is not None:
        env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    env.update(extra)
    return env


def give_to_server(path: Path) -> None:
    """Make the server user own `path` (when servers run as another user)."""
    account = _server_account()
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def check_reachable(path: Path) -> None:
    """Fail early, with advice, when the server user cannot traverse to `path`
    (pytest's tmp_path lives under a 0700 root directory, for example)."""
    account = _server_account()
    if account is None:
        return
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


# --------------------------------------------------------------------------- processes


def pidfile_port(pidfile: Path) -> int | None:
    """The port recorded in a postmaster.pid (line 4), or None."""
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


def pid_alive(pid: int) -> bool:
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


def is_postgres(pid: int) -> bool:
    """Guard against a reused pid in a stale postmaster.pid (Linux only; elsewhere: trust it)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() in ("postgres", "postmaster")
    except FileNotFoundError:
        return not os.path.isdir("/proc")
    except OSError:
        return True


def children(pid: int) -> list[int]:
    """Pids of the direct children of `pid` (its backends, for a postmaster)."""
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


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send `sig` to each pid; one that is already gone is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reap(pid: int, deadline: float) -> None:
    """Wait until `pid` is gone: reap it if it is our child, else wait until it
    is a zombie of someone else or gone."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        if time.monotonic() > deadline:
            raise LocalClusterError(f"process {pid} did not exit after SIGKILL")
        time.sleep(0.01)


def reap_zombie_children(keep: Iterable[int] = ()) -> list[int]:
    """Reap the zombie postgres processes that are our children, except `keep`, and
    return their pids: backends of a postmaster someone else killed (kill -9 from a
    terminal), re-parented to us as subreaper and never waited for otherwise."""
    if not os.path.isdir("/proc"):
        return []
    keep = set(keep)
    reaped = []
    for pid in children(os.getpid()):
        fields = _proc_stat(pid)
        if pid in keep or fields is None or fields[0] != "Z" or not _comm_is(pid, "postgres"):
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        reaped.append(pid)
    return reaped


def _comm_is(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == name
    except OSError:
        return False


_subreaper_lock = threading.Lock()
_subreaper = False


def become_subreaper() -> None:
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


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- registry

T = TypeVar("T")


class Leftovers(Generic[T]):
    """What this process started and has not stopped yet (servers, etcd members,
    pgroute instances): ``finish`` runs on each one left at exit (atexit), never in a
    forked child (it must not stop its parent's). Guarded by a lock: create_pair
    starts two servers from two threads."""

    def __init__(self, what: str, finish: Callable[[T], object]) -> None:
        self._what = what
        self._finish = finish
        self._lock = threading.Lock()
        self._items: set[T] = set()
        self._owner_pid = os.getpid()
        atexit.register(self.finish_all)

    def add(self, item: T) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: T) -> None:
        with self._lock:
            self._items.discard(item)

    def finish_all(self) -> None:
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            left = list(self._items)
        for item in left:
            try:
                self._finish(item)
            except Exception:
                log.exception("could not stop %s %s", self._what, getattr(item, "name", item))


_servers: Leftovers[LocalCluster] = Leftovers("local cluster", lambda cluster: cluster.kill())


def stop_all() -> None:
    """Kill every server this process started and did not stop (atexit safety net)."""
    _servers.finish_all()


def register(cluster: LocalCluster) -> None:
    """Record a server this process started (until `unregister`)."""
    _servers.add(cluster)


def unregister(cluster: LocalCluster) -> None:
    """Forget a server that stopped or was killed."""
    _servers.discard(cluster)
