"""Exception hierarchy shared by every layer of pgroute."""


class PgRouteError(Exception):
    """Base class of every error pgroute raises on purpose."""


class ConfigError(PgRouteError):
    """Invalid configuration; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
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
