"""The cluster metrics against a real 3-member etcd: round trips per operation, a
lost member counted as a failure, the member lease's age, and barriers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from pgroute.api.cluster_metrics import add_cluster_metrics
from pgroute.cluster.barrier import barrier
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.members import Membership

from ..unit.test_cluster_metrics import FakeFailsafe
from ..unit.test_metrics import scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@dataclass
class Node:
    """What the metrics read of a ClusterNode: its store and membership."""

    store: EtcdStore
    membership: Membership | None = None
    failsafe: FakeFailsafe = field(default_factory=FakeFailsafe)


async def test_round_trips_failures_lease_age_and_barriers_move(etcd) -> None:
    keys = Keys("/pgroute/metricstest")
    registry = CollectorRegistry()
    async with EtcdStore(etcd.endpoints, timeout=3.0) as store:
        node = Node(store)
        add_cluster_metrics(registry, node)
        node.membership = Membership(store, keys, "a", 6.0)
        await node.membership.start()
        try:
            await store.get(keys.route)
            complete = await barrier(store, keys, 0, 5.0)  # "a" is at epoch 0
            incomplete = await barrier(store, keys, 1, 0.5)  # nobody acknowledges 1
            s = scrape(registry)
            for operation in ("range", "txn", "lease_grant", "watch_open"):
                assert value(s, "pgroute_etcd_request_seconds_count", operation=operation) >= 1, operation
            assert 0 < value(s, "pgroute_etcd_request_seconds_sum", operation="range") < 10
            age = value(s, "pgroute_cluster_keepalive_age_seconds")
            assert age is not None and 0 <= age < 6.0
            assert complete.complete and not incomplete.complete
            assert value(s, "pgroute_cluster_barrier_total", result="complete") == 1
            assert value(s, "pgroute_cluster_barrier_total", result="incomplete") == 1
            assert value(s, "pgroute_cluster_barrier_wait_seconds_count") == 2

            # The member requests go to dies: the next request fails over, and the
            # failed attempt is counted.
            etcd.member(store.endpoint).kill()
            await store.get(keys.route)
            s = scrape(registry)
            assert value(s, "pgroute_etcd_request_failures_total", reason="connection") >= 1
        finally:
            await node.membership.close()
