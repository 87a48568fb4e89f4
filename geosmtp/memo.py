"""A memo for pure parsers of short text (an SPF or DMARC record): each text parsed once.

The same few senders' records come with every message, so their parse is kept; a text
longer than `longest` is parsed each time (a hostile 64 KB record must not fill memory),
and at most `entries` are kept, the oldest going first. What the parser raises is not
kept: it is raised anew each time. The results must be immutable (frozen dataclasses)."""
from __future__ import annotations

from functools import wraps
from typing import Callable, TypeVar

T = TypeVar("T")


def short_text_memo(entries: int = 1024, longest: int = 2048) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    def decorate(parse: Callable[[str], T]) -> Callable[[str], T]:
        kept: dict[str, T] = {}

        @wraps(parse)
        def parsed(text: str) -> T:
            try:
                return kept[text]
            except KeyError:
                pass
            result = parse(text)
            if len(text) <= longest:
                if len(kept) >= entries:
                    kept.pop(next(iter(kept)))
                kept[text] = result
            return result

        parsed.kept = kept  # for the tests
        return parsed
    return decorate
