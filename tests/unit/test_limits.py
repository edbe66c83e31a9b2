"""File-descriptor reservation at proxy start, and the rate-limited refusal log."""

from __future__ import annotations

import logging
import resource

import pytest

from pgroute.errors import ConfigError
from pgroute.proxy import limits
from pgroute.proxy.guards import RateLimitedLog
from pgroute.proxy.router import Route, Router
from pgroute.proxy.server import ProxyServer


def test_reserve_counts_two_descriptors_per_client_and_releases() -> None:
    needed = limits.reserve(1000, limit=4096, already_open=40)
    try:
        assert needed == 2 * (1000 + 64)
        # A second listener sees the first one's reservation.
        with pytest.raises(ConfigError) as e:
            limits.reserve(1000, limit=4096, already_open=40)
        assert e.value.key == "proxy.max_client_connections"
        assert "reserved by another listener" in e.value.message
    finally:
        limits.release(needed)
    limits.release(limits.reserve(1000, limit=4096, already_open=40))


def test_a_limit_that_cannot_be_honoured_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError) as e:
        limits.reserve(1000, limit=1024, already_open=20)
    assert e.value.key == "proxy.max_client_connections"
    assert "open-files limit 1024" in e.value.message
    assert "at most about 374" in e.value.message  # (1024 - 20 - 128) // 2 - 64


def test_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert limits.raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_proxy_refuses_to_start_beyond_the_descriptors() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("unlimited open files")
    server = ProxyServer(Router(Route(None, 0)), "127.0.0.1", 0, max_client_connections=hard, splice="off")
    with pytest.raises(ConfigError, match=r"proxy\.max_client_connections"):
        await server.start()
    assert limits._reserved == 0


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.refusals")
    rl = RateLimitedLog(logger, "refused", interval=60.0)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for _ in range(100):
            rl.note("max_connections", "sorry, too many clients already")
        rl.note("startup_timeout", "silent")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused: max_connections: sorry, too many clients already",
        "refused: startup_timeout: silent",
    ]
    rl.interval = 0.0
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        rl.note("max_connections", "again")
    assert caplog.records[-1].getMessage() == "refused: max_connections: again (and 99 more since the last line)"
