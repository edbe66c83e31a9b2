"""`pgroute run` as a cluster on a production-like etcd: clients over mutual TLS with a
private CA, authentication on. The instance leads, routes to the primary, and its
metrics show it authenticated. One in-process instance, a real pair, one etcd member."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgroute import app
from pgroute.local.etcd import LocalEtcdCluster
from pgroute.local.etcd_tls import make_etcd_tls
from pgroute.local.workload import wait_until

from .harness import make_config
from .test_cluster_metrics_run import _scrape

pytestmark = [pytest.mark.integration]

PASSWORD = "s3cret-Pw-42"


@pytest.fixture
def secure_etcd(pg_base_dir: Path, tmp_path: Path) -> Iterator[LocalEtcdCluster]:
    tls = make_etcd_tls(tmp_path / "certs", client_auth=True)
    cluster = LocalEtcdCluster(pg_base_dir / f"etcd-sec-{uuid.uuid4().hex[:8]}", size=1, tls=tls)
    try:
        cluster.start()
        cluster.enable_auth(PASSWORD)
        yield cluster
    finally:
        cluster.destroy()


async def test_an_instance_runs_on_etcd_with_mutual_tls_and_auth(pair, secure_etcd, tmp_path) -> None:
    tls = secure_etcd.tls
    assert tls is not None
    cluster = {
        "etcd": secure_etcd.endpoints,
        "name": "a",
        "prefix": f"/pgroute/test-{uuid.uuid4().hex[:6]}",
        "ttl": 3.0,
        "etcd_ca": str(tls.ca),
        "etcd_cert": str(tls.client_cert),
        "etcd_key": str(tls.client_key),
        "etcd_user": "root",
        "etcd_password": PASSWORD,
    }
    running = await asyncio.wait_for(app.start(make_config(pair, tmp_path, cluster=cluster)), 30)
    try:
        node = running.cluster
        assert node is not None
        await wait_until(lambda: node.leading and running.router.route.backend is not None, 30, what="a leads")
        backend = running.router.route.backend
        assert backend is not None and backend.name == "primary"
        s = await asyncio.to_thread(_scrape, running)
        assert s[("pgroute_etcd_request_seconds_count", (("operation", "authenticate"),))] >= 1
        assert s[("pgroute_etcd_request_failures_total", (("reason", "auth"),))] == 0
    finally:
        await running.stop()
