"""Changing the spool for geosmtp-queue: flush, hold, release and requeue are one transition
(a rename from the states an operation may take an entry from to the one it puts it in);
delete and bounce are their own steps. Each operation on one id answers a Result and prints
nothing; every one of them finds its entry through entries.located(), the one loop that
looks again when the server moved the entry meanwhile."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from geosmtp import safeio
from geosmtp.queuectl.entries import Result, done, failed, located, read_entry
from geosmtp.spool import Spool

DEFAULT_REASON = "no reason given"
# what an entry in each state can be made to do; the rest get an explanation
HINTS = {
    "hold": "it is held (use release)",
    "corrupt": "its envelope was unreadable (use requeue, or delete)",
    "incoming": "it is already waiting for delivery",
}
ENVELOPE_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


def give_new_files_to_spool_owner(spool_dir: str) -> None:
    """Run as root on a spool that belongs to the server's user: every file written is given
    to that user (an envelope rewritten by root, mode 0600, would be unreadable to it)."""
    st = os.stat(spool_dir)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        safeio.owner = (st.st_uid, st.st_gid)


def busy(verb: str) -> str:
    return f"busy: being delivered now; try again to {verb} it"


# -- the transition -------------------------------------------------------------------------
@dataclass(frozen=True)
class Transition:
    """An entry moves by rename from one of `sources` to `dst`; what every other state answers."""
    verb: str
    sources: tuple[str, ...]
    dst: str
    done: str
    already: str | None = None  # success when the entry is in dst already (None: refused)
    delivering: str | None = None  # success when it is in active/ (None: busy)
    refused: str | None = None  # the answer from any other state, {state} filled in
    # a reason to refuse an entry in one of `sources` after all (None: it may move)
    check: Callable[[Spool, str, str], str | None] | None = None

    def refusal(self, state: str) -> str:
        if self.refused is not None:
            return self.refused.format(state=state)
        if state == "active":
            return busy(self.verb)
        return f"cannot {self.verb} it: {HINTS.get(state, f'it is in {state}/')}"


def transition(spool: Spool, qid: str, move: Transition) -> Result:
    """Move one entry as `move` says, wherever the server has it now."""

    def step(state: str) -> Result | None:
        if state == move.dst and move.already is not None:
            return done(qid, move.already)
        if state == "active" and move.delivering is not None:
            return done(qid, move.delivering)
        if state not in move.sources:
            return failed(qid, move.refusal(state))
        problem = move.check(spool, qid, state) if move.check else None
        if problem:
            return failed(qid, problem)
        if spool.move(qid, state, move.dst):
            return done(qid, move.done, queued=move.dst == "incoming")
        return None  # it moved before the rename: look again

    return located(spool, qid, step, f"busy: it keeps moving; try again to {move.verb} it")


def still_corrupt(spool: Spool, qid: str, state: str) -> str | None:
    """A corrupt entry goes back only if its envelope now reads, is for its id, names a
    recipient, and its message file is there."""
    if state != "corrupt":
        return None
    entry = read_entry(spool, qid, "corrupt")
    if entry is None:
        return None  # gone meanwhile: the rename finds nothing and the entry is looked for again
    if entry.envelope is None:
        problem = entry.error
    elif not entry.envelope.recipients:
        problem = "the envelope has no recipients"
    else:
        problem = message_problem(spool, qid)
    return f"still corrupt: {problem}" if problem else None


def message_problem(spool: Spool, qid: str) -> str | None:
    try:
        with spool.open_body(qid):
            return None
    except FileNotFoundError:
        return "the message file is missing"
    except (OSError, ValueError) as exc:
        return f"the message file is unreadable ({exc})"


FLUSH = Transition("flush", ("deferred",), "incoming", "queued for delivery now",
                   already="already waiting for delivery", delivering="being delivered now")
HOLD = Transition("hold", ("incoming", "deferred"), "hold", "held", already="already held")
RELEASE = Transition("release", ("hold",), "incoming", "released", refused="not held (it is in {state}/)")
REQUEUE = Transition("requeue", ("deferred", "hold", "corrupt"), "incoming", "requeued",
                     already="already waiting for delivery", check=still_corrupt)


# -- delete ---------------------------------------------------------------------------------
def delete(spool: Spool, qid: str) -> Result:
    """Remove the entry and its message in any state, also while it is being delivered."""

    def step(state: str) -> Result | None:
        if not spool.delete(qid, state):
            return None
        note = " (it was being delivered: the attempt under way may still deliver)" if state == "active" else ""
        return done(qid, f"deleted from {state}/{note}")

    return located(spool, qid, step, "busy: it keeps moving; try again to delete it")


# -- bounce ---------------------------------------------------------------------------------
def one_line(text: str) -> str:
    """An operator's reason as one line of at most 500 characters, for the notice."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\s]+", " ", text).strip()[:500]


def bounce(spool: Spool, qid: str, reason: str) -> Result:
    """Mark the entry "return to sender" and put it in incoming/: the server fails every
    recipient not yet delivered (5.0.0) and sends the sender a notice."""

    def step(state: str) -> Result | None:
        if state == "active":
            return failed(qid, busy("bounce"))
        if state == "corrupt":
            return failed(qid, f"cannot bounce it: {HINTS['corrupt']}")
        # take it from the queue manager first: hold/ is never claimed, so the rewrite
        # cannot race a delivery
        if state != "hold" and not spool.move(qid, state, "hold"):
            return None  # claimed or moved meanwhile: look again
        return return_to_sender(spool, qid, state, reason)

    return located(spool, qid, step, "busy: it keeps moving; try again to bounce it")


def return_to_sender(spool: Spool, qid: str, origin: str, reason: str) -> Result:
    """The entry, now in hold/ (from `origin`), gets the mark and goes to incoming/."""
    try:
        envelope = spool.load(qid, "hold")
        if not envelope.pending():
            raise ValueError("no recipient is waiting for delivery")
        envelope.extra["return_to_sender"] = reason
        if not spool.rewrite(envelope, "hold"):
            return failed(qid, "gone meanwhile (deleted?)")
    except ENVELOPE_ERRORS as exc:
        if origin != "hold":
            spool.move(qid, "hold", origin)  # back where it was (a deferred entry keeps its mtime)
        return failed(qid, f"cannot bounce it: {exc}")
    except FileNotFoundError:
        return failed(qid, "gone meanwhile (deleted?)")
    if not spool.move(qid, "hold", "incoming"):
        return failed(qid, "gone meanwhile (deleted?)")
    note = "" if envelope.sender else " (the sender is <>: no notice is sent)"
    return done(qid, f"returned to sender{note}", queued=True)
