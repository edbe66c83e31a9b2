"""Until the cluster components are wired in, `pgroute run` with [cluster] etcd refuses
to start (exit 2) instead of running alone beside other instances."""

from __future__ import annotations

import pytest

from pgroute import app
from pgroute.config import Config, ConfigError


def _config() -> Config:
    return Config.model_validate(
        {
            "primary": {"dsn": "postgresql://postgres@127.0.0.1:1/chrispar"},
            "mirror": {"dsn": "postgresql://postgres@127.0.0.1:2/chrispar"},
            "cluster": {"etcd": ["127.0.0.1:2379"], "name": "a"},
        }
    )


async def test_start_with_cluster_etcd_refuses_to_start_alone() -> None:
    with pytest.raises(ConfigError, match="cannot run as a cluster yet") as err:
        await app.start(_config())
    assert err.value.key == "cluster.etcd"


def test_run_with_cluster_etcd_exits_2() -> None:
    # Before anything listens or connects (the nodes' ports here answer nothing).
    assert app.run(_config()) == 2
