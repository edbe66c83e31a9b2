"""pgroute killed (SIGKILL) at every phase boundary of failover, switchover, failback
and rejoin, then started again: each restart either routes by itself to the node
that holds every acknowledged commit, or fails closed with a reason that ``pgroute
resolve`` fixes. Never a route to a node missing an acknowledged commit.

pgroute runs as a real process; ``PGROUTE_FAULT_CRASH_AT=<operation>:<phase>`` makes
it SIGKILL itself as that phase starts (the phase boundary), with nothing cleaned
up. Each case prints one line (run with ``-s`` to collect the counts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pgroute import local
from pgroute.local.workload import Writer, missing, wait_until

from .harness import FAST_HEALTH

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]

SWITCH_PHASES = ("drain", "fence", "catch_up", "promote", "route", "resubscribe")
REJOIN_PHASES = ("divergence", "drop_orphaned_slot", "subscribe", "catch_up")
CASES = (
    [("switchover", p) for p in SWITCH_PHASES]
    + [("failover", p) for p in ("fence", "catch_up", "promote", "route")]  # manual, both up
    + [("failover-kill9", p) for p in ("fence", "promote", "route")]  # automatic, primary killed
    + [("failback", p) for p in SWITCH_PHASES]  # its rejoin phases: the rejoin cases below
    + [("rejoin", p) for p in REJOIN_PHASES]
)


class Pgroute:
    """One `pgroute run` process on fixed ports."""

    def __init__(self, config: Path, log: Path, proxy_port: int, api_port: int) -> None:
        self.config, self.log = config, log
        self.proxy_port, self.api_port = proxy_port, api_port
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, crash_at: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if k != "PGROUTE_FAULT_CRASH_AT"}
        if crash_at:
            env["PGROUTE_FAULT_CRASH_AT"] = crash_at
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgroute.cli", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
            )
        await wait_until(self._answers, 30, what="pgroute API")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"pgroute exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            self.status()
            return True
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/api/status", timeout=5) as r:
            return dict(json.loads(r.read()))

    def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", method="POST", data=json.dumps(body or {}).encode()
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError as exc:  # the process died under the request
            return 0, str(exc)

    async def wait_killed(self, timeout: float = 60) -> None:
        assert self.proc is not None
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, timeout, what="pgroute killed at its crash point")
        assert proc.returncode == -signal.SIGKILL, proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.asynccontextmanager
async def pgroute_for(pair: local.LocalPair, tmp: Path) -> AsyncIterator[Pgroute]:
    proxy_port, api_port = local.free_port(), local.free_port()
    health = "\n".join(f"{k} = {v}" for k, v in FAST_HEALTH.items())
    config = tmp / "pgroute.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{proxy_port}"\npause_timeout = 30.0\n'
        f'[primary]\ndsn = "{pair.primary_dsn()}"\n[mirror]\ndsn = "{pair.mirror_dsn()}"\n'
        f'[replication]\npublication = "{pair.publication}"\nsubscription = "{pair.subscription}"\n'
        f"[health]\n{health}\n"
        f'[api]\nlisten = "127.0.0.1:{api_port}"\n'
        f'[state]\npath = "{tmp / "state.json"}"\nrecovery_dir = "{tmp / "recovery"}"\n'
    )
    p = Pgroute(config, tmp / "pgroute.log", proxy_port, api_port)
    try:
        yield p
    finally:
        p.stop()


def following(st: dict[str, Any]) -> bool:
    standby = "mirror" if st["active"] == "primary" else "primary"
    return st["replication"] == "ok" and st["nodes"][standby]["lag_bytes"] is not None


async def wait_status(p: Pgroute, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = p.status()
        return st if pred(st) else None

    result: dict[str, Any] = await wait_until(check, timeout, what=what)
    return result


@pytest.mark.parametrize("op, phase", CASES, ids=[f"{o}-{p}" for o, p in CASES])
async def test_kill_pgroute_at_phase_boundary(pair, tmp_path, op, phase):
    async with pgroute_for(pair, tmp_path) as p:
        kind = "failover" if op == "failover-kill9" else op
        await p.start(crash_at=f"{kind}:{phase}")
        await wait_status(p, following, 30, "mirror following")
        writer = Writer(f"postgresql://postgres@127.0.0.1:{p.proxy_port}/{pair.dbname}").start()
        try:
            await wait_until(lambda: len(writer.acks) >= 20, 30, what="writes")
            await trigger(p, pair, op)
            await p.wait_killed()
            await p.start()  # no fault this time
            outcome = await settle(p, pair, writer)
        finally:
            await writer.stop()
        st = p.status()
        active = st["active"]
        assert active in ("primary", "mirror"), st
        dsn = pair.primary_dsn() if active == "primary" else pair.mirror_dsn()
        lost = await missing(dsn, writer.acks)
        assert lost == [], f"{active} lacks {len(lost)} acknowledged write(s) after {outcome}"
        # The other node is never open to clients: it follows, is fenced, or is down.
        other = st["nodes"]["mirror" if active == "primary" else "primary"]
        assert other["role"] in ("standby", "fenced", "down"), other
        print(f"\ncrash at {op}:{phase}: {outcome}")


async def trigger(p: Pgroute, pair: local.LocalPair, op: str) -> None:
    if op in ("switchover", "failover"):
        await asyncio.to_thread(p.post, f"/api/{op}", {})
    elif op == "failover-kill9":
        pair.primary.kill()
    elif op == "failback":
        # A kill -9 failover first; the primary comes back, is fenced and rejoined
        # automatically; then the failback switches back to it.
        pair.primary.kill()
        await wait_status(p, lambda s: s["active"] == "mirror" and s["state"] != "failing_over", 30, "failover")
        pair.primary.start()
        await wait_status(p, lambda s: s["active"] == "mirror" and following(s), 60, "primary rejoined")
        await asyncio.to_thread(p.post, "/api/failback", {})
    elif op == "rejoin":
        pair.primary.kill()
        await wait_status(p, lambda s: s["active"] == "mirror" and s["state"] != "failing_over", 30, "failover")
        pair.primary.start()  # pgroute fences it, then rejoins it automatically
    else:
        raise AssertionError(op)


async def settle(p: Pgroute, pair: local.LocalPair, writer: Writer) -> str:
    """After the restart (a node the scenario killed still down): routed by itself, or
    failed closed and resolved; then the killed node comes back and rejoins."""
    routable = ("primary", "mirror")
    try:
        st = await wait_status(
            p,
            lambda s: s["active"] in routable and s["nodes"][s["active"]]["up"] and s["state"] != "failing_over",
            60,
            "routed",
        )
        outcome = f"routed to {st['active']} by itself (epoch {st['epoch']})"
    except TimeoutError:
        st = p.status()
        if st["state"] != "no_routable_node":
            raise AssertionError(f"neither routed nor failed closed: {st['state']}: {st['reason']}") from None
        reason = st["reason"]
        holder = await node_with_every_ack(pair, writer)
        code, body = await asyncio.to_thread(p.post, "/api/resolve", {"active": holder})
        assert code == 200, body
        outcome = f"failed closed ({reason}); resolve {holder} fixed it"
    for node in (pair.primary, pair.mirror):
        if not node.is_running():
            node.start()  # it comes back: fenced, its divergent commits recovered, rejoined
    await wait_status(p, following, 90, "both nodes back in replication")
    return outcome


async def node_with_every_ack(pair: local.LocalPair, writer: Writer) -> str:
    for name, dsn in (("primary", pair.primary_dsn()), ("mirror", pair.mirror_dsn())):
        if not await missing(dsn, list(writer.acks)):
            return name
    raise AssertionError("no node holds every acknowledged write")
