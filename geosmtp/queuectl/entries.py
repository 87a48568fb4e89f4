"""Reading the spool for geosmtp-queue: find one entry wherever it is (the one
locate-and-retry loop, which the changes use too), every entry of some states, the ones a
filter keeps, the queue's shape by destination and age, a message's header section or whole
text. Answers data (an Entry, a Result when there is none); prints nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from geosmtp.envelope import DELIVERED, PENDING, Envelope
from geosmtp.spool import STATES, Spool, valid_id

ATTEMPTS = 3  # an entry may move between locate() and the step that uses it: look again
MAX_HEADERS = 256 * 1024  # `show` reads at most this much of the header section
NO_SUCH = "no such message in the queue"
# qshape's age buckets (minutes): 0-5, 5-10, 10-20, 20-40, 40-80, 80-160, 160+
BUCKET_EDGES = (5, 10, 20, 40, 80, 160)
BUCKETS = tuple(f"{lo}-{hi}m" for lo, hi in zip((0,) + BUCKET_EDGES, BUCKET_EDGES)) + (f"{BUCKET_EDGES[-1]}m+",)

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """What one operation on one id came to: `ok` with what was done, or why not."""
    qid: str
    ok: bool
    message: str
    queued: bool = False  # the entry was put into incoming/: the server is to be told


def done(qid: str, message: str, queued: bool = False) -> Result:
    return Result(qid, True, message, queued)


def failed(qid: str, message: str) -> Result:
    return Result(qid, False, message)


def located(spool: Spool, qid: str, step: Callable[[str], T | None], gave_up: str) -> T | Result:
    """step(state) with the state the entry of `qid` is in now. step answers None when the
    entry moved before it could act (a rename or a read found nothing): the entry is located
    again, a few times, then `gave_up` is the answer."""
    if not valid_id(qid):
        return failed(qid, "not a queue id")
    for _ in range(ATTEMPTS):
        state = spool.locate(qid)
        if state is None:
            return failed(qid, NO_SUCH)
        outcome = step(state)
        if outcome is not None:
            return outcome
    return failed(qid, gave_up)


# -- entries --------------------------------------------------------------------------------
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
    """The entry in `state`, its envelope read (or why not); None when it is not there."""
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


def find(spool: Spool, qid: str) -> Entry | Result:
    """The entry of `qid` wherever it is; a failed Result when there is none."""
    return located(spool, qid, lambda state: read_entry(spool, qid, state), NO_SUCH)


def state_ids(spool: Spool, state: str) -> Iterator[str]:
    """The ids in one state, in the order the directory gives them, read as they are used:
    no list of names and no sort, so that reading a million entries takes no more memory
    than reading ten (Spool.ids sorts a list of them all: 80 MB for a million)."""
    try:
        with os.scandir(os.path.join(spool.root, "queue", state)) as found:
            for item in found:
                if valid_id(item.name):
                    yield item.name
    except FileNotFoundError:
        return


def all_entries(spool: Spool, states: Iterable[str]) -> Iterator[Entry]:
    """Every entry of `states`, one state after the other, each state in directory order."""
    for state in states:
        for qid in state_ids(spool, state):
            entry = read_entry(spool, qid, state)
            if entry is not None:
                yield entry


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


# -- list's filter --------------------------------------------------------------------------
def sender_matcher(text: str | None) -> Callable[[str], bool] | None:
    """'<>' (or '') matches the null sender; anything else is a substring, in any case."""
    if text is None:
        return None
    if text in ("<>", ""):
        return lambda sender: sender == ""
    needle = text.strip().removeprefix("<").removesuffix(">").lower()
    return lambda sender: needle in sender.lower()


@dataclass
class Filter:
    """Which entries `list` shows. An entry whose envelope cannot be read is kept only when
    no filter on its contents (domain, sender, age) is given."""
    states: tuple[str, ...] = STATES
    domains: frozenset[str] = frozenset()  # a recipient not yet delivered at one of them
    sender: Callable[[str], bool] | None = None
    older_than: float | None = None  # seconds since arrival
    younger_than: float | None = None

    def keeps(self, entry: Entry, now: float) -> bool:
        env = entry.envelope
        if env is None:
            return not (self.domains or self.sender or self.older_than or self.younger_than)
        if self.domains and not any(r.status != DELIVERED and domain_of(r.address) in self.domains
                                    for r in env.recipients):
            return False
        if self.sender and not self.sender(env.sender):
            return False
        if self.older_than is not None and now - env.created < self.older_than:
            return False
        return self.younger_than is None or now - env.created < self.younger_than


def matching(spool: Spool, keep: Filter, now: float) -> Iterator[Entry]:
    return (entry for entry in all_entries(spool, keep.states) if keep.keeps(entry, now))


# -- summary --------------------------------------------------------------------------------
def bucket(age_seconds: float) -> str:
    minutes = age_seconds / 60
    for label, edge in zip(BUCKETS, BUCKET_EDGES):
        if minutes < edge:
            return label
    return BUCKETS[-1]


def _row() -> dict:
    return {"messages": 0, "recipients": 0, "buckets": dict.fromkeys(BUCKETS, 0)}


@dataclass
class Shape:
    """Counts by state, and by destination domain in age buckets (like Postfix's qshape):
    a message with recipients pending at two domains counts once in each, and once in TOTAL."""
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    total: dict = field(default_factory=_row)
    domains: dict[str, dict] = field(default_factory=dict)

    def add(self, env: Envelope, now: float) -> None:
        pending = [r for r in env.recipients if r.status == PENDING]
        if not pending:
            return
        b = bucket(now - env.created)
        self.total["messages"] += 1
        self.total["recipients"] += len(pending)
        self.total["buckets"][b] += 1
        seen: set[str] = set()
        for r in pending:
            d = domain_of(r.address)
            row = self.domains.setdefault(d, _row())
            row["recipients"] += 1
            if d not in seen:
                seen.add(d)
                row["messages"] += 1
                row["buckets"][b] += 1

    def order(self) -> list[str]:
        """The domains, the most messages first."""
        return sorted(self.domains, key=lambda d: (-self.domains[d]["messages"], d))


def shape(spool: Spool, wanted: Iterable[str], now: float) -> Shape:
    """Every state counted; the domain table from the entries in `wanted` states."""
    wanted = set(wanted)
    found = Shape()
    for entry in all_entries(spool, STATES):
        found.states[entry.state] += 1
        if entry.envelope is not None and entry.state in wanted:
            found.add(entry.envelope, now)
    return found


# -- show -----------------------------------------------------------------------------------
@dataclass
class Shown:
    """An entry and its message: the header section, or all of it when `whole`."""
    entry: Entry
    whole: bool
    data: bytes | None  # None when the message cannot be read
    problem: str | None  # why not
    first_line: str | None = None  # the entry's raw first line, when its envelope does not read


def look(spool: Spool, qid: str, whole: bool) -> Shown | Result:
    entry = find(spool, qid)
    if isinstance(entry, Result):
        return entry
    data, problem = read_message(spool, qid, whole)
    first_line = raw_first_line(spool, qid, entry.state) if entry.envelope is None else None
    return Shown(entry, whole, data, problem, first_line)


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
            data = fh.read()
        else:
            lines, size = [], 0
            while size < MAX_HEADERS:
                line = fh.readline(MAX_HEADERS - size)
                if not line or line in (b"\r\n", b"\n"):
                    break
                lines.append(line)
                size += len(line)
            data = b"".join(lines)
        if not spool.still_message(fh, qid):  # its file emptied for another message meanwhile
            return None, "delivered while it was read"
        return data, None


def raw_first_line(spool: Spool, qid: str, state: str) -> str | None:
    try:
        with open(spool.entry_path(qid, state), "rb") as fh:
            return fh.readline(4096).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return None
