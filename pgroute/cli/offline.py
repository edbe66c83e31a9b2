"""The commands that work without a daemon: ``check`` and ``setup-replication``.

They read the configuration and talk to both PostgreSQL nodes directly, through the
offline tools of the control plane (this module may import the control plane; the
control plane never imports the CLI). Those imports sit inside the commands so that
``pgroute status`` does not pay for asyncpg and the replication SQL at start-up.
"""

from __future__ import annotations

import asyncio
import sys

import click

from ..config import Config, ConfigError, validate_runtime
from ..pg.dsn import mask_dsn
from .base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_option, env_file_option, fail, load_config_or_exit


@click.command()
@config_option("TOML configuration file")
@env_file_option()
def check(config_path: str | None, env_file: str | None) -> None:
    """Validate the config, reach both nodes, verify the replication setup."""
    config = load_config_or_exit(config_path, env_file)
    config_error = None
    try:
        validate_runtime(config)
    except ConfigError as exc:
        config_error = str(exc)
    from ..tools.check import SAME_DATABASE_ITEM, check_pair

    try:
        items = asyncio.run(
            check_pair(
                config.primary.dsn,
                config.mirror.dsn,
                config.replication.publication,
                config.replication.subscription,
                config.health.timeout,
                max_lag_bytes=config.health.max_lag_bytes,
            )
        )
    except Exception as exc:  # check_pair should report, not raise; say what broke anyway
        fail(f"check could not run: {type(exc).__name__}: {exc}")
    if config.cluster.enabled:
        from ..tools.cluster_check import check_cluster

        items = [*items, *asyncio.run(check_cluster(config))]
    # Two DSNs that reach one database (whatever their host names say) are a
    # configuration error, as `pgroute run` reports it (exit 2): one verdict, on the
    # configuration line, and no advice about replication between a database and itself.
    same = next((i for i in items if i.name == SAME_DATABASE_ITEM and not i.ok), None)
    if same is not None:
        items = [i for i in items if i is not same]
        config_error = config_error or f"mirror.dsn: {same.detail}"
    if config_error is None:
        click.echo(f"✓ configuration: {config_path or 'defaults and environment'} is valid")
    else:
        click.echo(mask_dsn(f"✗ configuration: {config_error}"))
        if same is not None and same.fix:
            click.echo(mask_dsn(f"    fix: {same.fix}"))
    splice_ok, splice_line, splice_fix = check_splice(config.proxy.splice)
    click.echo(f"{'✓' if splice_ok else '✗'} {splice_line}")
    if splice_fix:
        click.echo(f"    fix: {splice_fix}")
    all_ok = config_error is None and splice_ok
    from .render import render_check_item

    for item in items:
        for line in render_check_item(item.name, item.ok, item.detail, item.fix, item.warning, item.notes):
            click.echo(line)
        if not item.ok:
            all_ok = False
    if config_error is not None:
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_OK if all_ok else EXIT_FAILED)


def check_splice(mode: str) -> tuple[bool, str, str]:
    """(ok, line, fix) for proxy.splice: can this machine load the kernel splice?"""
    if mode == "off":
        return True, "kernel splicing: off (proxy.splice), sessions are piped by pgroute", ""
    from ..proxy.sockmap import TRUSTED_KERNEL, Splicer, SpliceUnavailable, trusted_kernel

    if mode == "auto" and not trusted_kernel():
        return (
            True,
            "kernel splicing: not used on this kernel (auto needs Linux "
            f"{TRUSTED_KERNEL[0]}.{TRUSTED_KERNEL[1]} or newer); sessions will be piped "
            "by pgroute",
            "",
        )
    try:
        splicer = Splicer.create(1)
        try:
            splicer.self_test()
        finally:
            splicer.close()
    except SpliceUnavailable as exc:
        if mode == "on":
            return (
                False,
                f'kernel splicing: unavailable ({exc.strerror}) and proxy.splice is "on"',
                'run pgroute as root or with CAP_BPF and CAP_NET_ADMIN, or set proxy.splice = "auto"',
            )
        return (
            True,
            f"kernel splicing: unavailable ({exc.strerror}); sessions will be piped by "
            "pgroute (slower under load; root or CAP_BPF + CAP_NET_ADMIN enable it)",
            "",
        )
    return True, "kernel splicing: available, sessions will be forwarded by the kernel", ""


Stamp = tuple[int | None, str | None]
"""(epoch, active node) pgroute stamped on a node's database; (None, None) when never."""


async def _read_stamps(config: Config) -> dict[str, Stamp | None]:
    """Each node's stamp; None for a node that could not be read (setup-replication
    reports the connection error itself)."""
    from ..errors import PgRouteError
    from ..pg.catalog import read_stamp
    from ..pg.connect import connect

    stamps: dict[str, Stamp | None] = {}
    for name in ("primary", "mirror"):
        try:
            conn = await connect(config.node_dsn(name), config.health.timeout)
        except (PgRouteError, OSError):
            stamps[name] = None
            continue
        try:
            stamps[name] = await read_stamp(conn)
        finally:
            await conn.close()
    return stamps


def setup_verdict(primary: Stamp | None, mirror: Stamp | None) -> tuple[str, str]:
    """What setup-replication does given the nodes' stamps: ("setup", note),
    ("nothing", why) or ("refuse", why).

    A pair pgroute never switched is set up as usual. A pair it switched is left
    alone (after a failover the mirror is active and the primary follows it or is
    fenced: recreating the original direction would be wrong, and the seed's one-shot
    replication_setup, run again, must not fail the stack), except for the one case an
    upgrade or a replaced server needs: the primary is the active node by its stamp
    and the mirror DSN reaches a server pgroute never stamped, a new mirror."""
    p_epoch, p_active = primary or (None, None)
    m_epoch, m_active = mirror or (None, None)
    if m_epoch:
        return "nothing", f"epoch {m_epoch} stamped on mirror, active node {m_active}"
    if not p_epoch:
        return "setup", ""
    if p_active == "primary":
        return "setup", f"a new mirror for the pair pgroute manages (epoch {p_epoch}, primary active)"
    return (
        "refuse",
        f"epoch {p_epoch} stamped on primary says the active node is {p_active}, and mirror.dsn "
        "reaches a server pgroute never stamped: a new mirror is set up only while the primary "
        "is active; fail back first (pgroute failback), or point mirror.dsn at the node that was "
        "the mirror",
    )


@click.command("setup-replication")
@config_option("TOML configuration file")
@env_file_option()
def setup_replication_cmd(config_path: str | None, env_file: str | None) -> None:
    """Create the publication and subscription if missing."""
    config = load_config_or_exit(config_path, env_file)
    import asyncpg

    from ..errors import PgRouteError
    from ..tools.setup import SameDatabaseError, setup_replication

    stamps = asyncio.run(_read_stamps(config))
    verdict, why = setup_verdict(stamps["primary"], stamps["mirror"])
    if verdict == "nothing":
        click.echo(
            f"nothing to do: pgroute manages this pair ({why}); "
            "see `pgroute status`, `pgroute rejoin`, `pgroute failback`"
        )
        return
    if verdict == "refuse":
        fail(f"setup-replication refused: {why}; nothing was changed")
    if why:
        click.echo(f"setting up {why}")
    try:
        steps = asyncio.run(
            setup_replication(
                config.primary.dsn, config.mirror.dsn, config.replication.publication, config.replication.subscription
            )
        )
    except SameDatabaseError as exc:
        fail(f"configuration error: mirror.dsn: {exc}", EXIT_USAGE)
    except (PgRouteError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # OSError covers TimeoutError (initial copy too slow) and refused connections.
        fail(f"setup-replication failed: {exc}")
    for step in steps:
        warning = step.removeprefix("warning: ")
        click.echo(mask_dsn(f"! {warning}" if warning != step else f"✓ {step}"))
    if not steps:
        click.echo("nothing to do: publication and subscription already exist")
