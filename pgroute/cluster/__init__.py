"""pgroute as a cluster: several instances sharing state through etcd (issue 14).

So far this package holds the foundation, not yet wired into the daemon:

- `store`: the Store interface (records with revisions, leases with a deadline,
  compare-and-set, watches) and its typed errors;
- `etcd_store`: the Store on etcd v3 through its JSON gateway;
- `etcd_gateway`: the HTTP transport: failover across members, deadlines, errors;
- `etcd_auth`: TLS towards etcd and its authentication tokens;
- `endpoints`: parsing of the configured etcd endpoints;
- `keys`: the names of pgroute's keys under the configured prefix;
- `leader`: leader election on the Store (lease discipline, terms that fence writes);
- `clock`: the clock the cluster logic reads (real, or driven by a test);
- `memory_store`: an in-memory Store for unit tests.

Without a ``[cluster]`` section nothing here runs: pgroute is one instance with its
state file.
"""
