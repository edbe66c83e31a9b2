"""The names of the keys pgroute keeps in etcd, all under one prefix.

Owns the key layout, so that every module (and an operator reading etcd with
``etcdctl get --prefix``) agrees on it:

    <prefix>/leader            the leader key (bound to the leader's lease)
    <prefix>/route             the route record (written by the leader only)
    <prefix>/members/<name>    one record per instance (bound to its lease)
    <prefix>/roster            the instances that make up the cluster (leader only)
    <prefix>/departed/<name>   the incarnation of <name> that last stopped cleanly

Pure. Invariants: a prefix starts with "/" and does not end with one; a member name
is one path segment (no "/"), so ``Keys.member_name(Keys.member(n)) == n`` and a
member record never has keys below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
"""Instance names: a host name's characters, one path segment, 63 at most (a DNS label)."""

_NAME = re.compile(NAME_PATTERN)


def check_prefix(prefix: str) -> str:
    """The prefix if valid, else ValueError saying why."""
    if not prefix.startswith("/"):
        raise ValueError("must start with '/'")
    if prefix == "/" or prefix.endswith("/"):
        raise ValueError("must not end with '/'")
    if "//" in prefix:
        raise ValueError("must not contain '//'")
    if any(not ch.isprintable() or ch.isspace() for ch in prefix):
        raise ValueError("must not contain spaces or control characters")
    return prefix


def check_name(name: str) -> str:
    """The instance name if valid, else ValueError saying why."""
    if not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid instance name: 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_prefix(dbname: str) -> str:
    """The prefix when none is configured: one per database, ``/pgroute/<dbname>``
    (``/pgroute/chrispar`` for the seed's database), so that pgroute deployments for
    different databases can share one etcd. Characters other than letters, digits,
    '.', '_' and '-' become '_'."""
    return check_prefix("/pgroute/" + (re.sub(r"[^A-Za-z0-9._-]", "_", dbname) or "_"))


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys under one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @property
    def leader(self) -> str:
        return f"{self.prefix}/leader"

    @property
    def route(self) -> str:
        return f"{self.prefix}/route"

    @property
    def roster(self) -> str:
        return f"{self.prefix}/roster"

    def departed(self, name: str) -> str:
        return f"{self.prefix}/departed/{check_name(name)}"

    @property
    def members(self) -> str:
        """The prefix of every member record (ends with '/': watch or read it whole)."""
        return f"{self.prefix}/members/"

    def member(self, name: str) -> str:
        return self.members + check_name(name)

    def member_name(self, key: str) -> str | None:
        """The instance name of a member key, or None for any other key."""
        if not key.startswith(self.members):
            return None
        name = key[len(self.members) :]
        return name if _NAME.match(name) else None
