"""`pgroute check`'s kernel splicing line (cli.offline.check_splice), for each proxy.splice mode."""

from __future__ import annotations

import pytest

from pgroute.cli import offline
from pgroute.proxy.sockmap import Splicer, SpliceUnavailable


@pytest.fixture
def kernel_refuses(monkeypatch):
    def refuse(cls, max_sessions):
        raise SpliceUnavailable(1, "the kernel refused the sk_skb program: Operation not permitted")

    monkeypatch.setattr(Splicer, "create", classmethod(refuse))


def test_off_needs_nothing_from_the_kernel(kernel_refuses):
    ok, line, fix = offline.check_splice("off")
    assert ok and "off" in line and not fix


def test_auto_without_the_kernel_is_fine_but_says_so(kernel_refuses):
    ok, line, fix = offline.check_splice("auto")
    assert ok and "unavailable" in line and "Operation not permitted" in line and not fix


def test_on_without_the_kernel_fails_with_a_fix(kernel_refuses):
    ok, line, fix = offline.check_splice("on")
    assert not ok and "unavailable" in line
    assert "CAP_BPF" in fix and 'proxy.splice = "auto"' in fix


@pytest.mark.parametrize(
    "release, trusted",
    [
        ("6.18.44-fc-v595", True),
        ("6.6.0", True),
        ("6.5.13-generic", False),
        ("5.15.0-91-generic", False),
        ("7.0", True),
        ("garbage", False),
        ("6.10rc1", True),
    ],
)
def test_auto_trusts_kernels_from_6_6(release, trusted, monkeypatch):
    from pgroute.proxy import sockmap

    assert sockmap.trusted_kernel(release) is trusted
    monkeypatch.setattr(sockmap.platform, "release", lambda: release)
    ok, line, _ = offline.check_splice("auto")
    assert ok
    if not trusted:
        assert "not used on this kernel" in line


def test_kernel_release_parsing():
    from pgroute.proxy.sockmap import kernel_release

    assert kernel_release("6.10rc1") == (6, 10)
    assert kernel_release("6.18.44-fc-v595") == (6, 18)
    assert kernel_release("garbage") is None
