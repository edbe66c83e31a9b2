"""The ``pgroute`` command line (console script ``pgroute = "pgroute.cli:main"``).

- :mod:`.commands`: the click group ``main``, ``run``, the commands that talk to a
  running daemon, and ``demo``;
- :mod:`.offline`: ``check`` and ``setup-replication``, which need no daemon;
- :mod:`.client`: the HTTP client for the daemon's API and how its URL and token are
  found;
- :mod:`.render`: the human text for status documents and events (pure; the demo
  uses it too);
- :mod:`.base`: exit statuses, failing, and the options the commands share.
"""

from __future__ import annotations

from .commands import main

# The demo still imports the renderers from here; they live in .render, which is
# the import to use (it pulls in no click and no command).
from .render import render_event, render_status

__all__ = ["main", "render_event", "render_status"]
