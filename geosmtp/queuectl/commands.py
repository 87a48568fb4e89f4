"""geosmtp-queue's click wiring: the commands and their options, ids from the command line
or stdin, which renderer prints, on which stream, and the exit status. The work is done in
entries.py (reading) and changes.py (changing); this module decides nothing about the spool."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import click

from geosmtp.config import ConfigError, load, parse_duration
from geosmtp.queuectl import as_json, as_text, changes, entries
from geosmtp.queuectl.changes import DEFAULT_REASON
from geosmtp.queuectl.entries import Result
from geosmtp.queuectl.wake import wake_server
from geosmtp.spool import STATES, Spool

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """\b
Exit status:
  0  every operation succeeded
  1  an operation failed for at least one id (unknown id, busy, wrong state);
     the other ids are still processed
  2  bad usage or configuration
"""


# -- the tool's state -----------------------------------------------------------------------
@dataclass
class Ctl:
    spool: Spool
    spool_dir: str
    failed: int = 0
    queued: int = 0  # entries put into incoming/: the server is told at the end

    def report(self, outcome: Result) -> None:
        """A success on stdout; a failure on stderr, and the exit status becomes 1."""
        if not outcome.ok:
            self.failed += 1
        self.queued += outcome.queued
        sys.stdout.flush()  # what emit() buffered comes first
        click.echo(as_text.result(outcome), err=not outcome.ok)

    def finish(self) -> None:
        if self.queued:
            wake_server(self.spool_dir)
        leave(EXIT_FAILED if self.failed else EXIT_OK)


def leave(status: int) -> None:
    """Flush what emit() buffered (here, where a closed pipe is caught) and exit."""
    sys.stdout.flush()
    sys.exit(status)


def emit(pieces: Iterable[str | bytes]) -> None:
    """Lines as text; bytes (a message) as they are. Text goes through stdout's own buffer,
    flushed when it fills (and at exit): click.echo flushes every line, a third of the
    time of a `list` of 100,000 entries."""
    out = sys.stdout
    for piece in pieces:
        if isinstance(piece, bytes):
            out.flush()
            out.buffer.write(piece)
            out.buffer.flush()
        else:
            out.write(piece)
            out.write("\n")


class Group(click.Group):
    """Storage errors nobody expected (permissions, I/O) end the command with status 1; every
    command's help ends with the exit statuses."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("epilog", EPILOG)
        return super().command(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `geosmtp-queue list | head`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_FAILED)
        except OSError as exc:
            click.echo(f"geosmtp-queue: {exc}", err=True)
            ctx.exit(EXIT_FAILED)


@click.group(cls=Group, epilog=EPILOG)
@click.option("-c", "--config", "config_path", default="/etc/geosmtp/geosmtp.toml", envvar="GEOSMTP_CONFIG",
              show_default=True, type=click.Path(dir_okay=False), help="configuration file (TOML)")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """Inspect and manage the geosmtp queue, also while the server runs.

    Read: list, show, summary (each with --json). Change: flush, hold, release, requeue,
    bounce, delete. Commands that take ids accept several; "-" reads ids from stdin, one per
    line (e.g. from `list --json | jq -r .id`).
    """
    try:
        config = load(config_path)
    except ConfigError as exc:
        click.echo(f"geosmtp-queue: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    spool_dir = os.fspath(config.server.spool_dir)
    if not os.path.isdir(os.path.join(spool_dir, "queue")):
        click.echo(f"geosmtp-queue: {spool_dir}: no spool there (server.spool_dir; has geosmtp "
                   "run with this configuration?)", err=True)
        sys.exit(EXIT_USAGE)
    changes.give_new_files_to_spool_owner(spool_dir)
    ctx.obj = Ctl(Spool(spool_dir, flush=config.server.spool_flush), spool_dir)


def read_ids(ids: Iterable[str]) -> Iterator[str]:
    """The ids given; "-" stands for the ids on stdin, one a line."""
    for qid in ids:
        if qid == "-":
            for line in sys.stdin:
                if line.strip():
                    yield line.strip()
        else:
            yield qid


def select_ids(ctl: Ctl, ids: tuple[str, ...], every: bool, states: tuple[str, ...]) -> list[str]:
    """The ids given, or with --all every id in `states`."""
    if every and ids:
        raise click.UsageError("give queue ids or --all, not both")
    if every:
        found = [qid for s in states for qid in ctl.spool.ids(s)]
        if not found:
            click.echo(f"no message in {', '.join(s + '/' for s in states)}")
        return found
    if not ids:
        raise click.UsageError("give queue ids, or --all")
    return list(read_ids(ids))


# -- reading --------------------------------------------------------------------------------
def duration(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}") from None


@main.command("list")
@click.option("--state", type=click.Choice(STATES), multiple=True, help="only entries in this state (repeatable)")
@click.option("--domain", multiple=True, metavar="DOMAIN",
              help="only messages with a recipient not yet delivered at this domain (repeatable)")
@click.option("--sender", metavar="TEXT", help="only senders containing TEXT (an address, a domain...); '<>' for the null sender")
@click.option("--older-than", callback=duration, metavar="AGE", help="only messages that arrived at least AGE ago (30s, 5m, 1h, 2d)")
@click.option("--younger-than", callback=duration, metavar="AGE", help="only messages that arrived less than AGE ago")
@click.option("--json", "as_json_", is_flag=True, help="one JSON object per line and entry")
@click.pass_obj
def list_entries(ctl: Ctl, state, domain, sender, older_than, younger_than, as_json_) -> None:
    """The queue, one message at a time: id, state, arrival, age, size, sender; each
    recipient with its status and last reply; next attempt. State by state, each in the
    order its directory gives (streamed: a million entries take no more memory than ten).

    Entries whose envelope cannot be read are listed (by id) unless a filter on sender,
    domain or age is given."""
    now = time.time()
    keep = entries.Filter(tuple(state) or STATES, frozenset(d.lower().strip(".") for d in domain),
                          entries.sender_matcher(sender), older_than, younger_than)
    count = 0
    for entry in entries.matching(ctl.spool, keep, now):
        count += 1
        emit([as_json.line(as_json.entry(entry, now))] if as_json_ else as_text.list_entry(entry, now))
    if not as_json_:
        emit([as_text.list_end(count)])
    leave(EXIT_OK)


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--body", is_flag=True, help="print the whole message, not just its header section")
@click.option("--json", "as_json_", is_flag=True, help="one JSON object per line and id")
@click.pass_obj
def show(ctl: Ctl, ids, body, as_json_) -> None:
    """The envelope and the message headers of each id (with --body, the whole message)."""
    now = time.time()
    for qid in read_ids(ids):
        shown = entries.look(ctl.spool, qid, body)
        if isinstance(shown, Result):
            ctl.report(shown)
        else:
            emit([as_json.line(as_json.show(shown))] if as_json_ else as_text.show(shown, now))
    ctl.finish()


@main.command()
@click.option("--state", type=click.Choice(STATES), multiple=True,
              help="count only these states in the domain table (repeatable; default all but corrupt)")
@click.option("--json", "as_json_", is_flag=True, help="one JSON object")
@click.pass_obj
def summary(ctl: Ctl, state, as_json_) -> None:
    """Counts by state, and by destination domain in age buckets (like Postfix's qshape).

    The domain table counts messages with a recipient not yet delivered there (a message
    to two domains counts once in each; TOTAL once), by time since arrival."""
    found = entries.shape(ctl.spool, state or (s for s in STATES if s != "corrupt"), time.time())
    emit([as_json.line(as_json.summary(found))] if as_json_ else as_text.summary(found))
    leave(EXIT_OK)


# -- changes --------------------------------------------------------------------------------
@main.command()
@click.argument("ids", nargs=-1)
@click.pass_obj
def flush(ctl: Ctl, ids) -> None:
    """Retry now: deferred messages go back to incoming/ (every deferred message when no id
    is given) and the server is told to look. A message being delivered right now is left
    to that attempt ("being delivered now", not an error)."""
    targets = list(read_ids(ids)) if ids else ctl.spool.ids("deferred")
    if not targets:
        click.echo("nothing deferred")
    for qid in targets:
        ctl.report(changes.transition(ctl.spool, qid, changes.FLUSH))
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every message not held (those being delivered answer busy)")
@click.pass_obj
def hold(ctl: Ctl, ids, every) -> None:
    """Park messages in hold/: no delivery until released. A message being delivered right
    now cannot be held ("busy"): try again after its attempt."""
    for qid in select_ids(ctl, ids, every, ("incoming", "deferred", "active")):
        ctl.report(changes.transition(ctl.spool, qid, changes.HOLD))
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every held message")
@click.pass_obj
def release(ctl: Ctl, ids, every) -> None:
    """Move held messages back into the queue for delivery now."""
    for qid in select_ids(ctl, ids, every, ("hold",)):
        ctl.report(changes.transition(ctl.spool, qid, changes.RELEASE))
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every deferred, held and corrupt message")
@click.pass_obj
def requeue(ctl: Ctl, ids, every) -> None:
    """Put messages from deferred/, hold/ or corrupt/ back into incoming/ for delivery now.
    A corrupt entry goes back only if its envelope now reads, is for its id, and its message
    file is there."""
    for qid in select_ids(ctl, ids, every, ("deferred", "hold", "corrupt")):
        ctl.report(changes.transition(ctl.spool, qid, changes.REQUEUE))
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def delete(ctl: Ctl, ids) -> None:
    """Remove messages from the queue for good, in any state, without telling anyone. A
    message being delivered right now is removed too; its attempt under way may still
    deliver to some recipients."""
    for qid in read_ids(ids):
        ctl.report(changes.delete(ctl.spool, qid))
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--reason", default=DEFAULT_REASON, show_default=True, help="told to the sender in the notice")
@click.pass_obj
def bounce(ctl: Ctl, ids, reason) -> None:
    """Return messages to their senders: every recipient not yet delivered fails (5.0.0) and
    the sender gets a delivery status notification. The server does it, at once: the entry
    goes back to incoming/ marked "return to sender"."""
    reason = changes.one_line(reason) or DEFAULT_REASON
    for qid in read_ids(ids):
        ctl.report(changes.bounce(ctl.spool, qid, reason))
    ctl.finish()
