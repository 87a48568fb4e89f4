"""geosmtp.memo: a short text is parsed once, a long one every time, a failure never kept,
and the memo bounded."""
from __future__ import annotations

import pytest

from geosmtp.memo import short_text_memo


def counting(entries=3, longest=10):
    calls = []

    @short_text_memo(entries, longest)
    def parse(text: str) -> str:
        calls.append(text)
        if text == "bad":
            raise ValueError(text)
        return text.upper()
    return parse, calls


def test_a_short_text_is_parsed_once_a_long_one_each_time():
    parse, calls = counting()
    assert [parse("a"), parse("a"), parse("x" * 11), parse("x" * 11)] == ["A", "A", "X" * 11, "X" * 11]
    assert calls == ["a", "x" * 11, "x" * 11]


def test_a_failure_is_raised_anew_each_time():
    parse, calls = counting()
    for _ in range(2):
        with pytest.raises(ValueError):
            parse("bad")
    assert calls == ["bad", "bad"] and not parse.kept


def test_the_memo_keeps_at_most_its_entries_the_oldest_going_first():
    parse, calls = counting(entries=3)
    for text in "abcd":
        parse(text)
    assert list(parse.kept) == ["b", "c", "d"]
    parse("a")
    assert calls.count("a") == 2
