"""The `geosmtp` command: start, check-config, passwd, version.

Reached through geosmtp.entry (or `python -m geosmtp`), which monkey-patches first.
"""
from __future__ import annotations

import sys
from typing import NoReturn

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
        refuse(f"{exc.source}: configuration is not valid", exc.problems)


def refuse(what: str, problems: list[str]) -> NoReturn:
    click.echo(f"geosmtp: {what}:", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


def check_or_exit(path: str) -> Config:
    """The configuration, once it is valid and everything it names can be used; else the
    list of problems and exit status 2."""
    from geosmtp import preflight

    config = load_or_exit(path)
    problems = preflight.check(config)
    if problems:
        refuse(f"{path}: cannot start with this configuration", problems)
    return config


@click.group()
@click.version_option(__version__, prog_name="geosmtp")
def main() -> None:
    """geosmtp: an SMTP server with a durable spool and Maildir delivery."""


@main.command()
@CONFIG_OPTION
@click.option("--worker", is_flag=True, hidden=True, help="internal: a worker started by the master")
def start(config_path: str, worker: bool) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT."""
    import os

    # the master checks what the workers will use; it starts them only if all is well
    config = load_or_exit(config_path) if worker else check_or_exit(config_path)
    if not worker:
        prepare_directories(config, config_path)
    from geosmtp import log
    from geosmtp.server import Server

    log.setup(config.log.level, config.log.format, config.log.file)
    if worker:
        role, notify = "worker", int(os.environ["GEOSMTP_NOTIFY_FD"])
    else:
        role, notify = ("master" if config.server.workers > 1 else "all"), None
    try:
        server = Server(config, role=role, config_path=os.path.abspath(config_path), notify_fd=notify)
        server.serve_forever()
    except (OSError, ValueError) as exc:  # the port is taken, the spool or a file is unusable
        click.echo(f"geosmtp: cannot start: {exc}", err=True)
        sys.exit(1)


def prepare_directories(config: Config, config_path: str) -> None:
    """Before the server starts: as root with [server] user, the spool and Maildir root are
    made for that user if missing; with workers and metrics, the directory where every
    process keeps its counters (the master adds them up) is emptied of a previous run's."""
    import os

    from geosmtp import privileges

    target = privileges.identity(config.server.user, config.server.group)
    problem = privileges.switch_problem(target)
    if problem:
        refuse(f"{config_path}: cannot start with this configuration", [problem])
    spool = os.path.abspath(config.server.spool_dir)
    privileges.make_own_dirs(target, spool, os.path.abspath(config.local.maildir_root))
    if config.server.workers > 1 and config.metrics.address:
        import shutil

        from geosmtp.spool import lock_holder

        directory = os.path.join(spool, "metrics")
        if lock_holder(spool) is None:  # no geosmtp runs here: the files are a previous run's
            shutil.rmtree(directory, ignore_errors=True)
        privileges.make_own_dirs(target, directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: str) -> None:
    """Validate the configuration file and open everything it names (certificate and key,
    users file, DKIM keys, password and CA files, spool, Maildir root) as `start` does; exit
    with status 2 and every problem listed when the server could not start with it."""
    config = check_or_exit(config_path)
    names = ", ".join(f"{item.name}={item.address}" for item in config.listener)
    click.echo(f"{config_path}: ok ({len(config.listener)} listeners: {names})")


@main.command()
@CONFIG_OPTION
@click.argument("user")
@click.option("--stdin", "from_stdin", is_flag=True, help="read the password from standard input")
@click.option("--delete", is_flag=True, help="remove the user instead")
def passwd(config_path: str, user: str, from_stdin: bool, delete: bool) -> None:
    """Set (or --delete) USER's password in [auth] users_file. The password is asked for
    twice without echo, or read from standard input with --stdin; it is stored as an scrypt
    hash. Send SIGHUP to a running server to load the change."""
    import os

    from geosmtp import safeio
    from geosmtp.auth import UserStore, hash_password
    from geosmtp.protocol import PathError, parse_address

    config = load_or_exit(config_path)
    path = config.auth.users_file
    if path is None:
        raise click.UsageError("the configuration has no [auth] users_file")
    try:
        user = parse_address(user).key
    except PathError as exc:
        raise click.UsageError(f"{user!r} is not an address: {exc.reason}")
    try:
        store = UserStore.load(path) if os.path.exists(path) else UserStore({})
    except ValueError as exc:
        click.echo(f"geosmtp: {path}: {exc}", err=True)
        sys.exit(1)
    if delete:
        if store.users.pop(user, None) is None:
            click.echo(f"geosmtp: {user} is not in {path}", err=True)
            sys.exit(1)
    else:
        if from_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        if not password:
            raise click.UsageError("empty password")
        store.users[user] = hash_password(password)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    # the new file keeps the old one's owner, group and mode (the server must read it),
    # except that others never get to read the hashes
    with safeio.atomic_write(tmp, path, like=path) as fd:
        safeio.write_all(fd, store.dump().encode("utf-8"))
    safeio.fsync_path(directory)
    click.echo(f"{path}: {user} {'removed' if delete else 'set'}")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)
