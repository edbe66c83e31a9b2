"""`pgroute run` as a cluster, scraped: the app wires the cluster metrics to its
ClusterNode (etcd round trips, the member lease's age, the barrier of a switchover).
One in-process instance on a real pair and a real 3-member etcd."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgroute import app
from pgroute.local.workload import wait_until

from .harness import api_async, make_config, wait_following

pytestmark = [pytest.mark.integration]


def _scrape(running: app.Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.api_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_cluster_instance_exposes_etcd_lease_and_barrier_metrics(pair, etcd, tmp_path) -> None:
    cfg = make_config(
        pair,
        tmp_path,
        cluster={"etcd": etcd.endpoints, "name": "a", "prefix": f"/pgroute/test-{uuid.uuid4().hex[:6]}", "ttl": 3.0},
    )
    running = await app.start(cfg)
    try:
        node = running.cluster
        assert node is not None
        await wait_until(lambda: node.leading and running.router.route.backend is not None, 30, what="a leads")
        await wait_following(running)
        code, body = await api_async(running, "/api/switchover", "POST")
        assert code == 200, body
        s = await asyncio.to_thread(_scrape, running)
        assert s[("pgroute_etcd_request_seconds_count", (("operation", "range"),))] >= 1
        assert s[("pgroute_etcd_request_seconds_count", (("operation", "txn"),))] >= 1
        assert s[("pgroute_etcd_request_seconds_count", (("operation", "lease_grant"),))] >= 1
        assert s[("pgroute_etcd_request_seconds_count", (("operation", "watch_open"),))] >= 1
        age = s[("pgroute_cluster_keepalive_age_seconds", ())]
        assert 0 <= age < 3.0
        assert s[("pgroute_cluster_barrier_total", (("result", "complete"),))] == 1
        assert s[("pgroute_cluster_barrier_wait_seconds_count", ())] == 1
    finally:
        await running.stop()
