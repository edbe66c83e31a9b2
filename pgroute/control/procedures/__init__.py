"""The switch procedures the controller runs: failover, switchover, failback, rejoin,
fence, unfence. Each is a sequence of small idempotent steps (``replication``,
``fencing``, ``pg.catalog``), timed phase by phase through ``Op.phase``, safe to
re-run after a crash halfway, and returns an ``OpResult`` instead of raising for
node failures."""

from .context import Context, Op, OpResult
from .failover import abort_to, failover, promote_node
from .fence import fence, unfence
from .rejoin import rejoin
from .switchover import ensure_synchronous_commit, failback, switchover

__all__ = [
    "Context",
    "Op",
    "OpResult",
    "abort_to",
    "ensure_synchronous_commit",
    "failback",
    "failover",
    "fence",
    "promote_node",
    "rejoin",
    "switchover",
    "unfence",
]
