"""Deployment files (Dockerfile, docker-compose.yml, .dockerignore, Prometheus config)
checked without a Docker engine: they parse, everything they reference exists, the
environment they pass is accepted by pgroute's configuration loader, and the image's
ENTRYPOINT + CMD and HEALTHCHECK work when run outside Docker."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pgroute.config import ConfigError, load_config, parse_listen, validate_runtime

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_CONFIG = ROOT / "config" / "pgroute.example.toml"


# -- helpers ------------------------------------------------------------------------------


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?err}, $VAR and $$ (a literal $)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        missing = not current if op in (":-", ":?") else current is None
        if op in (":?", "?") and missing:
            raise AssertionError(f"compose requires ${name}: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return current or ""

    return _INTERPOLATION.sub(sub, value)


def compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as compose sees it with ``env`` (default: a fresh checkout, no .env)."""
    data = yaml.safe_load(COMPOSE.read_text())
    return interpolate(data, env or {})


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_json(word: str) -> list[str]:
    found = [rest for w, rest in dockerfile_instructions() if w == word]
    assert found, f"no {word} in the Dockerfile"
    return json.loads(found[-1])


def healthcheck_argv() -> list[str]:
    rest = next(rest for w, rest in dockerfile_instructions() if w == "HEALTHCHECK")
    _, _, command = rest.partition(" CMD ")
    return json.loads(command)


def pgroute_argv() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).with_name("pgroute")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgroute.cli"]


def cli_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PGROUTE_", "PG"))
        and k
        not in (
            "DATABASE_URL",
            "MIRROR_DATABASE_URL",
            "AUTO_FAILOVER_ENABLED",
            "HEALTH_CHECK_INTERVAL",
            "HEALTH_CHECK_MAX_RETRIES",
            "HEALTH_CHECK_TIMEOUT",
        )
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_path(service: dict, path: str) -> Path | None:
    """The host file behind a path inside a service's container (bind mounts only)."""
    for volume in service.get("volumes") or []:
        source, _, rest = volume.partition(":")
        target = rest.split(":")[0]
        if source.startswith((".", "/")) and (path == target or path.startswith(target + "/")):
            return (ROOT / source / os.path.relpath(path, target)).resolve()
    return None


# -- docker-compose.yml -----------------------------------------------------------------


def test_compose_parses_and_has_the_services():
    data = compose()
    services = data["services"]
    assert {"postgres_primary", "postgres_mirror", "replication_setup", "pgroute", "prometheus"} <= set(services)
    assert services["postgres_primary"]["container_name"] == "chrispar_postgres_primary"
    assert services["postgres_mirror"]["container_name"] == "postgres_mirror"
    for name in ("postgres_primary", "postgres_mirror"):
        svc = services[name]
        assert svc["image"] == "postgres:15"
        command = " ".join(svc["command"])
        for setting in ("wal_level=logical", "max_replication_slots=10", "max_wal_senders=10"):
            assert f"-c {setting}" in command
        assert svc["environment"]["POSTGRES_DB"] == "chrispar"
        assert "pg_isready" in " ".join(svc["healthcheck"]["test"])
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["pgroute"]


def test_compose_dependencies_wait_for_healthy_nodes_and_setup():
    services = compose()["services"]
    setup = services["replication_setup"]
    assert setup["command"] == ["setup-replication"]
    assert setup["depends_on"] == {
        "postgres_primary": {"condition": "service_healthy"},
        "postgres_mirror": {"condition": "service_healthy"},
    }
    assert services["pgroute"]["depends_on"] == {"replication_setup": {"condition": "service_completed_successfully"}}


def test_compose_references_exist():
    services = compose()["services"]
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounted {source} does not exist"
            else:
                assert source in (compose().get("volumes") or {}), f"{name}: undeclared volume {source}"
    # The image's CMD reads the file the pgroute service mounts.
    cmd = services["pgroute"]["command"]
    config_in_container = cmd[cmd.index("--config") + 1]
    config_on_host = container_path(services["pgroute"], config_in_container)
    assert config_on_host is not None and config_on_host.is_file()
    # Prometheus: its rule file sits next to its configuration, as mounted.
    prom = services["prometheus"]
    prom_config = container_path(prom, "/etc/prometheus/prometheus.yml")
    assert prom_config is not None
    scrape = yaml.safe_load(prom_config.read_text())
    for rule_file in scrape["rule_files"]:
        host = container_path(prom, f"/etc/prometheus/{rule_file}")
        assert host is not None and host.is_file(), rule_file
        yaml.safe_load(host.read_text())


def test_prometheus_scrapes_the_pgroute_api():
    services = compose()["services"]
    api_port = parse_listen(service_env(services["pgroute"])["PGROUTE_API_LISTEN"])[1]
    scrape = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"pgroute:{api_port}" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in scrape["scrape_configs"])


def test_compose_pgroute_environment_is_a_valid_configuration():
    services = compose()["services"]
    svc = services["pgroute"]
    # What the container sees: the image's ENV, then the service's environment.
    env = {**dockerfile_env(), **service_env(svc)}
    config_path = container_path(svc, svc["command"][svc["command"].index("--config") + 1])
    config = load_config(config_path, environ=env)
    validate_runtime(config)
    assert config.primary.parsed.host == "postgres_primary"
    assert config.mirror.parsed.host == "postgres_mirror"
    assert config.api.token == "change-me"
    # Published ports lead to what pgroute listens on inside the container.
    published = {p.split(":")[-1]: p for p in svc["ports"]}
    assert str(config.proxy.port) in published and published[str(config.proxy.port)].startswith("6432:")
    assert str(config.api.port) in published and published[str(config.api.port)].startswith("5000:")
    assert config.proxy.host == "0.0.0.0" and config.api.host == "0.0.0.0"
    # The seed's names are honoured as written.
    assert config.health.auto_failover is True
    assert config.health.interval == float(env["HEALTH_CHECK_INTERVAL"])
    assert config.health.max_retries == int(env["HEALTH_CHECK_MAX_RETRIES"])
    assert config.health.timeout == float(env["HEALTH_CHECK_TIMEOUT"])
    assert config.state.path.startswith("/var/lib/pgroute/")


def test_compose_settings_from_a_dotenv_file_reach_pgroute():
    dotenv = {
        "HEALTH_CHECK_INTERVAL": "30",
        "AUTO_FAILOVER_ENABLED": "false",
        "PGROUTE_API_TOKEN": "s3cret",
        "POSTGRES_PASSWORD": "pw",
    }
    svc = compose(dotenv)["services"]["pgroute"]
    config = load_config(EXAMPLE_CONFIG, environ={**dockerfile_env(), **service_env(svc)})
    validate_runtime(config)
    assert config.health.interval == 30.0 and config.health.auto_failover is False
    assert config.api.token == "s3cret"
    assert config.primary.parsed.password == "pw"


def test_compose_without_a_token_would_not_start_with_an_empty_one():
    # An explicitly empty PGROUTE_API_TOKEN falls back to the default, never to "".
    svc = compose({"PGROUTE_API_TOKEN": ""})["services"]["pgroute"]
    assert service_env(svc)["PGROUTE_API_TOKEN"] == "change-me"


def test_compose_replication_setup_environment_is_accepted():
    services = compose()["services"]
    env = {**dockerfile_env(), **service_env(services["replication_setup"])}
    # `pgroute setup-replication` with no --config: defaults plus environment.
    config = load_config(None, environ=env)
    assert config.primary.parsed.host == "postgres_primary"
    assert config.mirror.parsed.host == "postgres_mirror"
    assert config.primary.parsed.dbname == config.mirror.parsed.dbname == "chrispar"
    # Same pair as the one pgroute watches.
    pgroute_env = service_env(services["pgroute"])
    assert env["DATABASE_URL"] == pgroute_env["DATABASE_URL"]
    assert env["MIRROR_DATABASE_URL"] == pgroute_env["MIRROR_DATABASE_URL"]


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_basics():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    base = next(rest for w, rest in instructions if w == "FROM")
    assert base.startswith("python:3.11-slim")
    user = [rest for w, rest in instructions if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert any(w == "RUN" and "pip install ." in rest for w, rest in instructions)
    exposed = {p for w, rest in instructions if w == "EXPOSE" for p in rest.split()}
    assert {"6432", "5000"} <= exposed
    assert dockerfile_json("ENTRYPOINT") == ["pgroute"]
    assert dockerfile_json("CMD") == ["run", "--config", "/etc/pgroute/pgroute.toml"]
    assert "HEALTHCHECK" in words
    # The image's own listen addresses match what it exposes.
    env = dockerfile_env()
    assert parse_listen(env["PGROUTE_PROXY_LISTEN"])[1] == 6432
    assert parse_listen(env["PGROUTE_API_LISTEN"])[1] == 5000


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        parts = Path(path).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").strip("/")
            if any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", "")) for c in candidates):
                result = not negate
        return result

    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            sources += shlex.split(rest)[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    # pip install . needs the package and what pyproject.toml names.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["readme"] in sources
    assert "pgroute" in sources
    for heavy in (".venv", ".git", "tests", ".pgroute-demo"):
        assert ignored(heavy), f"{heavy} should not be sent to the Docker daemon"


def test_entrypoint_is_the_packaged_console_script():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry = dockerfile_json("ENTRYPOINT")[0]
    target = pyproject["project"]["scripts"][entry]
    module, _, func = target.partition(":")
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func))


def test_healthcheck_command_is_valid_python():
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    ast.parse(code)
    compile(code, "<HEALTHCHECK>", "exec")
    assert "http://127.0.0.1:5000/api/health" in code
    assert parse_listen(dockerfile_env()["PGROUTE_API_LISTEN"])[1] == 5000


def test_cmd_help_works():
    res = subprocess.run(
        [*pgroute_argv(), *dockerfile_json("CMD")[:1], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env({}),
    )
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout


def test_check_with_the_image_config_fails_cleanly_when_nodes_are_unreachable():
    """The config file the image ships is valid; with the compose environment (whose
    host names do not resolve here) `pgroute check` says the nodes are unreachable:
    exit 1, not a configuration error (2) or a crash."""
    env = {**dockerfile_env(), **service_env(compose()["services"]["pgroute"])}
    # Unreachable fast and deterministically: closed loopback ports.
    env["DATABASE_URL"] = f"postgresql://postgres:pw@127.0.0.1:{closed_port()}/chrispar"
    env["MIRROR_DATABASE_URL"] = f"postgresql://postgres:pw@127.0.0.1:{closed_port()}/chrispar"
    res = subprocess.run(
        [*pgroute_argv(), "check", "--config", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(env),
    )
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "configuration" in res.stdout and "is valid" in res.stdout
    assert "primary reachable" in res.stdout
    assert "Traceback" not in res.stderr
    assert ":pw@" not in res.stdout + res.stderr


def test_image_without_token_refuses_to_start():
    """The image listens on 0.0.0.0: `docker run` without PGROUTE_API_TOKEN is a
    configuration error (exit 2) that names api.token."""
    env = {
        **dockerfile_env(),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/chrispar",
        "MIRROR_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/chrispar",
    }
    with pytest.raises(ConfigError, match=r"api\.token"):
        validate_runtime(load_config(EXAMPLE_CONFIG, environ=env))
    res = subprocess.run(
        [*pgroute_argv(), *dockerfile_json("CMD")[:2], str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(env),
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "api.token" in res.stderr


def _get(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def test_entrypoint_and_cmd_run_and_healthcheck_outside_docker(tmp_path):
    """ENTRYPOINT + CMD with the shipped config: pgroute starts, fails closed (no node
    answers), the HEALTHCHECK command reports unhealthy, and SIGTERM stops it (0)."""
    proxy_port, api_port = closed_port(), closed_port()
    env = {
        **dockerfile_env(),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/chrispar",
        "MIRROR_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/chrispar",
        "PGROUTE_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "PGROUTE_API_LISTEN": f"127.0.0.1:{api_port}",
        "PGROUTE_API_TOKEN": "t0ken",
        "PGROUTE_STATE_PATH": str(tmp_path / "state.json"),
        "PGROUTE_STATE_RECOVERY_DIR": str(tmp_path / "recovery"),
        "HEALTH_CHECK_TIMEOUT": "1",
    }
    cmd = dockerfile_json("CMD")
    argv = [*pgroute_argv(), *cmd[:2], str(EXAMPLE_CONFIG), *cmd[3:]]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(env), cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(f"http://127.0.0.1:{api_port}/api/health")
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        assert status == 503 and body is not None and body["status"] == "unhealthy" and body["database"] is None
        # The image's HEALTHCHECK, pointed at this API port, fails while unhealthy.
        hc = healthcheck_argv()
        code = hc[2].replace("127.0.0.1:5000", f"127.0.0.1:{api_port}")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and "503" in res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
