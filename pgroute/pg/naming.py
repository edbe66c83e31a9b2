"""Names and positions, one rule each: SQL identifier and literal quoting,
qualified names (sequences, tables), LSN text <-> integer, and pgroute's naming
of subscriptions and slots.

Naming rule (shared by the control plane, the probe and the operator tools): the
publication has the configured name on whichever node publishes; the subscription
on the configured mirror is ``<subscription>``, the one on the configured primary
(following the mirror after a failover) is ``<subscription>_rev``. A
subscription's slot on its publisher has the subscription's name, and so has its
walsender's ``application_name`` (which is what ``synchronous_standby_names``
matches).

Replication positions are handled as integers (bytes since ``0/0``).
"""

from __future__ import annotations

import enum


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (what quote_ident does, always quoting)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal; the E'' form is right whatever
    standard_conforming_strings says."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def qualified(schema: str, name: str) -> str:
    """``"schema"."name"``: how every table and sequence is named in SQL text, in
    samples and in reports (the same string the catalog's ``format('%I.%I')`` gives
    is *not* used: it leaves lower-case names unquoted, so two spellings of one
    object would exist)."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def lsn_to_int(lsn: str | None) -> int | None:
    """``'16/B374D848'`` -> byte position; None stays None."""
    if lsn is None:
        return None
    hi, sep, lo = str(lsn).partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {lsn!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    """Byte position -> ``'16/B374D848'``."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def subscription_name(base: str, subscriber: str | enum.Enum) -> str:
    """Name of the subscription held by ``subscriber`` ("mirror" or "primary")."""
    who = subscriber.value if isinstance(subscriber, enum.Enum) else subscriber
    if who == "mirror":
        return base
    if who == "primary":
        return base + "_rev"
    raise ValueError(f"subscriber must be 'primary' or 'mirror', not {subscriber!r}")
