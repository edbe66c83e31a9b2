"""`EtcdStore`: the `Store` interface on etcd v3, through its JSON gateway.

Owns the translation between the Store's vocabulary and etcd's RPCs (base64 keys and
values, int64 fields as strings, fields left out when zero), lease grant/keep-alive/
revoke, compare-and-set transactions, and watches that resume on another member.
Which member serves a request, deadlines and error answers belong to
`etcd_gateway`.

Invariants:
- Reads are linearizable (``serializable`` is never set): a member cut off from the
  quorum cannot answer them, so a stale member is never believed.
- A watch resumes from the revision after the last event it delivered, on the next
  member, when its member breaks the stream or stops answering: when the stream is
  idle for a timeout, a linearizable read on the same member must succeed or the
  watch moves. No event is skipped or repeated; history the store compacted away is
  `Compacted`, never silently skipped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from .endpoints import endpoint_label
from .etcd_auth import UNAUTHENTICATED, EtcdAuthError, EtcdSecurity, is_expired_token
from .etcd_gateway import NOT_FOUND, EndpointFailed, EtcdError, EtcdGateway, GatewayObserver
from .store import (
    Compacted,
    Compare,
    CompareFailed,
    Delete,
    EventKind,
    Get,
    KeyValue,
    Lease,
    LeaseExpired,
    Op,
    Put,
    Read,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
    lease_deadline,
    prefix_range_end,
)

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

MAX_TTL = 9_000_000_000  # etcd's maximum lease TTL (seconds)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(value: Any) -> int:
    """int64 fields come as JSON strings; proto3 leaves zero values out."""
    return int(value) if value is not None else 0


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def key_value(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(kv.get("key")).decode(errors="replace"),
        value=_unb64(kv.get("value")),
        create_revision=_int(kv.get("create_revision")),
        mod_revision=_int(kv.get("mod_revision")),
        version=_int(kv.get("version")),
        lease=_int(kv.get("lease")),
    )


def range_request(key: str, prefix: bool) -> dict[str, Any]:
    raw = key.encode()
    request = {"key": _b64(raw)}
    if prefix:
        request["range_end"] = _b64(prefix_range_end(raw))
    return request


def read_of(body: dict[str, Any], revision: int | None = None) -> Read:
    items = tuple(key_value(kv) for kv in body.get("kvs", ()))
    rev = revision if revision is not None else _int(body.get("header", {}).get("revision"))
    return Read(items, rev)


def compare_json(compare: Compare) -> dict[str, Any]:
    field = {
        "VALUE": "value",
        "VERSION": "version",
        "CREATE": "create_revision",
        "MOD": "mod_revision",
        "LEASE": "lease",
    }[compare.target.value]
    operand = compare.operand
    encoded: str = _b64(operand) if isinstance(operand, bytes) else str(int(operand))
    return {
        "key": _b64(compare.key.encode()),
        "target": compare.target.value,
        "result": compare.result.value,
        field: encoded,
    }


def op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key.encode()), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": range_request(op.key, op.prefix)}
    return {"request_range": range_request(op.key, op.prefix)}


class EtcdStore:
    """The Store on an etcd v3 cluster (3.4 or later). Use from one event loop;
    `close()` when done (or ``async with``)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 3.0, security: EtcdSecurity | None = None) -> None:
        self._gateway = EtcdGateway(endpoints, timeout, security)

    @property
    def observer(self) -> GatewayObserver | None:
        """Told about every round trip to etcd and every failed attempt (the metrics)."""
        return self._gateway.observer

    @observer.setter
    def observer(self, observer: GatewayObserver | None) -> None:
        self._gateway.observer = observer

    @property
    def timeout(self) -> float:
        return self._gateway.timeout

    @property
    def endpoint(self) -> str:
        """The member requests go to now (``host:port``)."""
        return self._gateway.endpoint

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._gateway.close()

    # ----------------------------------------------------------------- reads

    async def get(self, key: str, *, timeout: float | None = None) -> Read:
        answer = await self._gateway.call("kv/range", range_request(key, False), timeout)
        return read_of(answer.body)

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> Read:
        answer = await self._gateway.call("kv/range", range_request(prefix, True), timeout)
        return read_of(answer.body)

    # ----------------------------------------------------------------- writes

    async def put(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        result = await self.txn((), [Put(key, _bytes(value), lease.id if lease else 0)], timeout=timeout)
        return result.revision

    async def create_if_absent(
        self, key: str, value: bytes | str, lease: Lease | None = None, *, timeout: float | None = None
    ) -> int:
        data = _bytes(value)
        lease_id = lease.id if lease else 0
        try:
            return await self._put_if(Compare.absent(key), key, data, lease_id, timeout)
        except CompareFailed as exc:
            current = exc.current
            # A retried attempt may find the write of an earlier attempt of this very
            # call: bound to our lease (ids are unique), with our value, it is ours.
            if lease_id and current is not None and current.lease == lease_id and current.value == data:
                return current.mod_revision
            raise

    async def put_if(
        self,
        key: str,
        value: bytes | str,
        mod_revision: int,
        lease: Lease | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        return await self._put_if(
            Compare.mod_revision(key, mod_revision), key, _bytes(value), lease.id if lease else 0, timeout
        )

    async def _put_if(self, compare: Compare, key: str, value: bytes, lease_id: int, timeout: float | None) -> int:
        result = await self.txn([compare], [Put(key, value, lease_id)], [Get(key)], timeout=timeout)
        if not result.succeeded:
            read = result.reads[0]
            raise CompareFailed(key, read.first if read else None)
        return result.revision

    async def delete_if(self, key: str, mod_revision: int, *, timeout: float | None = None) -> int:
        result = await self.txn([Compare.mod_revision(key, mod_revision)], [Delete(key)], [Get(key)], timeout=timeout)
        if not result.succeeded:
            read = result.reads[0]
            raise CompareFailed(key, read.first if read else None)
        return result.revision

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        result = await self.txn((), [Delete(key, prefix)], timeout=timeout)
        return result.revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        body: dict[str, Any] = {
            "compare": [compare_json(c) for c in compares],
            "success": [op_json(op) for op in success],
            "failure": [op_json(op) for op in failure],
        }
        answer = await self._gateway.call("kv/txn", body, timeout)
        succeeded = bool(answer.body.get("succeeded", False))
        revision = _int(answer.body.get("header", {}).get("revision"))
        ops = success if succeeded else failure
        responses = answer.body.get("responses", [])
        reads: list[Read | None] = []
        for i, op in enumerate(ops):
            response = responses[i] if i < len(responses) else {}
            reads.append(read_of(response.get("response_range", {}), revision) if isinstance(op, Get) else None)
        return TxnResult(succeeded, revision, tuple(reads))

    # ----------------------------------------------------------------- leases

    async def grant(self, ttl: float, *, timeout: float | None = None) -> Lease:
        if not 0 < ttl <= MAX_TTL or math.isnan(ttl):
            raise ValueError(f"lease TTL must be 1 to {MAX_TTL} seconds, not {ttl!r}")
        answer = await self._gateway.call("lease/grant", {"TTL": str(math.ceil(ttl))}, timeout)
        granted = _int(answer.body.get("TTL"))
        if answer.body.get("error") or granted <= 0:
            raise EtcdError(0, f"lease grant refused: {answer.body.get('error') or answer.body}")
        return Lease(_int(answer.body.get("ID")), granted, lease_deadline(answer.sent_at, granted))

    async def keepalive(self, lease: Lease, *, timeout: float | None = None) -> Lease:
        answer = await self._gateway.call("lease/keepalive", {"ID": str(lease.id)}, timeout)
        ttl = _int(answer.body.get("result", {}).get("TTL"))
        if ttl <= 0:
            raise LeaseExpired(lease.id)
        return Lease(lease.id, ttl, lease_deadline(answer.sent_at, ttl))

    async def revoke(self, lease: Lease, *, timeout: float | None = None) -> None:
        try:
            await self._gateway.call("lease/revoke", {"ID": str(lease.id)}, timeout)
        except EtcdError as exc:
            if exc.code != NOT_FOUND:
                raise

    async def time_to_live(self, lease: Lease, *, timeout: float | None = None) -> int:
        """Seconds the server still gives the lease (-1: it is gone). For tests and status."""
        answer = await self._gateway.call("lease/timetolive", {"ID": str(lease.id)}, timeout)
        return _int(answer.body.get("TTL"))

    async def compact(self, revision: int, *, timeout: float | None = None) -> None:
        """Drop the history before ``revision`` (maintenance and tests; etcd compacts
        by itself only when told to with --auto-compaction-*)."""
        await self._gateway.call("kv/compaction", {"revision": str(revision)}, timeout)

    # ----------------------------------------------------------------- watch

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """See `Store.watch_prefix`. The idle check and the give-up time are the
        store's timeout."""
        gateway = self._gateway
        raw = prefix.encode()
        next_revision = start_revision
        failing_since: float | None = None  # when the watch lost its member
        errors: dict[str, str] = {}
        renewed = False  # the auth token was renewed for this (re)connection
        while True:
            index = gateway.current
            # The token this stream sends (authenticating first; StoreUnavailable when
            # no member answers that within the store's timeout, as a watch gives up).
            token = await gateway.ensure_token(gateway.timeout)
            body = {
                "create_request": {
                    "key": _b64(raw),
                    "range_end": _b64(prefix_range_end(raw)),
                    "start_revision": str(next_revision),
                }
            }
            log.debug("watch %s from revision %d on %s", prefix, next_revision, endpoint_label(gateway.urls[index]))
            try:
                async with gateway.stream(index, "watch", body, gateway.attempt_timeout(gateway.timeout)) as stream:
                    while True:
                        message = await stream.next_message(gateway.timeout)
                        if message is None:
                            # Idle: is the member still there, and still in the quorum?
                            probe = range_request(prefix, True) | {"count_only": True}
                            await gateway.attempt(index, "kv/range", probe, gateway.attempt_timeout(gateway.timeout))
                            failing_since = None
                            continue
                        failing_since = None
                        result = message.get("result", {})
                        if result.get("canceled"):
                            compact = _int(result.get("compact_revision"))
                            if compact:
                                raise Compacted(next_revision, compact)
                            why = result.get("cancel_reason") or "no reason given"
                            if gateway.auth is not None and ("permission denied" in why or is_expired_token(0, why)):
                                # etcd cancels a watch whose token it does not know this way
                                # (3.4: "invalid auth token"; older: "permission denied").
                                raise EtcdError(UNAUTHENTICATED, f"watch canceled: {why}")
                            raise EndpointFailed(f"watch canceled: {why}")
                        renewed = False
                        for event in result.get("events", ()):
                            kind = EventKind.DELETE if event.get("type") == "DELETE" else EventKind.PUT
                            watched = WatchEvent(kind, key_value(event.get("kv", {})))
                            next_revision = watched.revision + 1
                            yield watched
            except EtcdError as exc:
                if renewed or gateway.auth is None or not is_expired_token(exc.code, exc.message):
                    if "permission denied" in exc.message:
                        raise EtcdAuthError(f"etcd: {exc.message}: check the rights of [cluster] etcd_user") from None
                    raise
                log.info("watch %s: auth token refused (%s); authenticating again", prefix, exc.message)
                renewed = True
                await gateway.renew_token(token, time.monotonic() + gateway.timeout, gateway.timeout)
                continue
            except EndpointFailed as exc:
                log.info("watch %s on %s failed: %s", prefix, endpoint_label(gateway.urls[index]), exc)
                if failing_since is None:  # a new outage: earlier errors are history
                    failing_since = time.monotonic()
                    errors.clear()
                errors[endpoint_label(gateway.urls[index])] = str(exc)
                gateway.failed(index, exc)
            if failing_since is not None and time.monotonic() - failing_since > gateway.timeout:
                detail = "; ".join(f"{ep}: {err}" for ep, err in errors.items())
                raise StoreUnavailable(f"etcd: no member served the watch for {gateway.timeout:g}s ({detail})")
            # Between members, a short pause: all of them refusing connections must
            # not become a busy loop.
            await asyncio.sleep(0.05)


if TYPE_CHECKING:

    def _is_a_store(store: EtcdStore) -> Store:
        return store  # mypy checks that EtcdStore implements the Store protocol
