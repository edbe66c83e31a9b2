"""Prometheus metrics: one private registry per app, fed two ways.

Owns every ``pgroute_*`` metric name. Values that already live somewhere else
(the Router's ``ProxyStats`` counters and the controller's ``status()`` snapshot)
are read at scrape time by a custom collector, so the data path pays nothing for
them. Values that only exist as a stream (probe results, finished switch events,
failed alert deliveries) are recorded by listener callbacks into ordinary
prometheus-client metrics.

Invariants:

- The registry is never the global one: tests and embedders may build many apps
  in one process.
- Listener callbacks never raise (they run inside the controller and monitor).
- A switch event is counted once even if its end is reported twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..model import Event, HealthSample, NodeName

if TYPE_CHECKING:
    from ..proxy.router import Router
    from .cluster_metrics import ClusterMetrics, ClusterNodeView

log = logging.getLogger(__name__)

NODES = (NodeName.PRIMARY.value, NodeName.MIRROR.value)
SWITCH_KINDS = ("failover", "failback", "switchover")
ALERT_CHANNELS = ("webhook", "command", "email")

# Probes answer in milliseconds when healthy and hit the timeout (default 5 s)
# when not; the buckets cover both ends.
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A switch phase ranges from a sub-millisecond route publish to a long catch-up.
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class StatusSource(Protocol):
    def status(self) -> dict: ...
    def add_event_listener(self, cb: Callable[[Event], None]) -> None: ...
    def add_sample_listener(self, cb: Callable[[HealthSample], None]) -> None: ...


class _SnapshotCollector:
    """Reads the router's counters and the controller's snapshot at scrape time."""

    def __init__(self, control: StatusSource, router: Router) -> None:
        self._control = control
        self._router = router

    def collect(self) -> Iterable[Metric]:
        stats = self._router.stats
        route = self._router.route

        current = GaugeMetricFamily("pgroute_client_connections", "Client connections open right now.")
        current.add_metric([], stats.connections_current)
        yield current
        total = CounterMetricFamily("pgroute_client_connections", "Client connections accepted since start.")
        total.add_metric([], stats.connections_total)
        yield total
        waiting = GaugeMetricFamily("pgroute_waiting_connections", "New connections held while routing is paused.")
        waiting.add_metric([], stats.waiting)
        yield waiting
        rejected = CounterMetricFamily(
            "pgroute_rejected_connections", "Client connections refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(dict(stats.rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected
        proxied = CounterMetricFamily("pgroute_proxied_bytes", "Bytes piped by the proxy.", labels=["direction"])
        c2s, s2c = stats.bytes_proxied()
        proxied.add_metric(["client_to_server"], c2s)
        proxied.add_metric(["server_to_client"], s2c)
        yield proxied
        spliced = CounterMetricFamily(
            "pgroute_spliced_sessions", "Client sessions handed to the kernel (BPF sockhash splicing) since start."
        )
        spliced.add_metric([], stats.spliced_total)
        yield spliced

        try:
            status = self._control.status()
        except Exception:  # a scrape must still return the proxy's own numbers
            log.exception("status() failed during a metrics scrape")
            status = None

        paused = GaugeMetricFamily("pgroute_paused", "1 while new connections are held.")
        epoch = GaugeMetricFamily("pgroute_epoch", "Routing epoch, bumped at every switch.")
        if status is None:
            paused.add_metric([], 1.0 if route.paused else 0.0)
            epoch.add_metric([], route.epoch)
            yield paused
            yield epoch
            return
        paused.add_metric([], 1.0 if status.get("paused", route.paused) else 0.0)
        epoch.add_metric([], status.get("epoch", route.epoch))
        yield paused
        yield epoch

        active = GaugeMetricFamily(
            "pgroute_active_node", "1 for the node new connections are routed to.", labels=["node"]
        )
        for node in NODES:
            active.add_metric([node], 1.0 if status.get("active") == node else 0.0)
        yield active

        nodes: dict[str, Any] = status.get("nodes") or {}
        up = GaugeMetricFamily("pgroute_node_up", "1 when the last probe of the node succeeded.", labels=["node"])
        lag = GaugeMetricFamily(
            "pgroute_replication_lag_bytes", "Bytes the standby is behind the active node.", labels=["node"]
        )
        lag_s = GaugeMetricFamily(
            "pgroute_replication_lag_seconds", "Seconds the standby is behind the active node.", labels=["node"]
        )
        for node in NODES:
            info = nodes.get(node) or {}
            # Unknown (no probe yet, or no standby to measure) is left out rather
            # than reported as 0, which would read as "down" or "caught up".
            if info.get("up") is not None:
                up.add_metric([node], 1.0 if info["up"] else 0.0)
            if info.get("lag_bytes") is not None:
                lag.add_metric([node], info["lag_bytes"])
            if info.get("lag_seconds") is not None:
                lag_s.add_metric([node], info["lag_seconds"])
        yield up
        yield lag
        yield lag_s
        cluster = status.get("cluster")
        if isinstance(cluster, dict):
            yield from _cluster_metrics(cluster)


def _cluster_metrics(cluster: dict[str, Any]) -> Iterable[Metric]:
    """In a cluster: leadership, being cut off from etcd, and each member's applied
    epoch (a member behind the route's epoch has not acknowledged it). The barrier's
    wait is the switch phase "barrier" of ``pgroute_switch_phase_duration_seconds``."""
    leader = GaugeMetricFamily("pgroute_cluster_leader", "1 while this instance holds the leader key.")
    leader.add_metric([], 1.0 if cluster.get("role") == "leader" else 0.0)
    yield leader
    cut_off = GaugeMetricFamily(
        "pgroute_cluster_cut_off", "1 while this instance is cut off from etcd and routes to no node."
    )
    cut_off.add_metric([], 1.0 if cluster.get("cut_off") else 0.0)
    yield cut_off
    members = [m for m in cluster.get("members") or [] if isinstance(m, dict)]
    count = GaugeMetricFamily("pgroute_cluster_members", "Live member records (instances whose lease is alive).")
    count.add_metric([], len(members))
    yield count
    epochs = GaugeMetricFamily(
        "pgroute_cluster_member_epoch", "The routing epoch each member has applied.", labels=["member"]
    )
    for m in members:
        if isinstance(m.get("epoch"), int):
            epochs.add_metric([str(m.get("name", "?"))], m["epoch"])
    yield epochs


class Metrics:
    """The listener-fed metrics plus the hooks other components call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.probe_duration = Histogram(
            "pgroute_probe_duration_seconds",
            "Duration of health probes.",
            ["node"],
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self.probe_failures = Counter(
            "pgroute_probe_failures", "Health probes that failed.", ["node"], registry=registry
        )
        self.failovers = Counter(
            "pgroute_failovers", "Finished switches by kind and result.", ["kind", "result"], registry=registry
        )
        self.phase_duration = Histogram(
            "pgroute_switch_phase_duration_seconds",
            "Duration of each phase of a switch.",
            ["kind", "phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.switch_duration = Histogram(
            "pgroute_switch_duration_seconds",
            "Total duration of a switch, start to end.",
            ["kind", "result"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.alerts_failed = Counter(
            "pgroute_alerts_failed", "Alert deliveries that failed after all retries.", ["channel"], registry=registry
        )
        self.build_info = Gauge("pgroute_build_info", "pgroute version.", ["version"], registry=registry)
        self.build_info.labels(__version__).set(1)
        # Create the series up front so dashboards and rate() see zeros, not gaps.
        for node in NODES:
            self.probe_duration.labels(node)
            self.probe_failures.labels(node)
        for kind in SWITCH_KINDS:
            self.failovers.labels(kind, "ok")
            self.failovers.labels(kind, "failed")
        for channel in ALERT_CHANNELS:
            self.alerts_failed.labels(channel)
        self._counted: deque[int] = deque(maxlen=256)
        self.cluster: ClusterMetrics | None = None  # set by create_metrics in a cluster

    # -- listeners (never raise) ---------------------------------------------------
    def on_sample(self, sample: HealthSample) -> None:
        try:
            node = sample.node.value if isinstance(sample.node, NodeName) else str(sample.node)
            self.probe_duration.labels(node).observe(max(sample.latency, 0.0))
            if not sample.ok:
                self.probe_failures.labels(node).inc()
        except Exception:
            log.exception("metrics: cannot record a probe sample")

    def on_event(self, event: Event) -> None:
        try:
            if event.kind not in SWITCH_KINDS or event.ended_at is None:
                return
            if event.id in self._counted:
                return
            self._counted.append(event.id)
            result = event.result or "unknown"
            self.failovers.labels(event.kind, result).inc()
            self.switch_duration.labels(event.kind, result).observe(max(event.ended_at - event.started_at, 0.0))
            for phase, seconds in event.phases:
                self.phase_duration.labels(event.kind, phase).observe(max(seconds, 0.0))
        except Exception:
            log.exception("metrics: cannot record event %s", getattr(event, "id", "?"))

    def alert_failed(self, channel: str) -> None:
        """``on_failure`` hook for :class:`pgroute.alerts.Alerter`."""
        try:
            self.alerts_failed.labels(channel).inc()
        except Exception:
            log.exception("metrics: cannot count a failed alert")


def create_metrics(
    control: StatusSource, router: Router, cluster: ClusterNodeView | None = None
) -> tuple[CollectorRegistry, Metrics]:
    """Build a private registry, register the scrape-time collector, and subscribe the
    listener-fed metrics to ``control``. Wire ``metrics.alert_failed`` into the
    Alerter's ``on_failure``. In a cluster, pass the `ClusterNode` as ``cluster``:
    its etcd round trips, member lease and barriers are measured too."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(_SnapshotCollector(control, router))
    control.add_sample_listener(metrics.on_sample)
    control.add_event_listener(metrics.on_event)
    if cluster is not None:
        # Imported here: a single instance never loads the cluster package for this.
        from .cluster_metrics import add_cluster_metrics

        metrics.cluster = add_cluster_metrics(registry, cluster)
    return registry, metrics
