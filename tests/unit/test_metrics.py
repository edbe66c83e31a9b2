"""Prometheus metrics: names and values from router stats, status() and listeners."""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgroute import __version__
from pgroute.api.metrics import create_metrics
from pgroute.model import Event, HealthSample, NodeName

from .test_api import FakeControl, make_router


def scrape(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


EXPECTED_NAMES = [
    "pgroute_active_node",
    "pgroute_node_up",
    "pgroute_probe_duration_seconds_bucket",
    "pgroute_probe_failures_total",
    "pgroute_replication_lag_bytes",
    "pgroute_failovers_total",
    "pgroute_switch_phase_duration_seconds",
    "pgroute_client_connections",
    "pgroute_client_connections_total",
    "pgroute_rejected_connections_total",
    "pgroute_proxied_bytes_total",
    "pgroute_paused",
    "pgroute_epoch",
    "pgroute_build_info",
    "pgroute_alerts_failed_total",
    "pgroute_waiting_connections",
    "pgroute_spliced_sessions_total",
]


def test_names_present():
    fake, router = FakeControl(), make_router()
    router.stats.reject("too_many_connections")
    registry, _metrics = create_metrics(fake, router)
    fake.event_listeners[0](Event(1, "failover", "x", 1.0, 2.0, "ok", (("promote", 0.5),)))
    text = generate_latest(registry).decode()
    for name in EXPECTED_NAMES:
        assert name in text, name
    # Each registry is private: a second one in the same process is fine.
    create_metrics(FakeControl(), make_router())


def test_values_follow_router_and_status():
    fake, router = FakeControl(), make_router()
    registry, _ = create_metrics(fake, router)
    stats = router.stats
    stats.connections_current, stats.connections_total, stats.waiting = 4, 17, 2
    stats.bytes_client_to_server, stats.bytes_server_to_client = 1000, 5000
    # Open spliced sessions: their bytes come from the kernel at scrape time.
    stats.live_bytes = lambda: (20, 300)
    stats.spliced_total = 9
    stats.reject("too_many_connections")
    stats.reject("too_many_connections")
    stats.reject("no_routable_node")
    s = scrape(registry)
    assert value(s, "pgroute_client_connections") == 4
    assert value(s, "pgroute_client_connections_total") == 17
    assert value(s, "pgroute_waiting_connections") == 2
    assert value(s, "pgroute_proxied_bytes_total", direction="client_to_server") == 1020
    assert value(s, "pgroute_proxied_bytes_total", direction="server_to_client") == 5300
    assert value(s, "pgroute_spliced_sessions_total") == 9
    assert value(s, "pgroute_rejected_connections_total", reason="too_many_connections") == 2
    assert value(s, "pgroute_rejected_connections_total", reason="no_routable_node") == 1
    assert value(s, "pgroute_active_node", node="primary") == 1
    assert value(s, "pgroute_active_node", node="mirror") == 0
    assert value(s, "pgroute_node_up", node="primary") == 1
    assert value(s, "pgroute_replication_lag_bytes", node="mirror") == 128
    assert value(s, "pgroute_epoch") == 3
    assert value(s, "pgroute_paused") == 0
    assert value(s, "pgroute_build_info", version=__version__) == 1

    # The collector reads at scrape time: a new snapshot shows up on the next scrape.
    fake.st.update(active="mirror", epoch=4, paused=True)
    fake.st["nodes"]["primary"]["up"] = False
    fake.st["nodes"]["mirror"]["up"] = None  # unknown: left out, not reported as down
    stats.connections_current = 0
    s = scrape(registry)
    assert value(s, "pgroute_active_node", node="primary") == 0
    assert value(s, "pgroute_active_node", node="mirror") == 1
    assert value(s, "pgroute_node_up", node="primary") == 0
    assert value(s, "pgroute_node_up", node="mirror") is None
    assert value(s, "pgroute_epoch") == 4
    assert value(s, "pgroute_paused") == 1
    assert value(s, "pgroute_client_connections") == 0

    fake.st["active"] = None
    s = scrape(registry)
    assert value(s, "pgroute_active_node", node="primary") == 0
    assert value(s, "pgroute_active_node", node="mirror") == 0


def test_cluster_metrics_only_in_a_cluster():
    fake, router = FakeControl(), make_router()
    registry, _ = create_metrics(fake, router)
    assert value(scrape(registry), "pgroute_cluster_leader") is None  # one instance: none
    fake.st["cluster"] = {
        "name": "a",
        "leader": "a",
        "role": "leader",
        "cut_off": False,
        "members": [{"name": "a", "epoch": 5}, {"name": "b", "epoch": 4}],
    }
    s = scrape(registry)
    assert value(s, "pgroute_cluster_leader") == 1
    assert value(s, "pgroute_cluster_cut_off") == 0
    assert value(s, "pgroute_cluster_members") == 2
    assert value(s, "pgroute_cluster_member_epoch", member="a") == 5
    assert value(s, "pgroute_cluster_member_epoch", member="b") == 4
    fake.st["cluster"].update(role="follower", cut_off=True, members=[])
    s = scrape(registry)
    assert value(s, "pgroute_cluster_leader") == 0
    assert value(s, "pgroute_cluster_cut_off") == 1
    assert value(s, "pgroute_cluster_members") == 0


def test_scrape_survives_status_failure():
    fake, router = FakeControl(), make_router()
    registry, _ = create_metrics(fake, router)

    def broken_status() -> dict:
        raise ZeroDivisionError("division by zero")

    fake.status = broken_status  # type: ignore[method-assign]  # this instance's status() fails
    router.stats.connections_total = 9
    s = scrape(registry)
    assert value(s, "pgroute_client_connections_total") == 9
    assert value(s, "pgroute_epoch") == 3


def test_samples_and_events_feed_metrics():
    fake, router = FakeControl(), make_router()
    registry, metrics = create_metrics(fake, router)
    now = time.time()
    for cb in fake.sample_listeners:
        cb(HealthSample(NodeName.PRIMARY, True, now, 0.002))
        cb(HealthSample(NodeName.PRIMARY, False, now, 5.0, error="timeout"))
        cb(HealthSample(NodeName.MIRROR, True, now, 0.001))
    running = Event(7, "failover", "primary down", now - 2, None, None)
    done = Event(7, "failover", "primary down", now - 2, now, "ok", (("fence", 0.05), ("promote", 1.5)))
    for on_event in fake.event_listeners:
        on_event(running)  # start: not counted yet
        on_event(done)
        on_event(done)  # reported twice: counted once
        on_event(Event(8, "switchover", "planned", now - 1, now, "failed", (("drain", 0.3),)))
        on_event(Event(9, "node_down", "primary down", now, now, "ok"))  # not a switch
    metrics.alert_failed("webhook")
    s = scrape(registry)
    assert value(s, "pgroute_probe_duration_seconds_count", node="primary") == 2
    assert value(s, "pgroute_probe_duration_seconds_count", node="mirror") == 1
    assert value(s, "pgroute_probe_failures_total", node="primary") == 1
    assert value(s, "pgroute_probe_failures_total", node="mirror") == 0
    assert value(s, "pgroute_failovers_total", kind="failover", result="ok") == 1
    assert value(s, "pgroute_failovers_total", kind="switchover", result="failed") == 1
    assert value(s, "pgroute_failovers_total", kind="failback", result="ok") == 0
    assert value(s, "pgroute_switch_phase_duration_seconds_count", kind="failover", phase="promote") == 1
    assert value(s, "pgroute_switch_phase_duration_seconds_sum", kind="failover", phase="promote") == 1.5
    assert value(s, "pgroute_switch_phase_duration_seconds_count", kind="switchover", phase="drain") == 1
    assert value(s, "pgroute_alerts_failed_total", channel="webhook") == 1
    assert value(s, "pgroute_alerts_failed_total", channel="email") == 0
    assert not any(k[0] == "pgroute_failovers_total" and ("kind", "node_down") in k[1] for k in s)


def test_listeners_never_raise():
    fake, router = FakeControl(), make_router()
    _, metrics = create_metrics(fake, router)
    metrics.on_sample(object())  # type: ignore[arg-type]  # garbage on purpose
    metrics.on_event(object())  # type: ignore[arg-type]  # garbage on purpose


def test_shipped_rules_and_dashboard_use_real_metric_names():
    """config/prometheus-alerts.yml and config/grafana-dashboard.json must not drift."""
    import re
    from pathlib import Path

    fake, router = FakeControl(), make_router()
    router.stats.reject("too_many_connections")
    registry, _metrics = create_metrics(fake, router)
    fake.event_listeners[0](Event(1, "failover", "x", 1.0, 2.0, "ok", (("promote", 0.5),)))
    exposed = set(re.findall(r"^(pgroute_[a-z_]+)", generate_latest(registry).decode(), re.M))
    root = Path(__file__).resolve().parents[2] / "config"
    for name in ("prometheus-alerts.yml", "grafana-dashboard.json"):
        used = set(re.findall(r"\b(pgroute_[a-z_]+)", (root / name).read_text()))
        assert used, name
        assert used <= exposed, (name, sorted(used - exposed))
