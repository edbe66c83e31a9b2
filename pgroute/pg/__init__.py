"""Talking to PostgreSQL: the one owner of connection strings and masking
(``dsn``), identifier/literal quoting, LSNs and pgroute's naming rules
(``naming``), control connections (``connect``) and the catalog facts that the
probe and the control plane both read (``catalog``).

Nothing here knows about the state machine, the Router or the API: the monitor,
the control plane and the offline operator tools all build on it.
"""
