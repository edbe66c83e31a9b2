"""Fixtures that start real PostgreSQL servers (see pgroute.local).

Every server a fixture starts is destroyed at teardown, even when the test
fails; `pgroute.local.stop_all` (atexit) and the session teardown kill whatever
is left, and a SIGTERM to pytest is turned into a KeyboardInterrupt so that
teardown runs then too. Directories left by a run killed with SIGKILL are
cleaned at the start of the next one.

Fixtures:
- ``pg_base_dir`` (session): a directory the ``postgres`` OS user can use, on
  /dev/shm when possible (``PGROUTE_TEST_TMPDIR`` overrides).
- ``local_cluster``: one started standalone server.
- ``cluster_factory``: ``cluster_factory(name="pg", settings=None, start=True, version=None)``.
- ``pair``: a fresh primary + mirror (``create_pair`` defaults: database
  ``chrispar``, the DEFAULT_SCHEMA tables, ``chrispar_pub`` / ``chrispar_sub``).
- ``pair_factory``: ``pair_factory(**create_pair_kwargs)`` for other settings or seeds.
- ``etcd``: a fresh 3-member etcd on loopback (pgroute.local.etcd), for the cluster tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgroute import local
from pgroute.errors import LocalClusterError
from pgroute.local.binaries import find_version
from pgroute.local.etcd import LocalEtcdCluster

_HERE = Path(__file__).parent
_PREFIX = "pgroute-test-"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only this directory's.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config: pytest.Config) -> str:
    """Which PostgreSQL the servers of this run are (PGROUTE_PG_VERSION selects it)."""
    try:
        found = local.find_binaries()
        return f"PostgreSQL {found.version}: {found.bindir}"
    except LocalClusterError as exc:
        return f"PostgreSQL: {exc}"


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def pg_base_dir():
    """Session directory for data directories and logs, reachable by the server user."""
    # $PGROUTE_TEST_TMPDIR, else /dev/shm when it has room, else the temporary directory.
    parent = local.scratch_parent(os.environ.get("PGROUTE_TEST_TMPDIR"))
    for place in {parent, None}:  # None: the system temporary directory
        local.cleanup_abandoned(_PREFIX, place)
    base = local.make_base_dir(_PREFIX, parent)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM would otherwise end pytest without teardown or atexit.
        previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        yield base
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        local.stop_all()
        shutil.rmtree(base, ignore_errors=True)


class ClusterFactory:
    """Creates started standalone servers; destroys them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.created: list[local.LocalCluster] = []

    def __call__(
        self, name: str = "pg", settings: dict[str, str] | None = None, start: bool = True, version: int | None = None
    ) -> local.LocalCluster:
        # version: that PostgreSQL major version (mixed pairs); None: the default binaries.
        binaries = find_version(version) if version is not None else None
        cluster = local.LocalCluster(
            local.make_base_dir(name + "-", parent=self.base) / "data", name=name, settings=settings, binaries=binaries
        )
        self.created.append(cluster)
        cluster.init()
        if start:
            cluster.start()
        return cluster

    def destroy(self) -> None:
        for cluster in self.created:
            cluster.destroy()
            shutil.rmtree(cluster.datadir.parent, ignore_errors=True)


class PairFactory:
    """Creates primary + mirror pairs; destroys them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.pairs: list[local.LocalPair] = []
        self.dirs: list[Path] = []

    @property
    def created(self) -> list[local.LocalCluster]:
        return [c for p in self.pairs for c in (p.primary, p.mirror)]

    def __call__(self, **kwargs) -> local.LocalPair:
        base = local.make_base_dir("pair-", parent=self.base)
        self.dirs.append(base)
        pair = local.create_pair(base, **kwargs)  # destroys its servers itself on failure
        self.pairs.append(pair)
        return pair

    def destroy(self) -> None:
        for pair in self.pairs:
            pair.destroy()
        for base in self.dirs:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster_factory(pg_base_dir):
    factory = ClusterFactory(pg_base_dir)
    try:
        yield factory
    finally:
        factory.destroy()


@pytest.fixture
def local_cluster(cluster_factory) -> local.LocalCluster:
    """A started standalone server, destroyed after the test."""
    return cluster_factory()


@pytest.fixture
def etcd(pg_base_dir) -> Iterator[LocalEtcdCluster]:
    """A fresh 3-member etcd on loopback ports (about a second to start), destroyed after the test."""
    cluster = LocalEtcdCluster(pg_base_dir / f"etcd-{uuid.uuid4().hex[:8]}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pair_factory(pg_base_dir):
    factory = PairFactory(pg_base_dir)
    try:
        yield factory
    finally:
        factory.destroy()


@pytest.fixture
def pair(pair_factory) -> local.LocalPair:
    """A fresh primary + mirror, replicating and caught up, destroyed after the test."""
    return pair_factory()
