"""Suite-wide pytest hooks.

When a test that used local PostgreSQL servers fails, the tail of each server's
log is attached to the failure report: the log files are deleted with the
servers at teardown, and they are usually what explains the failure.
"""

from __future__ import annotations

import pytest


def _clusters_of(item: pytest.Item) -> list:
    from pgroute.local import LocalCluster, LocalPair

    clusters: list[LocalCluster] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, LocalCluster):
            clusters.append(value)
        elif isinstance(value, LocalPair):
            clusters += [value.primary, value.mirror]
        else:
            # Factory fixtures expose what they created as `.created`.
            clusters += [c for c in getattr(value, "created", ()) if isinstance(c, LocalCluster)]
    return list(dict.fromkeys(clusters))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        for cluster in _clusters_of(item):
            tail = cluster.log_tail()
            if tail:
                report.sections.append((f"postgres log: {cluster.name} ({cluster.logfile})", tail))
    return report
