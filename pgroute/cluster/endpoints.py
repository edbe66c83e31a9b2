"""etcd endpoint strings: ``host:port`` (as the configuration contract writes them) or
``http://host:port`` / ``https://host:port``, turned into the base URL of the
member's JSON gateway. Pure; the configuration validates with it, the store connects
with it.

Invariant: a parsed endpoint has a scheme, a host and a port, and nothing else: no
path, no credentials (a password in an endpoint would reach logs and error messages).
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORT = 2379


def endpoint_url(text: str) -> str:
    """``"127.0.0.1:2379"`` -> ``"http://127.0.0.1:2379"``; ValueError naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty etcd endpoint")
    raw = text.strip()
    if "@" in raw:
        # Checked first: every later message quotes the endpoint.
        raise ValueError("etcd endpoint must not carry credentials (user:password@)")
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"etcd endpoint {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {text!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {text!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {text!r}: expected host:port, without a path")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORT}"


def endpoint_label(url: str) -> str:
    """What logs and errors show for an endpoint: ``host:port`` (https kept visible)."""
    return url.removeprefix("http://")
