"""The ``pgroute`` command line (console script ``pgroute = "pgroute.cli:main"``).

- :mod:`.commands`: the click group ``main``, ``run``, the commands that talk to a
  running daemon, and ``demo``;
- :mod:`.offline`: ``check`` and ``setup-replication``, which need no daemon;
- :mod:`.client`: the HTTP client for the daemon's API and how its URL and token are
  found;
- :mod:`.render`: the human text for status documents and events (pure; the demo
  uses it too);
- :mod:`.base`: exit statuses, failing, and the options the commands share.

Importing this package imports neither click nor the commands: the demo imports
:mod:`.render`, and the commands import the demo (lazily, in ``pgroute demo``), so an
eager ``main`` here would tie the two together again. ``main`` is loaded on first
use (PEP 562), which is what ``pgroute.cli:main`` and ``from pgroute.cli import
main`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commands import main


def __getattr__(name: str) -> Any:
    if name == "main":
        from .commands import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main"]
