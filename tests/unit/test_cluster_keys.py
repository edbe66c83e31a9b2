"""Key naming under the cluster prefix, prefix and instance-name rules, endpoint parsing."""

from __future__ import annotations

import pytest

from pgroute.cluster.endpoints import endpoint_label, endpoint_url
from pgroute.cluster.keys import Keys, check_name, default_prefix


def test_the_key_layout():
    keys = Keys("/pgroute/chrispar")
    assert keys.leader == "/pgroute/chrispar/leader"
    assert keys.route == "/pgroute/chrispar/route"
    assert keys.members == "/pgroute/chrispar/members/"
    assert keys.member("pg-a") == "/pgroute/chrispar/members/pg-a"


def test_member_names_round_trip_and_other_keys_are_not_members():
    keys = Keys("/p")
    for name in ("a", "pg-1.example.com", "A_b-9"):
        assert keys.member_name(keys.member(name)) == name
    assert keys.member_name(keys.leader) is None
    assert keys.member_name("/p/members/") is None
    assert keys.member_name("/p/members/a/b") is None
    assert keys.member_name("/other/members/a") is None


@pytest.mark.parametrize("prefix", ["pgroute", "/", "/pgroute/", "/a//b", "/a b", "/a\nb", ""])
def test_bad_prefixes(prefix):
    with pytest.raises(ValueError):
        Keys(prefix)


@pytest.mark.parametrize("name", ["", "a/b", "-a", ".a", "a b", "x" * 64, "é"])
def test_bad_instance_names(name):
    with pytest.raises(ValueError):
        check_name(name)


def test_default_prefix_is_one_per_database():
    assert default_prefix("chrispar") == "/pgroute/chrispar"
    assert default_prefix("my db/x") == "/pgroute/my_db_x"
    assert default_prefix("") == "/pgroute/_"


@pytest.mark.parametrize(
    "text, url",
    [
        ("127.0.0.1:2379", "http://127.0.0.1:2379"),
        (" 127.0.0.1:2379 ", "http://127.0.0.1:2379"),
        ("etcd1", "http://etcd1:2379"),
        ("https://etcd1.example:2379", "https://etcd1.example:2379"),
        ("http://[::1]:2379/", "http://[::1]:2379"),
        ("[::1]:23790", "http://[::1]:23790"),
    ],
)
def test_endpoint_urls(text, url):
    assert endpoint_url(text) == url


@pytest.mark.parametrize(
    "text", ["", "ftp://h:1", "h:port", "h:99999", "http://h:1/v3", "http://h:1?x=1", "u:secret@h:1", "http://:1"]
)
def test_bad_endpoints(text):
    with pytest.raises(ValueError) as caught:
        endpoint_url(text)
    assert "secret" not in str(caught.value)


def test_endpoint_labels_hide_only_the_default_scheme():
    assert endpoint_label("http://127.0.0.1:2379") == "127.0.0.1:2379"
    assert endpoint_label("https://h:2379") == "https://h:2379"
