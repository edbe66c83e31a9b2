"""Decoder for pgoutput logical-replication messages, protocol version 1.

PostgreSQL's wire formats belong to the ``pg`` package; this one is the format
of the changes a logical slot holds (read by the divergence recovery of the
control plane). This module owns the translation of the binary messages returned by
``pg_logical_slot_peek_binary_changes(slot, upto, NULL, 'proto_version', '1',
'publication_names', pub)`` (one message per row) into typed, frozen values:
``Relation``/``Column``, ``Change`` and ``Transaction``. It does no I/O.
It is a little over 600 lines: one small decoder per message type of one
protocol, kept in one file so that the whole format reads in one place.

Invariants:

- Every public decoding function either returns fully decoded values or raises
  ``ValueError`` naming the message and the offset where decoding failed. No
  ``IndexError`` or ``struct.error`` escapes: the reader checks every length
  before slicing, and a message must be consumed exactly (trailing bytes are an
  error, because they mean we misread the format).
- Values are kept as the publisher's text output (``str``), ``None`` for SQL
  NULL, ``UNCHANGED_TOAST`` for a TOASTed column an UPDATE did not change, and
  ``bytes`` only for binary-format columns (never requested by pgroute).
- ``decode_stream`` returns only complete transactions (Begin ... Commit); a
  stream that ends inside a transaction is malformed.

Format reference: PostgreSQL 15 documentation, "Logical Replication Message
Formats" (protocol section). Integers are big-endian; a String is a
NUL-terminated UTF-8 string. Protocol version 1 is the same on 15, 16 and 18:
tests/integration/test_versions.py decodes each one's messages (pg.versions).
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pgroute.pg.naming import int_to_lsn

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "Change",
    "ChangeKind",
    "Column",
    "Commit",
    "LogicalMessage",
    "Origin",
    "Relation",
    "StreamDecoder",
    "Transaction",
    "TypeInfo",
    "Value",
    "decode_message",
    "decode_stream",
    "pg_timestamp",
]

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
PG_EPOCH = _dt.datetime(2000, 1, 1, tzinfo=_dt.UTC)

# Relation column flag: the column is part of the replica identity key.
COLUMN_FLAG_KEY = 1

# Truncate option bits.
TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2


class _UnchangedToast:
    """Marker for a TOASTed value an UPDATE left untouched (TupleData 'u').

    The publisher does not send the value, so it must never be written back:
    SQL generation leaves such columns out of SET lists and comparisons skip
    them."""

    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = _UnchangedToast()

# One column value of a tuple.
Value = str | bytes | None | _UnchangedToast


def pg_timestamp(micros: int) -> _dt.datetime:
    """An aware UTC datetime from PostgreSQL's microseconds-since-2000 value."""
    try:
        return PG_EPOCH + _dt.timedelta(microseconds=micros)
    except OverflowError as exc:  # +/-infinity or garbage
        raise ValueError(f"timestamp out of range: {micros}") from exc


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Column:
    """One column of a Relation message (generated columns are never sent)."""

    flags: int
    name: str
    type_oid: int
    typmod: int

    @property
    def key(self) -> bool:
        """Part of the replica identity (all columns under REPLICA IDENTITY FULL)."""
        return bool(self.flags & COLUMN_FLAG_KEY)


@dataclass(frozen=True)
class Relation:
    """A published table as the publisher described it (message 'R').

    ``namespace`` is the schema name ('' stands for pg_catalog);
    ``replica_identity`` is pg_class.relreplident: 'd' default (primary key),
    'n' nothing, 'f' full, 'i' index."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def schema(self) -> str:
        return self.namespace or "pg_catalog"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def key_indexes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.columns) if c.key)


@dataclass(frozen=True)
class TypeInfo:
    """A non-builtin data type referenced by a relation (message 'Y')."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: _dt.datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: _dt.datetime


@dataclass(frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True)
class LogicalMessage:
    """pg_logical_emit_message() output (message 'M'; only sent with messages=true)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


class ChangeKind(str, enum.Enum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"


@dataclass(frozen=True)
class Change:
    """One row change (I, U, D) or one TRUNCATE statement (T).

    ``new`` is the new tuple (insert, update); ``old`` the old tuple of an
    update or delete, when the publisher sent one, and ``old_kind`` says which
    one it sent: 'K' (replica identity key columns only; the other positions are
    None) or 'O' (the whole old row, REPLICA IDENTITY FULL). Tuples follow the
    relation's column order.

    ``relation`` is filled in by ``decode_stream``; ``decode_message`` leaves it
    None. A TRUNCATE lists every relation of the statement in
    ``truncate_oids``/``truncate_relations`` (they must be truncated together
    for foreign keys) and ``relation_oid`` is the first of them."""

    kind: ChangeKind
    relation_oid: int
    new: tuple[Value, ...] | None = None
    old: tuple[Value, ...] | None = None
    old_kind: str | None = None
    relation: Relation | None = None
    truncate_oids: tuple[int, ...] = ()
    truncate_relations: tuple[Relation, ...] = ()
    cascade: bool = False
    restart_identity: bool = False


@dataclass(frozen=True)
class Transaction:
    """One committed transaction and its changes, in commit order."""

    xid: int
    commit_lsn: int
    commit_time: _dt.datetime
    changes: tuple[Change, ...]
    end_lsn: int = 0
    origin: str | None = None
    messages: tuple[LogicalMessage, ...] = field(default=())

    @property
    def commit_lsn_text(self) -> str:
        return int_to_lsn(self.commit_lsn)


Message = Begin | Commit | Origin | Relation | TypeInfo | Change | LogicalMessage


# ---------------------------------------------------------------- reader


class _Reader:
    """Bounds-checked big-endian reader over one message."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._buf = data
        self._pos = 0
        self._what = what

    def _fail(self, reason: str) -> ValueError:
        return ValueError(f"malformed pgoutput {self._what} message at offset {self._pos}: {reason}")

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise self._fail(f"{what} needs {n} bytes, {len(self._buf) - self._pos} left")
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def byte(self, what: str) -> str:
        return chr(self._take(1, what)[0])

    def int8(self, what: str) -> int:
        return self._take(1, what)[0]

    def int16(self, what: str) -> int:
        return struct.unpack(">h", self._take(2, what))[0]

    def int32(self, what: str) -> int:
        return struct.unpack(">i", self._take(4, what))[0]

    def uint32(self, what: str) -> int:
        return struct.unpack(">I", self._take(4, what))[0]

    def int64(self, what: str) -> int:
        return struct.unpack(">q", self._take(8, what))[0]

    def uint64(self, what: str) -> int:
        return struct.unpack(">Q", self._take(8, what))[0]

    def string(self, what: str) -> str:
        end = self._buf.find(b"\x00", self._pos)
        if end < 0:
            raise self._fail(f"{what}: string without NUL terminator")
        raw = self._buf[self._pos : end]
        self._pos = end + 1
        return self._utf8(raw, what)

    def text(self, n: int, what: str) -> str:
        return self._utf8(self._take(n, what), what)

    def raw(self, n: int, what: str) -> bytes:
        return self._take(n, what)

    def _utf8(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"{what}: invalid UTF-8 ({exc.reason})") from None

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise self._fail(f"{len(self._buf) - self._pos} trailing bytes")


def _tuple_data(r: _Reader) -> tuple[Value, ...]:
    ncols = r.int16("TupleData column count")
    if ncols < 0:
        raise r._fail(f"negative column count {ncols}")
    values: list[Value] = []
    for i in range(ncols):
        kind = r.byte(f"column {i} kind")
        if kind == "n":
            values.append(None)
        elif kind == "u":
            values.append(UNCHANGED_TOAST)
        elif kind in ("t", "b"):
            length = r.int32(f"column {i} length")
            if length < 0:
                raise r._fail(f"column {i}: negative length {length}")
            if kind == "t":
                values.append(r.text(length, f"column {i} text"))
            else:
                values.append(r.raw(length, f"column {i} binary"))
        else:
            raise r._fail(f"column {i}: unknown TupleData kind {kind!r}")
    return tuple(values)


def _decode_begin(r: _Reader) -> Begin:
    final_lsn = r.uint64("final LSN")
    ts = r.int64("commit timestamp")
    xid = r.uint32("xid")
    return Begin(final_lsn, pg_timestamp(ts), xid)


def _decode_commit(r: _Reader) -> Commit:
    flags = r.int8("flags")
    commit_lsn = r.uint64("commit LSN")
    end_lsn = r.uint64("end LSN")
    ts = r.int64("commit timestamp")
    return Commit(flags, commit_lsn, end_lsn, pg_timestamp(ts))


def _decode_origin(r: _Reader) -> Origin:
    lsn = r.uint64("origin commit LSN")
    return Origin(lsn, r.string("origin name"))


def _decode_relation(r: _Reader) -> Relation:
    oid = r.uint32("relation oid")
    namespace = r.string("namespace")
    name = r.string("relation name")
    ident = r.byte("replica identity")
    if ident not in "dnfi":
        raise r._fail(f"unknown replica identity {ident!r}")
    ncols = r.int16("column count")
    if ncols < 0:
        raise r._fail(f"negative column count {ncols}")
    columns = []
    for i in range(ncols):
        flags = r.int8(f"column {i} flags")
        cname = r.string(f"column {i} name")
        type_oid = r.uint32(f"column {i} type oid")
        typmod = r.int32(f"column {i} typmod")
        columns.append(Column(flags, cname, type_oid, typmod))
    return Relation(oid, namespace, name, ident, tuple(columns))


def _decode_type(r: _Reader) -> TypeInfo:
    oid = r.uint32("type oid")
    return TypeInfo(oid, r.string("type namespace"), r.string("type name"))


def _decode_insert(r: _Reader) -> Change:
    oid = r.uint32("relation oid")
    marker = r.byte("new tuple marker")
    if marker != "N":
        raise r._fail(f"expected 'N' before the new tuple, got {marker!r}")
    return Change(ChangeKind.INSERT, oid, new=_tuple_data(r))


def _decode_update(r: _Reader) -> Change:
    oid = r.uint32("relation oid")
    marker = r.byte("tuple marker")
    old = None
    old_kind = None
    if marker in ("K", "O"):
        old_kind = marker
        old = _tuple_data(r)
        marker = r.byte("new tuple marker")
    if marker != "N":
        raise r._fail(f"expected 'K', 'O' or 'N' in an update, got {marker!r}")
    return Change(ChangeKind.UPDATE, oid, new=_tuple_data(r), old=old, old_kind=old_kind)


def _decode_delete(r: _Reader) -> Change:
    oid = r.uint32("relation oid")
    marker = r.byte("old tuple marker")
    if marker not in ("K", "O"):
        raise r._fail(f"expected 'K' or 'O' in a delete, got {marker!r}")
    return Change(ChangeKind.DELETE, oid, old=_tuple_data(r), old_kind=marker)


def _decode_truncate(r: _Reader) -> Change:
    count = r.int32("relation count")
    if count <= 0:
        raise r._fail(f"truncate of {count} relations")
    options = r.int8("options")
    oids = tuple(r.uint32(f"relation {i} oid") for i in range(count))
    return Change(
        ChangeKind.TRUNCATE,
        oids[0],
        truncate_oids=oids,
        cascade=bool(options & TRUNCATE_CASCADE),
        restart_identity=bool(options & TRUNCATE_RESTART_IDENTITY),
    )


def _decode_logical_message(r: _Reader) -> LogicalMessage:
    flags = r.int8("flags")
    lsn = r.uint64("message LSN")
    prefix = r.string("prefix")
    length = r.int32("content length")
    if length < 0:
        raise r._fail(f"negative content length {length}")
    return LogicalMessage(bool(flags & 1), lsn, prefix, r.raw(length, "content"))


_DECODERS: dict[str, tuple[str, Callable[[_Reader], Message]]] = {
    "B": ("Begin", _decode_begin),
    "C": ("Commit", _decode_commit),
    "O": ("Origin", _decode_origin),
    "R": ("Relation", _decode_relation),
    "Y": ("Type", _decode_type),
    "I": ("Insert", _decode_insert),
    "U": ("Update", _decode_update),
    "D": ("Delete", _decode_delete),
    "T": ("Truncate", _decode_truncate),
    "M": ("Message", _decode_logical_message),
}


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one pgoutput v1 message. Raises ValueError when malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"pgoutput message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError("empty pgoutput message")
    tag = chr(data[0])
    try:
        what, decoder = _DECODERS[tag]
    except KeyError:
        # Stream (S/E/A/c) and two-phase (b/P/K/r) messages only appear with
        # options pgroute never requests; refuse rather than guess their layout.
        raise ValueError(f"unsupported pgoutput message type {tag!r}") from None
    r = _Reader(data, what)
    r.raw(1, "tag")
    msg = decoder(r)
    r.end()
    return msg


# ---------------------------------------------------------------- stream


def _row_data(row: object) -> bytes:
    if isinstance(row, (bytes, bytearray, memoryview)):
        return bytes(row)
    # (lsn, xid, data) rows from pg_logical_slot_peek_binary_changes, as tuples
    # or asyncpg Records: the message is the last column. Both only share
    # __getitem__ (a Record is no Sequence), so that is what is asked for;
    # decode_message checks that the column holds bytes.
    getitem = getattr(row, "__getitem__", None)
    if getitem is None:
        raise ValueError(f"cannot take pgoutput data from row {row!r}")
    try:
        data: bytes = getitem(-1)
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"cannot take pgoutput data from row {row!r}") from None
    return data


class StreamDecoder:
    """Groups a message stream into transactions and resolves relations.

    Feed messages in stream order; ``relations`` and ``types`` hold the latest
    description of each oid (the publisher re-sends a Relation after its
    schema changes, so each change is bound to the version current when it
    was decoded)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, TypeInfo] = {}
        self.transactions: list[Transaction] = []
        self._begin: Begin | None = None
        self._changes: list[Change] = []
        self._messages: list[LogicalMessage] = []
        self._origin: str | None = None
        self._count = 0

    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        index = self._count
        self._count += 1
        try:
            msg = decode_message(data)
        except ValueError as exc:
            raise ValueError(f"message #{index}: {exc}") from None
        self._handle(msg, index)

    def _handle(self, msg: Message, index: int) -> None:
        if isinstance(msg, Relation):
            self.relations[msg.oid] = msg
        elif isinstance(msg, TypeInfo):
            self.types[msg.oid] = msg
        elif isinstance(msg, Begin):
            if self._begin is not None:
                raise ValueError(f"message #{index}: Begin of xid {msg.xid} inside xid {self._begin.xid}")
            self._begin = msg
            self._changes = []
            self._messages = []
            self._origin = None
        elif isinstance(msg, Commit):
            begin = self._require_tx(index, "Commit")
            if msg.commit_lsn != begin.final_lsn:
                raise ValueError(
                    f"message #{index}: Commit LSN {int_to_lsn(msg.commit_lsn)} does not "
                    f"match Begin final LSN {int_to_lsn(begin.final_lsn)}"
                )
            self.transactions.append(
                Transaction(
                    xid=begin.xid,
                    commit_lsn=msg.commit_lsn,
                    commit_time=msg.commit_time,
                    changes=tuple(self._changes),
                    end_lsn=msg.end_lsn,
                    origin=self._origin,
                    messages=tuple(self._messages),
                )
            )
            self._begin = None
        elif isinstance(msg, Origin):
            self._require_tx(index, "Origin")
            self._origin = msg.name
        elif isinstance(msg, LogicalMessage):
            # Non-transactional messages arrive outside Begin/Commit; keep only
            # the transactional ones, which belong to the enclosing transaction.
            if msg.transactional:
                self._require_tx(index, "transactional Message")
                self._messages.append(msg)
        else:
            self._require_tx(index, msg.kind.value)
            self._changes.append(self._resolve(msg, index))

    def _require_tx(self, index: int, what: str) -> Begin:
        if self._begin is None:
            raise ValueError(f"message #{index}: {what} outside a transaction")
        return self._begin

    def _relation(self, oid: int, index: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise ValueError(f"message #{index}: change for relation {oid} before its Relation message") from None

    def _resolve(self, change: Change, index: int) -> Change:
        if change.kind is ChangeKind.TRUNCATE:
            rels = tuple(self._relation(o, index) for o in change.truncate_oids)
            return replace(change, relation=rels[0], truncate_relations=rels)
        rel = self._relation(change.relation_oid, index)
        ncols = len(rel.columns)
        for label, tup in (("new", change.new), ("old", change.old)):
            if tup is not None and len(tup) != ncols:
                raise ValueError(
                    f"message #{index}: {change.kind.value} on {rel.schema}.{rel.name} has "
                    f"{len(tup)} {label} columns, relation has {ncols}"
                )
        if (
            change.new is not None
            and change.kind is ChangeKind.INSERT
            and any(v is UNCHANGED_TOAST for v in change.new)
        ):
            raise ValueError(f"message #{index}: insert on {rel.schema}.{rel.name} has an unchanged-TOAST value")
        return replace(change, relation=rel)

    def finish(self) -> list[Transaction]:
        if self._begin is not None:
            raise ValueError(f"stream ended inside transaction {self._begin.xid} (no Commit message)")
        return list(self.transactions)


def decode_stream(rows: Iterable[object]) -> list[Transaction]:
    """Decode a peeked message stream into complete transactions.

    ``rows`` yields either raw message bytes or (lsn, xid, data) rows. Each
    change carries its resolved ``Relation``. Raises ValueError on any
    malformed message, a change before its relation, or an unfinished
    transaction."""
    decoder = StreamDecoder()
    for row in rows:
        decoder.feed(_row_data(row))
    return decoder.finish()
