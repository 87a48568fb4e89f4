"""geosmtp.dkimtags: tag lists and signature tags read as dkimpy reads them, on random
input: the same tags or both refused, the same verdict on the signature's tags."""
from __future__ import annotations

import random
import re

import dkim
import dkim.util
import pytest

from geosmtp import dkimtags

NOW = 1796000000
GOOD = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"AAAA", b"bh": b"AAAA", b"d": b"example.test", b"h": b"from",
        b"s": b"sel"}


def dkimpy_parse(value: bytes):
    try:
        return dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return None


def ours_parse(value: bytes):
    try:
        return dkimtags.parse(value)
    except dkimtags.TagError:
        return None


def test_random_tag_lists_parse_as_dkimpy_parses_them():
    rng = random.Random(32)
    pieces = [b"a", b"b", b"1", b"=", b";", b" ", b"\t", b"\r\n ", b"v", b"_", b"-", b"\xe9", b"bh", b"=="]
    refused = 0
    for _ in range(20000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        theirs = dkimpy_parse(value)
        assert ours_parse(value) == theirs, value
        refused += theirs is None
    assert 2000 < refused < 18000


VARIANTS = {
    b"v": [b"1", b"2", b""], b"a": [b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256", b"rsa-md5", b""],
    b"b": [b"AAAA", b"AA AA", b"AAA", b"A*AA", b"AAAA==", b""], b"bh": [b"AAAA", b"AAA", b"AA==", b"!!!!"],
    b"d": [b"example.test", b"exa(mple.test", b"ex\xe9mple.test", b"", b"EXAMPLE.test"],
    b"i": [None, b"@example.test", b"a@sub.example.test", b"@other.test", b"example.test", b"x.example.test",
           b"@EXAMPLE.TEST", b""],
    b"l": [None, b"0", b"123", b"12a", b"9" * 77], b"q": [None, b"dns/txt", b"dns"],
    b"t": [None, b"1796000000", b"1899999999", b"x", b"0"], b"x": [None, b"1796000100", b"1700000000", b"1", b"y", b"0"],
    b"cv": [None, b"pass", b"bad"], b"h": [b"from", None], b"s": [b"sel", None],
}


@pytest.fixture
def frozen(monkeypatch):
    import time
    monkeypatch.setattr(time, "time", lambda: NOW)


def test_random_signature_tags_are_judged_as_dkimpy_judges_them(frozen):
    rng = random.Random(6376)
    refused = 0
    for _ in range(20000):
        tags = dict(GOOD)
        for name in rng.sample(list(VARIANTS), rng.randint(0, 4)):
            value = rng.choice(VARIANTS[name])
            if value is None:
                tags.pop(name, None)
            else:
                tags[name] = value
        try:
            dkim.validate_signature_fields(dict(tags))
            theirs = None
        except (dkim.ValidationError, IndexError) as exc:
            theirs = re.sub(r"b'([^']*)'", r"\1", str(exc)) or type(exc).__name__
        try:
            dkimtags.check_signature(dict(tags), now=NOW)
            ours = None
        except dkimtags.TagError as exc:
            ours = str(exc)
        assert (ours is None) == (theirs is None), (tags, ours, theirs)
        if ours is not None and "index" not in theirs:
            assert theirs.startswith(ours.split(" value")[0].split(":")[0]), (ours, theirs)
        refused += ours is not None
    assert 5000 < refused < 19000
