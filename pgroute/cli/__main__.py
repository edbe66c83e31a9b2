"""``python -m pgroute.cli``: the same command line as the ``pgroute`` console script."""

from __future__ import annotations

from .commands import main

if __name__ == "__main__":  # pragma: no cover
    main()
