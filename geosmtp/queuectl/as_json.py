"""geosmtp-queue's output for a program (--json): one JSON object a line, field names that
stay; each renderer answers the object, the wiring prints it with `line`."""
from __future__ import annotations

import json
import re

from geosmtp.queuectl.entries import BUCKETS, Entry, Shape, Shown, last_error


def line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def recipient(r) -> dict:
    return {"address": r.address, "original": r.original, "status": r.status, "attempts": r.attempts,
            "last_reply": r.last_reply, "updated": r.updated, "remote": r.remote}


def entry(found: Entry, now: float) -> dict:
    """One `list` row; an entry whose envelope does not read has its id, state and error."""
    if found.envelope is None:
        return {"id": found.id, "state": found.state, "error": found.error, "mtime": found.stat.st_mtime}
    env = found.envelope
    return {
        "id": env.id, "state": found.state, "arrival": env.created, "age": round(now - env.created, 3),
        "size": env.size, "sender": env.sender, "attempts": env.attempts, "last_attempt": env.last_attempt,
        "next_attempt": found.next_attempt, "last_error": last_error(env),
        "recipients": [recipient(r) for r in env.recipients],
    }


def header_fields(data: bytes) -> list[dict]:
    """The header section as [{name, value}], folded lines unfolded."""
    fields: list[dict] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw[:1] in (" ", "\t") and fields:
            fields[-1]["value"] += " " + raw.strip()
        elif ":" in raw:
            name, _, value = raw.partition(":")
            fields.append({"name": name, "value": value.strip()})
    return fields


def show(shown: Shown) -> dict:
    """The envelope as stored, the headers, and with --body the whole message."""
    found, data = shown.entry, shown.data
    out = {"id": found.id, "state": found.state, "next_attempt": found.next_attempt,
           "envelope": found.envelope.to_dict() if found.envelope else None}
    if found.envelope is None:
        out["error"] = found.error
        out["envelope_line"] = shown.first_line
    head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0] if data is not None and shown.whole else data
    out["headers"] = header_fields(head) if head is not None else None
    if shown.whole:
        out["message"] = data.decode("utf-8", "replace") if data is not None else None
    if shown.problem:
        out["message_error"] = shown.problem
    return out


def summary(found: Shape) -> dict:
    order = found.order()
    return {"states": found.states, "total": sum(found.states.values()), "buckets": list(BUCKETS),
            "all": found.total, "domains": {d: found.domains[d] for d in order}}
