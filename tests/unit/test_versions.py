"""pgroute.pg.versions: the version facts as pure functions (the SQL they produce
runs against real servers of each version in tests/integration/test_versions.py)."""

from __future__ import annotations

import pytest

from pgroute.pg import versions


def test_apply_worker_filter_names_leader_pid_from_16_only():
    # 15 has no leader_pid column: naming it there would fail the probe's query.
    assert versions.apply_worker_filter(15, "st") == "st.relid IS NULL"
    for major in (16, 17, 18):
        assert versions.apply_worker_filter(major, "st") == "st.relid IS NULL AND st.leader_pid IS NULL"


def test_missing_rows_counted_from_18_only():
    for major in (15, 16, 17):
        assert versions.missing_rows_sql(major, "ss") == "NULL::bigint"
    assert versions.missing_rows_sql(18, "ss") == "(ss.confl_update_missing + ss.confl_delete_missing)::bigint"
    assert set(versions.MISSING_ROW_COUNTERS) <= set(versions.CONFLICT_COUNTERS)
    assert not versions.has_conflict_counters(17) and versions.has_conflict_counters(18)


@pytest.mark.parametrize(
    ("substream", "mode"),
    [
        (False, "off"),  # 15: boolean
        (True, "on"),
        ("false", "off"),  # 15 as text
        ("true", "on"),
        (b"f", "off"),  # 16+: "char", which asyncpg returns as bytes
        (b"t", "on"),
        (b"p", "parallel"),
        ("t", "on"),  # 16+ as text (psql, substream::text)
        ("p", "parallel"),
    ],
)
def test_streaming_mode_reads_every_version_s_column(substream, mode):
    assert versions.streaming_mode(substream) == mode


def test_streaming_mode_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="substream"):
        versions.streaming_mode("x")


def test_one_streaming_choice_every_version_accepts():
    # 'parallel' exists on 16+ only, and is 18's default: pgroute states 'on'.
    assert versions.SUBSCRIPTION_STREAMING == "on"
    assert versions.PGOUTPUT_PROTO_VERSION == 1


def test_node_facts_sql_per_version():
    from pgroute.pg.catalog import node_facts_sql

    assert "leader_pid" not in node_facts_sql(15) and "confl_" not in node_facts_sql(15)
    assert "leader_pid" in node_facts_sql(16) and "confl_" not in node_facts_sql(16)
    assert "leader_pid" in node_facts_sql(18) and "confl_update_missing" in node_facts_sql(18)
