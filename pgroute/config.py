"""Configuration: one TOML file, environment overrides, validated once into frozen objects.

Owns the whole configuration schema of ``../shared/DESIGN.md``. Sources, lowest
precedence first: built-in defaults, the TOML file, the ``--env-file`` file, the
process environment. Every key can be set from the environment as
``PGROUTE_<SECTION>_<KEY>``; the seed's names (``DATABASE_URL``,
``MIRROR_DATABASE_URL``, ``AUTO_FAILOVER_ENABLED``, ``HEALTH_CHECK_*``) are accepted as
written. Unknown keys, wrong types and out-of-range values raise ``ConfigError``
naming the key; the CLI turns that into exit status 2.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .pg.dsn import Dsn, mask_dsn, parse_dsn


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) -> (host, port); ValueError when malformed."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected host:port")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise ValueError("expected host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    # Strict: a TOML string is not a number and 1 is not true. Environment values are
    # strings; _coerce_env converts them to the field's type first.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Listener(_Section):
    """A section with a ``listen = "host:port"`` key."""

    listen: str

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class ProxyConfig(_Listener):
    listen: str = "127.0.0.1:6432"
    max_client_connections: int = Field(1000, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    pause_timeout: float = Field(30.0, gt=0)
    # How long a silent or slow client may take to send its first packet.
    startup_timeout: float = Field(10.0, gt=0)
    # SIGTERM: how long sessions may finish before they are closed.
    shutdown_timeout: float = Field(10.0, ge=0)
    # Kernel splicing (BPF sockhash): "auto" uses it when the kernel allows, "on"
    # refuses to start without it, "off" always pipes bytes through pgroute.
    splice: Literal["auto", "on", "off"] = "auto"
    # A second listener whose sessions are always piped (never spliced): for bulk
    # transfers (pg_dump, COPY-heavy jobs), which the pipe moves faster. "" = none.
    listen_piped: str = ""

    @field_validator("listen_piped")
    @classmethod
    def _listen_piped(cls, v: str) -> str:
        if v:
            parse_listen(v)
        return v

    @model_validator(mode="after")
    def _distinct_listeners(self) -> ProxyConfig:
        if self.listen_piped and self.piped_port != 0 and self.piped_port == self.port and self.piped_host == self.host:
            raise ValueError("listen_piped must differ from listen")
        return self

    @property
    def piped_host(self) -> str:
        return parse_listen(self.listen_piped)[0]

    @property
    def piped_port(self) -> int:
        return parse_listen(self.listen_piped)[1]


class NodeConfig(_Section):
    dsn: str

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        try:
            parse_dsn(v)
        except ValueError as exc:
            # The message must never echo the password back.
            raise ValueError(f"unparseable DSN {mask_dsn(v)!r}: {exc}") from None  # masked: any scheme
        return v

    @property
    def parsed(self) -> Dsn:
        return parse_dsn(self.dsn)


class ReplicationConfig(_Section):
    publication: str = Field("chrispar_pub", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    subscription: str = Field("chrispar_sub", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    synchronous: Literal["off", "on", "strict"] = "off"
    sequence_gap: int = Field(1000, ge=0)


class HealthConfig(_Section):
    auto_failover: bool = True
    interval: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0)
    timeout: float = Field(5.0, gt=0)
    retry_interval: float = Field(1.0, gt=0)
    auto_failback: bool = False
    # Extension: how long the returned primary must stay healthy and caught up
    # before an automatic failback starts.
    failback_delay: float = Field(60.0, ge=0)
    max_lag_bytes: int = Field(16 * 1024 * 1024, ge=0)

    @property
    def detection_bound(self) -> float:
        """Worst case from a crash to 'down': one interval to the next probe, that
        probe's timeout, then max_retries confirming probes started retry_interval
        apart, the last one bounded by the timeout."""
        confirm = self.max_retries * self.retry_interval + self.timeout if self.max_retries else 0.0
        return self.interval + self.timeout + confirm


class ApiConfig(_Listener):
    listen: str = "127.0.0.1:5000"
    token: str = ""


class StateConfig(_Section):
    path: str = "pgroute-state.json"
    # Extension: where rejoin writes recovery files of divergent commits.
    recovery_dir: str = "pgroute-recovery"


class AlertsConfig(_Section):
    webhook_urls: tuple[str, ...] = Field((), strict=False)  # TOML arrays are lists
    command: str = ""
    email_to: tuple[str, ...] = Field((), strict=False)
    email_from: str = "pgroute@localhost"
    smtp_url: str = ""
    timeout: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0)

    @field_validator("webhook_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook URL must start with http:// or https://: {url!r}")
        return v


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Config(_Section):
    proxy: ProxyConfig = ProxyConfig()
    primary: NodeConfig
    mirror: NodeConfig
    replication: ReplicationConfig = ReplicationConfig()
    health: HealthConfig = HealthConfig()
    api: ApiConfig = ApiConfig()
    state: StateConfig = StateConfig()
    alerts: AlertsConfig = AlertsConfig()
    log: LogConfig = LogConfig()

    def node_dsn(self, name: str) -> Dsn:
        return (self.primary if name == "primary" else self.mirror).parsed


# Seed variable name -> (section, key). Process environment beats the env file.
SEED_ENV = {
    "DATABASE_URL": ("primary", "dsn"),
    "MIRROR_DATABASE_URL": ("mirror", "dsn"),
    "AUTO_FAILOVER_ENABLED": ("health", "auto_failover"),
    "HEALTH_CHECK_INTERVAL": ("health", "interval"),
    "HEALTH_CHECK_MAX_RETRIES": ("health", "max_retries"),
    "HEALTH_CHECK_TIMEOUT": ("health", "timeout"),
}
LIST_KEYS = {("alerts", "webhook_urls"), ("alerts", "email_to")}


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a dotenv file: KEY=VALUE lines, # comments, optional quotes, optional 'export'."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--env-file", f"cannot read {path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        if "=" not in line:
            raise ConfigError(f"--env-file line {lineno}", "expected KEY=VALUE")
        key, _, value = line.partition("=")
        value = value.strip()
        if value[:1] in ("'", '"') and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def _env_overrides(env: Mapping[str, str]) -> dict[tuple[str, str], tuple[str, str]]:
    """(section, key) -> (env var name, raw value)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for name, target in SEED_ENV.items():
        if env.get(name, "") != "":
            out[target] = (name, env[name])
    sections = dict(Config.model_fields.items())
    for name, value in env.items():
        if not name.startswith("PGROUTE_") or name in NON_CONFIG_ENV:
            continue
        rest = name[len("PGROUTE_") :].lower()
        for section, field in sections.items():
            prefix = section + "_"
            if rest.startswith(prefix):
                key = rest[len(prefix) :]
                # Every field of Config is a section model (annotation never None).
                if key not in field.annotation.model_fields:  # type: ignore[union-attr]
                    raise ConfigError(name, f"unknown key {key!r} in section [{section}]")
                # PGROUTE_* names are more specific than the seed's: they win.
                out[(section, key)] = (name, value)
                break
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce_env(section: str, key: str, raw: str) -> Any:
    """Environment values are strings: convert to the field's type (strict validation
    then still rejects what does not convert)."""
    if (section, key) in LIST_KEYS:
        return [part.strip() for part in raw.split(",") if part.strip()]
    # As in _env_overrides: every field of Config is a section model.
    field = Config.model_fields[section].annotation.model_fields[key]  # type: ignore[union-attr]
    kind = field.annotation
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        return raw
    if kind is int:
        try:
            return int(text)
        except ValueError:
            return raw
    if kind is float:
        try:
            return float(text)
        except ValueError:
            return raw
    return raw


# PGROUTE_* variables that are not configuration keys.
NON_CONFIG_ENV = {"PGROUTE_API_URL", "PGROUTE_CONFIG"}


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) or "config"


def load_config(
    path: str | os.PathLike[str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load, merge and validate. Raises ConfigError naming the first bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    for section, value in data.items():
        if section not in Config.model_fields:
            raise ConfigError(section, "unknown section")
        if not isinstance(value, dict):
            raise ConfigError(section, "must be a table, e.g. [" + section + "]")

    env: dict[str, str] = {}
    if env_file is not None:
        env.update(read_env_file(env_file))
    env.update(os.environ if environ is None else environ)
    sources: dict[tuple[str, str], str] = {}
    for (section, key), (var, raw) in _env_overrides(env).items():
        data.setdefault(section, {})[key] = _coerce_env(section, key, raw)
        sources[(section, key)] = var

    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not isinstance(p, int))
        key = _location(loc)
        source = sources.get((loc[0], loc[1])) if len(loc) >= 2 else None
        if source:
            key = f"{key} (from {source})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
        raise ConfigError(key, mask_dsn(msg)) from None


def validate_runtime(config: Config) -> None:
    """Checks that involve several keys; run by `pgroute run` before starting."""
    if not is_loopback(config.api.host) and not config.api.token:
        raise ConfigError(
            "api.token",
            f"required when api.listen ({config.api.listen}) is not a loopback address; "
            "set [api] token or PGROUTE_API_TOKEN",
        )
    p, m = config.primary.parsed, config.mirror.parsed
    if (p.host, p.port, p.dbname) == (m.host, m.port, m.dbname):
        raise ConfigError("mirror.dsn", "points at the same database as primary.dsn")
