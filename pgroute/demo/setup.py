"""The demo's servers, directory and configuration, and what its two modes share.

Owns where the demo lives (``.pgroute-demo/demo-*`` under the current directory,
else under the system temporary directory; an abandoned one is removed by the next
run), the seed data, the demo's pgroute.toml, and `prepare`, which returns a
`Demo` with both servers running and replicating.

Invariant: the demo configuration ignores the process environment: a
``DATABASE_URL`` in the shell must not point the demo's pgroute at somebody's real
database.
"""

from __future__ import annotations

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pgroute import local
from pgroute.errors import LocalClusterError
from pgroute.local.workload import wait_until

if TYPE_CHECKING:
    from pgroute.config import Config
    from pgroute.control.controller import Controller

log = logging.getLogger(__name__)

DEMO_DIR = ".pgroute-demo"
RUN_PREFIX = "demo-"
RECOVERY_PREFIX = "recovery-"
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


# --------------------------------------------------------------------------- output


def say(text: str = "", err: bool = False) -> None:
    """Print a line for the user (stdout, or stderr for errors), flushed at once."""
    stream = sys.stderr if err else sys.stdout
    # A closed terminal (EIO after SIGHUP) or pipe must not stop the clean-up.
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)


# --------------------------------------------------------------------------- signals


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the demo (and clean up): Ctrl-C, SIGTERM, and closing
    the terminal (SIGHUP) unless the demo was started to ignore it (``nohup``)."""
    sigs: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs += (signal.SIGHUP,)
    return sigs


def ignore_stop_signals() -> None:
    """From here on the demo cleans up: a second Ctrl-C, SIGTERM or SIGHUP must not
    leave servers behind. (`main` restores the original handlers at the very end.)"""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def pgroute_command() -> str:
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
    """True when pgroute could listen on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The proxy and the API bind with SO_REUSEADDR: a TIME_WAIT leftover is fine.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int, avoid: set[int]) -> int:
    """`preferred` when free, else any free port not in `avoid`."""
    if preferred not in avoid and _port_free(preferred):
        return preferred
    while True:
        port = local.free_port()
        if port not in avoid:
            return port


def make_demo_dir() -> Path:
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


def keep_recovery_files(base: Path) -> Path | None:
    """Move the run's recovery files (divergent commits, pg_dump before a resync) out
    of the run's directory to ``<parent>/recovery-<time>``, which the clean-up keeps.
    Returns where they went, or None when pgroute wrote none. OSError when they
    cannot be moved (the caller then must not remove the run's directory)."""
    src = base / "recovery"
    if not src.is_dir() or not any(src.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = base.parent / f"{RECOVERY_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        dest = base.parent / f"{RECOVERY_PREFIX}{stamp}-{n}"
        n += 1
    src.rename(dest)  # same parent directory: one atomic rename
    return dest


def remove_demo_dir(base: Path) -> None:
    """Remove the run's directory, and .pgroute-demo when no other run uses it."""
    shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(OSError):
        base.parent.rmdir()  # only when no other demo runs there


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(path: Path, pair: local.LocalPair, proxy_port: int, api_port: int, state_dir: Path) -> None:
    """The demo's configuration file: a complete, commented pgroute.toml."""
    lines = [
        "# pgroute demo configuration (written by `pgroute demo`; removed when it stops,",
        "# except recovery files, which move to ../recovery-<time>).",
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
    """A prepared demo: its directory, servers and configuration."""

    base: Path
    pair: local.LocalPair
    config_path: Path
    config: Config
    pgroute: str = field(default_factory=pgroute_command)

    @property
    def api_url(self) -> str:
        """Where the demo's pgroute API listens."""
        return f"http://{self.config.api.listen}"

    @property
    def database_url(self) -> str:
        """What an application connects to: pgroute's proxy."""
        return f"postgresql://postgres@{self.config.proxy.listen}/{DBNAME}"


def create_demo_pair(base: Path) -> local.LocalPair:
    """Both servers with the seed and replication (the plain and the cluster demo)."""
    return local.create_pair(base, dbname=DBNAME, publication=PUBLICATION, subscription=SUBSCRIPTION, seed_sql=SEED_SQL)


def prepare(base: Path) -> Demo:
    """Both servers with the seed and replication, and the configuration to run pgroute with."""
    return configure(base, create_demo_pair(base))


def configure(base: Path, pair: local.LocalPair) -> Demo:
    """The demo's ports and pgroute.toml for `pair` (its servers running), as a `Demo`."""
    from pgroute.config import load_config

    avoid = {pair.primary.port, pair.mirror.port}
    proxy_port = pick_port(PROXY_PORT, avoid)
    api_port = pick_port(API_PORT, avoid | {proxy_port})
    config_path = base / "pgroute.toml"
    write_config(config_path, pair, proxy_port, api_port, base)
    # environ={}: the shell's DATABASE_URL & co. must not redirect the demo.
    config = load_config(config_path, environ={})
    return Demo(base, pair, config_path, config)


def start_with_retries(cluster: local.LocalCluster, attempts: int = 5) -> None:
    """Start a server that was killed, retrying for a few seconds."""
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


async def wait_following(ctl: Controller, timeout: float = 30.0) -> None:
    """Until pgroute has seen the mirror following with a known lag: before that an
    automatic failover is refused (the mirror's lag is unknown)."""

    def following() -> bool:
        st = ctl.status()
        return st["replication"] == "ok" and st["nodes"]["mirror"]["lag_bytes"] is not None

    await wait_until(following, timeout, what="the mirror to be seen following", interval=0.1)
