"""Base directories for local servers, and the clean-up of abandoned ones.

Invariant: a directory made by `make_base_dir` records its creator's pid in
``.owner``. A process killed with SIGKILL runs no atexit, so its servers outlive it;
`cleanup_abandoned` finds such directories (creator gone), kills their servers and
removes them. A directory whose creator still runs is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .cluster import LocalCluster
from .processes import check_reachable, give_to_server, pid_alive, pidfile_port

log = logging.getLogger(__name__)


def scratch_parent(explicit: Path | str | None = None) -> Path | None:
    """Where disposable data directories go: `explicit` when given, else /dev/shm
    when it has room (initdb is 2-3 times faster on tmpfs than on a disk, and the
    data is disposable), else None: the system temporary directory."""
    if explicit:
        return Path(explicit)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free > 2 << 30:
        return shm
    return None


def make_base_dir(prefix: str = "pgroute-", parent: Path | str | None = None) -> Path:
    """A new empty directory the server user can use (for data directories and logs).

    It records the creating process id in `.owner`, so `cleanup_abandoned()` can
    recognise directories whose creator died without cleaning up."""
    if parent is not None:
        check_reachable(Path(parent))
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    (path / ".owner").write_text(f"{os.getpid()}\n")
    give_to_server(path)
    check_reachable(path)
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
        if pid_alive(owner):
            continue
        for pidfile in list(base.glob("**/postmaster.pid")):
            LocalCluster(pidfile.parent, port=pidfile_port(pidfile)).kill()
        shutil.rmtree(base, ignore_errors=True)
        log.warning("removed abandoned local clusters in %s (owner pid %d is gone)", base, owner)
        removed += 1
    return removed
