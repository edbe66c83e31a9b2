"""The [cluster] section: defaults (one instance, as without the section), the
environment forms, and validation errors that name the key."""

from __future__ import annotations

import socket

import pytest

from pgroute.config import ConfigError, load_config, validate_runtime

DSNS = (
    '[primary]\ndsn = "postgresql://postgres@127.0.0.1:5432/chrispar"\n'
    '[mirror]\ndsn = "postgresql://postgres@127.0.0.1:5433/chrispar"\n'
)


def load(tmp_path, toml: str = "", env: dict[str, str] | None = None):
    path = tmp_path / "pgroute.toml"
    path.write_text(DSNS + toml)
    return load_config(path, environ=env or {})


def problems(tmp_path, toml: str = "", env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, toml, env)
    return dict(caught.value.problems)


def test_without_the_section_pgroute_runs_alone(tmp_path):
    config = load(tmp_path)
    assert not config.cluster.enabled
    assert config.cluster.etcd == ()
    assert config.cluster.ttl == 10.0
    # The prefix follows the database: the contract's /pgroute/chrispar for the seed.
    assert config.cluster_prefix == "/pgroute/chrispar"
    assert config.cluster.member_name == socket.gethostname()


def test_the_file_sets_every_key(tmp_path):
    config = load(
        tmp_path,
        '[cluster]\netcd = ["10.0.0.1:2379", "https://etcd2.example:2379"]\n'
        'name = "pgroute-a"\nprefix = "/prod/pgroute"\nttl = 15.0\n',
    )
    assert config.cluster.enabled
    assert config.cluster.etcd == ("10.0.0.1:2379", "https://etcd2.example:2379")
    assert config.cluster.member_name == "pgroute-a"
    assert config.cluster_prefix == "/prod/pgroute"
    assert config.cluster.ttl == 15.0
    validate_runtime(config)


def test_environment_overrides_with_a_comma_separated_endpoint_list(tmp_path):
    config = load(
        tmp_path,
        '[cluster]\netcd = ["10.0.0.9:2379"]\n',
        {
            "PGROUTE_CLUSTER_ETCD": "127.0.0.1:2379, 127.0.0.1:2380,127.0.0.1:2381",
            "PGROUTE_CLUSTER_NAME": "b",
            "PGROUTE_CLUSTER_TTL": "4",
        },
    )
    assert config.cluster.etcd == ("127.0.0.1:2379", "127.0.0.1:2380", "127.0.0.1:2381")
    assert config.cluster.name == "b"
    assert config.cluster.ttl == 4.0


@pytest.mark.parametrize(
    "toml, env, key",
    [
        ("[cluster]\nttl = 1.0\n", {}, "cluster.ttl"),  # below etcd's shortest lease
        ("[cluster]\nttl = 301.0\n", {}, "cluster.ttl"),
        ("[cluster]\nttl = nan\n", {}, "cluster.ttl"),
        ('[cluster]\nttl = "10"\n', {}, "cluster.ttl"),  # strict: a string is not a number
        ("", {"PGROUTE_CLUSTER_TTL": "0.5"}, "cluster.ttl (from PGROUTE_CLUSTER_TTL)"),
        ('[cluster]\netcd = "127.0.0.1:2379"\n', {}, "cluster.etcd"),  # a list, not a string
        ('[cluster]\netcd = ["127.0.0.1:2379", "http://127.0.0.1:2379"]\n', {}, "cluster.etcd"),  # twice
        ('[cluster]\netcd = ["ftp://127.0.0.1:2379"]\n', {}, "cluster.etcd"),
        ('[cluster]\netcd = ["127.0.0.1:port"]\n', {}, "cluster.etcd"),
        ('[cluster]\netcd = ["http://127.0.0.1:2379/v3"]\n', {}, "cluster.etcd"),
        ('[cluster]\nname = "a/b"\n', {}, "cluster.name"),  # one key segment
        ('[cluster]\nname = "-a"\n', {}, "cluster.name"),
        ('[cluster]\nprefix = "pgroute"\n', {}, "cluster.prefix"),
        ('[cluster]\nprefix = "/pgroute/"\n', {}, "cluster.prefix"),
        ('[cluster]\nprefix = "/a//b"\n', {}, "cluster.prefix"),
        ('[cluster]\nleader = "x"\n', {}, "cluster.leader"),  # unknown key
        ("", {"PGROUTE_CLUSTER_LEADER": "x"}, "PGROUTE_CLUSTER_LEADER"),
    ],
)
def test_bad_values_name_the_key(tmp_path, toml, env, key):
    assert key in problems(tmp_path, toml, env)


def test_range_errors_say_the_range(tmp_path):
    assert problems(tmp_path, "[cluster]\nttl = 1.0\n")["cluster.ttl"] == "1.0 is out of range: 2 to 300"


def test_an_endpoint_with_credentials_is_refused_without_echoing_them(tmp_path):
    found = problems(tmp_path, '[cluster]\netcd = ["http://root:s3cret@127.0.0.1:2379"]\n')
    assert "cluster.etcd" in found
    assert "s3cret" not in found["cluster.etcd"]


def test_a_host_name_unusable_as_instance_name_needs_an_explicit_name(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "x" * 64)
    config = load(tmp_path, '[cluster]\netcd = ["127.0.0.1:2379"]\n')
    with pytest.raises(ConfigError) as caught:
        validate_runtime(config)
    assert caught.value.key == "cluster.name"
    # Alone (no etcd), the host name is never used: no error.
    validate_runtime(load(tmp_path))


def test_etcd_tls_and_auth_keys(tmp_path):
    config = load(
        tmp_path,
        '[cluster]\netcd = ["https://etcd1.example:2379"]\netcd_ca = "/etc/pgroute/etcd-ca.pem"\n'
        'etcd_cert = "/etc/pgroute/client.pem"\netcd_key = "/etc/pgroute/client-key.pem"\netcd_user = "pgroute"\n',
        {"PGROUTE_CLUSTER_ETCD_PASSWORD": "hunter2-secret"},
    )
    c = config.cluster
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key, c.etcd_user) == (
        "/etc/pgroute/etcd-ca.pem",
        "/etc/pgroute/client.pem",
        "/etc/pgroute/client-key.pem",
        "pgroute",
    )
    assert c.etcd_password == "hunter2-secret"
    security = c.etcd_security
    assert (security.ca, security.cert, security.key, security.user) == (c.etcd_ca, c.etcd_cert, c.etcd_key, "pgroute")
    assert security.password == "hunter2-secret"
    # The password is in no repr (tracebacks, debug logs).
    assert "hunter2" not in repr(c) and "hunter2" not in repr(config) and "hunter2" not in repr(security)


@pytest.mark.parametrize(
    "toml, env, message",
    [
        ('etcd_key = "/k.pem"\n', {}, "etcd_key is set without etcd_cert"),
        ('etcd_password = "hunter2-secret"\n', {}, "etcd_password is set without etcd_user"),
        ("", {"PGROUTE_CLUSTER_ETCD_PASSWORD": "hunter2-secret"}, "etcd_password is set without etcd_user"),
        ('etcd_user = "root"\n', {}, "etcd_user is set without etcd_password"),
    ],
)
def test_etcd_security_settings_that_cannot_work(tmp_path, toml, env, message):
    found = problems(tmp_path, '[cluster]\netcd = ["https://127.0.0.1:2379"]\n' + toml, env)
    assert message in found["cluster"], found
    assert "hunter2" not in str(found)


def test_tls_files_with_only_plain_http_endpoints_are_an_error(tmp_path):
    found = problems(tmp_path, '[cluster]\netcd = ["127.0.0.1:2379"]\netcd_ca = "/ca.pem"\n')
    assert "no etcd endpoint is https://" in found["cluster"], found
