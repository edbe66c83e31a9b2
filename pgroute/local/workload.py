"""A writer that commits through pgroute and records every acknowledged commit, and
the check of which acknowledged commits a node lacks.

One writer serves the demo's tour, the integration tests and the benchmarks; what a
write is comes from a `Workload`:

- `Chrispar` alternates ``usuarios`` (serial key) and ``empleados`` (identity key) of
  the default schema, so both kinds of sequence are exercised across a switch;
- `Events` inserts ``(writer, seq)`` rows into the benchmarks' table
  (`EVENTS_SCHEMA`), the lightest write there is.

Invariants:

- A client never dies on an error: a failed connect or INSERT is counted, the
  connection is dropped and a new one is opened (a failover ends connections in
  every way asyncpg knows, ``InternalClientError`` included).
- A sequence number is never reused: an INSERT that got no answer may or may not
  have committed, so its row name must not come back with another write.
- `Writer.acks` is in acknowledgement order on one event loop's monotonic clock, so
  it can be bisected on time.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import collections
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import asyncpg

log = logging.getLogger(__name__)

EVENTS_TABLE = "bench_events"
EVENTS_SCHEMA = f"""
CREATE TABLE {EVENTS_TABLE} (
    id bigserial PRIMARY KEY,
    writer int NOT NULL,
    seq int NOT NULL,
    created timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (writer, seq)
);
"""
"""The `Events` workload's table (logical replication copies no DDL: create it on
both nodes, e.g. with ``create_pair(schema_sql=DEFAULT_SCHEMA + EVENTS_SCHEMA)``)."""

CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised, not an InterfaceError, when a connection dies in the middle of a
    # protocol state change: a failover does that.
    asyncpg.InternalClientError,
)
"""What a write through a failing-over proxy is expected to raise."""


class Ack(NamedTuple):
    """One acknowledged commit."""

    t: float  # time.monotonic() when the commit was acknowledged
    started: float  # time.monotonic() when the INSERT was sent
    client: int  # which of the writer's connections (1..clients)
    seq: int  # that client's write number, never reused
    table: str
    id: int  # the key the node gave the row
    name: str  # what identifies the row on any node, whatever its id
    port: int  # inet_server_port() of the node that committed it


class Row(NamedTuple):
    """What one INSERT wrote: see `Ack`."""

    table: str
    id: int
    name: str
    port: int


class Workload(abc.ABC):
    """What one write is, and how to find the writes again on a node."""

    @abc.abstractmethod
    async def insert(self, conn: asyncpg.Connection, client: int, seq: int, timeout: float) -> Row:
        """Commit write number `seq` of `client` (autocommit) and say what it wrote."""

    @abc.abstractmethod
    async def present(self, conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
        """Every row of this workload on the node: (table, name) -> id."""


class Chrispar(Workload):
    """Rows in ``usuarios`` (odd writes) and ``empleados`` (even writes), named
    ``<tag>-<seq>`` for the first client and ``<tag>-<client>-<seq>`` for others."""

    TABLES = ("usuarios", "empleados")

    def __init__(self, tag: str = "w") -> None:
        self.tag = tag

    def _name(self, client: int, seq: int) -> str:
        return f"{self.tag}-{seq}" if client == 1 else f"{self.tag}-{client}-{seq}"

    async def insert(self, conn: asyncpg.Connection, client: int, seq: int, timeout: float) -> Row:
        name = self._name(client, seq)
        if seq % 2:
            table = "usuarios"
            row = await conn.fetchrow(
                "INSERT INTO usuarios (nombre, email) VALUES ($1, $2) RETURNING id, inet_server_port()",
                name, f"{name}@example.com", timeout=timeout)  # fmt: skip
        else:
            table = "empleados"
            row = await conn.fetchrow(
                "INSERT INTO empleados (nombre) VALUES ($1) RETURNING id, inet_server_port()",
                name, timeout=timeout)  # fmt: skip
        return Row(table, row[0], name, row[1])

    async def present(self, conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for table in self.TABLES:
            for r in await conn.fetch(f"SELECT id, nombre FROM {table}"):
                out[(table, r["nombre"])] = r["id"]
        return out


class Events(Workload):
    """One row per write in `EVENTS_TABLE`, found again by ``(writer, seq)``."""

    INSERT = f"INSERT INTO {EVENTS_TABLE} (writer, seq) VALUES ($1, $2) RETURNING id, inet_server_port()"

    async def insert(self, conn: asyncpg.Connection, client: int, seq: int, timeout: float) -> Row:
        row = await conn.fetchrow(self.INSERT, client, seq, timeout=timeout)
        return Row(EVENTS_TABLE, row[0], f"{client}:{seq}", row[1])

    async def present(self, conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
        rows = await conn.fetch(f"SELECT id, writer, seq FROM {EVENTS_TABLE}")
        return {(EVENTS_TABLE, f"{r['writer']}:{r['seq']}"): r["id"] for r in rows}


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, *, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll `predicate` (a function, or one returning an awaitable) until it returns
    something true, and return that; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


class Writer:
    """`clients` connections through `dsn`, each committing one write at a time in
    a loop and recording every acknowledged one in `acks`; errors are counted by
    type in `errors` and the latest ones kept in `error_log` (monotonic time,
    client, message)."""

    def __init__(
        self,
        dsn: str,
        workload: Workload | None = None,
        *,
        clients: int = 1,
        connect_timeout: float = 5.0,
        query_timeout: float = 5.0,
        retry_sleep: float = 0.05,
        pause: float = 0.005,
    ) -> None:
        self.dsn = dsn
        self.workload = workload if workload is not None else Chrispar()
        self.clients = clients
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self.retry_sleep = retry_sleep
        self.pause = pause
        self.acks: list[Ack] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_log: collections.deque[tuple[float, int, str]] = collections.deque(maxlen=200)
        self._times: list[float] = []  # acks' times, for bisecting
        self._client_times: dict[int, list[float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self) -> Writer:
        """Start the clients (in the running event loop)."""
        self._tasks = [asyncio.create_task(self._client(c), name=f"writer-{c}") for c in range(1, self.clients + 1)]
        return self

    async def stop(self) -> None:
        """Stop the clients after their current write (cancel one that hangs)."""
        self._stopping.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self.query_timeout + self.connect_timeout + 2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, client: int) -> None:
        conn: asyncpg.Connection | None = None
        seq = 0
        try:
            while not self._stopping.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout, command_timeout=None)
                    seq += 1  # before the write: an unanswered INSERT may have committed
                    started = time.monotonic()
                    row = await self.workload.insert(conn, client, seq, self.query_timeout)
                    t = time.monotonic()
                    self.acks.append(Ack(t, started, client, seq, *row))
                    self._times.append(t)
                    self._client_times.setdefault(client, []).append(t)
                except CLIENT_ERRORS as exc:
                    self._failed(client, conn, exc)
                    conn = None
                    await self._sleep(self.retry_sleep)
                    continue
                except Exception as exc:
                    log.warning("writer client %d: unexpected %s: %s", client, type(exc).__name__, exc)
                    self._failed(client, conn, exc)
                    conn = None
                    await self._sleep(self.retry_sleep)
                    continue
                if self.pause:
                    await self._sleep(self.pause)
        finally:
            if conn is not None:
                conn.terminate()

    def _failed(self, client: int, conn: asyncpg.Connection | None, exc: BaseException) -> None:
        """Record a failed write and drop its connection (the caller opens a new one)."""
        self.errors[type(exc).__name__] += 1
        self.error_log.append((time.monotonic(), client, f"{type(exc).__name__}: {str(exc)[:160]}"))
        if conn is not None:
            conn.terminate()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the writer is stopped."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    # -- waiting for writes -------------------------------------------------------------

    @property
    def error_count(self) -> int:
        """How many writes failed (and were retried on a new connection)."""
        return sum(self.errors.values())

    async def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` more writes are acknowledged; TimeoutError names the last errors."""
        target = len(self.acks) + count
        try:
            await wait_until(
                lambda: len(self.acks) >= target, timeout, what=f"{count} more acknowledged writes", interval=0.01
            )
        except TimeoutError as exc:
            raise TimeoutError(f"writer: {exc}; last errors: {list(self.error_log)[-3:]}") from None

    def first_acked_after(self, t: float, port: int | None = None) -> Ack | None:
        """The first write acknowledged after monotonic time `t` (by the node on `port`)."""
        i = bisect.bisect_right(self._times, t)
        return next((a for a in self.acks[i:] if port is None or a.port == port), None)

    def first_started_after(self, t: float) -> Ack | None:
        """The first acknowledged write that was sent at or after monotonic time `t`."""
        return next((a for a in self.acks if a.started >= t), None)

    async def wait_first_acked_after(self, t: float, port: int | None = None, timeout: float = 60.0) -> Ack | None:
        """`first_acked_after`, waiting up to `timeout` for it; None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            a = self.first_acked_after(t, port)
            if a is not None or time.monotonic() > deadline:
                return a
            await asyncio.sleep(0.005)

    # -- queries over the record --------------------------------------------------------

    def max_gap(self, t0: float, t1: float) -> tuple[float, float, float]:
        """Longest interval with no acknowledged commit (from any client) that overlaps
        [t0, t1]: (seconds, gap start, gap end). Needs a commit after t1 to be meaningful."""
        return _max_gap(self._times, t0, t1)

    def max_client_gap(self, t0: float, t1: float) -> float:
        """The longest any one client went without an acknowledged commit, overlapping
        [t0, t1]: what a single application session experienced."""
        return max((_max_gap(ts, t0, t1)[0] for ts in self._client_times.values()), default=0.0)

    def errors_between(self, t0: float, t1: float) -> int:
        """Failed writes between monotonic times t0 and t1 (among the latest logged)."""
        return sum(1 for t, _, _ in self.error_log if t0 <= t <= t1)

    def error_samples(self) -> dict[str, str]:
        """The first message seen (among the latest logged) of each error type."""
        out: dict[str, str] = {}
        for _, _, msg in self.error_log:
            out.setdefault(msg.split(":", 1)[0], msg)
        return out


def _max_gap(times: list[float], t0: float, t1: float) -> tuple[float, float, float]:
    lo = max(bisect.bisect_right(times, t0) - 1, 0)
    hi = min(bisect.bisect_right(times, t1) + 1, len(times))
    best = (0.0, t0, t0)
    for a, b in zip(times[lo : hi - 1], times[lo + 1 : hi], strict=True):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


class AckCheck(NamedTuple):
    """Acknowledged writes a node does not hold as acknowledged."""

    absent: list[Ack]  # no row with the write's name
    changed: list[Ack]  # a row with its name but another id


async def check_acks(dsn: str, acks: Iterable[Ack], workload: Workload | None = None) -> AckCheck:
    """Which of `acks` the node at `dsn` lacks (see `AckCheck`)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        have = await (workload if workload is not None else Chrispar()).present(conn)
    finally:
        await conn.close()
    absent: list[Ack] = []
    changed: list[Ack] = []
    for a in acks:
        got = have.get((a.table, a.name))
        if got is None:
            absent.append(a)
        elif got != a.id:
            changed.append(a)
    return AckCheck(absent, changed)


async def missing(dsn: str, acks: Iterable[Ack], workload: Workload | None = None) -> list[Ack]:
    """Acknowledged writes that the node at `dsn` does not hold (absent, or under
    another id), in the order of `acks`."""
    acks = list(acks)
    check = await check_acks(dsn, acks, workload)
    lost = set(check.absent) | set(check.changed)
    return [a for a in acks if a in lost]
