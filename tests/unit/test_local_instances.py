"""pgroute.local.instances without processes: the configuration an instance gets is
one `pgroute run` accepts (with and without [cluster]), the environment passed to it
cannot redirect it, and the multi-host DSN lists every instance in the order asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pgroute.config import load_config
from pgroute.local import LocalPair
from pgroute.local.instances import LocalInstances, instance_env, new_instance

HEALTH = {"interval": 0.5, "max_retries": 2, "retry_interval": 0.2, "timeout": 1.0}


class _Pair:
    publication = "chrispar_pub"
    subscription = "chrispar_sub"

    def primary_dsn(self) -> str:
        return "postgresql://postgres@127.0.0.1:5001/chrispar"

    def mirror_dsn(self) -> str:
        return "postgresql://postgres@127.0.0.1:5002/chrispar"


PAIR = cast(LocalPair, _Pair())


def test_a_single_instance_config_is_valid_and_has_no_cluster(tmp_path: Path) -> None:
    inst = new_instance("one", tmp_path / "one", PAIR, HEALTH, ports=(7001, 7002), header="a comment")
    assert not inst.clustered
    config = load_config(inst.config_path, environ={})
    assert not config.cluster.enabled
    assert config.proxy.listen == "127.0.0.1:7001" and config.api.listen == "127.0.0.1:7002"
    assert config.health.interval == 0.5 and config.health.max_retries == 2
    assert config.state.path == str(tmp_path / "one" / "state.json")
    assert inst.config_path.read_text().startswith("# a comment\n")


def test_cluster_instances_share_etcd_and_prefix_with_their_own_names_and_ports(tmp_path: Path) -> None:
    endpoints = ["127.0.0.1:2379", "127.0.0.1:2380", "127.0.0.1:2381"]
    ports = [(7001, 7101), (7002, 7102), (7003, 7103)]
    group = LocalInstances(
        tmp_path, PAIR, endpoints, ttl=3.0, health=HEALTH, ports=ports, recovery_dir=tmp_path / "recovery"
    )
    configs = [load_config(i.config_path, environ={}) for i in group]
    assert [c.cluster.name for c in configs] == ["a", "b", "c"]
    assert {c.cluster.prefix for c in configs} == {group.prefix}
    assert all(list(c.cluster.etcd) == endpoints and c.cluster.ttl == 3.0 for c in configs)
    assert [c.proxy.listen for c in configs] == [f"127.0.0.1:{p}" for p, _ in ports]
    assert {c.state.recovery_dir for c in configs} == {str(tmp_path / "recovery")}
    assert len({c.state.path for c in configs}) == 3
    assert all(i.clustered for i in group)
    assert (
        group.multi_host_dsn()
        == "postgresql://postgres@127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003/chrispar?target_session_attrs=read-write"
    )
    assert group.multi_host_dsn(order=["c", "a", "b"]).startswith(
        "postgresql://postgres@127.0.0.1:7003,127.0.0.1:7001,"
    )


def test_the_instances_environment_cannot_override_their_config(monkeypatch: Any) -> None:
    for var in ("DATABASE_URL", "MIRROR_DATABASE_URL", "PGROUTE_PROXY_LISTEN", "HEALTH_CHECK_INTERVAL"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = instance_env()
    assert not {"DATABASE_URL", "MIRROR_DATABASE_URL", "PGROUTE_PROXY_LISTEN", "HEALTH_CHECK_INTERVAL"} & set(env)
    first, *rest = env["PYTHONPATH"].split(":")
    assert (Path(first) / "pgroute" / "__init__.py").is_file() and rest == ["/elsewhere"]
