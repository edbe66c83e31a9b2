"""Operator tools that work with no daemon running (``pgroute check``,
``pgroute setup-replication``). They may import the control plane; nothing in the
daemon imports them."""
