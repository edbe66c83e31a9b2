"""TLS and authentication towards etcd: what a production etcd asks of its clients.

Owns `EtcdSecurity` (the CA that signs the members' certificates, this instance's
client certificate for mutual TLS, the user and password), the `ssl.SSLContext`
built from it, and `TokenKeeper`: the token etcd's ``/v3/auth/authenticate`` hands
out for the user and password, sent in the ``Authorization`` header of every request.

Invariants:
- The password never leaves this module except in the authenticate request's body:
  it is not in any repr, message or log line.
- One authentication at a time: concurrent calls that find no token, or the same
  stale token, wait for the one request that renews it.
- A token etcd no longer knows (simple tokens live in one member's memory, expire
  after 5 idle minutes and vanish with a restart) is renewed and the request retried
  once (`etcd_gateway`); a refused password is `EtcdAuthError`, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .store import StoreRequestError

log = logging.getLogger(__name__)

# gRPC status codes etcd answers authentication problems with.
INVALID_ARGUMENT = 3
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16

_EXPIRED_MESSAGES = ("invalid auth token",)
_AUTH_MESSAGES = (
    "authentication failed",
    "user name is empty",
    "user name not found",
    "permission denied",
    "invalid auth token",
    "invalid auth management",
    "authentication is not enabled",
)


class EtcdAuthError(StoreRequestError):
    """etcd refused this instance's credentials or their rights (never retried)."""


def is_expired_token(code: int, message: str) -> bool:
    """An answer saying the token sent is unknown to the member (renew and retry)."""
    return code == UNAUTHENTICATED or any(m in message for m in _EXPIRED_MESSAGES)


def is_auth_problem(code: int, message: str) -> bool:
    """An answer about credentials or rights rather than the request itself."""
    return code in (UNAUTHENTICATED, PERMISSION_DENIED) or any(m in message for m in _AUTH_MESSAGES)


def auth_hint(message: str, user: str) -> str:
    """What to do about an authentication refusal, for the error's text."""
    if "user name is empty" in message:
        return "etcd has authentication enabled: set [cluster] etcd_user and etcd_password"
    if "permission denied" in message:
        who = f"user {user!r}" if user else "this client (no etcd_user: its certificate's name)"
        return f"{who} lacks the rights on pgroute's prefix (grant a role with readwrite on it)"
    if "not enabled" in message:
        return "etcd does not have authentication enabled: remove [cluster] etcd_user and etcd_password"
    if "authentication failed" in message:
        return f"check [cluster] etcd_user ({user!r}) and etcd_password (PGROUTE_CLUSTER_ETCD_PASSWORD)"
    return "check [cluster] etcd_user and etcd_password"


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """How to reach a secured etcd. ``ca``: PEM file of the CA the members' server
    certificates are checked against ("" = the system's CAs); ``cert``/``key``: this
    client's certificate and key (mutual TLS; ``key`` "" when the cert file holds
    it); ``user``/``password``: etcd's authentication (both or neither)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        problem = security_problem(self.cert, self.key, self.user, self.password)
        if problem:
            raise ValueError(problem)

    @property
    def authenticates(self) -> bool:
        return bool(self.user)

    def ssl_context(self) -> ssl.SSLContext:
        """The context https:// endpoints use; StoreRequestError naming the file that
        does not load."""
        try:
            context = ssl.create_default_context(cafile=self.ca or None)
        except (OSError, ssl.SSLError) as exc:
            raise StoreRequestError(f"etcd TLS: cannot load etcd_ca {self.ca}: {_why(exc)}") from None
        if self.cert:
            try:
                context.load_cert_chain(self.cert, self.key or None)
            except (OSError, ssl.SSLError) as exc:
                files = f"{self.cert}" + (f" / etcd_key {self.key}" if self.key else "")
                raise StoreRequestError(f"etcd TLS: cannot load etcd_cert {files}: {_why(exc)}") from None
        return context


def security_problem(cert: str, key: str, user: str, password: str) -> str | None:
    """Why these settings cannot work together (for the configuration's validation)."""
    if key and not cert:
        return "etcd_key is set without etcd_cert (the client certificate it belongs to)"
    if password and not user:
        return "etcd_password is set without etcd_user"
    if user and not password:
        return "etcd_user is set without etcd_password (or PGROUTE_CLUSTER_ETCD_PASSWORD)"
    return None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


Authenticate = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Sends the authenticate request's body (no token) and returns etcd's answer."""


class TokenKeeper:
    """The current token for one user. `headers()` gives what a request carries;
    `renew(stale)` replaces a token etcd refused (once, whoever asks first)."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._password = password
        self._token: str | None = None
        self._lock = asyncio.Lock()
        self.renewals = 0  # authentications after the first (tests and status)

    def __repr__(self) -> str:
        return f"TokenKeeper(user={self.user!r})"

    @property
    def token(self) -> str | None:
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def ensure(self, authenticate: Authenticate) -> str | None:
        """A token, authenticating first when there is none yet."""
        if self._token is None:
            await self.renew(None, authenticate)
        return self._token

    async def renew(self, stale: str | None, authenticate: Authenticate) -> None:
        """Authenticate anew unless someone did since ``stale`` was sent."""
        async with self._lock:
            if self._token is not None and self._token != stale:
                return
            answer = await authenticate({"name": self.user, "password": self._password})
            token = answer.get("token")
            if not isinstance(token, str) or not token:
                raise EtcdAuthError(f"etcd: authenticating as {self.user!r} gave no token")
            if self._token is not None:
                self.renewals += 1
                log.info("etcd: auth token for %r renewed", self.user)
            self._token = token
