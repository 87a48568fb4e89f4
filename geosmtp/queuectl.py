"""geosmtp-queue: look at the spool from outside the server.

Plain file operations (no monkey-patching); safe while the server runs, since it only reads
and, where it changes anything, does so by rename like the server.

Exit status: 0 success, 1 an operation failed (e.g. an unknown id), 2 bad usage or config.
"""
from __future__ import annotations

import json
import sys
import time

import click

from geosmtp.config import ConfigError, load
from geosmtp.spool import STATES, Spool


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@click.group()
@click.option("-c", "--config", "config_path", default="/etc/geosmtp/geosmtp.toml", envvar="GEOSMTP_CONFIG",
              show_default=True, type=click.Path(dir_okay=False), help="configuration file (TOML)")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """Inspect and manage the geosmtp queue."""
    try:
        config = load(config_path)
    except ConfigError as exc:
        click.echo(f"geosmtp-queue: {exc}", err=True)
        sys.exit(2)
    ctx.obj = Spool(config.server.spool_dir)


@main.command("list")
@click.option("--state", type=click.Choice(STATES), multiple=True, help="only these states")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per entry")
@click.pass_obj
def list_entries(spool: Spool, state: tuple[str, ...], as_json: bool) -> None:
    """One entry per message: id, state, age, size, sender, recipients."""
    now = time.time()
    count = 0
    for st, env, stat in spool.entries(state or STATES):
        count += 1
        if env is None:
            row = {"state": st, "error": "unreadable envelope", "mtime": stat.st_mtime}
            click.echo(json.dumps(row) if as_json else f"? {st} unreadable envelope")
            continue
        if as_json:
            row = {
                "id": env.id, "state": st, "arrival": env.created, "age": round(now - env.created, 3),
                "size": env.size, "sender": env.sender, "attempts": env.attempts,
                "next_attempt": stat.st_mtime if st == "deferred" else None,
                "recipients": [
                    {"address": r.address, "original": r.original, "status": r.status,
                     "attempts": r.attempts, "last_reply": r.last_reply}
                    for r in env.recipients
                ],
            }
            click.echo(json.dumps(row, ensure_ascii=False))
            continue
        click.echo(f"{env.id}  {st:<8} {_age(now - env.created):>5} {env.size:>9}  <{env.sender}>")
        for r in env.recipients:
            note = f"  ({r.last_reply})" if r.last_reply and r.status != "delivered" else ""
            click.echo(f"    {r.status:<9} <{r.address}>{note}")
    if not as_json:
        click.echo(f"-- {count} {'entry' if count == 1 else 'entries'}")


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "release_all", is_flag=True, help="every held message")
@click.pass_obj
def release(spool: Spool, ids: tuple[str, ...], release_all: bool) -> None:
    """Move held messages back into the queue (the server picks them up at its next scan)."""
    if release_all:
        ids = tuple(spool.ids("hold"))
    elif not ids:
        raise click.UsageError("give queue ids, or --all")
    failed = 0
    for qid in ids:
        if spool.move(qid, "hold", "incoming"):
            click.echo(f"{qid}: released")
        else:
            click.echo(f"{qid}: not held", err=True)
            failed += 1
    sys.exit(1 if failed else 0)
