"""`pgroute check`'s lines about the cluster (``[cluster] etcd`` set): etcd, the instance
name and the route record.

Reads only; writes nothing to etcd. Each etcd endpoint is asked on its own, so a lost
member shows even while the others answer (the cluster keeps working on a quorum).
"""

from __future__ import annotations

import asyncio

from ..cluster.etcd_store import EtcdStore
from ..cluster.keys import Keys
from ..cluster.members import Members, NameInUse
from ..cluster.records import CorruptRecord
from ..cluster.route import decode_route
from ..cluster.store import StoreError
from ..config import Config
from .check import CheckItem

ENDPOINT_TIMEOUT = 2.0


async def _endpoint_answers(endpoint: str) -> str | None:
    """None when this member answers a linearizable read, else why not."""
    try:
        async with EtcdStore([endpoint], timeout=ENDPOINT_TIMEOUT) as store:
            await store.get("/", timeout=ENDPOINT_TIMEOUT)
    except StoreError as exc:
        return str(exc) or type(exc).__name__
    return None


async def check_cluster(config: Config) -> list[CheckItem]:
    """The cluster's check items; [] when ``[cluster] etcd`` is empty."""
    if not config.cluster.enabled:
        return []
    endpoints = list(config.cluster.etcd)
    keys = Keys(config.cluster_prefix)
    name = config.cluster.member_name
    items: list[CheckItem] = []
    errors = await asyncio.gather(*(_endpoint_answers(e) for e in endpoints))
    down = [f"{e} ({err})" for e, err in zip(endpoints, errors, strict=True) if err is not None]
    up = len(endpoints) - len(down)
    if up == 0:
        items.append(
            CheckItem(
                "etcd",
                False,
                f"no member answers: {'; '.join(down)}",
                "start etcd, or fix [cluster] etcd (host:port of each member's client URL)",
            )
        )
        return items
    if down:
        items.append(
            CheckItem(
                "etcd",
                True,
                f"{up} of {len(endpoints)} members answer; not: {'; '.join(down)}",
                "bring the missing members back: the cluster survives losing fewer than half of them",
                warning=True,
            )
        )
    else:
        items.append(CheckItem("etcd", True, f"{up} of {len(endpoints)} members answer (prefix {keys.prefix})"))
    async with EtcdStore(endpoints, timeout=ENDPOINT_TIMEOUT * 2) as store:
        try:
            await Members(store, keys).check_name_free(name)
            items.append(CheckItem("cluster name", True, f"{name} is held by no live instance"))
        except NameInUse as exc:
            items.append(
                CheckItem(
                    "cluster name",
                    True,
                    f"{exc}; fine if that is this instance's own running pgroute",
                    "give every instance its own [cluster] name (PGROUTE_CLUSTER_NAME)",
                    warning=True,
                )
            )
        except StoreError as exc:
            items.append(CheckItem("cluster name", False, f"cannot read the member records: {exc}", None))
        try:
            kv = (await store.get(keys.route)).first
        except StoreError as exc:
            items.append(CheckItem("route", False, f"cannot read {keys.route}: {exc}", None))
            return items
        if kv is None:
            items.append(
                CheckItem("route", True, f"{keys.route} is absent: the first cluster start imports the state file")
            )
            return items
        try:
            route = decode_route(keys.route, kv.value)
        except CorruptRecord as exc:
            items.append(
                CheckItem("route", False, str(exc), "inspect it (etcdctl get) and delete it only if you know why")
            )
            return items
        active = route.active.value if route.active else "no node"
        who = f", written by {route.leader}" if route.leader else ""
        items.append(CheckItem("route", True, f"epoch {route.epoch}, active {active}{who}"))
    return items
