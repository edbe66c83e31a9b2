"""`pgroute demo --cluster`: one local pair, a local 3-member etcd and three pgroute
instances sharing one route (cluster mode), until Ctrl-C.

Owns the cluster demo's run: the servers (the same seed as `pgroute demo`), the etcd
members (pgroute.local.etcd) and the instances (pgroute.local.instances, shared with
bench/cluster.py), what it prints (the multi-host DSN, each instance's API and pid,
who leads, and what to try), the watch that says when the leader or an instance
changes, and the clean-up of all of it.

The instances are `pgroute run` processes, not `app.start` in this process: the
point of the demo is to kill one (``kill -9`` of the leader) and watch another take
over while clients move to the next host of the DSN; an instance in this process
could not be killed alone.

Invariants: everything lives in the demo's directory (etcd data too) and is removed
on SIGINT, SIGTERM or SIGHUP; the instances stop before etcd and the servers
(a stopping instance gives its leader key up and drains its sessions).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from pgroute import local
from pgroute.errors import LocalClusterError
from pgroute.local.etcd import LocalEtcdCluster, create_etcd_cluster
from pgroute.local.instances import LocalInstances

from .setup import (
    API_PORT,
    DBNAME,
    HEALTH,
    PROXY_PORT,
    create_demo_pair,
    ignore_stop_signals,
    pgroute_command,
    pick_port,
    say,
    start_with_retries,
    stop_signals,
)

log = logging.getLogger(__name__)

NAMES = ("a", "b", "c")
#: Lease seconds of the leader key and the member records: a killed leader is
#: replaced within about this long.
TTL = 3.0


def _ports(avoid: set[int]) -> list[tuple[int, int]]:
    """(proxy, API) per instance: 6432.. and 5000.. when free, free ports otherwise."""
    ports = []
    taken = set(avoid)
    for i in range(len(NAMES)):
        proxy = pick_port(PROXY_PORT + i, taken)
        taken.add(proxy)
        api = pick_port(API_PORT + i, taken)
        taken.add(api)
        ports.append((proxy, api))
    return ports


def cluster_main(base: Path) -> int:
    """Set up, run until a stop signal, clean up. The caller removes ``base``."""
    pair: local.LocalPair | None = None
    etcd: LocalEtcdCluster | None = None
    instances: LocalInstances | None = None
    try:
        say(f"pgroute demo --cluster: starting a primary, a mirror and 3 etcd members in {base} ...")
        started = time.monotonic()
        pair = create_demo_pair(base / "pair")
        etcd = create_etcd_cluster(3, base=base / "etcd")
        avoid = {pair.primary.port, pair.mirror.port} | {p for m in etcd.members for p in (m.client_port, m.peer_port)}
        instances = LocalInstances(
            base,
            pair,
            etcd.endpoints,
            names=NAMES,
            ttl=TTL,
            health=HEALTH,
            prefix=f"/pgroute/{DBNAME}",
            ports=_ports(avoid),
            header="pgroute demo --cluster: one instance of three (removed when the demo stops).",
            recovery_dir=base / "recovery",  # kept at the end, as by `pgroute demo`
        )
        say(f"pgroute demo --cluster: servers and etcd up in {time.monotonic() - started:.1f} s, starting 3 instances")
        instances.start(timeout=60)
        say(f"pgroute demo --cluster: ready in {time.monotonic() - started:.1f} s")
        return _run(base, pair, etcd, instances)
    except LocalClusterError as exc:
        say(f"pgroute demo: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        say("pgroute demo: interrupted", err=True)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            ignore_stop_signals()
        if instances is not None:
            say("pgroute demo: stopping the pgroute instances ...")
            instances.stop()
        if etcd is not None:
            etcd.destroy()
        if pair is not None:
            pair.destroy()
        if pair is not None or etcd is not None:
            say("pgroute demo: instances, etcd members, primary and mirror stopped")


def _run(base: Path, pair: local.LocalPair, etcd: LocalEtcdCluster, instances: LocalInstances) -> int:
    """Print the welcome, then watch until a stop signal; SIGUSR1 starts again
    whatever was killed (instances and servers)."""
    stop = threading.Event()
    restart = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        restart.set()

    if threading.current_thread() is threading.main_thread():
        for sig in stop_signals():
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGUSR1, on_usr1)
    leader = instances.leader()
    _welcome(pair, etcd, instances, leader.name if leader else None)
    shown_leader = leader.name if leader else None
    alive = {i.name: i.pid for i in instances}
    while not stop.wait(0.5):
        now = instances.leader()
        if now is not None and now.name != shown_leader:
            say(f">>> {now.name} leads now (pid {now.pid}, API {now.api_url}); `kill -9 {now.pid}` crashes it.")
            shown_leader = now.name
        for instance in instances:
            if alive.get(instance.name) and not instance.is_running():
                say(
                    f">>> instance {instance.name} (pid {alive[instance.name]}) is gone: its clients move to the "
                    f"next host of the DSN. `kill -USR1 {os.getpid()}` starts it again."
                )
            alive[instance.name] = instance.pid
        if restart.is_set() and not stop.is_set():
            restart.clear()
            _restart(pair, instances)
    say("\npgroute demo: stopping ...")
    return 0


def _restart(pair: local.LocalPair, instances: LocalInstances) -> None:
    for cluster in (pair.primary, pair.mirror):
        if not cluster.is_running():
            try:
                start_with_retries(cluster)
                say(f">>> {cluster.name} started again (pid {cluster.postmaster_pid()}, port {cluster.port}).")
            except LocalClusterError as exc:
                say(f">>> could not start {cluster.name}: {exc}", err=True)
    for instance in instances:
        if not instance.is_running():
            say(f">>> starting instance {instance.name} again (its old member record may hold the name for {TTL:g} s)")
            try:
                instance.start_again(timeout=TTL + 30)
                say(f">>> instance {instance.name} is back (pid {instance.pid}).")
            except LocalClusterError as exc:
                say(f">>> could not start instance {instance.name}: {exc}", err=True)


def _welcome(pair: local.LocalPair, etcd: LocalEtcdCluster, instances: LocalInstances, leader: str | None) -> None:
    cmd = pgroute_command()
    dsn = instances.multi_host_dsn(DBNAME)
    lead = instances[leader] if leader else None
    say(f"""
pgroute demo --cluster is running (Ctrl-C stops it and removes everything).

Point your application at every instance (libpq tries the next host when one is down):
  DATABASE_URL={dsn}
  psql '{dsn}' -c 'SELECT * FROM usuarios'
""")
    for i in instances:
        role = "leader" if i.name == leader else "follower"
        say(f"  instance {i.name}  proxy {i.proxy}  API {i.api_url}  pid {i.pid}  {role}")
    say(f"""
  etcd     {", ".join(etcd.endpoints)} (prefix {instances.prefix}, ttl {TTL:g} s)
  primary  {pair.primary.host}:{pair.primary.port} (pid {pair.primary.postmaster_pid()})
  mirror   {pair.mirror.host}:{pair.mirror.port} (pid {pair.mirror.postmaster_pid()})
  leader   {leader or "(none yet)"}
  logs     {instances.base}/<name>/pgroute.log

Things to try, in another terminal:
  # the cluster: leader, members and the epoch each applied
  {cmd} status --api {lead.api_url if lead else instances.instances[0].api_url}""")
    if lead is not None:
        say(f"""  # crash the leader: another instance takes the leader key within about {TTL:g} s
  kill -9 {lead.pid}""")
    say(f"""  # crash the primary: the leader fails over through the barrier, every instance follows
  kill -9 {pair.primary.postmaster_pid()}
  # start whatever was killed again (instances and servers)
  kill -USR1 {os.getpid()}
  # commands work against any instance (a follower forwards them to the leader)
  {cmd} failback --yes --api {instances.instances[-1].api_url}
""")


def etcd_missing() -> str | None:
    """Why the cluster demo cannot run here (no etcd binary), or None."""
    from pgroute.local.etcd import find_etcd

    try:
        find_etcd()
    except LocalClusterError as exc:
        return str(exc)
    return None
