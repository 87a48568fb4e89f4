"""The `geosmtp` command: start, check-config, version.

Reached through geosmtp.entry (or `python -m geosmtp`), which monkey-patches first.
"""
from __future__ import annotations

import sys

import click

from geosmtp import __version__
from geosmtp.config import Config, ConfigError, load

CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", default="/etc/geosmtp/geosmtp.toml", envvar="GEOSMTP_CONFIG",
    show_default=True, type=click.Path(dir_okay=False), help="configuration file (TOML)",
)


def load_or_exit(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        click.echo(f"geosmtp: {exc.source}: configuration is not valid:", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="geosmtp")
def main() -> None:
    """geosmtp: an SMTP server with a durable spool and Maildir delivery."""


@main.command()
@CONFIG_OPTION
def start(config_path: str) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT."""
    config = load_or_exit(config_path)
    from geosmtp import log
    from geosmtp.server import Server

    log.setup(config.log.level, config.log.format, config.log.file)
    try:
        server = Server(config)
        server.serve_forever()
    except OSError as exc:  # e.g. the port is taken or the spool is not writable
        click.echo(f"geosmtp: cannot start: {exc}", err=True)
        sys.exit(1)


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: str) -> None:
    """Validate the configuration file and exit (status 2 when it is not valid)."""
    config = load_or_exit(config_path)
    names = ", ".join(f"{item.name}={item.address}" for item in config.listener)
    click.echo(f"{config_path}: ok ({len(config.listener)} listeners: {names})")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)
