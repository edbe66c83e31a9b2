"""HTTP transport to etcd's v3 JSON gateway, with failover across the members.

Owns: the aiohttp session (TLS for https:// members, the auth token in every
request's header: `etcd_auth`), which member a request goes to, per-call and
per-attempt deadlines, the gateway's error answers (gRPC status codes in JSON), the
check that every member answering belongs to one etcd cluster, and telling an
optional `GatewayObserver` (the metrics) how long each round trip took and why an
attempt failed. Knows nothing of keys, leases or watches (`etcd_store` does); moves
JSON objects to and from ``/v3/<rpc>``.

Why the gateway and not a gRPC client library: see the README's "Cluster (in
progress)" paragraph; in short, the libraries tried either speak to one endpoint or
round-robin onto a hung member until the call times out, and both bring grpcio.

Invariants:
- Sticky endpoint: requests go to the current member until it fails (no answer
  within the attempt timeout, a connection error, or an "unavailable" answer such
  as "no leader"); then the next one in the configured order becomes current.
- A call never outlives its timeout. Each attempt gets ``timeout / members`` (at
  least `MIN_ATTEMPT`, at most what is left), so a hung member costs one slice and
  the others are still tried within the call.
- An answer from a member whose cluster id differs from the first one seen is a
  failure of that member (a misconfigured endpoint list must not mix two clusters).
- A call whose token etcd no longer knows renews it and is sent once more, within
  the same deadline; any other authentication refusal is `EtcdAuthError`.
- The observer is told, never asked: what it raises is logged and dropped, and
  this module does not import prometheus (the metrics set the observer).
- etcd 3.4 or later (the ``/v3/`` path; 3.3 only serves ``/v3beta/``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from .endpoints import endpoint_label, endpoint_url
from .etcd_auth import EtcdAuthError, EtcdSecurity, TokenKeeper, auth_hint, is_auth_problem, is_expired_token
from .store import StoreRequestError, StoreUnavailable

log = logging.getLogger(__name__)

MIN_ATTEMPT = 0.2
"""Seconds: the shortest attempt; below that a healthy member on a busy machine fails."""

# gRPC status codes (google.golang.org/grpc/codes) that mean "this member cannot
# serve now": try another one.
DEADLINE_EXCEEDED = 4
UNAVAILABLE = 14
UNKNOWN = 2
NOT_FOUND = 5
_RETRY_CODES = {DEADLINE_EXCEEDED, UNAVAILABLE}
# Answered with code Unknown by a member that lost its leadership mid-request
# (etcd-io/etcd#21671; Patroni retries it too).
_RETRY_MESSAGES = {"not a primary lessor"}


class EtcdError(StoreRequestError):
    """etcd refused a request (not an outage): ``code`` is the gRPC status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd: {message} (code {code})")
        self.code = code
        self.message = message


class EndpointFailed(Exception):
    """One member did not serve one attempt; the text goes into StoreUnavailable,
    ``reason`` (a metrics label) says which kind of failure it was."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class EtcdUnavailable(StoreUnavailable):
    """No member served a call; ``reasons``: the kinds of failure seen (the
    `EndpointFailed` reasons: {"tls"} means every attempt failed its handshake)."""

    def __init__(self, message: str, reasons: set[str]) -> None:
        super().__init__(message)
        self.reasons = frozenset(reasons)


class GatewayObserver(Protocol):
    """Told about every request to a member (the metrics implement it).
    ``operation``: a short name of the RPC (`operation_of`)."""

    def round_trip(self, operation: str, seconds: float) -> None:
        """A member answered (also with a refusal) after ``seconds``."""

    def failure(self, operation: str, reason: str) -> None:
        """An attempt failed: timeout, connection, tls, unavailable, bad_answer,
        other_cluster (the member did not serve), auth or refused (etcd said no)."""


_OPERATIONS = {
    "kv/range": "range",
    "kv/txn": "txn",
    "kv/compaction": "compaction",
    "lease/grant": "lease_grant",
    "lease/keepalive": "lease_keepalive",
    "lease/revoke": "lease_revoke",
    "lease/timetolive": "lease_timetolive",
    "watch": "watch_open",
    "auth/authenticate": "authenticate",
}


def operation_of(rpc: str) -> str:
    """The metrics' name of an RPC: a handful of fixed values (low cardinality)."""
    return _OPERATIONS.get(rpc) or rpc.replace("/", "_")


@dataclass(frozen=True, slots=True)
class Answer:
    """A member's answer, when the successful attempt was sent (monotonic), and by whom."""

    body: dict[str, Any]
    sent_at: float
    endpoint: str


class EtcdGateway:
    """Requests to the members of one etcd cluster, with failover. One event loop."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 3.0, security: EtcdSecurity | None = None) -> None:
        urls = [endpoint_url(e) for e in endpoints]
        if not urls:
            raise ValueError("no etcd endpoint given")
        if len(set(urls)) != len(urls):
            raise ValueError("etcd endpoints repeat")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.urls: tuple[str, ...] = tuple(urls)
        self.timeout = timeout
        self._current = 0
        self._cluster_id: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.security = security or EtcdSecurity()
        # Built now: a CA or certificate file that does not load is a configuration
        # error to report at start, not at the first request.
        https = any(u.startswith("https://") for u in urls)
        self._ssl = self.security.ssl_context() if https else None
        self.auth = TokenKeeper(self.security.user, self.security.password) if self.security.authenticates else None
        self.observer: GatewayObserver | None = None

    @property
    def endpoint(self) -> str:
        """The member requests go to now (``host:port``)."""
        return endpoint_label(self.urls[self._current])

    @property
    def current(self) -> int:
        return self._current

    def attempt_timeout(self, remaining: float) -> float:
        """The slice of a call one attempt may use (see the module's invariants)."""
        share = max(self.timeout / len(self.urls), MIN_ATTEMPT)
        return max(min(share, remaining), 0.0)

    def failed(self, index: int, reason: object) -> None:
        """Member ``index`` failed: the next one becomes current (if it still was)."""
        if index == self._current:
            self._current = (index + 1) % len(self.urls)
            log.warning(
                "etcd member %s failed (%s); switching to %s",
                endpoint_label(self.urls[index]),
                reason,
                self.endpoint,
            )

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        if self._session is None:
            # No aiohttp timeout: every request runs under our own deadline.
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=connector)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- unary calls

    async def call(self, rpc: str, body: dict[str, Any], timeout: float | None = None) -> Answer:
        """POST ``body`` to ``/v3/<rpc>`` on the current member, failing over until
        one answers or ``timeout`` (default: the gateway's) runs out. With a user,
        authenticates first and renews a token etcd no longer knows (once)."""
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        if self.auth is None:
            return await self._call(rpc, body, deadline, total)
        token = await self.auth.ensure(lambda b: self._authenticate(b, deadline, total))
        try:
            return await self._call(rpc, body, deadline, total)
        except EtcdError as exc:
            if not is_expired_token(exc.code, exc.message):
                raise
            log.info("etcd: auth token refused (%s); authenticating again", exc.message)
        await self.renew_token(token, deadline, total)
        return await self._call(rpc, body, deadline, total)

    async def ensure_token(self, timeout: float) -> str | None:
        """The token requests send now, authenticating first if there is none yet
        (None without a user)."""
        if self.auth is None:
            return None
        return await self.auth.ensure(lambda b: self._authenticate(b, time.monotonic() + timeout, timeout))

    async def renew_token(self, stale: str | None, deadline: float, total: float) -> None:
        """Authenticate again unless another request did since ``stale`` was sent."""
        if self.auth is not None:
            await self.auth.renew(stale, lambda b: self._authenticate(b, deadline, total))

    async def _authenticate(self, body: dict[str, Any], deadline: float, total: float) -> dict[str, Any]:
        try:
            return (await self._call("auth/authenticate", body, deadline, total, auth=False)).body
        except EtcdError as exc:
            user = self.auth.user if self.auth is not None else ""
            raise EtcdAuthError(f"etcd: cannot authenticate as {user!r}: {exc.message}") from None

    async def _call(
        self, rpc: str, body: dict[str, Any], deadline: float, total: float, *, auth: bool = True
    ) -> Answer:
        errors: dict[str, str] = {}
        reasons: set[str] = set()
        backoff = 0.05
        tried_in_round = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            index = self._current
            try:
                return await self.attempt(index, rpc, body, self.attempt_timeout(remaining), auth=auth)
            except EndpointFailed as exc:
                errors[endpoint_label(self.urls[index])] = str(exc)
                reasons.add(exc.reason)
                self.failed(index, exc)
            tried_in_round += 1
            if tried_in_round >= len(self.urls):
                # Every member failed once: wait a little before the next round, so
                # members refusing connections do not turn this into a busy loop.
                tried_in_round = 0
                await asyncio.sleep(max(min(backoff, deadline - time.monotonic()), 0))
                backoff = min(backoff * 2, 0.5)
        detail = "; ".join(f"{ep}: {err}" for ep, err in errors.items()) or "no attempt"
        raise EtcdUnavailable(f"etcd: no member answered {rpc} within {total:g}s ({detail})", reasons)

    async def attempt(self, index: int, rpc: str, body: dict[str, Any], timeout: float, *, auth: bool = True) -> Answer:
        """One request to member ``index``; EndpointFailed unless it answers in time.
        ``auth``: send the current token (the authenticate request does not)."""
        url = f"{self.urls[index]}/v3/{rpc}"
        session = self._session_now()
        headers = self.auth.headers() if auth and self.auth is not None else None
        operation = operation_of(rpc)
        sent_at = time.monotonic()
        try:
            try:
                async with asyncio.timeout(timeout):
                    async with session.post(url, json=body, headers=headers) as response:
                        raw = await response.read()
                        status = response.status
            except TimeoutError:
                raise EndpointFailed(f"no answer within {timeout:.2f}s", "timeout") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _connection_failed(exc) from None
            self._observe(operation, time.monotonic() - sent_at)
            data = self._decode(index, raw, status)
        except EndpointFailed as exc:
            self._failed(operation, exc.reason)
            raise
        except StoreRequestError as exc:  # EtcdError, EtcdAuthError
            expired = isinstance(exc, EtcdError) and is_expired_token(exc.code, exc.message)
            self._failed(operation, "auth" if expired or isinstance(exc, EtcdAuthError) else "refused")
            raise
        return Answer(data, sent_at, endpoint_label(self.urls[index]))

    def _observe(self, operation: str, seconds: float) -> None:
        if self.observer is not None:
            try:
                self.observer.round_trip(operation, seconds)
            except Exception:
                log.exception("etcd gateway observer failed")

    def _failed(self, operation: str, reason: str) -> None:
        if self.observer is not None:
            try:
                self.observer.failure(operation, reason)
            except Exception:
                log.exception("etcd gateway observer failed")

    def _decode(self, index: int, raw: bytes, status: int) -> dict[str, Any]:
        if status == 400 and raw.startswith(b"CommonName of client"):
            # etcd (3.4.10+) with authentication on: its JSON gateway cannot pass a
            # certificate's CN on as the user, so it refuses the request. Every member
            # will: not a member failure.
            raise EtcdAuthError(
                "etcd refuses a client certificate with a Common Name on its JSON gateway while "
                "authentication is on: issue [cluster] etcd_cert without a CN (subjectAltName only) "
                "and authenticate with etcd_user/etcd_password"
            )
        try:
            data = json.loads(raw)
        except ValueError:
            raise EndpointFailed(f"HTTP {status}, not a JSON answer: {raw[:120]!r}", "bad_answer") from None
        if not isinstance(data, dict):
            raise EndpointFailed(f"HTTP {status}, unexpected answer: {raw[:120]!r}", "bad_answer")
        if status >= 400 or "error" in data:
            raise_for_error(data, status, self.auth.user if self.auth is not None else "")
        self.check_cluster(index, data.get("header") or data.get("result", {}).get("header"))
        return data

    def check_cluster(self, index: int, header: Any) -> None:
        """EndpointFailed when the answer comes from another etcd cluster."""
        cluster_id = header.get("cluster_id") if isinstance(header, dict) else None
        if cluster_id is None:
            return
        if self._cluster_id is None:
            self._cluster_id = cluster_id
        elif cluster_id != self._cluster_id:
            raise EndpointFailed(
                f"{endpoint_label(self.urls[index])} belongs to another etcd cluster "
                f"(id {cluster_id}, the others: {self._cluster_id})",
                "other_cluster",
            )

    # ----------------------------------------------------------------- streams

    @asynccontextmanager
    async def stream(self, index: int, rpc: str, body: dict[str, Any], timeout: float) -> AsyncIterator[Stream]:
        """A streaming request (watch) to member ``index``: the answer's headers must
        arrive within ``timeout``; the messages are read from the yielded `Stream`."""
        url = f"{self.urls[index]}/v3/{rpc}"
        session = self._session_now()
        operation = operation_of(rpc)
        await self.ensure_token(timeout)
        headers = self.auth.headers() if self.auth is not None else None
        sent_at = time.monotonic()
        try:
            try:
                async with asyncio.timeout(timeout):
                    response = await session.post(url, json=body, headers=headers)
            except TimeoutError:
                raise EndpointFailed(f"no answer within {timeout:.2f}s", "timeout") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _connection_failed(exc) from None
        except EndpointFailed as exc:
            self._failed(operation, exc.reason)
            raise
        self._observe(operation, time.monotonic() - sent_at)
        try:
            if response.status >= 400:
                raw = await _read_some(response, timeout)
                self._decode(index, raw, response.status)
                raise EndpointFailed(f"HTTP {response.status}")
            yield Stream(self, index, response)
        finally:
            response.close()


class Stream:
    """The messages of one streaming answer, one JSON object per line."""

    def __init__(self, gateway: EtcdGateway, index: int, response: aiohttp.ClientResponse) -> None:
        self._gateway = gateway
        self._index = index
        self._response = response
        self._buffer = b""

    async def next_message(self, idle: float) -> dict[str, Any] | None:
        """The next message, or None when nothing arrived for ``idle`` seconds.
        EndpointFailed when the stream broke or ended."""
        while b"\n" not in self._buffer:
            try:
                # readany, not readline: cancelling readany loses no data (readline
                # would drop a half-read line on timeout).
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                # cancellation that arrives as the read completes (a watch whose
                # owner was closed once hung a test's teardown).
                async with asyncio.timeout(idle):
                    chunk = await self._response.content.readany()
            except TimeoutError:
                return None
            except (aiohttp.ClientError, OSError) as exc:
                raise EndpointFailed(f"watch stream broke: {_describe(exc)}") from None
            except RuntimeError as exc:
                # aiohttp's StreamReader says "Connection closed." this way when the
                # connection is gone before the read starts.
                raise EndpointFailed(f"watch stream broke: {exc}") from None
            if not chunk:
                raise EndpointFailed("watch stream ended")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            data = json.loads(line)
        except ValueError:
            raise EndpointFailed(f"watch stream: not JSON: {line[:120]!r}") from None
        if not isinstance(data, dict):
            raise EndpointFailed(f"watch stream: unexpected message: {line[:120]!r}")
        if "error" in data:
            auth = self._gateway.auth
            raise_for_error(data, 200, auth.user if auth is not None else "")
        result = data.get("result")
        if isinstance(result, dict):
            self._gateway.check_cluster(self._index, result.get("header"))
        return data


async def _read_some(response: aiohttp.ClientResponse, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await response.content.read(4096)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return b""


def raise_for_error(data: dict[str, Any], status: int, user: str = "") -> None:
    """Raise for an error answer: EndpointFailed when another member may serve it,
    EtcdError when etcd refused the request itself (EtcdAuthError for credentials or
    rights, except an unknown token, which the caller renews)."""
    error = data.get("error")
    if isinstance(error, dict):  # a streaming answer's error: {"grpc_code", "http_code", "message"}
        code = error.get("grpc_code", error.get("code", UNKNOWN))
        message = str(error.get("message", error))
    else:
        code = data.get("code", UNKNOWN)
        message = str(data.get("message") or error or data)
    if not isinstance(code, int):
        code = UNKNOWN
    if code in _RETRY_CODES or message in _RETRY_MESSAGES or (code == UNKNOWN and status >= 500):
        raise EndpointFailed(f"{message} (code {code})")
    if is_auth_problem(code, message) and not is_expired_token(code, message):
        raise EtcdAuthError(f"etcd: {message} (code {code}): {auth_hint(message, user)}")
    raise EtcdError(code, message)


def _connection_failed(exc: BaseException) -> EndpointFailed:
    """A failed connection; ``tls`` when the handshake or the certificate check failed."""
    return EndpointFailed(_describe(exc), "tls" if _is_tls(exc) else "connection")


def _is_tls(exc: BaseException | None) -> bool:
    # aiohttp re-raises a TLS alert from the server (a refused client certificate)
    # as a plain ClientOSError whose cause is the ssl.SSLError.
    for _ in range(4):
        if exc is None:
            return False
        if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
