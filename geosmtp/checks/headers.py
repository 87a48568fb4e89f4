"""The header section of a stored message, for checks: read it, split it into fields, and
write the message again without some of them. Lenient: any bytes give fields, never an error.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Iterable, NamedTuple

from geosmtp import safeio
from geosmtp.bounce import header_section as read_header_section  # noqa: F401 (for checks: one place)

COPY_CHUNK = 256 * 1024


class Field(NamedTuple):
    name: str  # as written (decoded leniently)
    value: str  # unfolded (CRLF before whitespace removed), leading space kept out
    start: int  # octet offsets of the whole field, continuation lines included, in the section
    end: int


def parse_fields(section: bytes) -> list[Field]:
    """The fields of a header section (CRLF lines, as read_header_section returns). A line
    that is neither a field nor a continuation (no colon) is skipped; so is the blank line."""
    fields: list[Field] = []
    pos = start = 0
    name = None
    value: list[bytes] = []
    for line in [*section.splitlines(keepends=True), b""]:  # b"": the end closes the last field
        if name is not None and line[:1] in (b" ", b"\t"):
            value.append(line.rstrip(b"\r\n"))  # a continuation: unfolded
        else:
            if name is not None:
                fields.append(Field(name, b"".join(value).decode("utf-8", "replace").strip(), start, pos))
                name = None
            head, colon, rest = line.partition(b":")
            if colon and (head := head.strip()):
                name, start, value = head.decode("utf-8", "replace"), pos, [rest.rstrip(b"\r\n")]
        pos += len(line)
    return fields


def field_indices(fields: list[Field], wanted: Iterable[tuple[str, int]]) -> set[int]:
    """(name, n) pairs → positions in `fields`: the n-th field of that name (1-based, any
    case); n = 0 means every field of that name."""
    out: set[int] = set()
    for name, n in wanted:
        name = name.lower()
        same = [i for i, f in enumerate(fields) if f.name.lower() == name]
        if n == 0:
            out.update(same)
        elif 0 < n <= len(same):
            out.add(same[n - 1])
    return out


def copy_without(src: BinaryIO, dst: int, section: bytes, fields: list[Field], drop: set[int]) -> None:
    """Write the message `src` (positioned at its first header, whose header section is
    `section`) to the descriptor `dst`, leaving out the fields at positions `drop`."""
    pos = 0
    for i in sorted(drop):
        safeio.write_all(dst, section[pos:fields[i].start])
        pos = fields[i].end
    safeio.write_all(dst, section[pos:])
    src.seek(len(section), os.SEEK_CUR)
    while chunk := src.read(COPY_CHUNK):
        safeio.write_all(dst, chunk)
