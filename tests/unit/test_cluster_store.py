"""Pure parts of the Store: lease deadline arithmetic, prefix ranges, the JSON forms of
compares and operations, error classification, attempt slices; and the gateway's
failover against local fake members (one that never answers, one that answers)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from pgroute.cluster.etcd_gateway import MIN_ATTEMPT, EndpointFailed, EtcdError, EtcdGateway, raise_for_error
from pgroute.cluster.etcd_store import compare_json, key_value, op_json, read_of
from pgroute.cluster.store import (
    Compare,
    CompareFailed,
    Delete,
    Get,
    Lease,
    Put,
    StoreUnavailable,
    lease_deadline,
    prefix_range_end,
)
from pgroute.local import free_port


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- lease deadlines ---------------------------------------------------------------------


def test_the_deadline_counts_from_the_send_time_not_the_answer():
    # Sent at 100.0, answered (late) at 103.0 with TTL 10: the server may have started
    # its 10 s right after the send, so the lease may be gone from 110.0 on.
    assert lease_deadline(100.0, 10) == 110.0
    lease = Lease(1, 10, lease_deadline(100.0, 10))
    assert lease.remaining(103.0) == 7.0
    assert lease.remaining(111.0) == -1.0


# -- keys and ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, end",
    [(b"/p/", b"/p0"), (b"a", b"b"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0")],
)
def test_prefix_range_end(prefix, end):
    assert prefix_range_end(prefix) == end


def test_key_values_decode_the_gateways_json():
    kv = key_value(
        {"key": b64(b"/p/a"), "value": b64(b"x"), "create_revision": "5", "mod_revision": "7", "version": "2"}
    )
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == ("/p/a", b"x", 5, 7, 2, 0)
    # proto3 JSON leaves zero values out: an empty value, no lease.
    assert key_value({"key": b64(b"k"), "mod_revision": "3"}).value == b""
    read = read_of({"header": {"revision": "9"}})
    assert read.items == () and read.revision == 9 and read.first is None


def test_compares_and_operations_in_json():
    assert compare_json(Compare.absent("/k")) == {
        "key": b64(b"/k"),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": "0",
    }
    assert compare_json(Compare.mod_revision("/k", 12))["mod_revision"] == "12"
    assert compare_json(Compare.value_is("/k", "v"))["value"] == b64(b"v")
    assert compare_json(Compare.lease_is("/k", 77))["lease"] == "77"
    assert op_json(Put("/k", b"v", 5)) == {"request_put": {"key": b64(b"/k"), "value": b64(b"v"), "lease": "5"}}
    assert "lease" not in op_json(Put("/k", b"v"))["request_put"]
    assert op_json(Delete("/p/", prefix=True)) == {
        "request_delete_range": {"key": b64(b"/p/"), "range_end": b64(b"/p0")}
    }
    assert op_json(Get("/k")) == {"request_range": {"key": b64(b"/k")}}


def test_compare_failed_says_what_it_found():
    assert "absent" in str(CompareFailed("/k", None))
    found = key_value({"key": b64(b"/k"), "mod_revision": "4"})
    assert "mod_revision 4" in str(CompareFailed("/k", found))


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, status",
    [
        ({"error": "etcdserver: request timed out", "code": 14}, 503),
        ({"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14}, 503),
        ({"error": "context deadline exceeded", "code": 4}, 504),
        ({"error": "not a primary lessor", "message": "not a primary lessor", "code": 2}, 500),
        ({"error": {"grpc_code": 14, "http_code": 503, "message": "unavailable"}}, 200),  # streamed
    ],
)
def test_unavailable_answers_move_to_another_member(data, status):
    with pytest.raises(EndpointFailed):
        raise_for_error(data, status)


@pytest.mark.parametrize(
    "data, code",
    [
        ({"error": "etcdserver: requested lease not found", "code": 5}, 5),
        ({"error": "etcdserver: mvcc: required revision has been compacted", "code": 11}, 11),
        ({"error": "bad request", "code": 3}, 3),
    ],
)
def test_refusals_are_errors_of_the_request(data, code):
    with pytest.raises(EtcdError) as caught:
        raise_for_error(data, 400)
    assert caught.value.code == code


def test_each_attempt_gets_a_slice_of_the_call():
    gateway = EtcdGateway(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], timeout=3.0)
    assert gateway.attempt_timeout(3.0) == 1.0  # a hung member costs a third of the call
    assert gateway.attempt_timeout(0.4) == 0.4  # never more than what is left
    assert EtcdGateway(["127.0.0.1:1"] * 1, timeout=3.0).attempt_timeout(3.0) == 3.0
    many = EtcdGateway([f"127.0.0.1:{p}" for p in range(1, 40)], timeout=3.0)
    assert many.attempt_timeout(3.0) == MIN_ATTEMPT


def test_the_endpoint_list_is_checked():
    with pytest.raises(ValueError):
        EtcdGateway([])
    with pytest.raises(ValueError):
        EtcdGateway(["127.0.0.1:2379", "http://127.0.0.1:2379"])


# -- failover against fake members ---------------------------------------------------------


async def _silent_member() -> tuple[asyncio.Server, int]:
    """Accepts connections and reads, never answers (like a SIGSTOPped member whose
    kernel still completes handshakes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.Event().wait()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _answering_member(cluster_id: str = "1") -> tuple[asyncio.Server, int]:
    body = json.dumps({"header": {"cluster_id": cluster_id, "revision": "3"}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_hung_member_costs_one_slice_and_the_next_answers():
    silent, silent_port = await _silent_member()
    answering, answering_port = await _answering_member()
    gateway = EtcdGateway([f"127.0.0.1:{silent_port}", f"127.0.0.1:{answering_port}"], timeout=2.0)
    try:
        answer = await gateway.call("kv/range", {"key": b64(b"k")})
        assert answer.endpoint == f"127.0.0.1:{answering_port}"
        assert gateway.endpoint == f"127.0.0.1:{answering_port}"  # sticky from now on
    finally:
        await gateway.close()
        silent.close()
        answering.close()


async def test_no_member_answering_is_store_unavailable_naming_each():
    silent, silent_port = await _silent_member()
    refused_port = free_port()  # nothing listens there: connections are refused
    gateway = EtcdGateway([f"127.0.0.1:{silent_port}", f"127.0.0.1:{refused_port}"], timeout=0.6)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(gateway.call("kv/range", {}), 10)
        assert f"127.0.0.1:{silent_port}" in str(caught.value)
    finally:
        await gateway.close()
        silent.close()


async def test_a_member_of_another_cluster_is_not_believed():
    first, first_port = await _answering_member("1")
    other, other_port = await _answering_member("2")
    gateway = EtcdGateway([f"127.0.0.1:{first_port}", f"127.0.0.1:{other_port}"], timeout=1.0)
    try:
        await gateway.attempt(0, "kv/range", {}, 1.0)
        with pytest.raises(EndpointFailed, match="another etcd cluster"):
            await gateway.attempt(1, "kv/range", {}, 1.0)
    finally:
        await gateway.close()
        first.close()
        other.close()
