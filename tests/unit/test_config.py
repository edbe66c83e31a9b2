"""Configuration: errors name the key (CLI exit 2), env overrides, runtime checks,
and password masking of every DSN form."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pgroute.cli import main
from pgroute.config import PATH_KEYS, Config, ConfigError, load_config, validate_runtime, value_range
from pgroute.pg.dsn import mask_dsn

DSNS = (
    '[primary]\ndsn = "postgresql://postgres@127.0.0.1:5432/chrispar"\n'
    '[mirror]\ndsn = "postgresql://postgres@127.0.0.1:5433/chrispar"\n'
)
CLEAN = {
    "DATABASE_URL": None,
    "MIRROR_DATABASE_URL": None,
    "PGROUTE_API_TOKEN": None,
    "PGROUTE_CONFIG": None,
    "AUTO_FAILOVER_ENABLED": None,
    "HEALTH_CHECK_INTERVAL": None,
    "HEALTH_CHECK_MAX_RETRIES": None,
    "HEALTH_CHECK_TIMEOUT": None,
    "PGROUTE_PRIMARY_DSN": None,
    "PGROUTE_MIRROR_DSN": None,
}


def write(tmp_path, text: str, name: str = "pgroute.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_cli(args, env=None):
    merged = dict(CLEAN)
    merged.update(env or {})
    return CliRunner().invoke(main, args, env=merged)


@pytest.mark.parametrize(
    "toml, key",
    [
        (DSNS + "[health]\nintervall = 3\n", "health.intervall"),  # unknown key
        (DSNS + "[bogus]\nx = 1\n", "bogus"),  # unknown section
        (DSNS + '[health]\ninterval = "fast"\n', "health.interval"),  # wrong type
        (DSNS + "[health]\nauto_failover = [1]\n", "health.auto_failover"),  # wrong type
        (DSNS + "[health]\nmax_retries = -1\n", "health.max_retries"),  # negative retries
        (DSNS + "[alerts]\nretries = -1\n", "alerts.retries"),  # negative retries
        (DSNS + "[health]\ntimeout = 0\n", "health.timeout"),  # zero timeout
        (DSNS + "[proxy]\nconnect_timeout = 0\n", "proxy.connect_timeout"),
        (DSNS + '[proxy]\nlisten = "127.0.0.1:70000"\n', "proxy.listen"),  # port > 65535
        (DSNS + '[api]\nlisten = "0.0.0.0:65536"\n', "api.listen"),
        (DSNS + '[replication]\nsynchronous = "maybe"\n', "replication.synchronous"),
        (DSNS + '[proxy]\nsplice = "yes"\n', "proxy.splice"),
        (DSNS + '[proxy]\nlisten = "127.0.0.1:7000"\nlisten_piped = "127.0.0.1:7000"\n', "proxy.listen_piped"),
        (DSNS + '[alerts]\nwebhook_urls = ["ftp://x"]\n', "alerts.webhook_urls"),
        ('[mirror]\ndsn = "postgresql://u@h/db"\n', "primary"),  # missing DSN
        ("[health\n", "--config"),  # not TOML
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path, toml, key):
    res = run_cli(["run", "--config", write(tmp_path, toml)])
    assert res.exit_code == 2, res.output
    assert key in res.stderr
    assert "Traceback" not in res.output


def test_missing_config_file_exits_2(tmp_path):
    res = run_cli(["run", "--config", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "--config" in res.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:hunter2@h:99999/db",  # bad port
        "postgresql://u:hunter2@/db",  # no host
    ],
)
def test_unparseable_dsn_names_key_without_password(tmp_path, dsn):
    toml = f'[primary]\ndsn = "{dsn}"\n[mirror]\ndsn = "postgresql://u@h/db"\n'
    res = run_cli(["run", "--config", write(tmp_path, toml)])
    assert res.exit_code == 2
    assert "primary.dsn" in res.stderr
    assert "hunter2" not in res.output


def test_wrong_scheme_dsn_does_not_echo_password(tmp_path):
    toml = '[primary]\ndsn = "mysql://u:hunter2@h/db"\n[mirror]\ndsn = "postgresql://u@h/db"\n'
    res = run_cli(["run", "--config", write(tmp_path, toml)])
    assert res.exit_code == 2 and "primary.dsn" in res.stderr
    assert "hunter2" not in res.output


def test_env_error_names_key_and_variable(tmp_path):
    res = run_cli(["run", "--config", write(tmp_path, DSNS)], env={"HEALTH_CHECK_INTERVAL": "soon"})
    assert res.exit_code == 2
    assert "health.interval" in res.stderr and "HEALTH_CHECK_INTERVAL" in res.stderr


def test_seed_env_names_override_file(tmp_path):
    path = write(tmp_path, DSNS + "[health]\ninterval = 30.0\nauto_failover = true\n")
    env = {
        "DATABASE_URL": "postgresql://app:pw@10.0.0.1:5432/chrispar",
        "MIRROR_DATABASE_URL": "postgresql://app:pw@10.0.0.2:5432/chrispar",
        "AUTO_FAILOVER_ENABLED": "false",
        "HEALTH_CHECK_INTERVAL": "5",
        "HEALTH_CHECK_MAX_RETRIES": "2",
        "HEALTH_CHECK_TIMEOUT": "1.5",
    }
    config = load_config(path, environ=env)
    assert config.primary.parsed.host == "10.0.0.1"
    assert config.mirror.parsed.host == "10.0.0.2"
    assert config.health.auto_failover is False
    assert config.health.interval == 5.0
    assert config.health.max_retries == 2
    assert config.health.timeout == 1.5


def test_env_file_with_seed_block(tmp_path):
    # The seed's backend/.env, inline comments included.
    env_file = write(
        tmp_path,
        (
            "# backend/.env\n"
            "DATABASE_URL=postgresql://postgres:pw@127.0.0.1:5432/chrispar\n"
            "MIRROR_DATABASE_URL='postgresql://postgres:pw@127.0.0.1:5433/chrispar'\n"
            "AUTO_FAILOVER_ENABLED=true          # Habilita failover automático\n"
            "HEALTH_CHECK_INTERVAL=30            # Verifica cada 30 segundos\n"
            "HEALTH_CHECK_MAX_RETRIES=3          # 3 fallos antes de failover\n"
            "export HEALTH_CHECK_TIMEOUT=5              # Timeout de 5 segundos\n"
        ),
        ".env",
    )
    config = load_config(None, env_file, environ={})
    assert config.mirror.parsed.port == 5433
    assert config.health.auto_failover is True
    assert (config.health.interval, config.health.max_retries, config.health.timeout) == (30, 3, 5)
    # The process environment beats the env file.
    config = load_config(None, env_file, environ={"HEALTH_CHECK_INTERVAL": "7"})
    assert config.health.interval == 7


def test_env_file_through_cli(tmp_path, monkeypatch):
    import sys
    import types

    seen: dict[str, Config] = {}
    fake_app = types.ModuleType("pgroute.app")
    # A stand-in module made at run time: mypy knows no attributes of a ModuleType.
    fake_app.run = lambda config: seen.setdefault("config", config) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgroute.app", fake_app)
    import pgroute.logs

    monkeypatch.setattr(pgroute.logs, "setup_logging", lambda level, fmt: None)
    env_file = write(
        tmp_path,
        "DATABASE_URL=postgresql://u@127.0.0.1:5432/a\n"
        "MIRROR_DATABASE_URL=postgresql://u@127.0.0.1:5433/a\n"
        "HEALTH_CHECK_INTERVAL=4\n",
        ".env",
    )
    res = run_cli(["run", "--env-file", env_file])
    assert res.exit_code == 0, res.output
    assert seen["config"].health.interval == 4
    res = run_cli(["run", "--env-file", str(tmp_path / "missing.env")])
    assert res.exit_code == 2 and "--env-file" in res.stderr


def test_pgroute_env_overrides(tmp_path):
    path = write(tmp_path, DSNS)
    env = {
        "DATABASE_URL": "postgresql://u@10.0.0.1:5432/db",
        "PGROUTE_PRIMARY_DSN": "postgresql://u@10.0.0.9:5432/db",  # more specific: wins
        "PGROUTE_HEALTH_INTERVAL": "2",
        "PGROUTE_PROXY_LISTEN": "0.0.0.0:6543",
        "PGROUTE_PROXY_SPLICE": "off",
        "PGROUTE_ALERTS_WEBHOOK_URLS": "https://a.example/x, https://b.example/y",
        "PGROUTE_API_TOKEN": "t0ken",
        "PGROUTE_LOG_LEVEL": "debug",
        "PGROUTE_API_URL": "http://ignored-by-config",
    }
    config = load_config(path, environ=env)
    assert config.primary.parsed.host == "10.0.0.9"
    assert config.health.interval == 2
    assert config.proxy.port == 6543
    assert config.proxy.splice == "off"
    assert config.alerts.webhook_urls == ("https://a.example/x", "https://b.example/y")
    assert config.api.token == "t0ken"
    assert config.log.level == "DEBUG"


def test_non_loopback_api_needs_token(tmp_path):
    path = write(tmp_path, DSNS + '[api]\nlisten = "0.0.0.0:5000"\n')
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as exc:
        validate_runtime(config)
    assert exc.value.key == "api.token"
    res = run_cli(["run", "--config", path])
    assert res.exit_code == 2 and "api.token" in res.stderr
    validate_runtime(load_config(path, environ={"PGROUTE_API_TOKEN": "t0ken"}))
    validate_runtime(load_config(write(tmp_path, DSNS + '[api]\nlisten = "[::1]:5000"\n', "v6.toml"), environ={}))


def test_same_database_twice_is_refused(tmp_path):
    toml = (
        '[primary]\ndsn = "postgresql://u@127.0.0.1:5432/db"\n[mirror]\ndsn = "postgresql://other@127.0.0.1:5432/db"\n'
    )
    with pytest.raises(ConfigError) as exc:
        validate_runtime(load_config(write(tmp_path, toml), environ={}))
    assert exc.value.key == "mirror.dsn"


def test_mask_dsn():
    assert mask_dsn("x postgresql://u:pw@h/db y") == "x postgresql://u:***@h/db y"
    assert mask_dsn("postgres://u:pw@h/db") == "postgres://u:***@h/db"
    assert mask_dsn("postgresql://u@h/db") == "postgresql://u@h/db"


def test_mask_dsn_password_with_at_sign():
    assert "ss@h" not in mask_dsn("postgresql://u:p@ss@h/db")


def test_mask_dsn_other_password_forms():
    assert "sec" not in mask_dsn("postgresql://u@h/db?password=sec")
    assert "sec" not in mask_dsn("host='h' user='u' password='sec'")


def test_example_config_loads_and_sets_every_key():
    import tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "pgroute.example.toml"
    config = load_config(path, environ={})
    validate_runtime(config)
    data = tomllib.loads(path.read_text())
    for section, field in Config.model_fields.items():
        keys = set(field.annotation.model_fields)  # type: ignore[union-attr]  # every field is a section model
        assert set(data.get(section, {})) == keys, section
    # Every value in the example is the default (the file documents the defaults).
    for section, values in data.items():
        if section in ("primary", "mirror"):
            continue
        defaults = Config.model_fields[section].default
        for key, value in values.items():
            expected = getattr(defaults, key)
            if (section, key) in PATH_KEYS:
                # Relative paths in the file resolve against the file's directory.
                assert getattr(config, section).model_dump()[key] == str(path.parent / value), (section, key)
                continue
            assert (list(expected) if isinstance(expected, tuple) else expected) == value, (section, key)


def test_example_env_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "example.env"
    config = load_config(None, path, environ={})
    assert config.health.interval == 30 and config.health.max_retries == 3
    assert config.mirror.parsed.port == 5433


# -- every number has a range ------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, env, key",
    [
        ("[health]\nmax_retries = 10000000\n", {}, "health.max_retries"),  # froze pgroute
        ("[health]\ninterval = inf\n", {}, "health.interval"),  # stopped probing
        ("[health]\ninterval = nan\n", {}, "health.interval"),
        ("[health]\ntimeout = 1e-9\n", {}, "health.timeout"),  # failed a healthy primary
        ("[health]\nretry_interval = 1e9\n", {}, "health.retry_interval"),
        ("[health]\nfailback_delay = -1.0\n", {}, "health.failback_delay"),
        ("[health]\nmax_lag_bytes = 9223372036854775807\n", {}, "health.max_lag_bytes"),
        ("[proxy]\nmax_client_connections = 1000000000\n", {}, "proxy.max_client_connections"),
        ("[proxy]\npause_timeout = inf\n", {}, "proxy.pause_timeout"),
        ("[proxy]\nstartup_timeout = 0.001\n", {}, "proxy.startup_timeout"),
        ("[replication]\nsequence_gap = 5000000000\n", {}, "replication.sequence_gap"),
        ("[alerts]\nretries = 1000\n", {}, "alerts.retries"),
        ("[alerts]\ntimeout = nan\n", {}, "alerts.timeout"),
        ("", {"HEALTH_CHECK_INTERVAL": "inf"}, "health.interval (from HEALTH_CHECK_INTERVAL)"),
        ("", {"HEALTH_CHECK_MAX_RETRIES": "10000000"}, "health.max_retries (from HEALTH_CHECK_MAX_RETRIES)"),
    ],
)
def test_numbers_out_of_range_exit_2_naming_the_key_and_range(tmp_path, toml, env, key):
    res = run_cli(["run", "--config", write(tmp_path, DSNS + toml)], env=env)
    assert res.exit_code == 2, res.output
    assert key in res.stderr and " to " in res.stderr, res.stderr
    assert "Traceback" not in res.output


def _numeric_keys() -> list[tuple[str, str]]:
    keys = []
    for section, field in Config.model_fields.items():
        for key, sub in field.annotation.model_fields.items():  # type: ignore[union-attr]
            if sub.annotation in (int, float):
                keys.append((section, key))
    return keys


def test_every_number_has_a_range_documented_in_readme_and_example():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    example = (root / "config" / "pgroute.example.toml").read_text()

    def number(text: str) -> float:
        return float(text.replace(",", ""))

    for section, key in _numeric_keys():
        bounds = value_range(section, key)
        assert bounds is not None, f"{section}.{key} has no range"
        row = re.search(rf"^\| `{section}\.{key}` \| [^|]* \| ([0-9.,]+) to ([0-9.,]+) \|", readme, re.M)
        assert row, f"README: no range for {section}.{key}"
        assert (number(row[1]), number(row[2])) == bounds, (section, key)
        block = example.split(f"[{section}]", 1)[1]
        doc = re.search(rf"# Range: ([0-9.,]+) to ([0-9.,]+)[^\n]*\n(?:#[^\n]*\n)*{key} =", block)
        assert doc, f"example: no range for {section}.{key}"
        assert (number(doc[1]), number(doc[2])) == bounds, (section, key)


def test_detection_formula_is_the_same_in_readme_and_example():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    formula = "interval + timeout + max_retries * retry_interval + timeout"
    assert formula in " ".join((root / "config" / "pgroute.example.toml").read_text().replace("#", " ").split())
    assert formula.replace("*", "\N{MULTIPLICATION SIGN}") in (root / "README.md").read_text()


# -- files that are not configuration ----------------------------------------------------


def test_invalid_utf8_config_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(DSNS.encode() + b'[alerts]\nemail_from = "caf\xe9@example.com"\n')
    res = run_cli(["run", "--config", str(path)])
    assert res.exit_code == 2, res.output
    assert str(path) in res.stderr and "UTF-8" in res.stderr and "line 6" in res.stderr
    assert "Traceback" not in res.output


def test_invalid_utf8_env_file_exits_2(tmp_path):
    env_file = tmp_path / "backend.env"
    env_file.write_bytes(b"DATABASE_URL=postgresql://u:p\xff@h/db\n")
    res = run_cli(["run", "--config", write(tmp_path, DSNS), "--env-file", str(env_file)])
    assert res.exit_code == 2 and "--env-file" in res.stderr and "UTF-8" in res.stderr


def test_config_that_is_a_fifo_does_not_hang(tmp_path):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pgroute.toml"
    os.mkfifo(fifo)
    code = f"from pgroute.config import load_config; load_config({str(fifo)!r}, environ={{}})"
    # A subprocess: the bug is a hang, and the test must fail rather than hang with it.
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "is a FIFO, not a regular file" in res.stderr, res.stderr
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, environ={})
    assert exc.value.key == "--config" and "is a directory" in exc.value.message


def test_config_that_is_a_device_is_refused(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("/dev/zero", environ={})
    assert exc.value.key == "--config" and "is a device" in exc.value.message


# -- messages ----------------------------------------------------------------------------


def test_missing_dsns_name_key_and_variables_and_every_error_at_once(tmp_path):
    res = run_cli(["run", "--config", write(tmp_path, '[health]\ntimeout = 0\n[proxy]\nlisten = "x"\n')])
    assert res.exit_code == 2, res.output
    err = res.stderr
    assert "4 problems" in err
    assert "primary.dsn: required" in err and "PGROUTE_PRIMARY_DSN" in err and "DATABASE_URL" in err
    assert "mirror.dsn: required" in err and "PGROUTE_MIRROR_DSN" in err and "MIRROR_DATABASE_URL" in err
    assert "health.timeout" in err and "proxy.listen: expected host:port" in err
    assert "Value error" not in err


def test_unknown_sections_are_listed_with_the_other_errors(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, DSNS + "[bogus]\nx = 1\n[health]\nintervall = 3\n"), environ={})
    assert [k for k, _ in exc.value.problems] == ["bogus", "health.intervall"]


def test_validator_messages_have_no_pydantic_prefix(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, DSNS + '[alerts]\nwebhook_urls = ["ftp://x"]\n'), environ={})
    assert exc.value.key == "alerts.webhook_urls"
    assert exc.value.message.startswith("webhook URL must start with"), exc.value.message


# -- relative paths ----------------------------------------------------------------------


def test_relative_state_path_in_file_is_relative_to_the_file(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(conf_dir, DSNS + '[state]\npath = "state/pgroute.json"\nrecovery_dir = "rec"\n')
    config = load_config(path, environ={})
    assert config.state.path == str(conf_dir / "state" / "pgroute.json")
    assert config.state.recovery_dir == str(conf_dir / "rec")
    # From the environment, or the default: the working directory, as before.
    env = load_config(path, environ={"PGROUTE_STATE_PATH": "here.json"})
    assert env.state.path == "here.json"
    assert load_config(write(conf_dir, DSNS, "plain.toml"), environ={}).state.path == "pgroute-state.json"
    absolute = load_config(write(conf_dir, DSNS + f'[state]\npath = "{tmp_path}/s.json"\n', "abs.toml"), environ={})
    assert absolute.state.path == f"{tmp_path}/s.json"
