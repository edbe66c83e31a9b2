"""Local PostgreSQL servers started from the binaries on this machine.

Everything `pgroute demo`, the integration tests and the benchmarks need to run
real servers without Docker, one concern per module:

- `binaries`: finding initdb, pg_ctl and postgres (and what to install otherwise);
- `processes`: ports, the server OS user, pids, reaping, the registry and `stop_all`;
- `cluster`: one server (`LocalCluster`): initdb, start, stop, kill, pause, SQL;
- `directories`: base directories and the clean-up of ones a killed run left behind;
- `pair`: a primary and a logical-replication mirror (`LocalPair`, `create_pair`);
- `workload`: a writer that records every acknowledged commit, and the check of
  which acknowledged commits a node lacks.

Invariants (details in each module): a server this process starts is its child and
is reaped when killed; every running server is registered and killed at exit;
directories of a run killed with SIGKILL are recognised (``.owner``) and removed
by the next run; as root, servers run as the ``postgres`` OS user.

Local tooling: imported by the demo, the tests and the benchmarks, never by the
daemon. This package re-exports the names those callers use; patch a module's own
attribute (``pgroute.local.binaries.SEARCH_GLOBS``), not the re-export.
"""

from __future__ import annotations

from .binaries import INSTALL_HINT, PgBinaries, find_binaries
from .cluster import LocalCluster
from .directories import cleanup_abandoned, make_base_dir, scratch_parent
from .pair import DEFAULT_SCHEMA, LocalPair, create_pair
from .processes import SERVER_USER, free_port, stop_all

__all__ = [
    "DEFAULT_SCHEMA",
    "INSTALL_HINT",
    "SERVER_USER",
    "LocalCluster",
    "LocalPair",
    "PgBinaries",
    "cleanup_abandoned",
    "create_pair",
    "find_binaries",
    "free_port",
    "make_base_dir",
    "scratch_parent",
    "stop_all",
]
