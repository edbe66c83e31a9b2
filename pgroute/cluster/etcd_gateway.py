"""HTTP transport to etcd's v3 JSON gateway, with failover across the members.

Owns: the aiohttp session, which member a request goes to, per-call and per-attempt
deadlines, the gateway's error answers (gRPC status codes in JSON), and the check
that every member answering belongs to one etcd cluster. Knows nothing of keys,
leases or watches (`etcd_store` does); moves JSON objects to and from ``/v3/<rpc>``.

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
- etcd 3.4 or later (the ``/v3/`` path; 3.3 only serves ``/v3beta/``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from .endpoints import endpoint_label, endpoint_url
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
    """One member did not serve one attempt; the reason goes into StoreUnavailable."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A member's answer, when the successful attempt was sent (monotonic), and by whom."""

    body: dict[str, Any]
    sent_at: float
    endpoint: str


class EtcdGateway:
    """Requests to the members of one etcd cluster, with failover. One event loop."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 3.0) -> None:
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
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- unary calls

    async def call(self, rpc: str, body: dict[str, Any], timeout: float | None = None) -> Answer:
        """POST ``body`` to ``/v3/<rpc>`` on the current member, failing over until
        one answers or ``timeout`` (default: the gateway's) runs out."""
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        errors: dict[str, str] = {}
        backoff = 0.05
        tried_in_round = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            index = self._current
            try:
                return await self.attempt(index, rpc, body, self.attempt_timeout(remaining))
            except EndpointFailed as exc:
                errors[endpoint_label(self.urls[index])] = str(exc)
                self.failed(index, exc)
            tried_in_round += 1
            if tried_in_round >= len(self.urls):
                # Every member failed once: wait a little before the next round, so
                # members refusing connections do not turn this into a busy loop.
                tried_in_round = 0
                await asyncio.sleep(max(min(backoff, deadline - time.monotonic()), 0))
                backoff = min(backoff * 2, 0.5)
        detail = "; ".join(f"{ep}: {err}" for ep, err in errors.items()) or "no attempt"
        raise StoreUnavailable(f"etcd: no member answered {rpc} within {total:g}s ({detail})")

    async def attempt(self, index: int, rpc: str, body: dict[str, Any], timeout: float) -> Answer:
        """One request to member ``index``; EndpointFailed unless it answers in time."""
        url = f"{self.urls[index]}/v3/{rpc}"
        session = self._session_now()
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                async with session.post(url, json=body) as response:
                    raw = await response.read()
                    status = response.status
        except TimeoutError:
            raise EndpointFailed(f"no answer within {timeout:.2f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EndpointFailed(_describe(exc)) from None
        data = self._decode(index, raw, status)
        return Answer(data, sent_at, endpoint_label(self.urls[index]))

    def _decode(self, index: int, raw: bytes, status: int) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            raise EndpointFailed(f"HTTP {status}, not a JSON answer: {raw[:120]!r}") from None
        if not isinstance(data, dict):
            raise EndpointFailed(f"HTTP {status}, unexpected answer: {raw[:120]!r}")
        if status >= 400 or "error" in data:
            raise_for_error(data, status)
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
                f"(id {cluster_id}, the others: {self._cluster_id})"
            )

    # ----------------------------------------------------------------- streams

    @asynccontextmanager
    async def stream(self, index: int, rpc: str, body: dict[str, Any], timeout: float) -> AsyncIterator[Stream]:
        """A streaming request (watch) to member ``index``: the answer's headers must
        arrive within ``timeout``; the messages are read from the yielded `Stream`."""
        url = f"{self.urls[index]}/v3/{rpc}"
        session = self._session_now()
        try:
            async with asyncio.timeout(timeout):
                response = await session.post(url, json=body)
        except TimeoutError:
            raise EndpointFailed(f"no answer within {timeout:.2f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EndpointFailed(_describe(exc)) from None
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
            raise_for_error(data, 200)
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


def raise_for_error(data: dict[str, Any], status: int) -> None:
    """Raise for an error answer: EndpointFailed when another member may serve it,
    EtcdError when etcd refused the request itself."""
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
    raise EtcdError(code, message)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
