"""Recovery of divergent commits left on a returning old primary.

Commits the old primary acknowledged but the mirror never received (the
*divergent commits*) are found, written down and replayed onto the node that
now takes writes, in three jobs, one module each:

- ``read``: peek the orphaned subscription slot (never consume it) and decode
  its pgoutput changes into a ``DivergentSet``.
- ``render``: the recovery files, replayable SQL and JSON lines, written
  atomically (``write_recovery_files``, ``to_sql``, ``to_jsonl``).
- ``apply``: replay the set onto the active node without overwriting any row
  that changed there, reporting conflicts and replaced rows (``apply_divergent``).

``model`` holds the values they share (``DivergentSet``, ``Conflict``,
``Replaced``, ``ApplyReport``, ``DivergenceError``) and ``SESSION_SETTINGS``, the
fixed text format divergent values travel in; ``rows`` what a change means row
by row (target key, assigned columns), so the SQL file and the live replay
agree. The pgoutput decoder itself is ``pgroute.pg.pgoutput``; quoting and LSNs
are ``pgroute.pg.naming``.

The failback action uses it as ``divergence.read_divergent(...)``,
``divergence.write_recovery_files(...)``, ``divergence.apply_divergent(...)``.
"""

from pgroute.control.divergence.apply import apply_divergent
from pgroute.control.divergence.model import (
    SESSION_SETTINGS,
    ApplyReport,
    Conflict,
    DivergenceError,
    DivergentSet,
    Replaced,
)
from pgroute.control.divergence.read import read_divergent
from pgroute.control.divergence.render import (
    change_to_sql,
    sql_value,
    to_jsonl,
    to_sql,
    write_recovery_files,
)

__all__ = [
    "SESSION_SETTINGS",
    "ApplyReport",
    "Conflict",
    "DivergenceError",
    "DivergentSet",
    "Replaced",
    "apply_divergent",
    "change_to_sql",
    "read_divergent",
    "sql_value",
    "to_jsonl",
    "to_sql",
    "write_recovery_files",
]
