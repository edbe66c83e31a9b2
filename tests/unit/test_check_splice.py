"""`pgroute check`'s kernel splicing line (cli._check_splice), for each proxy.splice mode."""

from __future__ import annotations

import pytest

from pgroute import cli
from pgroute.proxy.sockmap import Splicer, SpliceUnavailable


@pytest.fixture
def kernel_refuses(monkeypatch):
    def refuse(cls, max_sessions):
        raise SpliceUnavailable(1, "the kernel refused the sk_skb program: Operation not permitted")

    monkeypatch.setattr(Splicer, "create", classmethod(refuse))


def test_off_needs_nothing_from_the_kernel(kernel_refuses):
    ok, line, fix = cli._check_splice("off")
    assert ok and "off" in line and not fix


def test_auto_without_the_kernel_is_fine_but_says_so(kernel_refuses):
    ok, line, fix = cli._check_splice("auto")
    assert ok and "unavailable" in line and "Operation not permitted" in line and not fix


def test_on_without_the_kernel_fails_with_a_fix(kernel_refuses):
    ok, line, fix = cli._check_splice("on")
    assert not ok and "unavailable" in line
    assert "CAP_BPF" in fix and 'proxy.splice = "auto"' in fix
