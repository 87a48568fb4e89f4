"""geosmtp.linescan against the bytes-method checks it stands in for, on hostile blocks.

The reference is the reader's own slow path: find() for the end of data and the stuffing,
Connection._check (not `clean`) for bare CRs and LFs and long lines. scan() must either
agree with it exactly or answer None (the reader then takes the slow path), and it may
answer None only where the slow path finds a problem. Then whole DATA streams, bare and
long lines and smuggling attempts included, go through Connection.read_data with every
block scanned and with none: the same messages, the same verdicts, the same leftovers.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geosmtp import linescan
from geosmtp.connection import Connection
from tests.unit.test_connection import Pair, split

PROPERTY = settings(max_examples=2000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_LINE = 40

# pieces a hostile block is made of: text, line ends of every kind, dots, NULs, long runs
_PIECE = st.one_of(
    st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n",
                     b"\n.\r\n", b"\r\n.\n", b"\r\n..\r\n", b"\0", b"x" * 45, b"y" * 38]),
    st.binary(max_size=12),
)
_BLOCK = st.lists(_PIECE, max_size=40).map(lambda pieces: b"\r\n" + b"".join(pieces) + b"\r\n")


def reference(block: bytes) -> tuple[int, str | None, bytes]:
    """(end, problem, unstuffed content) by the bytes methods."""
    dot = block.find(b"\r\n.")
    end = -1 if dot < 0 else block.find(b"\r\n.\r\n", dot)
    content = block[2 : end + 2] if end >= 0 else block[2:]
    problem, unstuffed = Connection._check(content, MAX_LINE, False, dot >= 0)
    return end, problem, unstuffed


@PROPERTY
@given(block=_BLOCK)
def test_scan_agrees_with_the_bytes_methods_or_steps_aside(block):
    end, problem, unstuffed = reference(block)
    lines = linescan.scan(block, MAX_LINE)
    if lines is None:
        assert problem in ("bare", "line") or (problem == "nul" and not clean(block, end))
        return
    assert lines.end == end
    assert lines.stuffed == (block.find(b"\r\n.", 0, end + 2 if end >= 0 else len(block)) >= 0)
    content = block[2 : end + 2] if end >= 0 else block[2:]
    assert Connection._check(content, MAX_LINE, False, lines.stuffed, clean=True) == (problem, unstuffed)


def clean(block: bytes, end: int) -> bool:
    """No bare CR or LF and no long line before the end (a NUL hides both in reference())."""
    content = (block[2 : end + 2] if end >= 0 else block[2:]).replace(b"\0", b"x")
    return Connection._check(content, MAX_LINE, False, True)[0] is None


def test_scan_finds_the_end_after_stuffed_lines_and_before_pipelined_commands():
    body = b"\r\n" + b"..a line\r\n" + b"text\r\n" * 3000 + b".\r\nMAIL FROM:<a@b.test>\r\n"
    lines = linescan.scan(body, 1000)
    assert lines == linescan.Lines(body.find(b"\r\n.\r\n"), True)


def test_scan_steps_aside_for_bare_line_ends_before_the_end_only():
    clean_body = b"\r\n" + b"text\r\n" * 3000 + b".\r\n"
    assert linescan.scan(clean_body + b"bare\nafter the end\r\n", 1000).end == len(clean_body) - 5
    assert linescan.scan(b"\r\nbare\r" + clean_body[2:], 1000) is None
    assert linescan.scan(b"\r\n" + b"z" * 1001 + clean_body, 1000) is None


# -- whole streams through the reader, every block scanned against none --------------------
_LINE = st.binary(max_size=50).map(lambda b: b.replace(b"\0", b""))
_STREAM = st.lists(st.one_of(_LINE, st.sampled_from([b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\r"])),
                   max_size=30).map(lambda parts: b"\r\n".join(parts) + b"\r\n.\r\nQUIT\r\n")


def read(stream: bytes, cuts: list[int], vector_min: int, monkeypatch) -> tuple:
    monkeypatch.setattr(linescan, "VECTOR_MIN", vector_min)
    p = Pair()
    try:
        p.feed(split(stream, cuts))
        body, result, _ = p.data(max_line=MAX_LINE)
        try:  # the line after the data (how much of it had come by then is a matter of timing)
            after = p.line()
        except Exception as exc:  # a bare line end or a long line after an early end of data
            after = type(exc)
        return body, result, after
    finally:
        p.close()


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=_STREAM, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_the_reader_answers_the_same_with_and_without_the_scan(stream, cuts, monkeypatch):
    assert read(stream, cuts, 0, monkeypatch) == read(stream, cuts, 10**9, monkeypatch)


@pytest.mark.parametrize("size", [20_000, 300_000])
def test_a_big_message_read_through_the_scan(size):
    lines = [b"." * (i % 3) + b"line %d" % i for i in range(size // 12)]
    stream = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\nQUIT\r\n"
    p = Pair()
    try:
        p.feed(split(stream, [65536 * k for k in range(1, 8)]))
        body, result, _ = p.data()
        assert body == b"".join(ln + b"\r\n" for ln in lines)
        assert result.problem is None and p.line() == b"QUIT"
    finally:
        p.close()


# -- the delivery side: the relay's dot-stuffing test, a Maildir's line ends -----------------
_CHUNK = st.lists(_PIECE, max_size=60).map(b"".join)


@PROPERTY
@given(chunk=_CHUNK)
def test_dot_stuffed_and_lf_line_ends_agree_with_the_bytes_methods(chunk, monkeypatch):
    monkeypatch.setattr(linescan, "VECTOR_MIN", 0)
    assert linescan.dot_stuffed(chunk) == chunk.replace(b"\n.", b"\n..")
    assert linescan.lf_line_ends(chunk) == chunk.replace(b"\r\n", b"\n")


def test_big_chunks_take_the_vector_path():
    text = b"line\r\n" * 5000
    assert linescan.lf_line_ends(text) == b"line\n" * 5000
    assert linescan.dot_stuffed(text) is text
    assert linescan.dot_stuffed(text + b".dot\r\n") == text + b"..dot\r\n"
    assert linescan.lf_line_ends(b"x\r" * 5000) == b"x\r" * 5000  # CRs without LF stay
