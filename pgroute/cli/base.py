"""What every command module of the CLI shares.

Owns the contract's exit statuses (0 done, 1 refused or failed, 2 usage or
configuration error), how a command fails (the reason on stderr, passwords masked),
loading the configuration for a command, and the ``--config`` / ``--env-file``
options several commands take.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ..config import Config, ConfigError, load_config
from ..pg.dsn import mask_dsn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``pgroute: <message>`` (masked) on stderr and exit with ``code``."""
    click.echo(f"pgroute: {mask_dsn(message)}", err=True)
    sys.exit(code)


def load_config_or_exit(config_path: str | None, env_file: str | None) -> Config:
    """The configuration, or exit 2 naming the key that is wrong."""
    try:
        return load_config(config_path, env_file)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", EXIT_USAGE)


def config_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--config",
        "config_path",
        metavar="FILE",
        envvar="PGROUTE_CONFIG",
        type=click.Path(dir_okay=False),
        help=help_text,
    )


def env_file_option() -> Callable[[F], F]:
    return click.option(
        "--env-file",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="dotenv file (e.g. backend/.env); the process environment wins",
    )
