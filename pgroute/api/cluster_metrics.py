"""Metrics of one cluster instance's own work with etcd: round trips, its member
lease, and the barriers it ran as the leader.

Owns ``pgroute_etcd_request_seconds``, ``pgroute_etcd_request_failures_total``,
``pgroute_cluster_keepalive_age_seconds``, ``pgroute_cluster_barrier_wait_seconds``
and ``pgroute_cluster_barrier_total``, ``pgroute_cluster_failsafe`` (with its ``_seconds``
and the ``_confirming`` peers) (the cluster's snapshot metrics, leader and
members, stay in metrics.py). Fed without the cluster code knowing prometheus: the
etcd gateway tells an observer set on the store (`EtcdStore.observer`), barriers
tell a listener registered for that store (`add_barrier_listener`), and the lease's
age is read at scrape time from ``node.membership`` (replaced when the instance
registers anew, so it is looked up at every scrape, never kept).

Invariants: the observer and listeners never raise; label values are a fixed,
small set (operations and reasons are the gateway's names, results two words).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from ..cluster.barrier import BarrierResult, add_barrier_listener
from ..cluster.etcd_gateway import GatewayObserver
from ..cluster.members import Membership
from ..cluster.store import Store

log = logging.getLogger(__name__)

# A healthy etcd answers on loopback in a millisecond and across a LAN in a few;
# a member that does not answer costs its attempt slice (a third of the TTL at most).
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A barrier ends in milliseconds when every member acknowledges, or at its timeout
# (the TTL + 2 s: up to 302 s) when one has to expire.
BARRIER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
OPERATIONS = ("range", "txn", "lease_grant", "lease_keepalive", "lease_revoke", "watch_open")
REASONS = ("timeout", "connection", "tls", "unavailable", "bad_answer", "other_cluster", "auth", "refused")


class _ObservedStore(Store, Protocol):
    observer: GatewayObserver | None


class _FailsafeView(Protocol):
    def gauges(self) -> tuple[float | None, int]: ...


class ClusterNodeView(Protocol):
    """What the metrics read of a `pgroute.cluster_node.ClusterNode`."""

    @property
    def store(self) -> _ObservedStore: ...

    @property
    def membership(self) -> Membership | None: ...

    @property
    def failsafe(self) -> _FailsafeView: ...


class _LeaseCollector:
    """``pgroute_cluster_keepalive_age_seconds`` from the member lease, at scrape time."""

    def __init__(self, node: ClusterNodeView, clock: Callable[[], float]) -> None:
        self._node = node
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        age = GaugeMetricFamily(
            "pgroute_cluster_keepalive_age_seconds",
            "Seconds since this instance's member lease was last granted or refreshed (absent while it holds none).",
        )
        try:
            membership = self._node.membership
            lease = membership.lease if membership is not None else None
            if lease is not None:
                # The deadline is the refreshing request's send time + the TTL granted.
                age.add_metric([], max(0.0, self._clock() - (lease.deadline - lease.ttl)))
        except Exception:  # a scrape must still return everything else
            log.exception("metrics: cannot read the member lease")
        yield age
        failsafe = GaugeMetricFamily(
            "pgroute_cluster_failsafe",
            "1 while this instance routes without etcd on its peers' confirmations (the failsafe), else 0.",
        )
        since = GaugeMetricFamily(
            "pgroute_cluster_failsafe_seconds", "Seconds this instance has been in the failsafe (0 when not)."
        )
        confirming = GaugeMetricFamily(
            "pgroute_cluster_failsafe_confirming",
            "Peers whose failsafe this instance confirmed and whose confirmation still lasts.",
        )
        try:
            seconds, peers = self._node.failsafe.gauges()
            failsafe.add_metric([], 0.0 if seconds is None else 1.0)
            since.add_metric([], seconds or 0.0)
            confirming.add_metric([], peers)
        except Exception:
            log.exception("metrics: cannot read the failsafe")
        yield failsafe
        yield since
        yield confirming


class ClusterMetrics:
    """The listener-fed cluster metrics; also the etcd gateway's observer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.etcd_seconds = Histogram(
            "pgroute_etcd_request_seconds",
            "Round trips to etcd that got an answer, by operation.",
            ["operation"],
            buckets=ETCD_BUCKETS,
            registry=registry,
        )
        self.etcd_failures = Counter(
            "pgroute_etcd_request_failures",
            "Requests to an etcd member that failed (no answer, refused, or an error answer), by reason.",
            ["reason"],
            registry=registry,
        )
        self.barrier_wait = Histogram(
            "pgroute_cluster_barrier_wait_seconds",
            "How long the leader's barriers waited for the members' acknowledgements.",
            buckets=BARRIER_BUCKETS,
            registry=registry,
        )
        self.barriers = Counter(
            "pgroute_cluster_barrier",
            "Barriers run by this instance as the leader: complete, or incomplete at the timeout.",
            ["result"],
            registry=registry,
        )
        # Create the series up front so dashboards and rate() see zeros, not gaps.
        for operation in OPERATIONS:
            self.etcd_seconds.labels(operation)
        for reason in REASONS:
            self.etcd_failures.labels(reason)
        for result in ("complete", "incomplete"):
            self.barriers.labels(result)

    # -- GatewayObserver (never raises) ------------------------------------------------
    def round_trip(self, operation: str, seconds: float) -> None:
        try:
            self.etcd_seconds.labels(operation).observe(max(seconds, 0.0))
        except Exception:
            log.exception("metrics: cannot record an etcd round trip")

    def failure(self, operation: str, reason: str) -> None:
        try:
            self.etcd_failures.labels(reason).inc()
        except Exception:
            log.exception("metrics: cannot count a failed etcd request")

    # -- barrier listener (never raises) -----------------------------------------------
    def on_barrier(self, result: BarrierResult) -> None:
        try:
            self.barrier_wait.observe(max(result.elapsed, 0.0))
            self.barriers.labels("complete" if result.complete else "incomplete").inc()
        except Exception:
            log.exception("metrics: cannot record a barrier")


def add_cluster_metrics(
    registry: CollectorRegistry, node: ClusterNodeView, *, clock: Callable[[], float] = time.monotonic
) -> ClusterMetrics:
    """Register the cluster metrics in ``registry`` and hook them to ``node``'s store
    (as its observer and barrier listener) and member lease."""
    metrics = ClusterMetrics(registry)
    registry.register(_LeaseCollector(node, clock))
    store = node.store
    store.observer = metrics
    add_barrier_listener(store, metrics.on_barrier)
    return metrics
