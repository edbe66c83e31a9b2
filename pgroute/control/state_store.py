"""Persisted routing state (epoch, active node) and how pgroute decides where to route at start.

The state file is written atomically (temp file, fsync, rename, fsync of the
directory) before the Router is pointed at a new node. The same epoch is stamped on
the nodes themselves (see replication.write_stamp), so a lost or stale state file
cannot make pgroute route to a stale node: at start the highest epoch wins, and when
pgroute cannot tell, it routes to no node and says why (``resolve_start``, pure).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from ..files import NotRegularFile, read_regular_file
from ..model import NodeName
from ..pg.catalog import ServerIdentity

log = logging.getLogger(__name__)

#: Epochs count switches: PostgreSQL's largest bigint is far past any real count.
#: WAL positions (pg_lsn) are 64-bit unsigned.
MAX_EPOCH = 2**63 - 1
MAX_LSN = 2**64 - 1


def _is_int(value: object, high: int) -> TypeGuard[int]:
    # bool is an int subclass: true must not pass as epoch 1.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


@dataclass(frozen=True)
class Stored:
    epoch: int
    active: NodeName | None
    # The active node's WAL position last sampled (bytes): after a restart with the
    # active node down, the standby's applied position against it estimates the lag
    # (Patroni keeps the leader's optime for the same reason).
    active_lsn: int | None = None


class StateFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> Stored | None:
        """None when the file does not exist. A corrupt file raises ValueError naming
        the file: that is not a fresh start and must not be treated as one. Corrupt
        includes any epoch but a JSON integer 0..2**63-1 (1.9 is not epoch 1, 1e400 is
        not a number pgroute can stamp, true is not 1) and an active_lsn that is not
        a 64-bit WAL position. Only a regular file is read (a FIFO would hang)."""
        try:
            raw = read_regular_file(self.path)
        except FileNotFoundError:
            return None
        except NotRegularFile as exc:
            raise ValueError(f"corrupt state file {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            raise ValueError(f"corrupt state file {self.path}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"corrupt state file {self.path}: not a JSON object")
        epoch = data.get("epoch")
        if not _is_int(epoch, MAX_EPOCH):
            raise ValueError(f"corrupt state file {self.path}: epoch {epoch!r} is not an integer 0..{MAX_EPOCH}")
        lsn = data.get("active_lsn")
        if lsn is not None and not _is_int(lsn, MAX_LSN):
            raise ValueError(f"corrupt state file {self.path}: active_lsn {lsn!r} is not a WAL position")
        active = data.get("active")
        if active is not None and active not in {n.value for n in NodeName}:
            raise ValueError(f"corrupt state file {self.path}: active {active!r} is not a node")
        return Stored(epoch=epoch, active=NodeName(active) if active else None, active_lsn=lsn)

    def save(self, stored: Stored) -> None:
        directory = self.path.parent if str(self.path.parent) else Path(".")
        directory.mkdir(parents=True, exist_ok=True)
        data: dict[str, object] = {
            "epoch": stored.epoch,
            "active": stored.active.value if stored.active else None,
            "updated_at": time.time(),
        }
        if stored.active_lsn is not None:
            data["active_lsn"] = stored.active_lsn
        payload = json.dumps(data)
        fd, tmp = tempfile.mkstemp(prefix=".pgroute-state-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class NodeView:
    """What pgroute could read from a node at start."""

    reachable: bool
    epoch: int | None = None  # stamped epoch
    active: str | None = None  # stamped active node name ('primary', 'mirror', 'none')
    subscriber: bool = False  # holds a pgroute subscription
    read_only: bool = False  # any part of the fence is in force
    identity: ServerIdentity | None = None  # which database the DSN reached


@dataclass(frozen=True)
class Resolution:
    active: NodeName | None
    epoch: int
    reason: str
    unfence: bool = False  # the active node was left fenced by a switch that promoted nothing


def resolve_start(stored: Stored | None, views: dict[NodeName, NodeView]) -> Resolution:
    """Decide the active node at start. Highest epoch wins; fail closed when unsure."""
    claims: list[tuple[int, str | None, str]] = []
    if stored is not None:
        claims.append((stored.epoch, stored.active.value if stored.active else "none", "state file"))
    for node, view in views.items():
        if view.reachable and view.epoch is not None:
            claims.append((view.epoch, view.active, f"stamp on {node.value}"))
    unreachable = [n.value for n, v in views.items() if not v.reachable]

    if not claims:
        if unreachable:
            return Resolution(
                None,
                0,
                "no state file and no epoch stamp, and "
                f"{', '.join(unreachable)} unreachable: cannot tell which node is current",
            )
        p = views[NodeName.PRIMARY]
        if p.subscriber or p.read_only:
            return Resolution(
                None, 0, "fresh start but primary is a subscriber or read-only: cannot tell which node is current"
            )
        return Resolution(NodeName.PRIMARY, 0, "fresh start: no state file, no stamps; primary is active")

    top = max(c[0] for c in claims)
    winners = {c[1] for c in claims if c[0] == top}
    sources = ", ".join(c[2] for c in claims if c[0] == top)
    if len(winners) > 1:
        return Resolution(None, top, f"epoch {top} claims disagree ({sources}): cannot tell which node is current")
    winner = winners.pop()
    if winner in (None, "none"):
        return Resolution(None, top, f"epoch {top} routes to no node ({sources})")
    node = NodeName(winner)
    if stored is None and unreachable:
        # Without the file, a node that was down at the last switch may carry an older
        # stamp and the reachable one may not have the newest: require both stamps.
        return Resolution(
            None, top, f"state file missing and {', '.join(unreachable)} unreachable: cannot tell which node is current"
        )
    winner_view = views.get(node)
    if winner_view is not None and winner_view.reachable and winner_view.read_only and not winner_view.subscriber:
        # A switch fenced it and stopped before promoting the other node. That is
        # certain only when the other node still follows it: a subscriber was not
        # promoted, and (with the claims above agreeing) no newer epoch exists.
        other = views.get(node.other)
        if other is not None and other.reachable and other.subscriber and all(c[1] == winner for c in claims):
            return Resolution(
                node,
                top,
                f"epoch {top}: {node.value} is active ({sources}) and was left fenced by a switch that "
                f"promoted nothing ({node.other.value} still follows it): unfencing it",
                unfence=True,
            )
        why = (
            f"{node.other.value} is unreachable"
            if other is None or not other.reachable
            else f"{node.other.value} does not follow it"
            if not other.subscriber
            else "an older epoch names another node"
        )
        return Resolution(
            None,
            top,
            f"epoch {top} says {node.value} is active but it is fenced (read-only) and {why}: "
            "cannot tell which node is current",
        )
    return Resolution(node, top, f"epoch {top}: {node.value} is active ({sources})")
