"""pgoutput v1 decoding from hand-built messages, and SQL/JSON rendering of
decoded changes (quoting of identifiers and literals)."""

from __future__ import annotations

import datetime as dt
import json
import struct
from typing import TypeVar

import pytest

from pgroute.control.divergence import (
    DivergentSet,
    sql_value,
    to_jsonl,
    to_sql,
    write_recovery_files,
)
from pgroute.pg.naming import int_to_lsn, lsn_to_int, quote_ident, quote_literal
from pgroute.pg.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Change,
    ChangeKind,
    Commit,
    LogicalMessage,
    Origin,
    Relation,
    StreamDecoder,
    TypeInfo,
    decode_message,
    decode_stream,
    pg_timestamp,
)

# ---------------------------------------------------------------- builders

T = TypeVar("T")


def as_(cls: type[T], msg: object) -> T:
    """``msg`` narrowed to the message type a test expects it decodes to."""
    assert isinstance(msg, cls), msg
    return msg


def s(text: str) -> bytes:
    return text.encode() + b"\x00"


def tuple_data(*values) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED_TOAST:
            out += b"u"
        else:
            raw = v.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def begin(final_lsn: int, ts: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit(commit_lsn: int, end_lsn: int, ts: int) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, ts)


def relation(oid: int, ns: str, name: str, ident: str, cols) -> bytes:
    out = b"R" + struct.pack(">I", oid) + s(ns) + s(name) + ident.encode() + struct.pack(">h", len(cols))
    for flags, cname, typ, typmod in cols:
        out += struct.pack(">B", flags) + s(cname) + struct.pack(">Ii", typ, typmod)
    return out


def insert(oid: int, *values) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + tuple_data(*values)


def update(oid: int, new, old=None, old_kind=None) -> bytes:
    out = b"U" + struct.pack(">I", oid)
    if old_kind:
        out += old_kind.encode() + tuple_data(*old)
    return out + b"N" + tuple_data(*new)


def delete(oid: int, old, kind="K") -> bytes:
    return b"D" + struct.pack(">I", oid) + kind.encode() + tuple_data(*old)


def truncate(oids, options=0) -> bytes:
    return b"T" + struct.pack(">iB", len(oids), options) + b"".join(struct.pack(">I", o) for o in oids)


USERS_COLS = [(1, "id", 23, -1), (0, "nombre", 25, -1), (0, "email", 25, -1)]
TS = 123_456_789_000_000  # microseconds since 2000-01-01


# ---------------------------------------------------------------- messages


def test_begin_and_commit() -> None:
    b = decode_message(begin(0x1_0000_0010, TS, 731))
    assert b == Begin(0x1_0000_0010, pg_timestamp(TS), 731)
    assert b.commit_time == dt.datetime(2000, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=TS)
    c = decode_message(commit(0x1_0000_0010, 0x1_0000_0040, TS))
    assert c == Commit(0, 0x1_0000_0010, 0x1_0000_0040, pg_timestamp(TS))


def test_origin_type_and_logical_message() -> None:
    assert decode_message(b"O" + struct.pack(">Q", 99) + s("node_a")) == Origin(99, "node_a")
    assert decode_message(b"Y" + struct.pack(">I", 16500) + s("public") + s("mood")) == TypeInfo(
        16500, "public", "mood"
    )
    m = decode_message(b"M" + struct.pack(">BQ", 1, 7) + s("pfx") + struct.pack(">i", 3) + b"abc")
    assert m == LogicalMessage(True, 7, "pfx", b"abc")


def test_relation() -> None:
    rel = decode_message(relation(16401, "public", "Usuarios", "d", USERS_COLS))
    assert isinstance(rel, Relation)
    assert (rel.oid, rel.namespace, rel.name, rel.replica_identity) == (16401, "public", "Usuarios", "d")
    assert [c.name for c in rel.columns] == ["id", "nombre", "email"]
    assert [c.key for c in rel.columns] == [True, False, False]
    assert rel.columns[0].type_oid == 23 and rel.columns[0].typmod == -1
    assert rel.key_indexes == (0,)
    assert as_(Relation, decode_message(relation(1, "", "pg_x", "n", []))).schema == "pg_catalog"


def test_insert_with_null_and_unicode() -> None:
    ch = as_(Change, decode_message(insert(16401, "1", None, "ñandú ☃")))
    assert ch.kind is ChangeKind.INSERT
    assert ch.relation_oid == 16401
    assert ch.new == ("1", None, "ñandú ☃")
    assert ch.old is None and ch.old_kind is None and ch.relation is None


def test_update_forms() -> None:
    plain = as_(Change, decode_message(update(5, ["1", "a", UNCHANGED_TOAST])))
    assert plain.kind is ChangeKind.UPDATE
    assert plain.new == ("1", "a", UNCHANGED_TOAST) and plain.old is None
    keyed = as_(Change, decode_message(update(5, ["2", "a", "x"], old=["1", None, None], old_kind="K")))
    assert keyed.old == ("1", None, None) and keyed.old_kind == "K" and keyed.new is not None and keyed.new[0] == "2"
    full = as_(Change, decode_message(update(5, ["1", "b", "x"], old=["1", "a", "x"], old_kind="O")))
    assert full.old_kind == "O" and full.old == ("1", "a", "x")


def test_delete_forms() -> None:
    d = as_(Change, decode_message(delete(5, ["1", None, None])))
    assert d.kind is ChangeKind.DELETE and d.old == ("1", None, None) and d.old_kind == "K" and d.new is None
    assert as_(Change, decode_message(delete(5, ["1", "a", "b"], kind="O"))).old_kind == "O"


def test_truncate() -> None:
    t = as_(Change, decode_message(truncate([10, 11], options=3)))
    assert t.kind is ChangeKind.TRUNCATE
    assert t.truncate_oids == (10, 11) and t.relation_oid == 10
    assert t.cascade and t.restart_identity
    plain = as_(Change, decode_message(truncate([10])))
    assert not plain.cascade and not plain.restart_identity


# ---------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Z\x00\x00",  # unknown type
        b"B\x00\x00",  # short Begin
        begin(1, 2, 3) + b"\x00",  # trailing byte
        b"C" + struct.pack(">BQQ", 0, 1, 2),  # Commit without timestamp
        b"R" + struct.pack(">I", 1) + b"public",  # unterminated string
        relation(1, "public", "t", "x", USERS_COLS),  # bad replica identity
        relation(1, "public", "t", "d", USERS_COLS)[:-3],  # cut inside a column
        b"I" + struct.pack(">I", 1) + b"X" + tuple_data("1"),  # not 'N'
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 2) + b"t" + struct.pack(">i", 10) + b"abc",
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"q",  # unknown column kind
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", -1),  # negative count
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", -5),
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 2) + b"\xff\xfe",
        b"U" + struct.pack(">I", 1) + b"K" + tuple_data("1"),  # old key without new tuple
        b"U" + struct.pack(">I", 1) + b"X",
        b"D" + struct.pack(">I", 1) + b"N" + tuple_data("1"),  # delete needs K or O
        b"T" + struct.pack(">iB", 0, 0),  # no relations
        b"T" + struct.pack(">iB", 3, 0) + struct.pack(">I", 1),  # fewer oids than announced
        b"M" + struct.pack(">BQ", 0, 1) + s("p") + struct.pack(">i", 9) + b"ab",
    ],
)
def test_malformed_messages_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_message(data)


def test_non_bytes_message_is_value_error() -> None:
    with pytest.raises(ValueError):
        decode_message("B")  # type: ignore[arg-type]


# ---------------------------------------------------------------- streams


def _stream() -> list[bytes]:
    return [
        begin(0x200, TS, 700),
        relation(16401, "public", "usuarios", "d", USERS_COLS),
        insert(16401, "1", "Ana", "ana@x"),
        update(16401, ["1", "Ana María", "ana@x"]),
        commit(0x200, 0x230, TS),
        begin(0x300, TS + 1, 701),
        delete(16401, ["1", None, None]),
        truncate([16401], options=2),
        commit(0x300, 0x330, TS + 1),
    ]


def test_decode_stream_groups_and_resolves() -> None:
    rows = [(0x100, 700, m) for m in _stream()]
    txs = decode_stream(rows)
    assert [tx.xid for tx in txs] == [700, 701]
    first, second = txs
    assert first.commit_lsn == 0x200 and first.end_lsn == 0x230
    assert first.commit_time == pg_timestamp(TS)
    assert [c.kind for c in first.changes] == [ChangeKind.INSERT, ChangeKind.UPDATE]
    assert all(c.relation is not None and c.relation.name == "usuarios" for c in first.changes)
    assert [c.kind for c in second.changes] == [ChangeKind.DELETE, ChangeKind.TRUNCATE]
    assert second.changes[1].truncate_relations[0].name == "usuarios"
    # raw bytes work as rows too
    assert decode_stream(_stream()) == txs


def test_stream_keeps_origin_and_relations() -> None:
    dec = StreamDecoder()
    for m in [begin(5, TS, 1), b"O" + struct.pack(">Q", 4) + s("up"), commit(5, 6, TS)]:
        dec.feed(m)
    dec.feed(relation(9, "s", "t", "f", [(1, "a", 25, -1)]))
    assert dec.finish()[0].origin == "up"
    assert dec.relations[9].replica_identity == "f"


@pytest.mark.parametrize(
    "messages",
    [
        [insert(16401, "1", "a", "b")],  # change outside a tx
        [begin(1, TS, 1), insert(16401, "1", "a", "b"), commit(1, 2, TS)],  # unknown relation
        [begin(1, TS, 1)],  # no Commit
        [begin(1, TS, 1), begin(2, TS, 2)],  # nested Begin
        [commit(1, 2, TS)],  # Commit without Begin
        [begin(1, TS, 1), commit(9, 10, TS)],  # LSN mismatch
        [
            relation(16401, "public", "u", "d", USERS_COLS),
            begin(1, TS, 1),
            insert(16401, "1", "a"),
            commit(1, 2, TS),
        ],  # column count mismatch
        [
            relation(16401, "public", "u", "d", USERS_COLS),
            begin(1, TS, 1),
            insert(16401, "1", UNCHANGED_TOAST, "x"),
            commit(1, 2, TS),
        ],  # toast marker in insert
        [begin(1, TS, 1), b"\x01garbage", commit(1, 2, TS)],
    ],
)
def test_malformed_streams_raise_value_error(messages) -> None:
    with pytest.raises(ValueError):
        decode_stream(messages)


def test_row_without_data_is_value_error() -> None:
    with pytest.raises(ValueError):
        decode_stream([42])


def test_lsn_helpers() -> None:
    assert int_to_lsn(0x16_B374D848) == "16/B374D848"
    assert lsn_to_int("16/B374D848") == 0x16_B374D848
    with pytest.raises(ValueError):
        lsn_to_int("nope")


# ---------------------------------------------------------------- SQL rendering


def test_quote_ident_and_literal() -> None:
    assert quote_ident("Usuarios") == '"Usuarios"'
    assert quote_ident('we"ird') == '"we""ird"'
    # Divergent values are rendered with pg.naming's literal rule: always the
    # E'' form, so a literal means the same under either standard_conforming_strings.
    assert sql_value(None) == "NULL"
    assert sql_value("O'Brien") == quote_literal("O'Brien") == "E'O''Brien'"
    assert sql_value("C:\\dir") == "E'C:\\\\dir'"
    assert sql_value("it's \\n") == "E'it''s \\\\n'"
    assert sql_value("ñandú ☃") == "E'ñandú ☃'"
    with pytest.raises(ValueError):
        sql_value("a\x00b")
    with pytest.raises(ValueError):
        sql_value(b"raw")
    with pytest.raises(ValueError):
        sql_value(UNCHANGED_TOAST)


MIXED_COLS = [(1, "Id", 23, -1), (0, "Nombre Completo", 25, -1), (0, "nota", 25, -1)]


def _mixed_txs():
    return decode_stream(
        [
            begin(0x10, TS, 900),
            relation(77, "Ventas", "Clientes", "d", MIXED_COLS),
            insert(77, "1", "O'Brien", None),
            insert(77, "2", "back\\slash", "ñandú ☃"),
            update(77, ["2", "x", UNCHANGED_TOAST]),
            update(77, ["3", "y", "z"], old=["2", None, None], old_kind="K"),
            delete(77, ["1", None, None]),
            truncate([77], options=3),
            commit(0x10, 0x20, TS),
        ]
    )


def test_to_sql_quotes_everything() -> None:
    sql = to_sql(_mixed_txs())
    table = '"Ventas"."Clientes"'
    assert "SET TimeZone TO E'UTC';" in sql
    assert "BEGIN; -- xid 900, commit 0/10" in sql
    assert (
        f'INSERT INTO {table} ("Id", "Nombre Completo", "nota") OVERRIDING SYSTEM VALUE '
        "VALUES (E'1', E'O''Brien', NULL);"
    ) in sql
    assert "VALUES (E'2', E'back\\\\slash', E'ñandú ☃');" in sql
    # unchanged TOAST column left out, key not reassigned
    assert f"""UPDATE {table} SET "Nombre Completo" = E'x' WHERE "Id" = E'2';""" in sql
    # key change: keyed by the old key, new key assigned
    assert f"""UPDATE {table} SET "Id" = E'3', "Nombre Completo" = E'y', "nota" = E'z' WHERE "Id" = E'2';""" in sql
    assert f"""DELETE FROM {table} WHERE "Id" = E'1';""" in sql
    assert f"TRUNCATE {table} RESTART IDENTITY CASCADE;" in sql
    assert sql.rstrip().endswith("COMMIT;")


def test_to_sql_full_identity_uses_old_row_and_is_null() -> None:
    cols = [(1, "a", 23, -1), (1, "b", 25, -1)]
    txs = decode_stream(
        [
            begin(1, TS, 1),
            relation(5, "public", "t", "f", cols),
            update(5, ["1", "new"], old=["1", None], old_kind="O"),
            delete(5, ["1", None], kind="O"),
            commit(1, 2, TS),
        ]
    )
    sql = to_sql(txs)
    assert """UPDATE "public"."t" SET "b" = E'new' WHERE "a" = E'1' AND "b" IS NULL;""" in sql
    assert """DELETE FROM "public"."t" WHERE "a" = E'1' AND "b" IS NULL;""" in sql


def test_to_jsonl_and_recovery_files(tmp_path) -> None:
    txs = _mixed_txs()
    text = to_jsonl(txs)
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 6
    first = lines[0]
    assert first["xid"] == 900 and first["commit_lsn"] == "0/10"
    assert first["schema"] == "Ventas" and first["table"] == "Clientes" and first["kind"] == "insert"
    assert first["new"] == {"Id": "1", "Nombre Completo": "O'Brien", "nota": None}
    assert dt.datetime.fromisoformat(first["commit_time"]) == pg_timestamp(TS)
    assert lines[2]["unchanged_toast"] == ["nota"]
    assert lines[3]["old"] == {"Id": "2"} and lines[3]["old_kind"] == "K"
    assert lines[5]["tables"] == ["Ventas.Clientes"] and lines[5]["cascade"] is True

    divset = DivergentSet("s", "p", True, tuple(txs), {})
    jsonl, sql = write_recovery_files(tmp_path / "rec", divset, None, "divergent-1")
    assert jsonl.read_text(encoding="utf-8") == text
    assert sql.read_text(encoding="utf-8") == to_sql(txs)
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["divergent-1.jsonl", "divergent-1.sql"]
    with pytest.raises(ValueError):
        write_recovery_files(tmp_path, divset, None, "../escape")
