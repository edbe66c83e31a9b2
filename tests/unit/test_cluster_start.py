"""`pgroute run` with [cluster] etcd and no etcd member answering: exit 1 with the
reason, after at most about one TTL (it cannot follow a route nobody can read)."""

from __future__ import annotations

import logging
import socket

from pgroute import app
from pgroute.config import Config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_without_etcd_exits_1(caplog) -> None:
    config = Config.model_validate(
        {
            "proxy": {"listen": "127.0.0.1:0"},
            "api": {"listen": "127.0.0.1:0"},
            "primary": {"dsn": "postgresql://postgres@127.0.0.1:1/chrispar"},
            "mirror": {"dsn": "postgresql://postgres@127.0.0.1:2/chrispar"},
            "cluster": {"etcd": [f"127.0.0.1:{_closed_port()}"], "name": "a", "ttl": 2.0},
        }
    )
    with caplog.at_level(logging.ERROR, logger="pgroute.app"):
        assert app.run(config) == 1
    assert "cannot start: cluster: " in caplog.text
