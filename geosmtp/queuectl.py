"""geosmtp-queue: the operator's tool for the spool (list, show, summary, flush, hold, release,
delete, bounce, requeue).

Plain file operations (no monkey-patching), safe while the server runs: it reads, and where it
changes anything it does so by rename through the Spool, like the server. An entry in active/
belongs to the delivery under way: only `delete` touches it; anything else answers "busy".

After flush, release, requeue and bounce the running server is told to look at incoming/ at
once: its pid is in the spool's lock file, which it holds locked (flock) while it runs, and
SIGUSR1 means "look at the queue now". No server running (the lock is free): nothing is sent,
and the server sees the changes when it starts.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator

import click

from geosmtp import safeio
from geosmtp.config import ConfigError, load, parse_duration
from geosmtp.envelope import DELIVERED, PENDING, Envelope
from geosmtp.spool import STATES, Spool, lock_holder, valid_id

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# qshape's age buckets (minutes): 0-5, 5-10, 10-20, 20-40, 40-80, 80-160, 160+
BUCKET_EDGES = (5, 10, 20, 40, 80, 160)
BUCKETS = tuple(f"{lo}-{hi}m" for lo, hi in zip((0,) + BUCKET_EDGES, BUCKET_EDGES)) + (f"{BUCKET_EDGES[-1]}m+",)
MAX_HEADERS = 256 * 1024  # `show` reads at most this much of the header section
DEFAULT_REASON = "no reason given"
# what an entry in each state can be made to do; the rest get an explanation
HINTS = {
    "hold": "it is held (use release)",
    "corrupt": "its envelope was unreadable (use requeue, or delete)",
    "incoming": "it is already waiting for delivery",
}

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

    def fail(self, qid: str, message: str) -> None:
        self.failed += 1
        click.echo(f"geosmtp-queue: {qid}: {message}", err=True)

    def done(self, qid: str, message: str) -> None:
        click.echo(f"{qid}: {message}")

    def finish(self) -> None:
        if self.queued:
            wake_server(self.spool_dir)
        sys.exit(EXIT_FAILED if self.failed else EXIT_OK)


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
    give_new_files_to_spool_owner(spool_dir)
    ctx.obj = Ctl(Spool(spool_dir), spool_dir)


def give_new_files_to_spool_owner(spool_dir: str) -> None:
    """Run as root on a spool that belongs to the server's user: every file written is given
    to that user (an envelope rewritten by root, mode 0600, would be unreadable to it)."""
    st = os.stat(spool_dir)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        safeio.owner = (st.st_uid, st.st_gid)


# -- waking the server ----------------------------------------------------------------------
def wake_server(spool_dir: str) -> bool:
    """SIGUSR1 to the running server, whose pid is in spool_dir/lock: look at incoming/ now.

    Quiet about every failure: with no server (the lock is free), an empty or stale pid, or
    a pid that is not a geosmtp, nothing is sent and the next start or scan finds the change.
    """
    pid = lock_holder(spool_dir)
    if not pid or pid <= 1 or pid == os.getpid():
        return False
    # the pid was written by the lock's holder; still, never signal a process that is not a
    # geosmtp (SIGUSR1 kills a process that does not handle it)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"geosmtp" not in fh.read():
                return False
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc to ask
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True


# -- reading entries ------------------------------------------------------------------------
@dataclass
class Entry:
    id: str
    state: str
    stat: os.stat_result
    envelope: Envelope | None
    error: str | None = None  # why the envelope could not be read

    @property
    def next_attempt(self) -> float | None:
        return self.stat.st_mtime if self.state == "deferred" else None


def read_entry(spool: Spool, qid: str, state: str) -> Entry | None:
    path = spool.entry_path(qid, state)
    try:
        st = os.stat(path)
        envelope = spool.load(qid, state)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return Entry(qid, state, st, None, f"unreadable envelope ({type(exc).__name__}: {exc})")
    if envelope.id != qid:
        return Entry(qid, state, st, None, f"the envelope is for another id ({envelope.id})")
    return Entry(qid, state, st, envelope)


def all_entries(spool: Spool, states: Iterable[str]) -> Iterator[Entry]:
    for state in states:
        for qid in spool.ids(state):
            entry = read_entry(spool, qid, state)
            if entry is not None:
                yield entry


def find(ctl: Ctl, qid: str) -> Entry | None:
    """The entry of `qid` wherever it is; a failure (reported) when there is none."""
    if not valid_id(qid):
        ctl.fail(qid, "not a queue id")
        return None
    for _ in range(3):  # it may move between locate() and the read
        state = ctl.spool.locate(qid)
        if state is None:
            break
        entry = read_entry(ctl.spool, qid, state)
        if entry is not None:
            return entry
    ctl.fail(qid, "no such message in the queue")
    return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def last_error(envelope: Envelope) -> str | None:
    """The most recent reply of a recipient that is not delivered."""
    latest = None
    for r in envelope.recipients:
        if r.status != DELIVERED and r.last_reply:
            if latest is None or (r.updated or 0) >= (latest.updated or 0):
                latest = r
    return latest.last_reply if latest else None


def stamp(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def recipient_dict(r) -> dict:
    return {"address": r.address, "original": r.original, "status": r.status, "attempts": r.attempts,
            "last_reply": r.last_reply, "updated": r.updated, "remote": r.remote}


def entry_dict(entry: Entry, now: float) -> dict:
    if entry.envelope is None:
        return {"id": entry.id, "state": entry.state, "error": entry.error, "mtime": entry.stat.st_mtime}
    env = entry.envelope
    return {
        "id": env.id, "state": entry.state, "arrival": env.created, "age": round(now - env.created, 3),
        "size": env.size, "sender": env.sender, "attempts": env.attempts, "last_attempt": env.last_attempt,
        "next_attempt": entry.next_attempt, "last_error": last_error(env),
        "recipients": [recipient_dict(r) for r in env.recipients],
    }


def when_next(entry: Entry, now: float) -> str:
    if entry.state == "deferred":
        t = entry.stat.st_mtime
        return f"next attempt {stamp(t)} ({'in ' + age(t - now) if t > now else 'due'})"
    return {"incoming": "next attempt: now", "active": "being delivered now",
            "hold": "held: no attempt until released"}.get(entry.state, "")


# -- list -----------------------------------------------------------------------------------
def duration(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}") from None


def sender_matcher(text: str | None):
    if text is None:
        return None
    if text in ("<>", ""):
        return lambda sender: sender == ""
    needle = text.strip().removeprefix("<").removesuffix(">").lower()
    return lambda sender: needle in sender.lower()


@main.command("list")
@click.option("--state", type=click.Choice(STATES), multiple=True, help="only entries in this state (repeatable)")
@click.option("--domain", multiple=True, metavar="DOMAIN",
              help="only messages with a recipient not yet delivered at this domain (repeatable)")
@click.option("--sender", metavar="TEXT", help="only senders containing TEXT (an address, a domain...); '<>' for the null sender")
@click.option("--older-than", callback=duration, metavar="AGE", help="only messages that arrived at least AGE ago (30s, 5m, 1h, 2d)")
@click.option("--younger-than", callback=duration, metavar="AGE", help="only messages that arrived less than AGE ago")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line and entry")
@click.pass_obj
def list_entries(ctl: Ctl, state, domain, sender, older_than, younger_than, as_json) -> None:
    """The queue, one message at a time: id, state, arrival, age, size, sender; each
    recipient with its status and last reply; next attempt.

    Entries whose envelope cannot be read are listed (by id) unless a filter on sender,
    domain or age is given."""
    now = time.time()
    domains = {d.lower().strip(".") for d in domain}
    sender_ok = sender_matcher(sender)
    filtered = bool(domains or sender_ok or older_than or younger_than)
    count = 0
    for entry in all_entries(ctl.spool, state or STATES):
        env = entry.envelope
        if env is None:
            if filtered:
                continue
        else:
            if domains and not any(r.status != DELIVERED and domain_of(r.address) in domains for r in env.recipients):
                continue
            if sender_ok and not sender_ok(env.sender):
                continue
            if older_than is not None and now - env.created < older_than:
                continue
            if younger_than is not None and now - env.created >= younger_than:
                continue
        count += 1
        if as_json:
            click.echo(json.dumps(entry_dict(entry, now), ensure_ascii=False))
            continue
        if env is None:
            click.echo(f"{entry.id}  {entry.state:<8}  {entry.error}")
            continue
        click.echo(f"{env.id}  {entry.state:<8}  {stamp(env.created)} {age(now - env.created):>5} "
                   f"{env.size:>9}  <{env.sender}>")
        for r in env.recipients:
            note = f"  ({r.last_reply})" if r.last_reply and r.status != DELIVERED else ""
            click.echo(f"    {r.status:<9} <{r.address}>{note}")
        tries = f"{env.attempts} attempt{'' if env.attempts == 1 else 's'}"
        click.echo(f"    {when_next(entry, now)}; {tries}" if when_next(entry, now) else f"    {tries}")
    if not as_json:
        click.echo(f"-- {count} {'entry' if count == 1 else 'entries'}")
    sys.exit(EXIT_OK)


# -- show -----------------------------------------------------------------------------------
def read_message(spool: Spool, qid: str, whole: bool) -> tuple[bytes | None, str | None]:
    """(the header section, or the whole message when `whole`; why not, if unreadable)."""
    try:
        fh = spool.open_body(qid)
    except FileNotFoundError:
        return None, "the message file is missing"
    except (OSError, ValueError) as exc:
        return None, str(exc)
    with fh:
        if whole:
            return fh.read(), None
        lines, size = [], 0
        while size < MAX_HEADERS:
            line = fh.readline(MAX_HEADERS - size)
            if not line or line in (b"\r\n", b"\n"):
                break
            lines.append(line)
            size += len(line)
        return b"".join(lines), None


def header_fields(data: bytes) -> list[dict]:
    fields: list[dict] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw[:1] in (" ", "\t") and fields:
            fields[-1]["value"] += " " + raw.strip()
        elif ":" in raw:
            name, _, value = raw.partition(":")
            fields.append({"name": name, "value": value.strip()})
    return fields


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--body", is_flag=True, help="print the whole message, not just its header section")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line and id")
@click.pass_obj
def show(ctl: Ctl, ids, body, as_json) -> None:
    """The envelope and the message headers of each id (with --body, the whole message)."""
    now = time.time()
    for qid in read_ids(ids):
        entry = find(ctl, qid)
        if entry is None:
            continue
        data, problem = read_message(ctl.spool, qid, body)
        if as_json:
            out = {"id": qid, "state": entry.state, "next_attempt": entry.next_attempt,
                   "envelope": entry.envelope.to_dict() if entry.envelope else None}
            if entry.envelope is None:
                out["error"] = entry.error
                out["envelope_line"] = raw_first_line(ctl.spool, qid, entry.state)
            head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0] if data is not None and body else data
            out["headers"] = header_fields(head) if head is not None else None
            if body:
                out["message"] = data.decode("utf-8", "replace") if data is not None else None
            if problem:
                out["message_error"] = problem
            click.echo(json.dumps(out, ensure_ascii=False))
            continue
        show_text(ctl, entry, now)
        if problem:
            click.echo(f"message: {problem}")
        elif body:
            click.echo("--- message")
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            if data and not data.endswith(b"\n"):
                click.echo()
        else:
            click.echo("--- headers")
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    ctl.finish()


def raw_first_line(spool: Spool, qid: str, state: str) -> str | None:
    try:
        with open(spool.entry_path(qid, state), "rb") as fh:
            return fh.readline(4096).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return None


def show_text(ctl: Ctl, entry: Entry, now: float) -> None:
    env = entry.envelope
    click.echo(f"id:          {entry.id}")
    click.echo(f"state:       {entry.state}")
    if env is None:
        click.echo(f"error:       {entry.error}")
        click.echo(f"first line:  {raw_first_line(ctl.spool, entry.id, entry.state)}")
        return
    click.echo(f"arrival:     {stamp(env.created)} ({age(now - env.created)} ago)")
    click.echo(f"size:        {env.size} ({env.body}{', SMTPUTF8' if env.smtputf8 else ''})")
    click.echo(f"sender:      <{env.sender}>")
    c = env.client
    click.echo(f"client:      [{c.address}] helo={c.helo or '-'} listener={c.listener or '-'} "
               f"user={c.auth_user or '-'} tls={c.tls or '-'}")
    click.echo(f"attempts:    {env.attempts}, last {stamp(env.last_attempt)}")
    nxt = when_next(entry, now)
    if nxt:
        click.echo(f"next:        {nxt}")
    click.echo("recipients:")
    for r in env.recipients:
        orig = f" (RCPT TO:<{r.original}>)" if r.original != r.address else ""
        click.echo(f"    {r.status:<9} <{r.address}>{orig} attempts={r.attempts}")
        if r.last_reply:
            where = f"{r.remote}, " if r.remote else ""
            click.echo(f"              [{where}{stamp(r.updated)}] {r.last_reply}")
    extra = {k: ("(signature)" if k == "dkim" and v else v) for k, v in env.extra.items()}
    if extra:
        click.echo(f"extra:       {json.dumps(extra, ensure_ascii=False)}")


# -- summary --------------------------------------------------------------------------------
def bucket(age_seconds: float) -> str:
    minutes = age_seconds / 60
    for label, edge in zip(BUCKETS, BUCKET_EDGES):
        if minutes < edge:
            return label
    return BUCKETS[-1]


@main.command()
@click.option("--state", type=click.Choice(STATES), multiple=True,
              help="count only these states in the domain table (repeatable; default all but corrupt)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_obj
def summary(ctl: Ctl, state, as_json) -> None:
    """Counts by state, and by destination domain in age buckets (like Postfix's qshape).

    The domain table counts messages with a recipient not yet delivered there (a message
    to two domains counts once in each; TOTAL once), by time since arrival."""
    now = time.time()
    wanted = set(state or (s for s in STATES if s != "corrupt"))
    states = dict.fromkeys(STATES, 0)
    total = {"messages": 0, "recipients": 0, "buckets": dict.fromkeys(BUCKETS, 0)}
    domains: dict[str, dict] = {}
    for entry in all_entries(ctl.spool, STATES):
        states[entry.state] += 1
        env = entry.envelope
        if env is None or entry.state not in wanted:
            continue
        b = bucket(now - env.created)
        pending = [r for r in env.recipients if r.status == PENDING]
        if not pending:
            continue
        total["messages"] += 1
        total["recipients"] += len(pending)
        total["buckets"][b] += 1
        seen: set[str] = set()
        for r in pending:
            d = domain_of(r.address)
            row = domains.setdefault(d, {"messages": 0, "recipients": 0, "buckets": dict.fromkeys(BUCKETS, 0)})
            row["recipients"] += 1
            if d not in seen:
                seen.add(d)
                row["messages"] += 1
                row["buckets"][b] += 1
    order = sorted(domains, key=lambda d: (-domains[d]["messages"], d))
    if as_json:
        click.echo(json.dumps({"states": states, "total": sum(states.values()), "buckets": list(BUCKETS),
                               "all": total, "domains": {d: domains[d] for d in order}}, ensure_ascii=False))
        sys.exit(EXIT_OK)
    for s, n in states.items():
        click.echo(f"{s:<10}{n:>7}")
    click.echo(f"{'total':<10}{sum(states.values()):>7}")
    click.echo()
    width = max([len("domain"), *map(len, order)]) + 1
    click.echo(f"{'domain':<{width}}{'T':>6}" + "".join(f"{b:>9}" for b in BUCKETS))
    for name, row in [("TOTAL", total), *((d, domains[d]) for d in order)]:
        click.echo(f"{name:<{width}}{row['messages']:>6}" + "".join(f"{row['buckets'][b]:>9}" for b in BUCKETS))
    sys.exit(EXIT_OK)


# -- changes --------------------------------------------------------------------------------
def read_ids(ids: Iterable[str]) -> Iterator[str]:
    for qid in ids:
        if qid == "-":
            for line in sys.stdin:
                if line.strip():
                    yield line.strip()
        else:
            yield qid


def select_ids(ctl: Ctl, ids: tuple[str, ...], every: bool, states: tuple[str, ...]) -> list[str]:
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


def transition(ctl: Ctl, qid: str, sources: tuple[str, ...], dst: str, verb: str, done: str,
               already: str) -> bool:
    """Move one entry from one of `sources` to `dst` by rename; report either way."""
    if not valid_id(qid):
        ctl.fail(qid, "not a queue id")
        return False
    for _ in range(3):  # the server may move it between locate() and the rename
        state = ctl.spool.locate(qid)
        if state is None:
            ctl.fail(qid, "no such message in the queue")
            return False
        if state == dst:
            ctl.done(qid, already)
            return True
        if state == "active":
            ctl.fail(qid, f"busy: being delivered now; try again to {verb} it")
            return False
        if state not in sources:
            ctl.fail(qid, f"cannot {verb} it: {HINTS.get(state, f'it is in {state}/')}")
            return False
        if ctl.spool.move(qid, state, dst):
            if dst == "incoming":
                ctl.queued += 1
            ctl.done(qid, done)
            return True
    ctl.fail(qid, f"busy: it keeps moving; try again to {verb} it")
    return False


@main.command()
@click.argument("ids", nargs=-1)
@click.pass_obj
def flush(ctl: Ctl, ids) -> None:
    """Retry now: deferred messages go back to incoming/ (every deferred message when no id
    is given) and the server is told to look."""
    targets = list(read_ids(ids)) if ids else ctl.spool.ids("deferred")
    if not targets:
        click.echo("nothing deferred")
    for qid in targets:
        transition(ctl, qid, ("deferred",), "incoming", "flush", "queued for delivery now",
                   "already waiting for delivery")
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every message not held (those being delivered answer busy)")
@click.pass_obj
def hold(ctl: Ctl, ids, every) -> None:
    """Park messages in hold/: no delivery until released. A message being delivered right
    now cannot be held ("busy"): try again after its attempt."""
    for qid in select_ids(ctl, ids, every, ("incoming", "deferred", "active")):
        transition(ctl, qid, ("incoming", "deferred"), "hold", "hold", "held", "already held")
    ctl.finish()


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every held message")
@click.pass_obj
def release(ctl: Ctl, ids, every) -> None:
    """Move held messages back into the queue for delivery now."""
    for qid in select_ids(ctl, ids, every, ("hold",)):
        if not valid_id(qid):
            ctl.fail(qid, "not a queue id")
            continue
        state = ctl.spool.locate(qid)
        if state is None:
            ctl.fail(qid, "no such message in the queue")
        elif state != "hold":
            ctl.fail(qid, f"not held (it is in {state}/)")
        elif ctl.spool.move(qid, "hold", "incoming"):
            ctl.queued += 1
            ctl.done(qid, "released")
        else:
            ctl.fail(qid, "not held (moved meanwhile)")
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
        if valid_id(qid) and ctl.spool.locate(qid) == "corrupt":
            problem = corrupt_problem(ctl.spool, qid)
            if problem:
                ctl.fail(qid, f"still corrupt: {problem}")
                continue
        transition(ctl, qid, ("deferred", "hold", "corrupt"), "incoming", "requeue", "requeued",
                   "already waiting for delivery")
    ctl.finish()


def corrupt_problem(spool: Spool, qid: str) -> str | None:
    entry = read_entry(spool, qid, "corrupt")
    if entry is None:
        return None  # gone meanwhile: transition() says so
    if entry.envelope is None:
        return entry.error
    if not entry.envelope.recipients:
        return "the envelope has no recipients"
    try:
        with spool.open_body(qid):
            pass
    except FileNotFoundError:
        return "the message file is missing"
    except (OSError, ValueError) as exc:
        return f"the message file is unreadable ({exc})"
    return None


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def delete(ctl: Ctl, ids) -> None:
    """Remove messages from the queue for good, in any state, without telling anyone. A
    message being delivered right now is removed too; its attempt under way may still
    deliver to some recipients."""
    for qid in read_ids(ids):
        if not valid_id(qid):
            ctl.fail(qid, "not a queue id")
            continue
        for _ in range(3):
            state = ctl.spool.locate(qid)
            if state is None:
                ctl.fail(qid, "no such message in the queue")
                break
            if ctl.spool.delete(qid, state):
                note = " (it was being delivered: the attempt under way may still deliver)" if state == "active" else ""
                ctl.done(qid, f"deleted from {state}/{note}")
                break
        else:
            ctl.fail(qid, "busy: it keeps moving; try again to delete it")
    ctl.finish()


def one_line(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\s]+", " ", text).strip()[:500]


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--reason", default=DEFAULT_REASON, show_default=True, help="told to the sender in the notice")
@click.pass_obj
def bounce(ctl: Ctl, ids, reason) -> None:
    """Return messages to their senders: every recipient not yet delivered fails (5.0.0) and
    the sender gets a delivery status notification. The server does it, at once: the entry
    goes back to incoming/ marked "return to sender"."""
    reason = one_line(reason) or DEFAULT_REASON
    for qid in read_ids(ids):
        bounce_one(ctl, qid, reason)
    ctl.finish()


def bounce_one(ctl: Ctl, qid: str, reason: str) -> None:
    spool = ctl.spool
    entry = find(ctl, qid)
    if entry is None:
        return
    if entry.state == "active":
        return ctl.fail(qid, "busy: being delivered now; try again to bounce it")
    if entry.state == "corrupt":
        return ctl.fail(qid, f"cannot bounce it: {HINTS['corrupt']}")
    origin = entry.state
    # take it from the queue manager first: hold/ is never claimed, so the rewrite below
    # cannot race a delivery
    if origin != "hold" and not spool.move(qid, origin, "hold"):
        return ctl.fail(qid, "busy: it moved (being delivered?); try again to bounce it")
    try:
        envelope = spool.load(qid, "hold")
        if not envelope.pending():
            raise ValueError("no recipient is waiting for delivery")
        envelope.extra["return_to_sender"] = reason
        if not spool.rewrite(envelope, "hold"):
            return ctl.fail(qid, "gone meanwhile (deleted?)")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        if origin != "hold":
            spool.move(qid, "hold", origin)  # back where it was (a deferred entry keeps its mtime)
        return ctl.fail(qid, f"cannot bounce it: {exc}")
    except FileNotFoundError:
        return ctl.fail(qid, "gone meanwhile (deleted?)")
    if not spool.move(qid, "hold", "incoming"):
        return ctl.fail(qid, "gone meanwhile (deleted?)")
    ctl.queued += 1
    note = "" if envelope.sender else " (the sender is <>: no notice is sent)"
    ctl.done(qid, f"returned to sender{note}")
