"""How a failed probe is classified (monitor.probe): unreachable counts against the
node, refused (the server answered with an error) and local (pgroute's own file
descriptors or memory) do not. The connection is replaced by a fake that raises
what asyncpg raises; no database is involved."""

from __future__ import annotations

import errno
from typing import Any

import asyncpg
import pytest

from pgroute.model import NodeName
from pgroute.monitor import probe as probe_module
from pgroute.monitor.probe import Prober
from pgroute.pg.dsn import parse_dsn


def prober() -> Prober:
    return Prober(NodeName.PRIMARY, parse_dsn("postgresql://u:secret@127.0.0.1:1/db"), 1.0, "sub", "sub_rev")


@pytest.mark.parametrize(
    "exc, reached, local",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), False, False),
        (OSError(errno.EHOSTUNREACH, "No route to host"), False, False),
        (TimeoutError(), False, False),
        (asyncpg.InvalidPasswordError('password authentication failed for user "u"'), True, False),
        (asyncpg.InvalidAuthorizationSpecificationError('role "u" is not permitted to log in'), True, False),
        (asyncpg.InvalidCatalogNameError('database "db" does not exist'), True, False),
        (asyncpg.TooManyConnectionsError("too many connections for database"), True, False),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True, False),
        (OSError(errno.EMFILE, "Too many open files"), False, True),
        (OSError(errno.ENFILE, "Too many open files in system"), False, True),
        (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"), False, False),
        (RuntimeError("a bug in pgroute"), False, True),
    ],
)
async def test_failed_probe_classification(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException, reached: bool, local: bool
) -> None:
    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(probe_module.asyncpg, "connect", connect)
    sample = await prober().probe()
    assert not sample.ok
    assert (sample.reached, sample.local, sample.refused) == (reached, local, reached)
    assert sample.error and "secret" not in sample.error
