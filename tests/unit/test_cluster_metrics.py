"""Cluster metrics: the etcd gateway's observer, the member lease's age at scrape
time, and barrier results, on fakes and the in-memory store (real etcd: the
integration test in tests/integration/test_etcd_metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from pgroute.api.cluster_metrics import add_cluster_metrics
from pgroute.api.metrics import create_metrics
from pgroute.cluster.barrier import BarrierResult, barrier
from pgroute.cluster.etcd_gateway import EtcdGateway, operation_of
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.members import Membership
from pgroute.cluster.memory_store import MemoryServer, MemoryStore
from pgroute.cluster.store import Lease

from .test_api import FakeControl, make_router
from .test_metrics import scrape, value


class FakeMembership:
    def __init__(self, lease: Lease | None) -> None:
        self.lease = lease


class FakeFailsafe:
    def __init__(self) -> None:
        self.seconds: float | None = None
        self.peers = 0

    def gauges(self) -> tuple[float | None, int]:
        return self.seconds, self.peers


@dataclass
class FakeNode:
    store: Any
    membership: Any = None
    failsafe: Any = field(default_factory=FakeFailsafe)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _result(complete: bool, elapsed: float) -> BarrierResult:
    missing = () if complete else ("b",)
    return BarrierResult(7, complete, {"a": 0.0}, {}, missing, elapsed)


def test_operations_are_a_small_fixed_set():
    assert operation_of("kv/range") == "range"
    assert operation_of("kv/txn") == "txn"
    assert operation_of("lease/keepalive") == "lease_keepalive"
    assert operation_of("lease/grant") == "lease_grant"
    assert operation_of("watch") == "watch_open"
    assert operation_of("auth/authenticate") == "authenticate"


def test_the_store_observer_feeds_the_etcd_histogram_and_failures():
    registry = CollectorRegistry()
    store = EtcdStore(["127.0.0.1:1"])
    metrics = add_cluster_metrics(registry, FakeNode(store))
    assert store.observer is metrics
    s = scrape(registry)
    # Series exist before any request: dashboards see zeros, not gaps.
    assert value(s, "pgroute_etcd_request_seconds_count", operation="txn") == 0
    assert value(s, "pgroute_etcd_request_failures_total", reason="timeout") == 0
    store.observer.round_trip("txn", 0.004)
    store.observer.round_trip("txn", 0.002)
    store.observer.round_trip("lease_keepalive", 0.5)
    store.observer.failure("range", "timeout")
    s = scrape(registry)
    assert value(s, "pgroute_etcd_request_seconds_count", operation="txn") == 2
    assert value(s, "pgroute_etcd_request_seconds_sum", operation="txn") == 0.006
    assert value(s, "pgroute_etcd_request_seconds_bucket", operation="lease_keepalive", le="0.25") == 0
    assert value(s, "pgroute_etcd_request_seconds_bucket", operation="lease_keepalive", le="0.5") == 1
    assert value(s, "pgroute_etcd_request_failures_total", reason="timeout") == 1


async def test_the_gateway_reports_a_member_that_refuses_connections():
    registry = CollectorRegistry()
    store = EtcdStore(["127.0.0.1:1"], timeout=0.3)  # nothing listens on port 1
    add_cluster_metrics(registry, FakeNode(store))
    try:
        await store.get("/x")
    except Exception:
        pass
    finally:
        await store.close()
    s = scrape(registry)
    assert value(s, "pgroute_etcd_request_failures_total", reason="connection") >= 1
    assert value(s, "pgroute_etcd_request_seconds_count", operation="range") == 0  # no answer, no round trip


async def test_an_observer_that_raises_does_not_break_the_gateway():
    class Broken:
        def round_trip(self, operation: str, seconds: float) -> None:
            raise RuntimeError("boom")

        def failure(self, operation: str, reason: str) -> None:
            raise RuntimeError("boom")

    gateway = EtcdGateway(["127.0.0.1:1"])
    gateway.observer = Broken()
    gateway._observe("range", 0.1)
    gateway._failed("range", "timeout")


def test_keepalive_age_is_read_from_the_current_membership_at_scrape_time():
    registry = CollectorRegistry()
    clock = Clock(1000.0)
    node = FakeNode(EtcdStore(["127.0.0.1:1"]))
    add_cluster_metrics(registry, node, clock=clock)
    assert value(scrape(registry), "pgroute_cluster_keepalive_age_seconds") is None  # no lease: absent
    # Refreshed by a request sent at 990 with a 10 s TTL: deadline 1000.
    node.membership = FakeMembership(Lease(1, 10, 1000.0))
    assert value(scrape(registry), "pgroute_cluster_keepalive_age_seconds") == 10.0
    clock.now = 1004.5
    assert value(scrape(registry), "pgroute_cluster_keepalive_age_seconds") == 14.5
    # The instance registered anew: the new membership's lease counts.
    node.membership = FakeMembership(Lease(2, 10, 1013.0))
    assert value(scrape(registry), "pgroute_cluster_keepalive_age_seconds") == 1.5
    node.membership = FakeMembership(None)
    assert value(scrape(registry), "pgroute_cluster_keepalive_age_seconds") is None


def test_a_broken_membership_does_not_break_the_scrape():
    class Broken:
        @property
        def lease(self) -> Lease:
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    add_cluster_metrics(registry, FakeNode(EtcdStore(["127.0.0.1:1"]), Broken()))
    s = scrape(registry)
    assert value(s, "pgroute_cluster_keepalive_age_seconds") is None
    assert value(s, "pgroute_cluster_barrier_total", result="complete") == 0


def test_barrier_results_feed_the_wait_histogram_and_the_counter():
    registry = CollectorRegistry()
    metrics = add_cluster_metrics(registry, FakeNode(EtcdStore(["127.0.0.1:1"])))
    metrics.on_barrier(_result(True, 0.08))
    metrics.on_barrier(_result(False, 12.0))
    metrics.on_barrier(object())  # type: ignore[arg-type]  # garbage: logged, never raised
    s = scrape(registry)
    assert value(s, "pgroute_cluster_barrier_total", result="complete") == 1
    assert value(s, "pgroute_cluster_barrier_total", result="incomplete") == 1
    assert value(s, "pgroute_cluster_barrier_wait_seconds_count") == 2
    assert value(s, "pgroute_cluster_barrier_wait_seconds_bucket", le="0.1") == 1
    assert value(s, "pgroute_cluster_barrier_wait_seconds_bucket", le="15.0") == 2


async def test_a_barrier_run_on_the_store_reaches_that_stores_metrics_only():
    keys = Keys("/pgroute/t")
    server = MemoryServer()
    store, other = MemoryStore(server), MemoryStore(server)
    registry, other_registry = CollectorRegistry(), CollectorRegistry()
    add_cluster_metrics(registry, FakeNode(store))
    add_cluster_metrics(other_registry, FakeNode(other))
    member = Membership(store, keys, "a", 5.0)
    await member.start()
    try:
        done = await barrier(store, keys, 0, 1.0)  # "a" applied epoch 0 already
        late = await barrier(store, keys, 1, 0.2)  # nobody acknowledges epoch 1
    finally:
        await member.close()
    assert done.complete and not late.complete
    s = scrape(registry)
    assert value(s, "pgroute_cluster_barrier_total", result="complete") == 1
    assert value(s, "pgroute_cluster_barrier_total", result="incomplete") == 1
    assert value(s, "pgroute_cluster_barrier_wait_seconds_count") == 2
    assert value(scrape(other_registry), "pgroute_cluster_barrier_wait_seconds_count") == 0


def test_create_metrics_adds_the_cluster_metrics_only_for_a_cluster():
    registry, metrics = create_metrics(FakeControl(), make_router())
    assert metrics.cluster is None
    assert value(scrape(registry), "pgroute_etcd_request_failures_total", reason="timeout") is None
    store = EtcdStore(["127.0.0.1:1"])
    node = FakeNode(store, FakeMembership(Lease(1, 10, 0.0)))
    registry, metrics = create_metrics(FakeControl(), make_router(), cluster=node)
    assert metrics.cluster is not None and store.observer is metrics.cluster
    s = scrape(registry)
    assert value(s, "pgroute_etcd_request_failures_total", reason="timeout") == 0
    assert value(s, "pgroute_cluster_keepalive_age_seconds") is not None


def test_the_failsafe_gauges_are_read_at_scrape_time():
    registry = CollectorRegistry()
    node = FakeNode(EtcdStore(["127.0.0.1:1"]))
    add_cluster_metrics(registry, node)
    s = scrape(registry)
    assert value(s, "pgroute_cluster_failsafe") == 0
    assert value(s, "pgroute_cluster_failsafe_seconds") == 0
    assert value(s, "pgroute_cluster_failsafe_confirming") == 0
    node.failsafe.seconds, node.failsafe.peers = 4.5, 2
    s = scrape(registry)
    assert value(s, "pgroute_cluster_failsafe") == 1
    assert value(s, "pgroute_cluster_failsafe_seconds") == 4.5
    assert value(s, "pgroute_cluster_failsafe_confirming") == 2
