"""pgroute: a PostgreSQL failover proxy for a primary / logical-replication mirror pair."""

__version__ = "0.1.0"
