"""The `geosmtp` command: start, check-config, passwd, directory, version.

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
    """Set (or --delete) USER's password, stored as an scrypt hash: in [auth] users_file (send
    SIGHUP to a running server to load the change), or in the users table of an SQL
    [directory] (live within its cache_ttl). The password is asked for twice without echo,
    or read from standard input with --stdin."""
    from geosmtp.auth import hash_password

    config = load_or_exit(config_path)
    if config.directory.backend == "config" and config.auth.users_file is None:
        raise click.UsageError("the configuration has no [auth] users_file")
    user = address_key(user)
    password = None if delete else read_new_password(from_stdin)
    if config.directory.backend == "config":
        write_users_file(config.auth.users_file, user, None if delete else hash_password(password))
        return
    from geosmtp.directory import sql

    with sql_engine(config) as engine:
        if delete:
            if not sql.delete_user(engine, user):
                click.echo(f"geosmtp: {user} is not in the directory's users", err=True)
                sys.exit(1)
        else:
            sql.set_password(engine, user, hash_password(password))
        click.echo(f"{engine.describe()}: {user} {'removed' if delete else 'set'}")


def address_key(text: str) -> str:
    from geosmtp.protocol import PathError, parse_address

    try:
        return parse_address(text).key
    except PathError as exc:
        raise click.UsageError(f"{text!r} is not an address: {exc.reason}")


def read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.UsageError("empty password")
    return password


def write_users_file(path, user: str, encoded: str | None) -> None:
    """Set (encoded) or remove (None) one user in the users file, atomically."""
    import os

    from geosmtp import safeio
    from geosmtp.auth import UserStore

    try:
        store = UserStore.load(path) if os.path.exists(path) else UserStore({})
    except ValueError as exc:
        click.echo(f"geosmtp: {path}: {exc}", err=True)
        sys.exit(1)
    if encoded is None:
        if store.users.pop(user, None) is None:
            click.echo(f"geosmtp: {user} is not in {path}", err=True)
            sys.exit(1)
    else:
        store.users[user] = encoded
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    # the new file keeps the old one's owner, group and mode (the server must read it),
    # except that others never get to read the hashes
    with safeio.atomic_write(tmp, path, like=path) as fd:
        safeio.write_all(fd, store.dump().encode("utf-8"))
    safeio.fsync_path(directory)
    click.echo(f"{path}: {user} {'removed' if encoded is None else 'set'}")


class sql_engine:
    """The [directory] SQL engine for one command; exits with status 1 and the reason when
    the database does not answer, status 2 when the directory is not SQL."""

    def __init__(self, config: Config, create: bool = False):
        if config.directory.backend == "config":
            raise click.UsageError('[directory] backend = "config": the domains, mailboxes and aliases are '
                                   "in [local] of the configuration file")
        from geosmtp import parts

        try:
            self.engine = parts.directory_engine(config, lambda fn, *args: fn(*args), create=create)
        except (OSError, ValueError) as exc:  # directory.password_file
            click.echo(f"geosmtp: {exc}", err=True)
            sys.exit(1)

    def __enter__(self):
        return self.engine

    def __exit__(self, kind, exc, tb) -> None:
        from geosmtp.directory import DirectoryUnavailable

        self.engine.close()
        if isinstance(exc, DirectoryUnavailable):
            click.echo(f"geosmtp: {exc}", err=True)
            sys.exit(1)


@main.group()
def directory() -> None:
    """The SQL directory ([directory] backend = "sqlite" or "postgresql"): make its tables,
    add domains, mailboxes and aliases. Running servers see a change within cache_ttl."""


@directory.command("init")
@CONFIG_OPTION
def directory_init(config_path: str) -> None:
    """Create the directory's tables (and the SQLite file) where missing; changes nothing that
    exists, so it may be run again."""
    from geosmtp.directory import sql

    with sql_engine(load_or_exit(config_path), create=True) as engine:
        sql.init(engine)
        click.echo(f"{engine.describe()}: directory tables ready (schema {sql.SCHEMA_VERSION})")


@directory.command("add-domain")
@CONFIG_OPTION
@click.argument("domains", nargs=-1, required=True)
def directory_add_domain(config_path: str, domains: tuple[str, ...]) -> None:
    """Make DOMAINS local: their mail is delivered here."""
    from geosmtp.config import is_hostname
    from geosmtp.directory import sql

    names = [d.lower() for d in domains]
    _add_rows(config_path, names, [d for d in names if not is_hostname(d)], "not a domain name",
              sql.add_domain, "domains")


@directory.command("add-mailbox")
@CONFIG_OPTION
@click.argument("addresses", nargs=-1, required=True)
def directory_add_mailbox(config_path: str, addresses: tuple[str, ...]) -> None:
    """Add mailboxes (their domains must be local for mail to reach them)."""
    from geosmtp.directory import sql

    keys = [address_key(a) for a in addresses]
    # the local part becomes a folder under maildir_root/<domain>/
    bad = [k for k in keys if k.rpartition("@")[0].startswith(".") or "/" in k.rpartition("@")[0]]
    _add_rows(config_path, keys, bad, "cannot be a mailbox folder name", sql.add_mailbox, "mailboxes")


def _add_rows(config_path: str, rows: list[str], bad: list[str], why: str, add, what: str) -> None:
    """Refuse the command if any row is bad, else add each row to the SQL directory."""
    if bad:
        raise click.UsageError(f"{why}: {', '.join(bad)}")
    with sql_engine(load_or_exit(config_path)) as engine:
        for row in rows:
            add(engine, row)
        click.echo(f"{engine.describe()}: {len(rows)} {what} added")


@directory.command("add-alias")
@CONFIG_OPTION
@click.argument("alias")
@click.argument("targets", nargs=-1, required=True)
def directory_add_alias(config_path: str, alias: str, targets: tuple[str, ...]) -> None:
    """ALIAS delivers to TARGETS (mailboxes, other aliases or remote addresses), in order."""
    from geosmtp.directory import sql

    key, keys = address_key(alias), [address_key(t) for t in targets]
    with sql_engine(load_or_exit(config_path)) as engine:
        sql.add_alias(engine, key, keys)
        click.echo(f"{engine.describe()}: {key} -> {', '.join(keys)}")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)
