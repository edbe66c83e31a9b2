"""`pgroute check`'s lines about the cluster (``[cluster] etcd`` set): etcd, the instance
name and the route record.

Reads only; writes nothing to etcd. Each etcd endpoint is asked on its own, so a lost
member shows even while the others answer (the cluster keeps working on a quorum).
With TLS and authentication configured, a refused password or a certificate that
does not verify is said as such, with the keys to fix (never the password).
"""

from __future__ import annotations

import asyncio

from ..cluster.etcd_auth import EtcdAuthError, EtcdSecurity
from ..cluster.etcd_gateway import EtcdUnavailable
from ..cluster.etcd_store import EtcdStore
from ..cluster.keys import Keys
from ..cluster.members import Members, NameInUse
from ..cluster.records import CorruptRecord
from ..cluster.roster import decode_roster
from ..cluster.route import decode_route
from ..cluster.store import StoreError
from ..config import Config
from .check import CheckItem

ENDPOINT_TIMEOUT = 2.0


AUTH_HINT = "fix [cluster] etcd_user and etcd_password (PGROUTE_CLUSTER_ETCD_PASSWORD), or the user's roles in etcd"
TLS_HINT = "fix [cluster] etcd_ca (the CA of the members' certificates), etcd_cert and etcd_key"


async def _endpoint_answers(endpoint: str, security: EtcdSecurity) -> tuple[str, str] | None:
    """None when this member answers a linearizable read, else (kind, why not):
    kind is "auth", "tls" or "down"."""
    try:
        async with EtcdStore([endpoint], timeout=ENDPOINT_TIMEOUT, security=security) as store:
            await store.get("/", timeout=ENDPOINT_TIMEOUT)
    except EtcdAuthError as exc:
        return "auth", str(exc)
    except StoreError as exc:
        tls = isinstance(exc, EtcdUnavailable) and exc.reasons == {"tls"}
        return ("tls" if tls else "down"), str(exc) or type(exc).__name__
    return None


def _hint(kinds: set[str]) -> str:
    if kinds == {"auth"}:
        return AUTH_HINT
    if kinds == {"tls"}:
        return TLS_HINT
    return "start etcd, or fix [cluster] etcd (host:port of each member's client URL)"


async def check_cluster(config: Config) -> list[CheckItem]:
    """The cluster's check items; [] when ``[cluster] etcd`` is empty."""
    if not config.cluster.enabled:
        return []
    endpoints = list(config.cluster.etcd)
    keys = Keys(config.cluster_prefix)
    name = config.cluster.member_name
    items: list[CheckItem] = []
    security = config.cluster.etcd_security
    errors = await asyncio.gather(*(_endpoint_answers(e, security) for e in endpoints))
    down = [f"{e} ({err[1]})" for e, err in zip(endpoints, errors, strict=True) if err is not None]
    kinds = {err[0] for err in errors if err is not None}
    up = len(endpoints) - len(down)
    if up == 0:
        says = {
            "auth": "every member refuses this instance's credentials",
            "tls": "the TLS handshake fails with every member",
        }.get(next(iter(kinds)) if len(kinds) == 1 else "", "no member answers")
        items.append(CheckItem("etcd", False, f"{says}: {'; '.join(down)}", _hint(kinds)))
        return items
    if down:
        items.append(
            CheckItem(
                "etcd",
                True,
                f"{up} of {len(endpoints)} members answer; not: {'; '.join(down)}",
                _hint(kinds)
                if kinds <= {"auth", "tls"}
                else "bring the missing members back: the cluster survives losing fewer than half of them",
                warning=True,
            )
        )
    else:
        items.append(CheckItem("etcd", True, f"{up} of {len(endpoints)} members answer (prefix {keys.prefix})"))
    async with EtcdStore(endpoints, timeout=ENDPOINT_TIMEOUT * 2, security=security) as store:
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
        items.append(await _roster_item(store, keys, name))
    return items


async def _roster_item(store: EtcdStore, keys: Keys, name: str) -> CheckItem:
    """The roster (who may lead; whom the failsafe asks) and this instance's place on it."""
    try:
        kv = (await store.get(keys.roster)).first
    except StoreError as exc:
        return CheckItem("roster", False, f"cannot read {keys.roster}: {exc}", None)
    if kv is None:
        return CheckItem("roster", True, f"{keys.roster} is absent: the first leader writes it")
    try:
        roster = decode_roster(keys.roster, kv.value)
    except CorruptRecord as exc:
        return CheckItem(
            "roster",
            False,
            f"{exc}: no new leader can be elected while it stays",
            "delete it (etcdctl del) once no instance is riding out an etcd outage: the leader rewrites it",
        )
    members = ", ".join(sorted(roster.names)) or "nobody"
    text = f"generation {roster.gen}: {members}"
    waiting = sorted(roster.names - roster.eligible)
    if waiting:
        text += f" (not yet eligible to lead: {', '.join(waiting)})"
    if name not in roster.names:
        text += f"; {name} joins it when it starts"
    missing_api = sorted(m.name for m in roster.members if not m.api)
    if missing_api:
        return CheckItem(
            "roster",
            True,
            f"{text}; without an API address: {', '.join(missing_api)} (the failsafe cannot ask them)",
            "set [cluster] advertise_api on those instances",
            warning=True,
        )
    return CheckItem("roster", True, text)
