"""The EtcdStore against a production-like etcd: clients over TLS with a private CA
(and mutual TLS), etcd's authentication with a token that expires, and what
`pgroute check` says when either fails. Real etcd members on loopback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pgroute.api.cluster_metrics import ClusterMetrics
from pgroute.cluster.etcd_auth import EtcdAuthError, EtcdSecurity
from pgroute.cluster.etcd_gateway import EtcdUnavailable
from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.store import EventKind, StoreError
from pgroute.cluster.watching import watching
from pgroute.config import Config
from pgroute.local.etcd import LocalEtcdCluster
from pgroute.local.etcd_tls import EtcdTls, client_pair, make_etcd_tls
from pgroute.tools.cluster_check import check_cluster

from ..unit.test_metrics import scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

P = "/pgroute/sectest/"
PASSWORD = "s3cret-Pw-42"  # must never show in an error


@pytest.fixture
def tls_files(tmp_path: Path) -> EtcdTls:
    return make_etcd_tls(tmp_path / "certs", client_auth=True)


@pytest.fixture
def tls_etcd(pg_base_dir: Path, tls_files: EtcdTls) -> Iterator[LocalEtcdCluster]:
    """One etcd member serving clients over TLS, requiring a client certificate."""
    cluster = LocalEtcdCluster(pg_base_dir / f"etcd-tls-{uuid.uuid4().hex[:8]}", size=1, tls=tls_files)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def auth_etcd(pg_base_dir: Path) -> Iterator[LocalEtcdCluster]:
    """One etcd member with authentication enabled (user root), tokens valid 1 s."""
    # Simple tokens unused for a second expire (etcd's default: 5 minutes).
    flags = ("--auth-token=simple", "--auth-token-ttl=1")
    cluster = LocalEtcdCluster(pg_base_dir / f"etcd-auth-{uuid.uuid4().hex[:8]}", size=1, flags=flags)
    try:
        cluster.start()
        cluster.enable_auth(PASSWORD)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def tls_auth_etcd(pg_base_dir: Path, tls_files: EtcdTls) -> Iterator[LocalEtcdCluster]:
    """One etcd member with mutual TLS and authentication: what production runs."""
    cluster = LocalEtcdCluster(pg_base_dir / f"etcd-tlsauth-{uuid.uuid4().hex[:8]}", size=1, tls=tls_files)
    try:
        cluster.start()
        cluster.enable_auth(PASSWORD)
        yield cluster
    finally:
        cluster.destroy()


def _config(endpoints: list[str], **cluster: str) -> Config:
    return Config.model_validate(
        {
            "primary": {"dsn": "postgresql://u@127.0.0.1:1/db"},
            "mirror": {"dsn": "postgresql://u@127.0.0.1:2/db"},
            "cluster": {"etcd": endpoints, "name": "a", "prefix": "/pgroute/sectest", **cluster},
        }
    )


async def _round_trip(store: EtcdStore) -> None:
    """Write, read, watch and keep a lease alive: every kind of request the cluster sends."""
    start = await store.put(P + "k", "v1")
    first = (await store.get(P + "k")).first
    assert first is not None and first.text == "v1"
    lease = await store.grant(5)
    await store.keepalive(lease)
    async with watching(store, P, start + 1) as events:
        await store.put(P + "k", "v2", lease)
        event = await asyncio.wait_for(anext(events), 10)
    assert (event.kind, event.kv.text) == (EventKind.PUT, "v2")
    await store.revoke(lease)


async def test_tls_with_a_private_ca_and_a_client_certificate(tls_etcd, tls_files) -> None:
    endpoint = tls_etcd.endpoints[0]
    assert endpoint.startswith("https://")
    security = EtcdSecurity(str(tls_files.ca), str(tls_files.client_cert), str(tls_files.client_key))
    async with EtcdStore([endpoint], timeout=5.0, security=security) as store:
        await _round_trip(store)
    # Without the CA, the member's certificate does not verify.
    async with EtcdStore([endpoint], timeout=1.0) as store:
        with pytest.raises(EtcdUnavailable, match=r"(?i)certificate") as unverified:
            await store.get(P + "k")
    assert unverified.value.reasons == {"tls"}
    # The member requires a client certificate.
    async with EtcdStore([endpoint], timeout=1.0, security=EtcdSecurity(str(tls_files.ca))) as store:
        with pytest.raises(EtcdUnavailable) as no_client_cert:
            await store.get(P + "k")
    assert no_client_cert.value.reasons == {"tls"}, no_client_cert.value


async def test_mutual_tls_with_auth_and_a_client_certificate_without_a_common_name(tls_auth_etcd, tls_files) -> None:
    ca, cert, key = str(tls_files.ca), str(tls_files.client_cert), str(tls_files.client_key)
    security = EtcdSecurity(ca, cert, key, user="root", password=PASSWORD)
    async with EtcdStore(tls_auth_etcd.endpoints, timeout=5.0, security=security) as store:
        await _round_trip(store)
    # etcd's JSON gateway refuses a certificate with a CN while auth is on: said so at once.
    named_cert, named_key = client_pair(tls_files, "named", "pgroute")
    named = EtcdSecurity(ca, str(named_cert), str(named_key), user="root", password=PASSWORD)
    async with EtcdStore(tls_auth_etcd.endpoints, timeout=5.0, security=named) as store:
        with pytest.raises(EtcdAuthError, match="without a CN"):
            await store.get(P + "k")


async def test_a_ca_file_that_does_not_load_is_named() -> None:
    with pytest.raises(StoreError, match=r"etcd_ca /nonexistent/ca\.pem"):
        EtcdStore(["https://127.0.0.1:1"], security=EtcdSecurity("/nonexistent/ca.pem"))


async def test_check_says_the_tls_handshake_fails(tls_etcd, tls_files) -> None:
    items = await check_cluster(_config(tls_etcd.endpoints))  # no etcd_ca: the system's CAs
    assert not items[0].ok
    assert "TLS handshake fails" in items[0].detail, items[0].detail
    assert "etcd_ca" in (items[0].fix or "")
    good = _config(
        tls_etcd.endpoints,
        etcd_ca=str(tls_files.ca),
        etcd_cert=str(tls_files.client_cert),
        etcd_key=str(tls_files.client_key),
    )
    assert all(item.ok for item in await check_cluster(good)), await check_cluster(good)


async def test_auth_with_the_right_password_works_a_wrong_one_is_a_clear_error(auth_etcd) -> None:
    endpoints = auth_etcd.endpoints
    async with EtcdStore(endpoints, timeout=5.0, security=EtcdSecurity(user="root", password=PASSWORD)) as store:
        await _round_trip(store)
    wrong = "not-the-" + PASSWORD
    async with EtcdStore(endpoints, timeout=2.0, security=EtcdSecurity(user="root", password=wrong)) as store:
        with pytest.raises(EtcdAuthError) as refused:
            await store.get(P + "k")
    text = str(refused.value)
    assert "authentication failed" in text and "etcd_password" in text, text
    assert PASSWORD not in text and wrong not in text
    async with EtcdStore(endpoints, timeout=2.0) as store:
        with pytest.raises(EtcdAuthError, match="set \\[cluster\\] etcd_user and etcd_password"):
            await store.get(P + "k")


async def test_check_says_the_credentials_are_refused(auth_etcd) -> None:
    items = await check_cluster(_config(auth_etcd.endpoints, etcd_user="root", etcd_password="wrong-one"))
    assert not items[0].ok
    assert "refuses this instance's credentials" in items[0].detail, items[0].detail
    assert "wrong-one" not in items[0].detail
    assert "etcd_password" in (items[0].fix or "")
    good = _config(auth_etcd.endpoints, etcd_user="root", etcd_password=PASSWORD)
    assert all(item.ok for item in await check_cluster(good))


async def test_a_token_etcd_forgot_is_renewed(auth_etcd) -> None:
    """A simple token lives in the members' memory until it is unused for its TTL (a
    restart forgets the ones its log does not replay). A request renews its store's
    token and goes through; a watch open across the expiry renews its own when its
    idle check is refused; a watch opened with a forgotten token, when etcd cancels
    it. After the expiry, each store sends one kind of request only."""
    security = EtcdSecurity(user="root", password=PASSWORD)
    async with (
        EtcdStore(auth_etcd.endpoints, timeout=2.0, security=security) as open_watcher,
        EtcdStore(auth_etcd.endpoints, timeout=2.0, security=security) as late_watcher,
        EtcdStore(auth_etcd.endpoints, timeout=5.0, security=security) as writer,
    ):
        registry = CollectorRegistry()
        writer.observer = ClusterMetrics(registry)
        start = await writer.put(P + "k", "before")
        await late_watcher.get(P + "k")  # authenticates
        keepers = [s._gateway.auth for s in (open_watcher, late_watcher, writer)]
        assert all(keepers)
        tokens = [k.token for k in keepers if k is not None]
        async with watching(open_watcher, P, start + 1) as events:
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(3)  # every token unused for longer than its TTL
            async with watching(late_watcher, P, start + 1) as late_events:
                late = asyncio.ensure_future(anext(late_events))
                await asyncio.sleep(0.5)
                await writer.put(P + "k", "after")
                assert (await asyncio.wait_for(first, 15)).kv.text == "after"
                assert (await asyncio.wait_for(late, 15)).kv.text == "after"
        for keeper, token in zip(keepers, tokens, strict=True):
            assert keeper is not None and keeper.renewals == 1 and keeper.token != token
        # The writer's refused token is counted as an auth failure; two authentications.
        samples = scrape(registry)
        assert value(samples, "pgroute_etcd_request_failures_total", reason="auth") == 1
        assert value(samples, "pgroute_etcd_request_seconds_count", operation="authenticate") == 2
