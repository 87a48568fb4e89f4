"""The milter packets: written as libmilter reads them, read defensively."""
from __future__ import annotations

import struct

import pytest

from geosmtp.checks import milter_codec as mc


def test_packets_are_length_prefixed_with_their_command():
    assert mc.packet(mc.SMFIC_EOH) == b"\x00\x00\x00\x01N"
    assert mc.strings(mc.SMFIC_HEADER, "Subject", "hi") == b"\x00\x00\x00\x0cLSubject\x00hi\x00"
    assert mc.optneg() == b"\x00\x00\x00\x0dO" + struct.pack(">III", 6, mc.ACTIONS_OFFERED, mc.PROTOCOL_OFFERED)


def test_a_nul_inside_a_string_is_never_written():
    assert mc.cstr("a\x00b") == b"a?b\x00"
    assert mc.strings(mc.SMFIC_HELO, "x\x00y").count(b"\x00") == 4  # three in the length, one terminator


def test_connect_and_macros():
    assert mc.connect_data("[192.0.2.1]", mc.SMFIA_INET, 0, "192.0.2.1") == b"[192.0.2.1]\x004\x00\x00192.0.2.1\x00"
    assert mc.connect_data("x", mc.SMFIA_UNKNOWN, 0, "") == b"x\x00U"
    assert mc.macros(mc.SMFIC_CONNECT, [("j", "mx"), ("{daemon_name}", "mx")]) == \
        mc.packet(mc.SMFIC_MACRO, b"Cj\x00mx\x00{daemon_name}\x00mx\x00")


def test_the_option_negotiation_is_read_with_its_macro_lists():
    data = struct.pack(">III", 6, mc.SMFIF_ADDHDRS, mc.SMFIP_NOHELO | mc.SMFIP_NR_HDR)
    data += struct.pack(">I", mc.SMFIM_EOM) + b"i {auth_type}\x00" + struct.pack(">I", 99) + b"x\x00"
    neg = mc.parse_optneg(data)
    assert (neg.version, neg.actions) == (6, mc.SMFIF_ADDHDRS)
    assert neg.skips(mc.SMFIC_HELO) and not neg.skips(mc.SMFIC_MAIL)
    assert neg.no_reply(mc.SMFIC_HEADER) and not neg.no_reply(mc.SMFIC_RCPT)
    assert neg.symlists == {mc.SMFIM_EOM: ("i", "{auth_type}")}  # an unknown stage is ignored


@pytest.mark.parametrize("data", [
    b"\x00" * 8,  # cut short
    struct.pack(">III", 7, 0, 0),  # a version we do not speak
    struct.pack(">III", 1, 0, 0),
    struct.pack(">III", 6, 0x400, 0),  # an action we did not offer
    struct.pack(">III", 6, 0, mc.SMFIP_RCPT_REJ),  # a step we did not offer
    struct.pack(">III", 6, 0, 0) + b"\x00\x00",  # a truncated macro list
    struct.pack(">III", 6, 0, 0) + struct.pack(">I", 0) + b"no nul",
])
def test_a_bad_option_negotiation_is_refused(data):
    with pytest.raises(mc.ProtocolError):
        mc.parse_optneg(data)


def test_packet_lengths_are_bounded_before_reading():
    assert mc.packet_length(struct.pack(">I", 5), 10) == 5
    with pytest.raises(mc.ProtocolError):
        mc.packet_length(b"\x00\x00\x00\x00", 10)
    with pytest.raises(mc.TooBig):
        mc.packet_length(struct.pack(">I", 100 * 1024 * 1024), 1024 * 1024)


def test_strings_and_indices_of_replies():
    assert mc.split_strings(b"X-A\x00v\x00", 2) == [b"X-A", b"v"]
    assert mc.split_index(struct.pack(">I", 3) + b"x\x00") == (3, b"x\x00")
    for bad, count in ((b"X-A\x00v", 2), (b"X-A\x00", 2), (b"a\x00b\x00c\x00", 2)):
        with pytest.raises(mc.ProtocolError):
            mc.split_strings(bad, count)
    with pytest.raises(mc.ProtocolError):
        mc.split_index(b"\x00\x01")


@pytest.mark.parametrize("raw, want", [
    (b"550 5.7.1 Go away\x00", (550, "5.7.1", "Go away")),
    (b"550\x00", (550, None, "")),  # a code with no text
    (b"550 5.7.1\x00", (550, "5.7.1", "")),  # a bare enhanced code
    (b"451 4.7.1 100%% busy\x00", (451, "4.7.1", "100% busy")),
    (b"550-5.7.1 first\r\n550 5.7.1 second\x00", (550, "5.7.1", "first; second")),
    (b"554 4.7.1 mismatched class\x00", (554, None, "mismatched class")),  # a wrong class is dropped
    (b"421 shutting down\x00", (421, None, "shutting down")),
])
def test_reply_codes_are_parsed_defensively(raw, want):
    assert mc.parse_replycode(raw) == want


@pytest.mark.parametrize("raw", [b"250 ok\x00", b"hello\x00", b"\x00", b"55 x\x00",
                                 b"550-first\r\n451 second\x00", b"550 a\x00b\x00"])
def test_reply_codes_that_are_not_refusals_are_errors(raw):
    with pytest.raises(mc.ProtocolError):
        mc.parse_replycode(raw)
