"""setup-replication's decision from the nodes' epoch stamps (cli.offline.setup_verdict)."""

from __future__ import annotations

import pytest

from pgroute.cli.offline import setup_verdict

NEVER = (None, None)


@pytest.mark.parametrize(
    "primary,mirror,verdict",
    [
        (NEVER, NEVER, "setup"),  # a pair pgroute never switched
        (None, NEVER, "setup"),  # primary unreachable: setup itself reports the connection error
        ((0, None), (0, None), "setup"),
        ((3, "primary"), NEVER, "setup"),  # a new (e.g. new-version) mirror beside the active primary
        ((3, "mirror"), (3, "mirror"), "nothing"),  # after a failover: never recreate the old direction
        (NEVER, (1, "mirror"), "nothing"),
        (None, (1, "mirror"), "nothing"),  # old primary down after a failover
        ((3, "primary"), (3, "primary"), "nothing"),  # already a managed pair
        ((3, "mirror"), NEVER, "refuse"),  # the active node's stamp names a mirror this server is not
        ((3, "none"), NEVER, "refuse"),
    ],
)
def test_setup_verdict(primary, mirror, verdict) -> None:
    got, why = setup_verdict(primary, mirror)
    assert got == verdict
    assert (why == "") == (got == "setup" and not (primary and primary[0]))
