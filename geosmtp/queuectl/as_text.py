"""geosmtp-queue's output for a person. Each renderer answers the lines to print, in order;
a `bytes` piece is part of a message, to be written as it is (no decoding)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Iterator

from geosmtp.envelope import DELIVERED
from geosmtp.queuectl.entries import BUCKETS, Entry, Result, Shape, Shown


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


def when_next(entry: Entry, now: float) -> str:
    if entry.state == "deferred":
        t = entry.stat.st_mtime
        return f"next attempt {stamp(t)} ({'in ' + age(t - now) if t > now else 'due'})"
    return {"incoming": "next attempt: now", "active": "being delivered now",
            "hold": "held: no attempt until released"}.get(entry.state, "")


def result(outcome: Result) -> str:
    """A success, for stdout; a failure, for stderr, names the tool."""
    line = f"{outcome.qid}: {outcome.message}"
    return line if outcome.ok else f"geosmtp-queue: {line}"


# -- list -----------------------------------------------------------------------------------
def list_entry(entry: Entry, now: float) -> list[str]:
    """id, state, arrival, age, size, sender; a line per recipient; the next attempt."""
    env = entry.envelope
    if env is None:
        return [f"{entry.id}  {entry.state:<8}  {entry.error}"]
    lines = [f"{env.id}  {entry.state:<8}  {stamp(env.created)} {age(now - env.created):>5} "
             f"{env.size:>9}  <{env.sender}>"]
    for r in env.recipients:
        note = f"  ({r.last_reply})" if r.last_reply and r.status != DELIVERED else ""
        lines.append(f"    {r.status:<9} <{r.address}>{note}")
    tries = f"{env.attempts} attempt{'' if env.attempts == 1 else 's'}"
    nxt = when_next(entry, now)
    lines.append(f"    {nxt}; {tries}" if nxt else f"    {tries}")
    return lines


def list_end(count: int) -> str:
    return f"-- {count} {'entry' if count == 1 else 'entries'}"


# -- show -----------------------------------------------------------------------------------
def show(shown: Shown, now: float) -> Iterator[str | bytes]:
    """The envelope, then the header section (or the whole message)."""
    yield from envelope_lines(shown, now)
    if shown.problem:
        yield f"message: {shown.problem}"
    elif shown.whole:
        yield "--- message"
        yield shown.data
        if shown.data and not shown.data.endswith(b"\n"):
            yield ""
    else:
        yield "--- headers"
        yield shown.data


def envelope_lines(shown: Shown, now: float) -> Iterator[str]:
    entry, env = shown.entry, shown.entry.envelope
    yield f"id:          {entry.id}"
    yield f"state:       {entry.state}"
    if env is None:
        yield f"error:       {entry.error}"
        yield f"first line:  {shown.first_line}"
        return
    yield f"arrival:     {stamp(env.created)} ({age(now - env.created)} ago)"
    yield f"size:        {env.size} ({env.body}{', SMTPUTF8' if env.smtputf8 else ''})"
    yield f"sender:      <{env.sender}>"
    c = env.client
    yield (f"client:      [{c.address}] helo={c.helo or '-'} listener={c.listener or '-'} "
           f"user={c.auth_user or '-'} tls={c.tls or '-'}")
    yield f"attempts:    {env.attempts}, last {stamp(env.last_attempt)}"
    nxt = when_next(entry, now)
    if nxt:
        yield f"next:        {nxt}"
    if env.extra.get("quarantine"):
        yield f"quarantined: {env.extra['quarantine']} (release to deliver)"
    yield "recipients:"
    for r in env.recipients:
        orig = f" (RCPT TO:<{r.original}>)" if r.original != r.address else ""
        yield f"    {r.status:<9} <{r.address}>{orig} attempts={r.attempts}"
        if r.last_reply:
            where = f"{r.remote}, " if r.remote else ""
            yield f"              [{where}{stamp(r.updated)}] {r.last_reply}"
    extra = {k: ("(signature)" if k in ("prefix", "dkim") and v else v) for k, v in env.extra.items()
             if k != "quarantine"}
    if extra:
        yield f"extra:       {json.dumps(extra, ensure_ascii=False)}"


# -- summary --------------------------------------------------------------------------------
def summary(found: Shape) -> Iterator[str]:
    """Counts by state, then the domain table: T (messages), then one column per age."""
    for s, n in found.states.items():
        yield f"{s:<10}{n:>7}"
    yield f"{'total':<10}{sum(found.states.values()):>7}"
    yield ""
    order = found.order()
    width = max([len("domain"), *map(len, order)]) + 1
    yield f"{'domain':<{width}}{'T':>6}" + "".join(f"{b:>9}" for b in BUCKETS)
    for name, row in [("TOTAL", found.total), *((d, found.domains[d]) for d in order)]:
        yield f"{name:<{width}}{row['messages']:>6}" + "".join(f"{row['buckets'][b]:>9}" for b in BUCKETS)
