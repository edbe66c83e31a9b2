"""The CLI's side of the daemon's HTTP API.

Owns :class:`ApiClient` (a tiny synchronous JSON client), :class:`DaemonUnreachable`
(no answer at all, as opposed to an HTTP error status) and how a command finds the
daemon: ``--api`` (or ``PGROUTE_API_URL``), else the ``[api] listen`` of ``--config``,
else :data:`DEFAULT_API_URL`; the token from ``PGROUTE_API_TOKEN``, else the config
file's ``[api] token``.

The HTTP client is ``urllib.request``: no extra dependency for a handful of small
JSON requests. Nothing here prints or exits: a problem with the command's own input
is a :class:`ClientSetupError` whose message the command shows as it is.
"""

from __future__ import annotations

import json
import os
import tomllib
import urllib.error
import urllib.request
from typing import Any

from ..config import parse_listen

DEFAULT_API_URL = "http://127.0.0.1:5000"


class DaemonUnreachable(Exception):
    """The daemon did not answer (refused, timed out, no route): the reason as text."""


class ClientSetupError(Exception):
    """``--api`` or ``--config`` cannot give a daemon address: a usage error (exit 2)."""


class ApiClient:
    """Tiny synchronous JSON client for the daemon's API."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body) for any status; DaemonUnreachable when
        no answer came."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())
        except urllib.error.URLError as exc:
            raise DaemonUnreachable(str(getattr(exc.reason, "strerror", None) or exc.reason)) from None
        except (OSError, TimeoutError) as exc:
            raise DaemonUnreachable(str(exc) or type(exc).__name__) from None

    def get(self, path: str, timeout: float | None = None) -> tuple[int, Any]:
        return self.call("GET", path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> tuple[int, Any]:
        return self.call("POST", path, body or {}, timeout=timeout)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        # Not JSON (a proxy's error page, another service): keep a readable excerpt.
        return {"error": raw.decode("utf-8", "replace")[:200]}


def url_from_listen(listen: str) -> str:
    """The URL that reaches an ``[api] listen`` address from this machine."""
    host, port = parse_listen(listen)
    # A wildcard listen address is reached through loopback from this machine.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def api_from_config_file(path: str) -> tuple[str | None, str]:
    """([api] listen as a URL, [api] token) from a config file, reading only [api]:
    the DSNs may come from the environment, so a full load could fail needlessly."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ClientSetupError(f"configuration error: --config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClientSetupError(f"configuration error: --config: {path} is not valid TOML: {exc}") from None
    api = data.get("api") or {}
    if not isinstance(api, dict):
        raise ClientSetupError("configuration error: api: must be a table")
    url = None
    if "listen" in api:
        try:
            url = url_from_listen(str(api["listen"]))
        except ValueError as exc:
            raise ClientSetupError(f"configuration error: api.listen: {exc}") from None
    return url, str(api.get("token") or "")


def make_client(api_url: str | None, config_path: str | None) -> ApiClient:
    """The client a daemon command uses, from its ``--api`` and ``--config`` options."""
    file_url, file_token = (None, "")
    if config_path:
        file_url, file_token = api_from_config_file(config_path)
    url = api_url or file_url or DEFAULT_API_URL
    if not url.startswith(("http://", "https://")):
        raise ClientSetupError(f"--api: expected an http:// URL, got {url!r}")
    token = os.environ.get("PGROUTE_API_TOKEN") or file_token
    return ApiClient(url, token)
