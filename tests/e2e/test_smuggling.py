"""End to end: SMTP smuggling (SEC Consult, 2023; CVE-2023-51764/5/6). Only <CRLF>.<CRLF> ends
DATA. A message body that hides a fake end of data followed by a second transaction must
get exactly one reply, and the hidden transaction must never become a message — whether
bare newlines are refused (the default) or normalized to CRLF.

The real recipient is alice; the smuggled transaction names bob, with a sender of its own.
"""
import base64

import pytest

from geosmtp import replies
from tests.support.e2e import (
    start_data,
    connect, delivered_ids, expect, known_ids, nothing_more, queue_id, send_marker, send_message, wait_closed,
    wait_delivered,
)
from tests.support.server import PASSWORDS, ServerProcess

# Fake ends of data: every way a parser that also honours bare LF or CR could be fooled.
VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\n\n.\n\n",
    b"\r\r\n.\r\r\n",
]
# Fake ends of data made only of real CRLF lines: no bare newline, so both modes may accept
# the message — but still as one message with the text in it.
CRLF_VARIANTS = [
    b"\r\n .\r\n",
    b"\r\n..\r\n",
]
# What a next hop that drops NUL would take for <CRLF>.<CRLF>: refused in both modes (RFC
# 5322 2.3 forbids NUL), so we never store nor relay it.
NUL_VARIANTS = [
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n\x00.\x00\r\n",
    b"\n\x00.\n",
]

SMUGGLED = (b"MAIL FROM:<evil@x.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n"
            b"From: evil@x.test\r\n"
            b"Subject: SMUGGLED\r\n"
            b"\r\n"
            b"smuggled body\r\n")


def ids(variants):
    return [v.decode("latin-1").encode("unicode_escape").decode() for v in variants]


@pytest.fixture(scope="module")
def normalizing(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("smuggle-normalize"),
                        {"server": {"bare_newline": "normalize"},
                         "listeners": {"submission": {"allow_plaintext_auth": True}}}).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["reject", "normalize"])
def mode_server(request, server, normalizing):
    return request.param, (server if request.param == "reject" else normalizing)


def smuggle(srv, variant: bytes, split: bool):
    """Send the smuggling body; returns (the one reply to DATA, the RawClient)."""
    c = connect(srv.port)
    start_data(c, "honest@remote.test", ["alice@example.test"])
    first = b"From: honest@remote.test\r\nSubject: honest\r\n\r\nhonest body" + variant
    rest = SMUGGLED + b"\r\n.\r\n"
    if split:  # the fake end of data at the end of one packet, the smuggled commands in the next
        c.send(first)
        assert nothing_more(c, 0.1), "a reply before the real end of data"
        c.send(rest)
    else:
        c.send(first + rest)
    return c.reply(), c


def check_after(srv, c, before, reply):
    """Exactly one reply to DATA, no smuggled message, at most one real message."""
    # If the smuggled MAIL/RCPT/DATA had run, their replies would come before NOOP's.
    assert c.cmd("NOOP") == (replies.NOOP_OK.code, [f"{replies.NOOP_OK.enhanced} {replies.NOOP_OK.text}"])
    assert c.cmd("QUIT")[0] == 221
    assert wait_closed(c)
    assert c.buf == b""
    c.close()
    marker = send_marker(srv, "postmaster@example.test")
    new = known_ids(srv) - before - {marker}
    assert not (set(delivered_ids(srv, "bob@example.test")) - before), "bob got the smuggled message"
    for box in ("alice@example.test", "bob@example.test", "postmaster@example.test", "carol@other.test"):
        for qid, msg in delivered_ids(srv, box).items():
            if qid not in before:
                assert not msg.startswith(b"Return-Path: <evil@x.test>"), (box, msg)
    if reply[0] == 250:
        qid = queue_id(reply)
        assert new == {qid}, "more than one message was stored"
        return wait_delivered(srv, "alice@example.test", qid)
    assert new == set(), "a refused message was stored"
    return None


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split"])
@pytest.mark.parametrize("variant", VARIANTS, ids=ids(VARIANTS))
def test_bare_newline_fake_end_of_data(mode_server, variant, split):
    mode, srv = mode_server
    before = known_ids(srv)
    reply, c = smuggle(srv, variant, split)
    if mode == "reject":
        assert (reply[0], reply[1][-1].split(" ")[0]) == (550, "5.6.0"), reply
    else:
        assert reply[0] == 250, reply
    msg = check_after(srv, c, before, reply)
    if mode == "normalize":
        # exactly one message, with the would-be commands as plain body text
        assert b"Subject: honest\n" in msg
        assert b"\nMAIL FROM:<evil@x.test>\nRCPT TO:<bob@example.test>\nDATA\n" in msg
        assert b"\nSubject: SMUGGLED\n" in msg
        assert msg.endswith(b"\nsmuggled body\n\n")  # its CRLF, then the CRLF of ".CRLF"


@pytest.mark.parametrize("variant", CRLF_VARIANTS, ids=ids(CRLF_VARIANTS))
def test_crlf_lookalike_fake_end_of_data(mode_server, variant):
    mode, srv = mode_server
    before = known_ids(srv)
    reply, c = smuggle(srv, variant, split=False)
    assert reply[0] in (250, 550, 552, 554), reply
    msg = check_after(srv, c, before, reply)
    if msg is not None:
        assert b"MAIL FROM:<evil@x.test>\nRCPT TO:<bob@example.test>\nDATA\n" in msg


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split"])
@pytest.mark.parametrize("variant", NUL_VARIANTS, ids=ids(NUL_VARIANTS))
def test_nul_fake_end_of_data_is_refused(mode_server, variant, split):
    _, srv = mode_server
    before = known_ids(srv)
    reply, c = smuggle(srv, variant, split)
    expect(reply, replies.NUL_IN_MESSAGE)
    assert check_after(srv, c, before, reply) is None


def test_nul_anywhere_in_a_message_is_refused(mode_server):
    _, srv = mode_server
    before = known_ids(srv)
    c = connect(srv.port)
    reply = send_message(c, "honest@remote.test", ["alice@example.test"],
                         b"Subject: nul\r\n\r\nsome text \x00 with a NUL in it")
    expect(reply, replies.NUL_IN_MESSAGE)
    assert check_after(srv, c, before, reply) is None


@pytest.mark.parametrize("line", [
    b"AUTH PLAIN AGFsaWNl\x00QGV4YW1wbGUudGVzdA==",
    b"AUTH PL\x00AIN",
])
def test_nul_in_an_auth_command_is_refused(normalizing, line):
    c = connect(normalizing.submission_port)
    assert 500 <= c.cmd(line)[0] < 600
    assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.test")[1]  # not authenticated
    c.close()


def test_nul_in_a_sasl_response_is_refused(normalizing):
    c = connect(normalizing.submission_port)
    assert c.cmd("AUTH PLAIN")[0] == 334
    response = base64.b64encode(b"\0alice@example.test\0" + PASSWORDS["alice@example.test"].encode())
    expect(c.cmd(response + b"\x00"), replies.AUTH_BAD_BASE64)
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(b"YWxp\x00Y2U=")[0] == 501  # the LOGIN user name
    assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.test")[1]  # not authenticated
    c.close()


def test_smuggling_with_pipelined_follow_up(server):
    """The bytes after the real end of data are commands again — and only those."""
    before = known_ids(server)
    c = connect(server.port)
    c.send(b"MAIL FROM:<honest@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: x\r\n\r\nbody\n.\n" + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
    code_, lines = c.reply()
    assert (code_, lines[-1].split(" ")[0]) == (550, "5.6.0")
    assert c.reply()[0] == 250  # the NOOP
    assert nothing_more(c)
    c.close()
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}
