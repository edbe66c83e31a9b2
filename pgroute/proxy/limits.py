"""File descriptors: the proxy's open-files limit and what its listeners may use of it.

Owns the one process-wide resource a connection flood exhausts first. At start-up
each ProxyServer raises the soft ``RLIMIT_NOFILE`` to the hard limit (the soft one
is often 1,024 while the hard one is far higher) and reserves the descriptors its
``max_client_connections`` can use; a listener whose reservation does not fit is
refused before it accepts anything, rather than failing later with EMFILE on a
client, on the HTTP API or, worse, on a health probe of a healthy node.

How descriptors are counted (``descriptors_needed``):

- every client slot costs 2: the client's socket and its backend connection (a
  spliced session holds exactly those two; a piped one the same two behind its
  transports);
- the refusal pool (sockets accepted beyond ``max_client_connections`` that are
  read long enough to answer 53300, or to forward a CancelRequest) costs 2 each;
- ``HEADROOM`` for everything else the daemon opens while running: health probes and
  the controller's SQL connections to both nodes (a handful), HTTP API and metrics
  connections (aiohttp, a few dozen at most), etcd, alert webhooks and SMTP, the
  state file, logs;
- plus whatever the process already has open when the listener starts (counted from
  ``/proc/self/fd``), and what earlier listeners of this process reserved.
"""

from __future__ import annotations

import logging
import os
import resource

from ..errors import ConfigError

log = logging.getLogger(__name__)

HEADROOM = 128

_reserved = 0  # descriptors reserved by the listeners of this process


def refusal_pool(max_client_connections: int) -> int:
    """How many sockets beyond the limit may be in their refusal at once."""
    return max(8, min(64, max_client_connections // 10))


def descriptors_needed(max_client_connections: int) -> int:
    """Descriptors one listener may hold at most: see the module docstring."""
    return 2 * (max_client_connections + refusal_pool(max_client_connections))


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        # An infinite hard limit is not a value setrlimit accepts for the soft one.
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-files limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a small process
        return 32


def reserve(max_client_connections: int, *, limit: int | None = None, already_open: int | None = None) -> int:
    """Reserve a listener's descriptors; ConfigError naming the key when they do not
    fit. Returns the reservation, for ``release``."""
    global _reserved
    if limit is None:
        limit = raise_open_files_limit()
    if already_open is None:
        already_open = open_descriptors()
    needed = descriptors_needed(max_client_connections)
    available = limit - already_open - HEADROOM - _reserved
    if needed > available:
        most = max(0, available // 2 - refusal_pool(max_client_connections))
        raise ConfigError(
            "proxy.max_client_connections",
            f"{max_client_connections} cannot be honoured: each client takes 2 file descriptors "
            f"(its socket and its backend's), {needed} in all with the refusal pool, but only "
            f"{max(0, available)} of the open-files limit {limit} are left ({already_open} open, "
            f"{HEADROOM} kept for probes, the API and control connections"
            + (f", {_reserved} reserved by another listener" if _reserved else "")
            + f"); raise the hard limit (ulimit -Hn, LimitNOFILE=) or set at most about {most}",
        )
    _reserved += needed
    return needed


def release(reservation: int) -> None:
    global _reserved
    _reserved = max(0, _reserved - reservation)
