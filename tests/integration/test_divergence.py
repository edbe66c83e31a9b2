"""Divergent commits on a real pair: written on the primary while the mirror's
subscription is disabled, primary SIGKILLed, subscription dropped as failover
does, primary restarted; then read (peek only), applied to the mirror with a
colliding row, written to recovery files, and replayed on a scratch database."""

from __future__ import annotations

import json
import time

import asyncpg
import pytest

from pgroute.control.divergence import apply_divergent, read_divergent, to_sql, write_recovery_files
from pgroute.local import DEFAULT_SCHEMA
from pgroute.pg.pgoutput import Change, ChangeKind

# matrix: also run on every PostgreSQL major version by `make test-matrix` (issue 15).
pytestmark = pytest.mark.matrix

SLOT = "chrispar_sub"
PUB = "chrispar_pub"

BASE_ROWS = """
INSERT INTO usuarios (nombre, email) VALUES ('Ana', 'ana@x'), ('Bob', 'bob@x'), ('Carla', 'carla@x');
INSERT INTO empleados (nombre, usuario_id) VALUES ('Eva', 1);
"""

# Three divergent transactions: a NULL, a quote, a backslash, non-ASCII text,
# an update, a delete, an identity (GENERATED ALWAYS) row, a timestamptz.
DIVERGENT = [
    "INSERT INTO usuarios (nombre, email) VALUES ('O''Reilly', NULL), ('Zoë \\ back', 'z@x');",  # ids 4, 5
    "UPDATE usuarios SET nombre = 'Ana María' WHERE id = 1; DELETE FROM usuarios WHERE id = 2;",
    "INSERT INTO empleados (nombre, usuario_id) VALUES ('Eve \"Quoted\"', 4);"  # identity id 2
    " INSERT INTO pedidos (usuario_id, total) VALUES (4, 10.50);",
]

TABLES = ("usuarios", "empleados", "pedidos")


def _table(change: Change) -> str:
    """The table a decoded change is on (read_divergent resolves every relation)."""
    assert change.relation is not None
    return change.relation.name


def _dump(cluster, dbname: str) -> dict[str, str]:
    return {t: cluster.sql(f"SELECT * FROM {t} ORDER BY id", dbname) for t in TABLES}


def _wait(cluster, query: str, dbname: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while cluster.sql(query, dbname) != "t":
        assert time.monotonic() < deadline, f"timed out waiting for: {query}"
        time.sleep(0.05)


async def test_divergent_commits_are_recovered(pair, tmp_path) -> None:
    db = pair.dbname
    pair.primary.sql(BASE_ROWS, db)
    pair.wait_synced()

    # The mirror stops receiving; the primary keeps committing.
    pair.mirror.sql(f"ALTER SUBSCRIPTION {SLOT} DISABLE", db)
    _wait(pair.primary, f"SELECT NOT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'", db)
    for statement in DIVERGENT:
        pair.primary.sql(f"BEGIN; {statement} COMMIT;", db)
    expected = _dump(pair.primary, db)

    # Failover as the controller does it: publisher down, slot detached, dropped.
    pair.primary.kill()
    # What the mirror applied, by its own crash-safe record (gone with the
    # subscription, so read first).
    applied_lsn = pair.mirror.sql(
        "SELECT s.remote_lsn FROM pg_replication_origin_status s"
        " JOIN pg_subscription sub ON s.external_id = 'pg_' || sub.oid"
        f" WHERE sub.subname = '{SLOT}'",
        db,
    )
    pair.mirror.sql(f"ALTER SUBSCRIPTION {SLOT} SET (slot_name = NONE)", db)
    pair.mirror.sql(f"DROP SUBSCRIPTION {SLOT}", db)
    # The mirror takes writes: one row exactly like a divergent one, one that
    # collides with divergent id 5 (the sequence set so nextval hands out 5).
    pair.mirror.sql(
        "INSERT INTO usuarios (id, nombre, email) VALUES (4, 'O''Reilly', NULL);"
        "SELECT setval('usuarios_id_seq', 4);"
        "INSERT INTO usuarios (nombre, email) VALUES ('Marta', 'marta@x');",
        db,
    )
    assert pair.mirror.sql("SELECT nombre FROM usuarios WHERE id = 5", db) == "Marta"

    # The old primary returns fenced (read-only), as failback finds it.
    pair.primary.start()
    pair.primary.set_settings(default_transaction_read_only="on")
    slot_before = pair.primary.sql(
        f"SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'", db
    )

    primary = await asyncpg.connect(pair.primary_dsn())
    mirror = await asyncpg.connect(pair.mirror_dsn())
    try:
        assert await primary.fetchval("SHOW default_transaction_read_only") == "on"
        divset = await read_divergent(primary, SLOT, PUB, applied_lsn=applied_lsn)
        again = await read_divergent(primary, SLOT, PUB, applied_lsn=applied_lsn)
        unfiltered = await read_divergent(primary, SLOT, PUB)
        missing = await read_divergent(primary, "no_such_slot", PUB)

        assert divset.slot_found and not missing.slot_found and missing.empty
        assert again.transactions == divset.transactions
        # After SIGKILL the slot's confirmed_flush_lsn is the last one saved to
        # disk, so the raw peek may also hold transactions the mirror applied
        # (here: the base rows, unless a checkpoint ran in between).
        extra = len(unfiltered.transactions) - len(divset.transactions)
        assert extra == divset.already_applied >= 0
        assert unfiltered.transactions[extra:] == divset.transactions
        assert divset.applied_lsn is not None  # given: applied_lsn=
        assert all(tx.end_lsn <= divset.applied_lsn for tx in unfiltered.transactions[:extra])
        kinds = [[(c.kind, _table(c)) for c in tx.changes] for tx in divset.transactions]
        assert kinds == [
            [(ChangeKind.INSERT, "usuarios"), (ChangeKind.INSERT, "usuarios")],
            [(ChangeKind.UPDATE, "usuarios"), (ChangeKind.DELETE, "usuarios")],
            [(ChangeKind.INSERT, "empleados"), (ChangeKind.INSERT, "pedidos")],
        ]
        first = divset.transactions[0].changes
        assert first[0].new == ("4", "O'Reilly", None)
        assert first[1].new == ("5", "Zoë \\ back", "z@x")
        third = divset.transactions[2].changes[0].new
        assert third is not None and third[:2] == ("2", 'Eve "Quoted"')
        assert divset.confirmed_flush_lsn is not None
        assert all(tx.commit_lsn > divset.confirmed_flush_lsn for tx in divset.transactions)
        # Peeking consumed nothing.
        assert (
            pair.primary.sql(f"SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'", db)
            == slot_before
        )

        report = await apply_divergent(mirror, divset)
        assert report.skipped_identical == 1  # id 4, already on the mirror
        assert report.applied == 4  # update 1, delete 2, empleados 2, pedidos 1
        assert len(report.conflicts) == 1
        conflict = report.conflicts[0]
        assert (conflict.table, conflict.kind, conflict.key) == ("public.usuarios", "insert", {"id": "5"})
        assert conflict.divergent == {"id": "5", "nombre": "Zoë \\ back", "email": "z@x"}
        assert conflict.active == {"id": "5", "nombre": "Marta", "email": "marta@x"}
        assert report.partial_transactions == (divset.transactions[0].xid,)
        assert {r.kind for r in report.replaced} == {"update", "delete"}

        # The mirror's colliding row was not overwritten; the rest arrived.
        rows = await mirror.fetch("SELECT id, nombre, email FROM usuarios ORDER BY id")
        assert [tuple(r) for r in rows] == [
            (1, "Ana María", "ana@x"),
            (3, "Carla", "carla@x"),
            (4, "O'Reilly", None),
            (5, "Marta", "marta@x"),
        ]
        assert await mirror.fetchval("SELECT nombre FROM empleados WHERE id = 2") == 'Eve "Quoted"'
        assert await mirror.fetchval("SELECT total::text FROM pedidos WHERE id = 1") == "10.50"
        primary_creado = await primary.fetchval("SELECT creado FROM pedidos WHERE id = 1")
        assert await mirror.fetchval("SELECT creado FROM pedidos WHERE id = 1") == primary_creado
        # Sequences moved past the replayed ids.
        assert await mirror.fetchval("SELECT nextval('empleados_id_seq')") == 3
        assert await mirror.fetchval("SELECT nextval('pedidos_id_seq')") == 2

        # Re-running is harmless: nothing applied twice, the conflict stays one.
        rerun = await apply_divergent(mirror, divset)
        assert (rerun.applied, rerun.skipped_identical, len(rerun.conflicts)) == (0, 5, 1)
        # Replaying the unfiltered peek converges to the same state (replayed
        # history, in order, ends where it ended), though rows changed later
        # in that history show up as conflicts.
        state = _dump(pair.mirror, db)
        raw = await apply_divergent(mirror, unfiltered)
        assert _dump(pair.mirror, db) == state
        assert conflict in raw.conflicts
    finally:
        await primary.close()
        await mirror.close()

    jsonl, sql_path = write_recovery_files(tmp_path, divset, report, "divergent-test")
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    changes = [x for x in lines if "kind" in x and not x.get("conflict") and not x.get("replaced")]
    assert len(changes) == 6
    assert {(x["table"], x["kind"]) for x in changes} >= {("usuarios", "delete"), ("pedidos", "insert")}
    assert [x["new"] for x in changes if x["table"] == "usuarios" and x["kind"] == "insert"] == [
        {"id": "4", "nombre": "O'Reilly", "email": None},
        {"id": "5", "nombre": "Zoë \\ back", "email": "z@x"},
    ]
    conflicts = [x for x in lines if x.get("conflict")]
    assert len(conflicts) == 1 and conflicts[0]["active"]["nombre"] == "Marta"
    assert sql_path.read_text(encoding="utf-8") == to_sql(divset.transactions, divset.relations)

    # The SQL replayed on a copy of the pre-divergence state reproduces the
    # old primary exactly.
    pair.mirror.sql("CREATE DATABASE scratch")
    pair.mirror.sql(DEFAULT_SCHEMA + BASE_ROWS, "scratch")
    pair.mirror.sql(sql_path.read_text(encoding="utf-8"), "scratch")
    assert _dump(pair.mirror, "scratch") == expected
    assert _dump(pair.primary, db) == expected


async def test_no_divergence_after_a_clean_sync(pair) -> None:
    pair.primary.sql(BASE_ROWS, pair.dbname)
    pair.wait_synced()
    pair.mirror.sql(f"ALTER SUBSCRIPTION {SLOT} DISABLE", pair.dbname)
    # Peeking needs the slot released by the (now stopping) walsender.
    _wait(pair.primary, f"SELECT NOT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'", pair.dbname)
    conn = await asyncpg.connect(pair.primary_dsn())
    try:
        divset = await read_divergent(conn, SLOT, PUB)
    finally:
        await conn.close()
    assert divset.slot_found and divset.empty and divset.change_count == 0


MATRIX_SCHEMA = (
    DEFAULT_SCHEMA
    + """
CREATE TABLE notas (id int PRIMARY KEY, txt text);
ALTER TABLE notas REPLICA IDENTITY FULL;
"""
)


async def test_apply_outcomes(local_cluster) -> None:
    """Every apply outcome, on one server: database ``src`` holds the slot and
    the divergent commits, database ``dst`` plays the active node."""
    pg = local_cluster
    for db in ("src", "dst"):
        pg.sql(f"CREATE DATABASE {db}")
        pg.sql(MATRIX_SCHEMA, db)
    pg.sql(BASE_ROWS + "INSERT INTO notas VALUES (1, 'a'), (2, 'b');", "src")
    pg.sql(
        "CREATE PUBLICATION p FOR ALL TABLES;SELECT pg_create_logical_replication_slot('s', 'pgoutput');",
        "src",
    )
    pg.sql(
        # id 1 missing, id 2 already deleted, id 12 and email dup@x taken by other rows
        "INSERT INTO usuarios VALUES (3, 'Carla', 'carla@x'), (12, 'X', 'x@x'), (20, 'Other', 'dup@x');"
        "INSERT INTO notas VALUES (1, 'changed'), (2, 'b');",
        "dst",
    )
    for tx in [
        "INSERT INTO usuarios VALUES (10, 'Dup', 'dup@x');",  # other unique key
        "UPDATE usuarios SET nombre = 'U1' WHERE id = 1;",  # target missing
        "INSERT INTO usuarios VALUES (11, 'New', 'new@x');"
        " UPDATE usuarios SET nombre = 'New2' WHERE id = 11;",  # applied twice
        "INSERT INTO usuarios VALUES (12, 'C', 'c@x');"
        " UPDATE usuarios SET nombre = 'C2' WHERE id = 12;",  # conflict, then its update
        "DELETE FROM usuarios WHERE id = 2;",  # already absent
        "UPDATE notas SET txt = 'a2' WHERE id = 1; DELETE FROM notas WHERE id = 2;",  # FULL identity
        "TRUNCATE pedidos;",
    ]:
        pg.sql(f"BEGIN; {tx} COMMIT;", "src")

    src = await asyncpg.connect(pg.dsn("src"))
    dst = await asyncpg.connect(pg.dsn("dst"))
    try:
        divset = await read_divergent(src, "s", "p")
        assert len(divset.transactions) == 7
        report = await apply_divergent(dst, divset)
        outcomes = {(c.table, c.kind, tuple(c.key.values())[:1]): c for c in report.conflicts}
        assert set(outcomes) == {
            ("public.usuarios", "insert", ("10",)),
            ("public.usuarios", "update", ("1",)),
            ("public.usuarios", "insert", ("12",)),
            ("public.usuarios", "update", ("12",)),
            ("public.notas", "update", ("1",)),
            ("public.pedidos", "truncate", ()),
        }
        dup = outcomes[("public.usuarios", "insert", ("10",))]
        assert "usuarios_email_key" in dup.reason
        assert dup.active == {"id": "20", "nombre": "Other", "email": "dup@x"}
        assert "does not exist" in outcomes[("public.usuarios", "update", ("1",))].reason
        active = outcomes[("public.usuarios", "update", ("12",))].active
        assert active is not None and active["nombre"] == "X"
        assert outcomes[("public.notas", "update", ("1",))].active == {"id": "1", "txt": "changed"}
        # insert 11, update 11 (before-image known: no replaced row), delete notas 2
        assert report.applied == 3 and report.replaced == ()
        assert report.skipped_identical == 1  # delete of the absent id 2
        rows = await dst.fetch("SELECT id, nombre FROM usuarios ORDER BY id")
        assert [tuple(r) for r in rows] == [(3, "Carla"), (11, "New2"), (12, "X"), (20, "Other")]
        assert [tuple(r) for r in await dst.fetch("SELECT * FROM notas")] == [(1, "changed")]
        assert await dst.fetchval("SELECT last_value FROM usuarios_id_seq") == 20
    finally:
        await src.close()
        await dst.close()
