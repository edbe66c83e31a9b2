"""Health from everyone (issue 14 item 7): three in-process instances on one real
pair and a real 3-member etcd, probing only every 30 s. The primary is killed with
SIGKILL while a writer goes through a FOLLOWER: its proxy's connects to the dead
primary fail, the follower says so in its member record, and the leader probes the
primary at once and fails over through the barrier well before its next scheduled
probe; nothing acknowledged is lost. The leader's /api/status shows the follower's
signal, and the signal clears once the route has moved.

Which signals do not trigger anything (old epoch, other node) is covered at unit
level (tests/unit/test_cluster_passive.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import pytest

from pgroute import app
from pgroute.local.workload import wait_until
from pgroute.model import NodeName

from .harness import Writer, make_config, missing, proxy_dsn, wait_following
from .test_cluster_run import leaders, member, routed

pytestmark = [pytest.mark.integration]

TTL = 3.0
#: Scheduled probes 30 s apart: only a passive signal makes the leader look sooner.
HEALTH = {"interval": 30.0, "max_retries": 2, "retry_interval": 0.2, "timeout": 1.0}
#: The property under test: the leader acts on the signal, well before its next probe.
NOTICED_WITHIN = 12.0


async def test_a_followers_failed_connects_make_the_leader_fail_over(pair, etcd, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgroute")
    prefix = f"/pgroute/test-{uuid.uuid4().hex[:6]}"
    runs: list[app.Running] = []
    try:
        for name in ("a", "b", "c"):
            state = tmp_path / name
            state.mkdir()
            cluster = {"etcd": etcd.endpoints, "name": name, "prefix": prefix, "ttl": TTL}
            runs.append(await app.start(make_config(pair, state, cluster=cluster, health=HEALTH)))
            if name == "a":
                await wait_until(lambda: member(runs[0]).leading, 30, what="a leads")
        await wait_until(lambda: len(leaders(runs)) == 1, 30, what="one leader")
        await wait_until(lambda: all(routed(r)[0] == "primary" for r in runs), 30, what="all route to primary")
        leader = leaders(runs)[0]
        follower = next(r for r in runs if r is not leader)
        epoch0 = routed(leader)[1]
        name = member(follower).name
        controller = member(leader).controller
        # The leader's controller must know the mirror follows before it may fail
        # over; with 30 s between probes, ask for them now (the next scheduled ones
        # are then 30 s away).
        for node in NodeName:
            controller.monitor.probe_soon(node, 0.0)
        await wait_following(leader)

        # Everything the leader's status shows of the follower's signal, meanwhile.
        seen: list[dict[str, Any]] = []

        async def watch_status() -> None:
            while True:
                for m in member(leader).control.status()["cluster"]["members"]:
                    if m["name"] == name and m["unreachable"] is not None:
                        seen.append(m["unreachable"])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_status())
        writer = Writer(proxy_dsn(follower)).start()
        try:
            await writer.wait_acked(20)
            pair.wait_synced()
            at_kill = len(writer.acks)
            t_kill = time.monotonic()
            pair.primary.kill()
            await wait_until(
                lambda: all(routed(r) == ("mirror", epoch0 + 1) for r in runs),
                NOTICED_WITHIN,
                what="every instance routes to the mirror",
            )
            print(f"primary killed; every instance on the mirror after {time.monotonic() - t_kill:.2f}s")
            first = await writer.wait_first_acked_after(t_kill, timeout=30)
            assert first is not None
            print(f"first write through follower {name} after the kill: {first.t - t_kill:.2f}s")
        finally:
            await writer.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        lost = await missing(pair.mirror_dsn(), writer.acks)
        assert not [m for m in lost if writer.acks.index(m) >= at_kill], lost

        # The leader probed because of the follower's signal, and that probe (not the
        # signal) led to the failover.
        lines = [r.getMessage() for r in caplog.records if r.name == "pgroute.control.controller"]
        heard = next(i for i, line in enumerate(lines) if line.startswith(f"member {name} could not reach primary"))
        failover = next(i for i, line in enumerate(lines) if "FAILOVER to mirror" in line)
        assert heard < failover, lines
        print(lines[heard])

        # The leader's status showed the signal: the node and epoch it was about, no DSN.
        assert seen, "the leader's /api/status never showed the follower's signal"
        assert seen[0]["node"] == "primary" and seen[0]["epoch"] == epoch0 and seen[0]["count"] >= 1, seen[0]
        assert "postgresql://" not in seen[0]["error"], seen[0]
        # The route moved: every member's signal clears.
        await wait_until(
            lambda: all(m["unreachable"] is None for m in member(leader).cluster_status()["members"]),
            10,
            what="signals cleared",
        )
    finally:
        for running in runs:
            with contextlib.suppress(Exception):
                await running.stop()
