"""Validation shared by the JSON records pgroute keeps in etcd (route, members).

Owns `CorruptRecord` and the field checks every record decoder uses. Pure.

Invariant: a record that does not decode is an error naming its key, never a missing
record: "absent" and "unreadable" lead to different decisions (an absent route is a
first start; an unreadable one must stop the cluster from guessing). The rules match
the state file's (`StateFile.load`): an epoch is a JSON integer 0..2**63-1 and never a
boolean (true is not epoch 1), a WAL position a 64-bit unsigned integer.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

from pgroute.errors import PgRouteError

#: The same bounds as the state file (pgroute.control.state_store), restated here
#: because the cluster package does not import the control plane.
MAX_EPOCH = 2**63 - 1
MAX_LSN = 2**64 - 1


class CorruptRecord(PgRouteError, ValueError):
    """A record in the store that pgroute cannot read; ``key`` names it."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"corrupt record {key}: {why}")
        self.key = key
        self.why = why


def is_int(value: object, high: int) -> TypeGuard[int]:
    """An integer 0..high that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def is_time(value: object) -> TypeGuard[float]:
    """A finite, non-negative wall-clock time (seconds since the epoch)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def load_object(key: str, value: bytes) -> dict[str, Any]:
    """The JSON object stored at ``key``, or CorruptRecord."""
    try:
        data = json.loads(value.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise CorruptRecord(key, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptRecord(key, "not a JSON object")
    return data


def dump_object(data: dict[str, Any]) -> bytes:
    """The canonical encoding: compact, keys sorted, no NaN or infinity."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def field(key: str, data: dict[str, Any], name: str, check: Any, what: str, default: Any = ...) -> Any:
    """``data[name]`` if ``check`` accepts it (the default when the field is absent and
    one is given), else CorruptRecord naming the key and the field."""
    if name not in data:
        if default is ...:
            raise CorruptRecord(key, f"{name} is missing")
        return default
    value = data[name]
    if not check(value):
        raise CorruptRecord(key, f"{name} {value!r} is not {what}")
    return value
