"""Exception hierarchy shared by every layer of pgroute."""

from __future__ import annotations

from collections.abc import Sequence


class PgRouteError(Exception):
    """Base class of every error pgroute raises on purpose."""


class ConfigError(PgRouteError):
    """Invalid configuration; the message names the offending key.

    ``more`` carries the other problems found in the same pass, so an operator fixes
    them all at once instead of one per run; ``key`` and ``message`` are the first."""

    def __init__(self, key: str, message: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((key, message), *more)
        if more:
            lines = [f"{k}: {m}" for k, m in self.problems]
            text = f"{len(lines)} problems:\n  " + "\n  ".join(lines)
        else:
            text = f"{key}: {message}"
        super().__init__(text)
        self.key = key
        self.message = message


class NodeUnavailable(PgRouteError):
    """A node could not be reached or did not answer in time."""


class UnsafeStep(PgRouteError):
    """A destructive step refused because it could not prove it changes the right node
    (the node it would change is the source of the data, or the active node)."""


class ActionRefused(PgRouteError):
    """A requested switch was refused; the message says why (HTTP 409, CLI exit 1)."""


class LocalClusterError(PgRouteError):
    """A local PostgreSQL server could not be created, started or stopped."""
