"""End to end: the command dialogue of an inbound session, reply by reply (SPEC "Session and
transaction"), against a real server process over loopback."""
import smtplib

import pytest

from geosmtp import replies
from tests.support.e2e import (
    HOSTNAME, code, connect, expect, nothing_more, queue_id, send_message, wait_closed, wait_delivered,
)
from tests.support.smtp import RawClient

EXTENSIONS = {"PIPELINING", "SIZE 36700160", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"}


@pytest.fixture
def c(server):
    """A client that has been greeted and has said EHLO."""
    client = connect(server.port)
    yield client
    client.close()


@pytest.fixture
def fresh(server):
    """A client that has only read the greeting."""
    client = connect(server.port, ehlo=None)
    yield client
    client.close()


# -- greeting, EHLO, HELO -------------------------------------------------------------------
def test_greeting(server):
    with RawClient(server.port) as c:
        assert c.reply() == (220, [f"{HOSTNAME} ESMTP"])


def test_ehlo_lists_exactly_the_supported_extensions(fresh):
    code_, lines = fresh.cmd("EHLO client.test")
    assert code_ == 250
    assert lines[0].startswith(HOSTNAME)
    assert set(lines[1:]) == EXTENSIONS
    assert len(lines[1:]) == len(EXTENSIONS)  # nothing twice
    for absent in ("STARTTLS", "AUTH", "CHUNKING", "DSN"):
        assert not any(line.split(" ")[0] == absent for line in lines), absent


def test_ehlo_through_smtplib(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        code_, _ = s.ehlo("client.test")
        assert code_ == 250
        assert set(s.esmtp_features) == {"pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes"}
        assert s.esmtp_features["size"] == "36700160"


def test_ehlo_size_follows_the_configured_limit(make_server):
    srv = make_server({"limits": {"max_message_size": 10000}})
    with connect(srv.port, ehlo=None) as c:
        _, lines = c.cmd("EHLO client.test")
        assert "SIZE 10000" in lines[1:]


def test_helo(fresh):
    assert fresh.cmd("HELO client.test") == (250, [HOSTNAME])
    assert fresh.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


@pytest.mark.parametrize("verb", ["EHLO", "HELO", "EHLO ", "HELO   "])
def test_greeting_without_domain_is_501(fresh, verb):
    code_, lines = fresh.cmd(verb)
    assert code_ == 501
    assert lines[-1].startswith("5.5.")
    # and the session is still unintroduced
    expect(fresh.cmd("MAIL FROM:<a@remote.test>"), replies.NEED_EHLO)


def test_verbs_are_case_insensitive(fresh):
    assert fresh.cmd("ehlo client.test")[0] == 250
    assert fresh.code("mail from:<a@remote.test>") == "250 2.1.0"
    assert fresh.code("Rcpt To:<alice@example.test>") == "250 2.1.5"
    assert fresh.code("rset") == "250 2.0.0"


def test_parameters_need_ehlo_not_helo(fresh):
    fresh.cmd("HELO client.test")
    assert fresh.code("MAIL FROM:<a@remote.test> SIZE=100") == "555 5.5.4"
    assert fresh.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


# -- order of commands ----------------------------------------------------------------------
def test_mail_before_greeting_is_503(fresh):
    expect(fresh.cmd("MAIL FROM:<a@remote.test>"), replies.NEED_EHLO)


def test_rcpt_before_mail_is_503(c):
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)


def test_data_before_mail_is_503(c):
    expect(c.cmd("DATA"), replies.NEED_MAIL)


def test_data_before_any_rcpt_is_503(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    expect(c.cmd("DATA"), replies.NEED_RCPT)


def test_data_with_only_rejected_recipients_is_554(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    expect(c.cmd("RCPT TO:<nobody@example.test>"), replies.UNKNOWN_USER)
    expect(c.cmd("DATA"), replies.NO_VALID_RECIPIENTS)
    # the transaction is still open: a good RCPT then DATA works
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: after 554\r\n\r\nx\r\n.\r\n")
    queue_id(c.reply())


def test_nested_mail_is_503(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    expect(c.cmd("MAIL FROM:<b@remote.test>"), replies.NESTED_MAIL)
    # the first transaction survives the error
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"


def test_rset_clears_the_transaction(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    assert c.code("RSET") == "250 2.0.0"
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)
    expect(c.cmd("DATA"), replies.NEED_MAIL)
    assert c.code("MAIL FROM:<b@remote.test>") == "250 2.1.0"


def test_rset_keeps_the_greeting(c):
    assert c.code("RSET") == "250 2.0.0"
    assert c.code("MAIL FROM:<a@remote.test> SIZE=10") == "250 2.1.0"  # still an EHLO session


def test_rset_with_argument_is_501(c):
    assert c.code("RSET now") == "501 5.5.4"


@pytest.mark.parametrize("greeting", ["EHLO again.test", "HELO again.test"])
def test_new_greeting_clears_the_transaction(c, greeting):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    assert c.cmd(greeting)[0] == 250
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)
    assert c.code("MAIL FROM:<b@remote.test>") == "250 2.1.0"


def test_end_of_data_clears_the_transaction(c):
    queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: one\r\n\r\nx"))
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)
    expect(c.cmd("DATA"), replies.NEED_MAIL)
    assert c.code("MAIL FROM:<b@remote.test>") == "250 2.1.0"


def test_quit_mid_transaction(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    code_, lines = c.cmd("QUIT")
    assert code_ == 221 and lines[-1].startswith("2.0.0")
    assert wait_closed(c)


# -- unknown commands and syntax ------------------------------------------------------------
@pytest.mark.parametrize("line", ["FOO", "FOO bar", "MAILX FROM:<a@remote.test>",
                                  "BDAT 10 LAST", "ETRN example.test", "TURN", "1234", "", "   "])
def test_unknown_verb_is_500_5_5_2(c, line):
    expect(c.cmd(line), replies.UNKNOWN_COMMAND)
    assert c.code("NOOP") == "250 2.0.0"


def test_starttls_and_auth_where_not_offered(c):
    # the MX listener of the test config has no TLS and no AUTH
    expect(c.cmd("STARTTLS"), replies.TLS_NOT_AVAILABLE)
    expect(c.cmd("AUTH PLAIN"), replies.AUTH_NOT_AVAILABLE)
    assert c.code("NOOP") == "250 2.0.0"


def test_line_of_512_octets_is_accepted(c):
    line = "NOOP " + "x" * (510 - 5)  # 510 + CRLF = 512, RFC 5321 4.5.3.1.4
    assert len(line) + 2 == 512
    assert c.code(line) == "250 2.0.0"


@pytest.mark.parametrize("length", [513, 600, 5000, 60_000])
def test_line_over_512_octets_is_500_5_5_6_and_the_session_goes_on(c, length):
    line = "NOOP " + "x" * (length - 2 - 5)
    expect(c.cmd(line), replies.LINE_TOO_LONG)
    assert c.code("NOOP") == "250 2.0.0"
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


def test_long_line_is_not_executed_in_part(c):
    # a MAIL line over the limit must not start a transaction from its first 512 octets
    line = "MAIL FROM:<a@remote.test> " + "X" * 600
    expect(c.cmd(line), replies.LINE_TOO_LONG)
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)


def test_long_line_then_pipelined_command(c):
    c.send("NOOP " + "x" * 1000 + "\r\nMAIL FROM:<a@remote.test>\r\n")
    expect(c.reply(), replies.LINE_TOO_LONG)
    assert code(c.reply()) == "250 2.1.0"


@pytest.mark.parametrize("line", [
    b"NOOP\x00",
    b"\x00",
    b"MAIL FROM:<a\x00b@remote.test>",
    b"EHLO cl\x00ient.test",
])
def test_nul_byte_in_a_command_is_rejected(c, line):
    code_, _ = c.cmd(line)
    assert 500 <= code_ < 600
    # nothing of it took effect
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)
    assert c.code("NOOP") == "250 2.0.0"


def test_nul_in_rcpt_never_adds_a_recipient(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert c.cmd(b"RCPT TO:<alice@example.test>\x00")[0] >= 500
    # a line with NUL is no RCPT command at all, so DATA finds none: 503 (554 would do too)
    assert c.code("DATA") in ("503 5.5.1", "554 5.5.1")


def test_invalid_utf8_in_a_command_is_rejected(c):
    expect(c.cmd(b"MAIL FROM:<\xff\xfe@remote.test>"), replies.NOT_UTF8)
    assert c.code("NOOP") == "250 2.0.0"


@pytest.mark.parametrize("line", [b"NOOP\n", b"NOOP\rRSET\r\n"])
def test_bare_newline_in_a_command(c, line):
    c.send(line)
    code_, _ = c.reply()
    assert code_ == 500
    assert c.code("NOOP") == "250 2.0.0"


@pytest.mark.parametrize("line", [
    "MAIL FROM:a@remote.test",
    "MAIL FROM:<a@remote.test",
    "MAIL FROM:a@remote.test>",
    "MAIL FROM:",
    "MAIL",
    "MAIL TO:<a@remote.test>",
    "MAIL FROM:<a@remote.test>garbage",
])
def test_mail_without_angle_brackets_is_501_5_5_4(c, line):
    expect(c.cmd(line), replies.MAIL_SYNTAX)


@pytest.mark.parametrize("line", [
    "RCPT TO:alice@example.test",
    "RCPT TO:<alice@example.test",
    "RCPT TO:",
    "RCPT",
    "RCPT FROM:<alice@example.test>",
])
def test_rcpt_without_angle_brackets_is_501_5_5_4(c, line):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    expect(c.cmd(line), replies.RCPT_SYNTAX)


def test_space_after_colon_is_tolerated(c):
    assert c.code("MAIL FROM: <a@remote.test>") == "250 2.1.0"
    assert c.code("RCPT TO: <alice@example.test>") == "250 2.1.5"


@pytest.mark.parametrize("path", [
    "not an address",
    "a@",
    "@remote.test",
    "a@@remote.test",
    "a..b@remote.test",
    ".a@remote.test",
    "a@-bad-.test",
    "a@remote..test",
    "a b@remote.test",
    "a@[300.1.1.1]",
    "a@[127.0.0.1",
    "@remote.test:",
])
def test_bad_sender_address_is_501(c, path):
    code_, lines = c.cmd(f"MAIL FROM:<{path}>")
    assert code_ == 501, (path, code_, lines)
    assert lines[-1].startswith("5.")
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"  # no transaction was started


@pytest.mark.parametrize("path", ["", "a@", "a..b@example.test", "alice@exa mple.test", "alice@example.test.."])
def test_bad_recipient_address_is_501(c, path):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    code_, lines = c.cmd(f"RCPT TO:<{path}>")
    assert code_ == 501, (path, code_, lines)
    assert lines[-1].startswith("5.")


def test_null_sender_is_accepted(c):
    assert c.code("MAIL FROM:<>") == "250 2.1.0"
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"


@pytest.mark.parametrize("params", ["FOO=bar", "AUTH=<>", "RET=FULL", "ENVID=x", "X-UNKNOWN"])
def test_unknown_mail_parameter_is_555(c, params):
    code_, lines = c.cmd(f"MAIL FROM:<a@remote.test> {params}")
    assert code((code_, lines)) == "555 5.5.4"


@pytest.mark.parametrize("params", ["NOTIFY=NEVER", "ORCPT=rfc822;alice@example.test", "FOO"])
def test_unknown_rcpt_parameter_is_555(c, params):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<alice@example.test> {params}") == "555 5.5.4"


@pytest.mark.parametrize("params", ["SIZE=36700161", "SIZE=99999999999999"])
def test_declared_size_over_the_limit_is_552_5_3_4(c, params):
    expect(c.cmd(f"MAIL FROM:<a@remote.test> {params}"), replies.MESSAGE_TOO_BIG_DECLARED)
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


@pytest.mark.parametrize("params", ["SIZE=36700160", "SIZE=0", "BODY=7BIT", "BODY=8BITMIME", "body=8bitmime",
                                    "SMTPUTF8", "SIZE=10 BODY=8BITMIME SMTPUTF8"])
def test_known_mail_parameters(c, params):
    assert c.code(f"MAIL FROM:<a@remote.test> {params}") == "250 2.1.0"


@pytest.mark.parametrize("params", ["BODY=bogus", "BODY=BINARYMIME", "BODY", "SIZE=abc", "SIZE=-1", "SIZE",
                                    "SMTPUTF8=yes", "SIZE=1 SIZE=2", "=x"])
def test_bad_mail_parameter_value_is_501(c, params):
    code_, lines = c.cmd(f"MAIL FROM:<a@remote.test> {params}")
    assert code_ == 501, (params, code_, lines)
    assert lines[-1].startswith("5.5.4")
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


# -- lengths and non-ASCII ------------------------------------------------------------------
@pytest.mark.parametrize("extra", [11, 60])  # 257 octets, and well over
def test_path_over_256_octets_is_rejected(c, extra):
    local = "a" * 60
    domain = ".".join(["d" * 60] * 3) + "." + "e" * extra
    path = f"{local}@{domain}"
    assert len(path) + 2 >= 257
    code_, lines = c.cmd(f"MAIL FROM:<{path}>")
    assert code_ in (501, 553) and lines[-1].startswith("5.1."), (code_, lines)
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    code_, lines = c.cmd(f"RCPT TO:<{path}>")
    assert code_ in (501, 553) and lines[-1].startswith("5.1."), (code_, lines)


def test_path_of_256_octets_is_accepted(server):
    local = "a" * 60
    domain = ".".join(["d" * 60] * 3)
    domain += "." + "e" * (256 - 2 - len(local) - 1 - len(domain) - 1)
    path = f"{local}@{domain}"
    assert len(path) + 2 == 256
    with connect(server.port, source="127.0.0.2") as c:
        assert c.code(f"MAIL FROM:<{path}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{path}>") == "250 2.1.5"


def test_local_part_over_64_octets_is_rejected(c):
    code_, lines = c.cmd(f"MAIL FROM:<{'a' * 65}@remote.test>")
    assert code_ in (501, 553) and lines[-1].startswith("5.1."), (code_, lines)
    assert c.code(f"MAIL FROM:<{'a' * 64}@remote.test>") == "250 2.1.0"
    code_, lines = c.cmd(f"RCPT TO:<{'b' * 65}@example.test>")
    assert code_ in (501, 553) and lines[-1].startswith("5.1."), (code_, lines)


def test_non_ascii_sender_needs_smtputf8(c):
    expect(c.cmd("MAIL FROM:<jörg@remote.test>"), replies.NEED_SMTPUTF8)
    expect(c.cmd("MAIL FROM:<a@bücher.test>"), replies.NEED_SMTPUTF8)
    assert c.code("MAIL FROM:<jörg@remote.test> SMTPUTF8") == "250 2.1.0"


def test_non_ascii_recipient_needs_smtputf8(c):
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    expect(c.cmd("RCPT TO:<ålice@example.test>"), replies.NEED_SMTPUTF8)


def test_non_ascii_with_smtputf8_is_delivered(server, c):
    assert c.code("MAIL FROM:<jörg@bücher.test> SMTPUTF8 BODY=8BITMIME") == "250 2.1.0"
    expect(c.cmd("RCPT TO:<ålice@example.test>"), replies.UNKNOWN_USER)  # well-formed, just unknown
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: grüße\r\n\r\nSchöne Grüße\r\n.\r\n".encode())
    qid = queue_id(c.reply())
    msg = wait_delivered(server, "alice@example.test", qid)
    assert msg.startswith("Return-Path: <jörg@bücher.test>\n".encode())
    assert "Schöne Grüße".encode() in msg
    assert b"with UTF8SMTP id " + qid.encode() in msg


# -- other verbs ----------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["alice", "alice@example.test", "nobody@example.test", "<bob@example.test>"])
def test_vrfy_never_confirms(c, arg):
    expect(c.cmd(f"VRFY {arg}"), replies.VRFY_CANNOT)


def test_expn_is_502(c):
    expect(c.cmd("EXPN team@example.test"), replies.EXPN_DISABLED)
    expect(c.cmd("EXPN"), replies.EXPN_DISABLED)


@pytest.mark.parametrize("line", ["HELP", "HELP MAIL"])
def test_help_is_214(c, line):
    assert c.cmd(line)[0] == 214


@pytest.mark.parametrize("line", ["NOOP", "NOOP with an argument"])
def test_noop_is_250(c, line):
    expect(c.cmd(line), replies.NOOP_OK)


def test_noop_before_greeting_and_mid_transaction(fresh):
    assert fresh.code("NOOP") == "250 2.0.0"
    fresh.cmd("EHLO client.test")
    assert fresh.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert fresh.code("NOOP") == "250 2.0.0"
    assert fresh.code("RCPT TO:<alice@example.test>") == "250 2.1.5"  # NOOP left the transaction alone


def test_quit_is_221_and_closes(fresh):
    code_, lines = fresh.cmd("QUIT")
    assert code_ == 221 and lines == [f"2.0.0 {HOSTNAME} Bye"]
    assert wait_closed(fresh)


def test_commands_after_quit_are_not_run(server):
    with connect(server.port) as c:
        c.send("QUIT\r\nMAIL FROM:<a@remote.test>\r\nNOOP\r\n")
        assert c.reply()[0] == 221
        assert wait_closed(c)
        assert c.buf == b""


@pytest.mark.parametrize("line", ["GET / HTTP/1.1", "POST /index.html HTTP/1.0", "CONNECT mx.example.test:25 HTTP/1.1"])
def test_http_request_is_521_and_closed(fresh, line):
    fresh.send(f"{line}\r\nHost: mx.example.test\r\n\r\n")
    code_, _ = fresh.reply()
    assert code_ == 521
    assert wait_closed(fresh)
    assert fresh.buf == b""  # the header lines were never answered


def test_submission_needs_auth_for_mail(server):
    with connect(server.submission_port) as c:
        expect(c.cmd("MAIL FROM:<alice@example.test>"), replies.AUTH_REQUIRED)
        expect(c.cmd("RCPT TO:<bob@example.test>"), replies.NEED_MAIL)


def test_no_stray_replies_after_a_dialogue(c):
    for line in ["NOOP", "MAIL FROM:<a@remote.test>", "RCPT TO:<nobody@example.test>", "RSET", "FOO"]:
        c.cmd(line)
    assert nothing_more(c)
