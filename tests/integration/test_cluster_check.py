"""`pgroute check` with ``[cluster] etcd`` set, against a real pair and a real 3-member
etcd: each member asked on its own, the instance name and the route record."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pgroute.cluster.etcd_store import EtcdStore
from pgroute.cluster.keys import Keys
from pgroute.cluster.members import Membership
from pgroute.cluster.roster import Roster, RosterEntry, encode_roster
from pgroute.cluster.route import Route, RouteWriter
from pgroute.model import NodeName

from .harness import write_config_file

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PREFIX = "/pgroute/checktest"


async def _check(cfg) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgroute.cli",
        "check",
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_check_reports_etcd_name_route_and_that_cluster_mode_is_not_wired(pair, etcd, tmp_path) -> None:
    cfg = write_config_file(
        tmp_path / "pgroute.toml",
        pair.primary_dsn(),
        pair.mirror_dsn(),
        cluster={"etcd": etcd.endpoints, "name": "a", "prefix": PREFIX},
    )
    code, out = await _check(cfg)
    assert code == 0, out
    assert "cluster mode" not in out  # pgroute run runs as a cluster now
    assert f"✓ etcd: 3 of 3 members answer (prefix {PREFIX})" in out
    assert "✓ cluster name: a is held by no live instance" in out
    assert f"✓ route: {PREFIX}/route is absent" in out
    assert "✓ replication" in out or "✓ subscription" in out, out  # the pair's own items still run

    keys = Keys(PREFIX)
    async with EtcdStore(etcd.endpoints) as store:
        member = Membership(store, keys, "a", 5.0, proxy="h1:6432", api="h1:5000")
        await member.start()
        writer = RouteWriter(store, keys, "a")
        await writer.read()
        await writer.write(Route(epoch=3, active=NodeName.MIRROR))
        try:
            code, out = await _check(cfg)
            assert f"✓ roster: {PREFIX}/roster is absent: the first leader writes it" in out, out
            roster = Roster(4, (RosterEntry("a", "1", "http://h1:5000"), RosterEntry("b", "2", "")), frozenset({"a"}))
            await store.put(keys.roster, encode_roster(roster))
            code, out = await _check(cfg)
            assert "! roster: generation 4: a, b (not yet eligible to lead: b); without an API address: b" in out, out
            assert "    fix: set [cluster] advertise_api on those instances" in out
            assert "! cluster name: " in out and "proxy h1:6432" in out, out
            assert "    fix: give every instance its own [cluster] name" in out
            assert "✓ route: epoch 3, active mirror, written by a" in out

            # One member of three lost: a warning naming it; the quorum still answers.
            # The raft leader is the one killed, and check runs once the two left have
            # elected a new one: during the election no member serves a linearizable
            # read, and on a loaded machine that took longer than check's 2 s (CI).
            lost = await asyncio.to_thread(etcd.leader)
            lost.kill()
            await asyncio.to_thread(etcd.leader)
            code, out = await _check(cfg)
            assert f"! etcd: 2 of 3 members answer; not: {lost.endpoint}" in out, out
            assert "✓ route: epoch 3" in out
        finally:
            await member.close(revoke=False)

    # All of etcd gone: a failing line with the fix, and no hang.
    etcd.kill()
    code, out = await _check(cfg)
    assert code == 1
    assert "✗ etcd: no member answers" in out, out
    assert "    fix: start etcd, or fix [cluster] etcd" in out
