"""The roster: which instances make up the cluster, for the failsafe and for who may lead.

Owns the roster record (``<prefix>/roster``, written by the leader only, fenced to
its term), its encoding, and the pure rules around it:
- `next_roster`: the roster the leader should write given the live member records
  (a member that joined, left, or restarted with a new incarnation id bumps the
  generation);
- `settle`: a roster whose every live member has acknowledged its generation makes
  its newcomers eligible to lead;
- `may_lead`: whether an instance may campaign for the leader key.

Why a roster at all (the failsafe's soundness, see pgroute/cluster/failsafe.py): an
instance cut off from etcd keeps routing only while *every other roster member*
confirms its view, and a member refuses once it has seen a newer route epoch or
roster generation. An instance can only become the leader (and switch anything) if
it is an eligible roster member, so a failsafe instance always asks the one that
could switch, or one that has acknowledged the change. A newcomer added while some
member was already cut off becomes eligible only once every live member has
acknowledged the generation that lists it: a member acknowledges only after its
confirmations of older generations have expired, and refuses them from then on.
Without a roster (a first start) nobody is in failsafe, so anyone may lead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .keys import check_name
from .records import MAX_EPOCH, CorruptRecord, dump_object, is_int, load_object
from .records import field as record_field


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One instance: its name, incarnation id (new at each process start) and API URL."""

    name: str
    id: str
    api: str


@dataclass(frozen=True, slots=True)
class Roster:
    """Generation ``gen`` of the roster: its members, and which of them may lead."""

    gen: int
    members: tuple[RosterEntry, ...]
    eligible: frozenset[str]

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("a roster lists an instance twice")
        if not self.eligible <= set(names):
            raise ValueError("an eligible instance is not on the roster")

    @property
    def names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.members)

    def entry(self, name: str) -> RosterEntry | None:
        return next((m for m in self.members if m.name == name), None)

    @property
    def settled(self) -> bool:
        """Every member may lead (no newcomer awaits the others' acknowledgements)."""
        return self.eligible == self.names


def encode_roster(roster: Roster) -> bytes:
    return dump_object(
        {
            "gen": roster.gen,
            "members": [{"name": m.name, "id": m.id, "api": m.api} for m in roster.members],
            "eligible": sorted(roster.eligible),
        }
    )


def decode_roster(key: str, value: bytes) -> Roster:
    """The roster stored at ``key``, or CorruptRecord naming it."""
    data = load_object(key, value)
    gen = record_field(key, data, "gen", lambda v: is_int(v, MAX_EPOCH), f"an integer 0..{MAX_EPOCH}")
    members = record_field(key, data, "members", lambda v: isinstance(v, list), "a list")
    eligible = record_field(key, data, "eligible", lambda v: isinstance(v, list), "a list")
    entries = []
    for m in members:
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("name", "id", "api")):
            raise CorruptRecord(key, f"member {m!r} is not {{name, id, api}} strings")
        try:
            entries.append(RosterEntry(check_name(m["name"]), m["id"], m["api"]))
        except ValueError as exc:
            raise CorruptRecord(key, str(exc)) from None
    if not all(isinstance(n, str) for n in eligible):
        raise CorruptRecord(key, "eligible is not a list of names")
    try:
        return Roster(gen, tuple(entries), frozenset(eligible))
    except ValueError as exc:
        raise CorruptRecord(key, str(exc)) from None


def next_roster(current: Roster | None, live: Iterable[RosterEntry]) -> Roster | None:
    """The roster to write when the live members differ from ``current`` (None: no
    change). A first roster makes everyone eligible (nobody can be in failsafe
    without one); later, newcomers (a new name, or a known name with a new
    incarnation id) wait for `settle`, and members that left lose eligibility now."""
    entries = tuple(sorted(live, key=lambda e: e.name))
    if current is None:
        return Roster(1, entries, frozenset(e.name for e in entries)) if entries else None
    if set(entries) == set(current.members):
        return None
    kept = {m.name for m in current.members if m in entries}  # same name and incarnation
    return Roster(current.gen + 1, entries, frozenset(current.eligible & kept))


def settle(roster: Roster, acked: Mapping[str, int], *, waited: bool) -> Roster | None:
    """``roster`` with every member eligible, once each live member in it has
    acknowledged its generation (``acked``: live member name -> generation it
    acknowledged) and the leader has ``waited`` out the confirmations given before
    it wrote it; None while that is not so (or nothing is left to settle)."""
    if roster.settled or not waited:
        return None
    for m in roster.members:
        if m.name in acked and acked[m.name] < roster.gen:
            return None
    return Roster(roster.gen, roster.members, roster.names)


def may_lead(roster: Roster | None, name: str) -> str | None:
    """None when ``name`` may campaign for the leader key, else why not."""
    if roster is None or name in roster.eligible:
        return None
    if name in roster.names:
        return f"{name} joined roster generation {roster.gen}, not yet acknowledged by every member"
    return f"{name} is not on the roster (generation {roster.gen}: {', '.join(sorted(roster.names)) or 'empty'})"
