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
import socket
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .cluster.endpoints import endpoint_url
from .cluster.etcd_auth import EtcdSecurity, security_problem
from .cluster.keys import check_name, check_prefix, default_prefix
from .errors import ConfigError
from .files import read_regular_file
from .pg.dsn import Dsn, mask_dsn, parse_dsn


def _seconds(default: float, low: float, high: float) -> Any:
    """A duration in seconds within [low, high]: finite (inf and NaN are refused)."""
    return Field(default, ge=low, le=high, allow_inf_nan=False)


def _count(default: int, low: int, high: int) -> Any:
    return Field(default, ge=low, le=high)


# Ranges. Every number has both bounds: a value that validates must not break
# pgroute later (10,000,000 retries froze it, 1e-9 s of timeout declared a healthy
# primary down, inf stopped probing). The README's configuration reference and
# config/pgroute.example.toml document the same ranges (a unit test compares them).
#
# Open file descriptors: two per client (client and backend socket); Linux's
# nr_open default is 1,048,576.
MAX_CLIENTS = 1_000_000
# Promotion adds the gap to every sequence: a serial (int4) column ends at 2,147,483,647.
MAX_SEQUENCE_GAP = 1_000_000_000
# A mirror a terabyte behind is not a failover target; beyond that the check is off
# in practice (and `failover --force` exists for that case).
MAX_LAG_BYTES = 1 << 40


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
    max_client_connections: int = _count(1000, 1, MAX_CLIENTS)
    # A backend connect is a TCP (and TLS) handshake: under 0.1 s fails a healthy node
    # across a busy network; past 5 minutes no client waits that long.
    connect_timeout: float = _seconds(5.0, 0.1, 300.0)
    # Held clients wait this long; an hour is far past any driver's own timeout.
    pause_timeout: float = _seconds(30.0, 0.1, 3600.0)
    # How long a silent or slow client may take to send its first packet. Capped
    # like PostgreSQL's authentication_timeout (600 s); 0.5 s leaves a TLS handshake
    # over a long link its round trips.
    startup_timeout: float = _seconds(10.0, 0.5, 600.0)
    # SIGTERM: how long sessions may finish before they are closed (0: at once).
    shutdown_timeout: float = _seconds(10.0, 0.0, 3600.0)
    # Kernel splicing (BPF sockhash): "auto" uses it when the kernel allows, "on"
    # refuses to start without it, "off" always pipes bytes through pgroute.
    splice: Literal["auto", "on", "off"] = "auto"
    # A second listener whose sessions are always piped (never spliced): for bulk
    # transfers (pg_dump, COPY-heavy jobs), which the pipe moves faster. "" = none.
    listen_piped: str = ""

    @field_validator("listen_piped")
    @classmethod
    def _listen_piped(cls, v: str, info: ValidationInfo) -> str:
        if v:
            host, port = parse_listen(v)
            listen = info.data.get("listen")  # validated first (declared first)
            if port != 0 and isinstance(listen, str) and parse_listen(listen) == (host, port):
                raise ValueError("must differ from proxy.listen")
        return v

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
    sequence_gap: int = _count(1000, 0, MAX_SEQUENCE_GAP)


class HealthConfig(_Section):
    auto_failover: bool = True
    # 0.1 s: ten fresh connections a second per node is the most a probe should
    # cost; 600 s: detection slower than ten minutes is no failover at all.
    interval: float = _seconds(30.0, 0.1, 600.0)
    # Confirming probes start at once, retry_interval apart, each its own connection
    # and task: 100 is far past any useful certainty and keeps that burst bounded.
    max_retries: int = _count(3, 0, 100)
    # A probe opens a connection, authenticates (scram hashing, maybe TLS) and runs a
    # query: a healthy server under load can take hundreds of milliseconds, so below
    # 0.5 s probes fail nodes that are fine.
    timeout: float = _seconds(5.0, 0.5, 300.0)
    retry_interval: float = _seconds(1.0, 0.05, 60.0)
    auto_failback: bool = False
    # Extension: how long the returned primary must stay healthy and caught up
    # before an automatic failback starts (at most a day).
    failback_delay: float = _seconds(60.0, 0.0, 86400.0)
    max_lag_bytes: int = _count(16 * 1024 * 1024, 0, MAX_LAG_BYTES)

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
    timeout: float = _seconds(5.0, 0.1, 300.0)
    # Backoff doubles from 0.5 s: 10 retries already span about 8.5 minutes.
    retries: int = _count(3, 0, 10)

    @field_validator("webhook_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook URL must start with http:// or https://: {url!r}")
        return v


class ClusterConfig(_Section):
    """[cluster]: several pgroute instances sharing their state through etcd.

    Absent, or ``etcd = []``: one instance with its state file, exactly as without
    the section. Set, `pgroute run` joins the cluster (pgroute/cluster_node.py)."""

    # etcd members, "host:port" or "http(s)://host:port"; PGROUTE_CLUSTER_ETCD comma separated.
    etcd: tuple[str, ...] = Field((), strict=False)  # TOML arrays are lists
    # This instance's name, unique in the cluster; "" = the host name.
    name: str = ""
    # Every key pgroute keeps in etcd lives under it; "" = /pgroute/<primary.dsn's database>.
    prefix: str = ""
    # Lease seconds of the leader key and member records (etcd grants whole seconds,
    # rounded up). 2 s is etcd's shortest lease with its default election timeout (it
    # grants that instead of less); past 5 minutes a dead leader blocks every
    # switch for longer than any failover may take.
    ttl: float = _seconds(10.0, 2.0, 300.0)
    # The URL of this instance's API as the other instances reach it (the failsafe's
    # confirmations, forwarded commands); "" = http://<api.listen>, which must then
    # not be a wildcard address.
    advertise_api: str = ""
    # The proxy's host:port as shown to operators in the member records; "" = proxy.listen.
    advertise_proxy: str = ""
    # Seconds an instance cut off from etcd may keep routing while every other
    # member confirms its route over their APIs (the failsafe); 0 turns the failsafe
    # off (an instance cut off fails closed, as Stolon's proxies do).
    failsafe_max: float = _seconds(300.0, 0.0, 86400.0)
    # A production etcd: https:// endpoints are checked against etcd_ca ("" = the
    # system's CAs); etcd_cert/etcd_key: this client's certificate (mutual TLS);
    # etcd_user/etcd_password: etcd's authentication (PGROUTE_CLUSTER_ETCD_PASSWORD).
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password: str = Field("", repr=False)

    @model_validator(mode="after")
    def _security(self) -> ClusterConfig:
        problem = security_problem(self.etcd_cert, self.etcd_key, self.etcd_user, self.etcd_password)
        if problem:
            raise ValueError(problem)
        if (self.etcd_ca or self.etcd_cert) and self.etcd and not any(e.startswith("https://") for e in self.etcd):
            raise ValueError("etcd_ca/etcd_cert are set but no etcd endpoint is https://host:port")
        return self

    @property
    def etcd_security(self) -> EtcdSecurity:
        """TLS files and credentials for the EtcdStore (`pgroute.cluster.etcd_auth`)."""
        return EtcdSecurity(self.etcd_ca, self.etcd_cert, self.etcd_key, self.etcd_user, self.etcd_password)

    @field_validator("etcd")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        urls = [endpoint_url(e) for e in v]
        if len(set(urls)) != len(urls):
            raise ValueError("an etcd endpoint is listed twice")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v) if v else v

    @field_validator("advertise_api")
    @classmethod
    def _advertise_api(cls, v: str) -> str:
        if v and not (v.startswith(("http://", "https://")) and len(v.split("://", 1)[1]) > 0):
            raise ValueError(f"must be an http:// or https:// URL: {v!r}")
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            return check_prefix(v) if v else v
        except ValueError as exc:
            raise ValueError(f"{v!r} {exc}") from None

    @property
    def enabled(self) -> bool:
        """True when pgroute runs as a cluster (etcd endpoints are configured)."""
        return bool(self.etcd)

    @property
    def member_name(self) -> str:
        """This instance's name: ``name``, else the host name (checked by validate_runtime)."""
        return self.name or socket.gethostname()


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
    cluster: ClusterConfig = ClusterConfig()
    log: LogConfig = LogConfig()

    def node_dsn(self, name: str) -> Dsn:
        return (self.primary if name == "primary" else self.mirror).parsed

    @property
    def cluster_prefix(self) -> str:
        """The etcd key prefix: ``cluster.prefix``, else ``/pgroute/<database of primary.dsn>``."""
        return self.cluster.prefix or default_prefix(self.primary.parsed.dbname)


# Seed variable name -> (section, key). Process environment beats the env file.
SEED_ENV = {
    "DATABASE_URL": ("primary", "dsn"),
    "MIRROR_DATABASE_URL": ("mirror", "dsn"),
    "AUTO_FAILOVER_ENABLED": ("health", "auto_failover"),
    "HEALTH_CHECK_INTERVAL": ("health", "interval"),
    "HEALTH_CHECK_MAX_RETRIES": ("health", "max_retries"),
    "HEALTH_CHECK_TIMEOUT": ("health", "timeout"),
}
LIST_KEYS = {("alerts", "webhook_urls"), ("alerts", "email_to"), ("cluster", "etcd")}


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a dotenv file: KEY=VALUE lines, # comments, optional quotes, optional 'export'."""
    values: dict[str, str] = {}
    text = _read_text(path, "--env-file")
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


def _read_text(path: str | os.PathLike[str], option: str) -> str:
    """A regular file's text (UTF-8, as TOML requires), or ConfigError naming ``option``
    and the file: a FIFO or a directory must not hang or crash pgroute."""
    try:
        raw = read_regular_file(path)
    except OSError as exc:
        raise ConfigError(option, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(option, f"{path} is not UTF-8 text (invalid byte at line {line})") from None


def _field(section: str, key: str) -> Any:
    model = Config.model_fields[section].annotation
    fields = getattr(model, "model_fields", {})
    return fields.get(key)


def value_range(section: str, key: str) -> tuple[float, float] | None:
    """(low, high) of a numeric key, both inclusive; None for a key without one."""
    field = _field(section, key)
    if field is None:
        return None
    low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
    if low is None or high is None:
        return None
    return low, high


def _required(section: str, key: str) -> str:
    names = [f"PGROUTE_{section.upper()}_{key.upper()}"]
    names += [var for var, target in SEED_ENV.items() if target == (section, key)]
    return f"required: set {key} in [{section}] of the config file, or {' or '.join(names)}"


def _problems(exc: ValidationError, sources: Mapping[tuple[str, str], str]) -> list[tuple[str, str]]:
    """Every validation error as (key, message): the key names the variable when the
    value came from the environment; pydantic's own prefixes are dropped."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not isinstance(p, int))
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind == "missing" and len(loc) == 1 and loc[0] in ("primary", "mirror"):
            loc = (loc[0], "dsn")  # a missing [primary] table is a missing primary.dsn
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = _required(*loc) if len(loc) == 2 else "required"
        elif len(loc) == 2 and (bounds := value_range(*loc)) is not None and kind not in ("int_type", "float_type"):
            low, high = bounds
            if kind == "finite_number":
                msg = f"must be a finite number, {low:g} to {high:g}"
            else:
                msg = f"{err.get('input')!r} is out of range: {low:g} to {high:g}"
        key = _location(loc)
        source = sources.get((loc[0], loc[1])) if len(loc) >= 2 else None
        if source:
            key = f"{key} (from {source})"
        problems.append((key, mask_dsn(msg)))
    return problems


def _raise(problems: list[tuple[str, str]]) -> None:
    if problems:
        (key, message), *more = problems
        raise ConfigError(key, message, more=more)


# Keys naming paths that a relative value in the file resolves against the file's
# directory (from the environment or the defaults: the working directory).
PATH_KEYS = (("state", "path"), ("state", "recovery_dir"))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load, merge and validate. Raises ConfigError naming every bad key at once."""
    data: dict[str, Any] = {}
    if path is not None:
        text = _read_text(path, "--config")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    problems: list[tuple[str, str]] = []
    for section, value in list(data.items()):
        if section not in Config.model_fields:
            problems.append((section, "unknown section"))
            del data[section]
        elif not isinstance(value, dict):
            problems.append((section, "must be a table, e.g. [" + section + "]"))
            del data[section]
    if path is not None:
        # A relative path in the file means "next to this file", wherever pgroute
        # runs from (a service manager's working directory is often /).
        base = os.path.dirname(os.path.abspath(path))
        for section, key in PATH_KEYS:
            value = data.get(section, {}).get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                data[section][key] = os.path.join(base, value)

    env: dict[str, str] = {}
    if env_file is not None:
        env.update(read_env_file(env_file))
    env.update(os.environ if environ is None else environ)
    sources: dict[tuple[str, str], str] = {}
    for (section, key), (var, raw) in _env_overrides(env).items():
        data.setdefault(section, {})[key] = _coerce_env(section, key, raw)
        sources[(section, key)] = var

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        _raise(problems + _problems(exc, sources))
        raise  # unreachable: a ValidationError has at least one error
    _raise(problems)
    return config


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
    if config.cluster.enabled and not config.cluster.name:
        try:
            check_name(config.cluster.member_name)
        except ValueError as exc:
            raise ConfigError("cluster.name", f"the host name cannot be used: {exc}; set [cluster] name") from None
    if config.cluster.enabled and not config.cluster.advertise_api and config.api.host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            "cluster.advertise_api",
            f"required when api.listen ({config.api.listen}) is a wildcard address: the other instances "
            "need a URL they can reach (failsafe confirmations, forwarded commands)",
        )
