"""End to end: AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), submission and sender ownership
(SPEC "AUTH (RFC 4954)" and "Relay policy"), `geosmtp passwd`, and that no credential ever
reaches the log.

Most tests run on a listener with allow_plaintext_auth = true so that they need no TLS; the
plaintext refusal and one AUTH over STARTTLS are tested explicitly. Failed AUTHs slow the
client down (1 s, then 2 s...), so tests that fail on purpose use their own client address
(127.0.x.y) and, where there are several, run side by side.
"""
import base64
import json
import os
import pty
import select
import signal
import stat
import smtplib
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from geosmtp import replies
from geosmtp.auth import UserStore, verify_password
from tests.support.e2e import (
    code, connect, expect, known_ids, queue_id, send_marker, send_message, wait_closed, wait_delivered,
)
from tests.support.server import PASSWORDS, ServerProcess

ALICE, BOB = "alice@example.test", "bob@example.test"
ALICE_PW, BOB_PW = PASSWORDS[ALICE], PASSWORDS[BOB]
USERNAME_PROMPT, PASSWORD_PROMPT = "VXNlcm5hbWU6", "UGFzc3dvcmQ6"  # "Username:", "Password:"
PLAINTEXT_AUTH = {"listeners": {
    "submission": {"allow_plaintext_auth": True},
    # the MX listener offers AUTH too, so that AUTH inside a transaction can be tried
    "smtp": {"auth": True, "allow_plaintext_auth": True},
}}
SENDERS = {"auth": {"senders": {ALICE: ["alice@other.test", "@owned.test"]}}}


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def parallel(*calls):
    """Run the callables side by side (failed AUTHs each sleep); their results, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=30) for f in [pool.submit(call) for call in calls]]


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("auth"), {**PLAINTEXT_AUTH, **SENDERS}).start()
    yield srv
    srv.stop()


def authed(port: int, user: str = ALICE, source: str | None = None, password: str | None = None):
    """A greeted client, authenticated as `user` (with PASSWORDS[user] unless told)."""
    c = connect(port, source=source)
    expect(c.cmd(f"AUTH PLAIN {plain(user, password or PASSWORDS[user])}"), replies.AUTH_OK)
    return c


# -- advertising and plaintext ------------------------------------------------------------
def test_no_auth_over_plaintext_by_default(server):
    """The default submission listener has no TLS and no allow_plaintext_auth."""
    with connect(server.submission_port, ehlo=None) as c:
        code_, lines = c.cmd("EHLO client.test")
        assert code_ == 250
        assert not any(line.split(" ")[0] == "AUTH" for line in lines), lines
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.ENCRYPTION_REQUIRED)
        expect(c.cmd("AUTH LOGIN"), replies.ENCRYPTION_REQUIRED)
        assert c.code("AUTH PLAIN") == "538 5.7.11"
        expect(c.cmd("MAIL FROM:<alice@example.test>"), replies.AUTH_REQUIRED)
        assert c.code("NOOP") == "250 2.0.0"


def test_auth_is_advertised_where_plaintext_is_allowed(sub):
    with connect(sub.submission_port, ehlo=None) as c:
        code_, lines = c.cmd("EHLO client.test")
        assert code_ == 250 and "AUTH PLAIN LOGIN" in lines[1:]
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)
        assert c.cmd("AUTH PLAIN x") == (503, ["5.5.1 Already authenticated"])
        # once authenticated, AUTH is no longer offered
        code_, lines = c.cmd("EHLO client.test")
        assert code_ == 250 and not any(line.startswith("AUTH") for line in lines)


def test_smtplib_login(sub):
    with smtplib.SMTP("127.0.0.1", sub.submission_port, timeout=10) as s:
        s.ehlo("client.test")
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert s.login(ALICE, ALICE_PW)[0] == 235
        s.sendmail(ALICE, [BOB], b"Subject: via smtplib\r\n\r\nhi\r\n")
    sub.wait_for(lambda: any(b"Subject: via smtplib" in m for m in sub.messages(BOB)))


# -- PLAIN --------------------------------------------------------------------------------
def test_plain_with_initial_response(sub):
    with connect(sub.submission_port) as c:
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}") == (235, ["2.7.0 Authentication successful"])
        qid = queue_id(send_message(c, ALICE, [BOB], b"Subject: plain\r\n\r\nx"))
    msg = wait_delivered(sub, BOB, qid)
    assert b"with ESMTPA id" in msg  # RFC 3848


def test_plain_with_empty_challenge(sub):
    with connect(sub.submission_port) as c:
        assert c.cmd("AUTH PLAIN") == (334, [""])
        expect(c.cmd(plain(BOB, BOB_PW)), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{BOB}>") == "250 2.1.0"


@pytest.mark.parametrize("auth_line", [
    f"auth plain {plain(ALICE, ALICE_PW)}",  # the mechanism name is case-insensitive
    f"AUTH PLAIN {plain('ALICE@Example.TEST', ALICE_PW)}",  # so is the user name
    f"AUTH PLAIN {plain(ALICE, ALICE_PW, authzid=ALICE)}",  # authzid naming the same user
    f"AUTH PLAIN {plain(ALICE, ALICE_PW, authzid='Alice@Example.Test')}",
])
def test_plain_variants_that_succeed(sub, auth_line):
    with connect(sub.submission_port) as c:
        expect(c.cmd(auth_line), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"  # the user is alice, in lower case


# -- LOGIN --------------------------------------------------------------------------------
def test_login_with_both_prompts(sub):
    with connect(sub.submission_port) as c:
        assert c.cmd("AUTH LOGIN") == (334, [USERNAME_PROMPT])
        assert c.cmd(b64(ALICE)) == (334, [PASSWORD_PROMPT])
        expect(c.cmd(b64(ALICE_PW)), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


def test_login_with_initial_response(sub):
    with connect(sub.submission_port) as c:
        assert c.cmd(f"AUTH LOGIN {b64(BOB)}") == (334, [PASSWORD_PROMPT])
        expect(c.cmd(b64(BOB_PW)), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{BOB}>") == "250 2.1.0"


def test_pipelined_login_responses(sub):
    """A client that sends its responses without waiting for the 334s still authenticates."""
    with connect(sub.submission_port) as c:
        c.send(f"AUTH LOGIN\r\n{b64(ALICE)}\r\n{b64(ALICE_PW)}\r\nNOOP\r\n")
        assert c.reply() == (334, [USERNAME_PROMPT])
        assert c.reply() == (334, [PASSWORD_PROMPT])
        expect(c.reply(), replies.AUTH_OK)
        assert code(c.reply()) == "250 2.0.0"


# -- refusals that are not failed attempts -------------------------------------------------
@pytest.mark.parametrize("dialogue", [
    ["AUTH PLAIN"],
    ["AUTH LOGIN"],
    ["AUTH LOGIN", b64(ALICE)],
    [f"AUTH LOGIN {b64(ALICE)}"],
])
def test_star_cancels_with_501_5_0_0(sub, dialogue):
    with connect(sub.submission_port) as c:
        for line in dialogue:
            assert c.cmd(line)[0] == 334
        assert c.cmd("*") == (501, ["5.0.0 Authentication cancelled"])
        assert c.code("NOOP") == "250 2.0.0"
        expect(c.cmd("MAIL FROM:<alice@example.test>"), replies.AUTH_REQUIRED)
        # a cancel is not a failure: no delay, and AUTH can start again at once
        start = time.monotonic()
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)
        assert time.monotonic() - start < 0.9


@pytest.mark.parametrize("dialogue", [
    [f"AUTH PLAIN {plain(ALICE, ALICE_PW)}!"],  # bad initial response
    ["AUTH PLAIN =="],
    ["AUTH PLAIN", "%%%"],
    ["AUTH PLAIN", plain(ALICE, ALICE_PW)[:-1]],  # truncated: bad padding
    ["AUTH LOGIN", "not-base64!"],
    ["AUTH LOGIN", b64(ALICE), ALICE_PW],  # the password sent raw instead of base64
    [f"AUTH LOGIN {ALICE}"],
])
def test_bad_base64_is_501_5_5_2(sub, dialogue):
    with connect(sub.submission_port) as c:
        for line in dialogue[:-1]:
            assert c.cmd(line)[0] == 334
        start = time.monotonic()
        expect(c.cmd(dialogue[-1]), replies.AUTH_BAD_BASE64)
        assert time.monotonic() - start < 0.9  # not treated as a guess: no delay
        assert c.code("NOOP") == "250 2.0.0"
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)


@pytest.mark.parametrize("line", ["AUTH CRAM-MD5", "AUTH XOAUTH2 dXNlcj1h", "AUTH GSSAPI", "AUTH PLAINX",
                                  "AUTH LOGIN-PLAIN", "AUTH ANONYMOUS"])
def test_unknown_mechanism_is_504_5_5_4(sub, line):
    with connect(sub.submission_port) as c:
        assert c.cmd(line) == (504, ["5.5.4 Unrecognized authentication mechanism"])
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)


@pytest.mark.parametrize("line", ["AUTH", "AUTH PLAIN a b"])
def test_auth_syntax_error_is_501(sub, line):
    with connect(sub.submission_port) as c:
        code_, lines = c.cmd(line)
        assert code_ == 501 and lines[-1].startswith("5.5."), lines
        assert c.code("NOOP") == "250 2.0.0"


def test_auth_before_ehlo_is_503(sub):
    with connect(sub.submission_port, ehlo=None) as c:
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.NEED_EHLO)
        assert c.cmd("EHLO client.test")[0] == 250
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)


def test_auth_when_already_authenticated_is_503_5_5_1(sub):
    with authed(sub.submission_port) as c:
        expect(c.cmd(f"AUTH PLAIN {plain(BOB, BOB_PW)}"), replies.ALREADY_AUTHENTICATED)
        expect(c.cmd("AUTH LOGIN"), replies.ALREADY_AUTHENTICATED)
        # still alice
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


def test_auth_inside_a_transaction_is_503_5_5_1(sub):
    # the MX listener of this server offers AUTH but does not need it for MAIL
    with connect(sub.port) as c:
        assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}") == (
            503, ["5.5.1 AUTH not allowed during a mail transaction"])
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"  # the transaction goes on
        expect(c.cmd("RCPT TO:<someone@remote.test>"), replies.RELAY_DENIED)  # and is not authenticated
        assert c.code("RSET") == "250 2.0.0"
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)
        assert c.code("MAIL FROM:<alice@example.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<someone@remote.test>") == "250 2.1.5"


# -- failed attempts ----------------------------------------------------------------------
def test_wrong_credentials_slow_down_then_421(sub):
    c = connect(sub.submission_port, source="127.0.1.1")
    other = connect(sub.submission_port, source="127.0.1.2")
    try:
        start = time.monotonic()
        c.send(f"AUTH PLAIN {plain(ALICE, 'wrong-password')}\r\n")
        # another client is not held up by the delay
        assert other.code("NOOP") == "250 2.0.0"
        assert time.monotonic() - start < 0.8
        assert c.reply() == (535, ["5.7.8 Authentication credentials invalid"])
        first = time.monotonic() - start

        start = time.monotonic()
        expect(c.cmd(f"AUTH PLAIN {plain('nobody@example.test', ALICE_PW)}"), replies.AUTH_FAILED)
        second = time.monotonic() - start
        assert first >= 0.8, first
        assert second >= first + 0.5, (first, second)

        expect(c.cmd("NOOP"), replies.OK)  # the session is still usable between attempts
        expect(c.cmd("MAIL FROM:<alice@example.test>"), replies.AUTH_REQUIRED)
        c.send("AUTH LOGIN\r\n")
        assert c.reply() == (334, [USERNAME_PROMPT])
        assert c.cmd(b64(ALICE)) == (334, [PASSWORD_PROMPT])
        assert c.cmd(b64("still-wrong")) == (421, ["4.7.0 Too many authentication failures, closing connection"])
        assert wait_closed(c)
    finally:
        c.close()
        other.close()
    # the next session from the same address starts afresh (the per-IP hourly limit is 30)
    with authed(sub.submission_port, source="127.0.1.1") as c2:
        assert c2.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


FAILURES = {
    "wrong password": [f"AUTH PLAIN {plain(ALICE, BOB_PW)}"],
    "unknown user": [f"AUTH PLAIN {plain('nobody@example.test', ALICE_PW)}"],
    "user of another domain": [f"AUTH PLAIN {plain('alice@other.test', ALICE_PW)}"],
    "authzid names someone else": [f"AUTH PLAIN {plain(ALICE, ALICE_PW, authzid=BOB)}"],
    "password with a trailing space": [f"AUTH PLAIN {plain(ALICE, ALICE_PW + ' ')}"],
    "PLAIN with two fields": [f"AUTH PLAIN {b64(ALICE + chr(0) + ALICE_PW)}"],
    "PLAIN empty response": ["AUTH PLAIN", "="],
    "PLAIN initial response =": ["AUTH PLAIN ="],
    "PLAIN not UTF-8": ["AUTH PLAIN " + b64(b"\0alice@example.test\0\xff")],
    "LOGIN wrong password": ["AUTH LOGIN", b64(ALICE), b64("nope")],
    "LOGIN password typed as the user": [f"AUTH LOGIN {b64(ALICE_PW)}", b64(ALICE_PW)],
    "LOGIN empty user": ["AUTH LOGIN", "=", b64(ALICE_PW)],
}


def test_every_kind_of_failure_is_535_5_7_8(sub):
    def attempt(i, dialogue):
        # on the MX listener, which lets us check that a failed AUTH opens no relay
        with connect(sub.port, source=f"127.0.2.{i + 1}") as c:
            for line in dialogue[:-1]:
                assert c.cmd(line)[0] == 334, dialogue
            got = code(c.cmd(dialogue[-1]))
            assert c.code("MAIL FROM:<alice@example.test>") == "250 2.1.0"
            relay = code(c.cmd("RCPT TO:<someone@remote.test>"))
            return got, relay

    results = parallel(*[lambda i=i, d=d: attempt(i, d) for i, d in enumerate(FAILURES.values())])
    assert dict(zip(FAILURES, results)) == {name: ("535 5.7.8", "554 5.7.1") for name in FAILURES}


def test_failed_attempt_then_success_in_the_same_session(sub):
    with connect(sub.submission_port, source="127.0.1.3") as c:
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, 'guess')}"), replies.AUTH_FAILED)
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


# -- submission and relay -----------------------------------------------------------------
def test_submission_needs_auth_before_mail(sub):
    with connect(sub.submission_port) as c:
        assert c.cmd(f"MAIL FROM:<{ALICE}>") == (530, ["5.7.0 Authentication required"])
        expect(c.cmd(f"RCPT TO:<{BOB}>"), replies.NEED_MAIL)
        expect(c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"), replies.AUTH_OK)
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


def test_trusted_network_still_needs_auth_on_submission(sub):
    with connect(sub.submission_port, source="127.0.0.2") as c:
        expect(c.cmd(f"MAIL FROM:<{ALICE}>"), replies.AUTH_REQUIRED)


def test_authenticated_user_relays_and_stranger_does_not(sub):
    with authed(sub.submission_port) as c:
        qid = queue_id(send_message(c, ALICE, ["someone@remote.test"], b"Subject: out\r\n\r\nx"))
    sub.wait_for(lambda: qid in sub.queue_files("deferred"))
    env = json.loads((sub.spool / "queue" / "deferred" / qid).read_text())
    assert [r["address"] for r in env["recipients"]] == ["someone@remote.test"]
    assert env["client"]["auth_user"] == ALICE and env["client"]["listener"] == "submission"
    assert env["sender"] == ALICE

    before = known_ids(sub)
    deferred = sub.queue_files("deferred")
    with connect(sub.port) as c:  # same address, MX listener, no AUTH
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"
        assert c.cmd("RCPT TO:<someone@remote.test>") == (554, ["5.7.1 Relay access denied"])
        expect(c.cmd("DATA"), replies.NO_VALID_RECIPIENTS)
    marker = send_marker(sub)
    assert known_ids(sub) - before == {marker}
    assert sub.queue_files("deferred") == deferred


def test_auth_on_the_mx_listener_also_opens_relay(sub):
    with authed(sub.port, BOB) as c:
        assert c.code(f"MAIL FROM:<{BOB}>") == "250 2.1.0"
        assert c.code("RCPT TO:<someone@remote.test>") == "250 2.1.5"
        assert c.code("RCPT TO:<user@[192.0.2.1]>") == "250 2.1.5"


# -- sender ownership ---------------------------------------------------------------------
@pytest.mark.parametrize("sender", [
    ALICE,
    "Alice@Example.TEST",
    "team@example.test",  # an alias that delivers to her
    "TEAM@example.test",
    "",  # <>: bounces and reports
    "alice@other.test",  # [auth.senders]
    "anyone@owned.test",  # [auth.senders] "@owned.test"
    "x@OWNED.test",
    "@relay.test:alice@example.test",  # a source route is ignored
])
def test_alice_may_send_as(sub, sender):
    with authed(sub.submission_port) as c:
        assert c.cmd(f"MAIL FROM:<{sender}>") == (250, ["2.1.0 Sender ok"])


@pytest.mark.parametrize("sender", [
    BOB,
    "anyone@remote.test",
    "fwd@example.test",  # an alias, but not one that delivers to her
    "carol@other.test",
    "postmaster@example.test",
    "alice@example.test.evil.test",
    "alice@owned.test.evil.test",
    "x@sub.owned.test",  # "@owned.test" is that domain, not its subdomains
    "alice@remote.test",
    '"alice@example.test"@remote.test',
    "alice%example.test@remote.test",
    "alice@[127.0.0.1]",
    "@example.test:bob@example.test",
])
def test_alice_may_not_send_as(sub, sender):
    with authed(sub.submission_port) as c:
        assert c.cmd(f"MAIL FROM:<{sender}>") == (553, ["5.7.1 Sender address rejected: not owned by user"])
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"  # no transaction was started


def test_extra_senders_are_per_user(sub):
    with authed(sub.submission_port, BOB) as c:
        expect(c.cmd("MAIL FROM:<alice@other.test>"), replies.SENDER_NOT_OWNED)
        expect(c.cmd("MAIL FROM:<anyone@owned.test>"), replies.SENDER_NOT_OWNED)
        expect(c.cmd(f"MAIL FROM:<{ALICE}>"), replies.SENDER_NOT_OWNED)
        assert c.code("MAIL FROM:<team@example.test>") == "250 2.1.0"


def test_restrict_sender_off_lets_any_sender_through(make_server):
    srv = make_server({**PLAINTEXT_AUTH, "auth": {"restrict_sender": False}})
    for sender in (BOB, "anyone@remote.test", ""):
        with authed(srv.submission_port) as c:
            assert c.code(f"MAIL FROM:<{sender}>") == "250 2.1.0", sender
            assert c.code("RCPT TO:<someone@remote.test>") == "250 2.1.5"


# -- STARTTLS -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return {"cert_file": str(cert_file), "key_file": str(key_file)}, ctx


def test_auth_over_starttls(make_server, tls_files):
    files, ctx = tls_files
    srv = make_server({"tls": files, "listeners": {"submission": {"tls": "starttls"}}})
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
        s.ehlo("client.test")
        assert "starttls" in s.esmtp_features and "auth" not in s.esmtp_features
        assert s.docmd("AUTH", f"PLAIN {plain(ALICE, ALICE_PW)}") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        s.starttls(context=ctx)
        s.ehlo("client.test")
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert "starttls" not in s.esmtp_features
        assert s.login(ALICE, ALICE_PW)[0] == 235
        s.sendmail(ALICE, [BOB], b"Subject: over TLS\r\n\r\nhi\r\n")
    msg = srv.wait_for(lambda: [m for m in srv.messages(BOB) if b"Subject: over TLS" in m])[0]
    assert b"with ESMTPSA id" in msg


def test_starttls_forgets_plaintext_auth(make_server, tls_files):
    files, ctx = tls_files
    srv = make_server({"tls": files, "listeners": {
        "submission": {"tls": "starttls", "allow_plaintext_auth": True}}})
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
        s.ehlo("client.test")
        assert "auth" in s.esmtp_features
        assert s.docmd("AUTH", f"PLAIN {plain(ALICE, ALICE_PW)}")[0] == 235
        s.starttls(context=ctx)
        s.ehlo("client.test")
        assert "auth" in s.esmtp_features  # offered again: the old AUTH is gone (RFC 3207 4.2)
        assert s.docmd("MAIL", f"FROM:<{ALICE}>") == (530, b"5.7.0 Authentication required")
        assert s.docmd("AUTH", f"PLAIN {plain(BOB, BOB_PW)}")[0] == 235
        assert s.docmd("MAIL", f"FROM:<{BOB}>")[0] == 250


# -- no secret in any log -----------------------------------------------------------------
def test_no_credential_payload_or_hash_in_the_log(make_server):
    srv = make_server({**PLAINTEXT_AUTH, "log": {"level": "TRACE"}})
    wrong = "wrong-Secret-77"
    b64_payloads: list[str] = []

    def p(value: str) -> str:
        b64_payloads.append(value)
        return value

    sessions = [
        # (port, lines to send one by one); every reply is read
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, ALICE_PW))}"]),
        (srv.submission_port, ["AUTH PLAIN", p(plain(BOB, BOB_PW))]),
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, ALICE_PW, authzid=ALICE))}"]),
        (srv.submission_port, ["AUTH LOGIN", p(b64(ALICE)), p(b64(ALICE_PW))]),
        (srv.submission_port, [f"AUTH LOGIN {p(b64(BOB))}", p(b64(BOB_PW))]),
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, wrong))}", "AUTH PLAIN", p(plain(BOB, wrong)),
                               f"AUTH PLAIN {p(plain(ALICE, wrong))}"]),  # 535, 535, 421
        (srv.submission_port, ["AUTH LOGIN", p(b64(ALICE)), p(b64(wrong))]),
        (srv.submission_port, [f"AUTH LOGIN {p(b64(ALICE_PW))}", p(b64(ALICE_PW))]),  # password as user
        (srv.submission_port, ["AUTH LOGIN", p(b64(BOB_PW)), "*"]),
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, ALICE_PW, authzid=BOB))}"]),
        (srv.submission_port, [f"AUTH PLAIN {p(plain('nobody@example.test', wrong))}"]),
        (srv.submission_port, [f"AUTH PLAIN {ALICE_PW}"]),  # the raw password: bad base64
        (srv.submission_port, ["AUTH LOGIN", p(b64(ALICE)), wrong]),  # raw password at the prompt
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, ALICE_PW))}!"]),
        (srv.submission_port, [f"AUTH CRAM-MD5 {p(b64(ALICE_PW))}"]),
        (srv.submission_port, [f"AUTH PLAIN {p(plain(ALICE, wrong + 'x' * 600))}"]),  # over 512: 500
        (srv.submission_port, ["AUTH PLAIN", p(plain(ALICE, wrong * 1000))]),  # over 12288: 535
        (srv.port, [f"AUTH PLAIN {p(plain(ALICE, ALICE_PW))}",  # the MX listener: 235
                    f"AUTH PLAIN {p(plain(BOB, BOB_PW))}"]),  # 503 already authenticated
        (srv.port, ["MAIL FROM:<x@remote.test>", f"AUTH PLAIN {p(plain(BOB, BOB_PW))}"]),  # 503 in a transaction
    ]

    def run(i, port, lines):
        got = []
        with connect(port, source=f"127.0.3.{i + 1}") as c:
            for line in lines:
                reply = c.cmd(line)
                got.append(reply[0])
                if reply[0] == 421:
                    break
            if got[-1] != 421:
                c.cmd("QUIT")
        return got

    results = parallel(*[lambda i=i, s=s: run(i, *s) for i, s in enumerate(sessions)])
    assert results == [
        [235], [334, 235], [235], [334, 334, 235], [334, 235],
        [535, 334, 535, 421], [334, 334, 535], [334, 535], [334, 334, 501], [535], [535],
        [501], [334, 334, 501], [501], [504], [500], [334, 535],
        [235, 503], [250, 503],
    ]
    with connect(srv.port, ehlo=None) as c:  # AUTH before EHLO
        expect(c.cmd(f"AUTH PLAIN {p(plain(ALICE, ALICE_PW))}"), replies.NEED_EHLO)
    # a reload logs about the users file
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for(lambda: "reload: 2 users loaded" in srv.log())
    srv.stop()

    log = srv.log()
    lines = log.splitlines()
    assert any(" TRACE " in line and "<- AUTH ****" in line for line in lines), "TRACE not in effect"
    assert any("AUTH PLAIN failed" in line for line in lines)
    hashes = UserStore.load(srv.root / "users").users.values()
    secrets = [ALICE_PW, BOB_PW, wrong, "$scrypt$", *b64_payloads,
               *(part for h in hashes for part in h.split("$")[-2:])]
    for line in lines:
        for secret in secrets:
            assert secret not in line, (secret, line)
            assert secret.lower() not in line.lower(), (secret, line)


LETTERS_ONLY_PASSWORD = "AAAAAAAAAAAA"  # base64 "QUFBQUFBQUFBQUFB": letters only, like an SMTP verb


def test_responses_sent_after_a_refused_auth_are_not_logged(tmp_path):
    """A client that sends AUTH and its responses in one go (printf ... | nc, a naive script)
    to a listener that refuses AUTH in clear (538) has its responses read as commands. One
    that happens to look like a verb (base64 of letters only, at most 16) lands in the log."""
    srv = ServerProcess(tmp_path / "srv", {
        "listeners": {"smtp": {"auth": True, "allow_plaintext_auth": True}},  # submission: TLS only
        "log": {"level": "TRACE"},
    })
    from geosmtp.auth import hash_password
    with open(srv.root / "users", "a") as fh:
        fh.write(f"dora@example.test:{hash_password(LETTERS_ONLY_PASSWORD, ln=10)}\n")
    srv.start()
    payload = b64(LETTERS_ONLY_PASSWORD)
    assert payload.isalpha() and len(payload) <= 16
    dialogue = f"AUTH LOGIN\r\n{b64('dora@example.test')}\r\n{payload}\r\n"
    try:
        with connect(srv.submission_port) as c:  # AUTH refused in clear: 538, then 2 x 500
            c.send(dialogue)
            assert [c.reply()[0] for _ in range(3)] == [538, 500, 500]
        with connect(srv.port) as c:  # where AUTH is allowed, the same bytes authenticate
            c.send(dialogue)
            assert [c.reply()[0] for _ in range(3)] == [334, 334, 235]
    finally:
        srv.stop()
    assert payload.lower() not in srv.log().lower()


# -- geosmtp passwd -----------------------------------------------------------------------
def geosmtp_passwd(srv: ServerProcess, *args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "geosmtp", "passwd", "-c", str(srv.config_path), *args],
                          input=stdin, capture_output=True, text=True, timeout=30, cwd=srv.root)


def auth_result(srv: ServerProcess, user: str, password: str, source: str) -> str:
    with connect(srv.submission_port, source=source) as c:
        return code(c.cmd(f"AUTH PLAIN {plain(user, password)}"))


def reload_users(srv: ServerProcess, users: int) -> None:
    """SIGHUP, then wait (bounded) for the reload to be logged."""
    marker = f"reload: {users} users loaded"
    seen = srv.log().count(marker)
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for(lambda: srv.log().count(marker) > seen)


def test_passwd_stdin_creates_updates_and_deletes(make_server):
    srv = make_server(PLAINTEXT_AUTH)
    users_file = srv.root / "users"
    original = users_file.read_text()

    # create
    result = geosmtp_passwd(srv, "Dave@Example.Test", "--stdin", stdin="dave-new-pw-3\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{users_file}: dave@example.test set"
    assert "dave-new-pw-3" not in result.stdout + result.stderr
    text = users_file.read_text()
    assert "dave-new-pw-3" not in text
    for line in original.splitlines():
        assert line in text.splitlines()  # the others are untouched
    store = UserStore.load(users_file)
    assert verify_password("dave-new-pw-3", store.users["dave@example.test"])
    assert stat.S_IMODE(users_file.stat().st_mode) & 0o077 == 0  # hashes: not for other users

    # the running server learns it on SIGHUP
    assert auth_result(srv, "dave@example.test", "dave-new-pw-3", "127.0.4.1") == "535 5.7.8"
    reload_users(srv, 3)
    with authed(srv.submission_port, "dave@example.test", password="dave-new-pw-3") as c:
        assert c.code("MAIL FROM:<dave@example.test>") == "250 2.1.0"

    # update
    result = geosmtp_passwd(srv, ALICE, "--stdin", stdin="alice-new-pw-4\n")
    assert result.returncode == 0, result.stderr
    assert "alice-new-pw-4" not in result.stdout + result.stderr
    reload_users(srv, 3)
    assert parallel(lambda: auth_result(srv, ALICE, ALICE_PW, "127.0.4.2"),
                    lambda: auth_result(srv, ALICE, "alice-new-pw-4", "127.0.4.3")) == ["535 5.7.8", "235 2.7.0"]

    # delete
    result = geosmtp_passwd(srv, BOB, "--delete")
    assert result.returncode == 0, result.stderr
    assert BOB not in users_file.read_text()
    reload_users(srv, 2)
    assert auth_result(srv, BOB, BOB_PW, "127.0.4.4") == "535 5.7.8"
    result = geosmtp_passwd(srv, BOB, "--delete")
    assert result.returncode == 1 and "bob@example.test is not in" in result.stderr

    # no leftovers next to the users file
    assert not [name for name in os.listdir(srv.root) if name.endswith(".tmp")]
    srv_log = srv.log()
    for secret in ("dave-new-pw-3", "alice-new-pw-4", "$scrypt$"):
        assert secret not in srv_log


@pytest.mark.parametrize("args, stdin", [
    (["dave@example.test", "--stdin"], "\n"),  # empty password
    (["not an address", "--stdin"], "pw\n"),
])
def test_passwd_refuses_bad_input(tmp_path, args, stdin):
    srv = ServerProcess(tmp_path / "srv")
    before = (srv.root / "users").read_text()
    result = geosmtp_passwd(srv, *args, stdin=stdin)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert (srv.root / "users").read_text() == before


def test_passwd_reports_a_bad_users_file_line_without_printing_it(tmp_path):
    srv = ServerProcess(tmp_path / "srv")
    users_file = srv.root / "users"
    good = users_file.read_text()
    bad = "carol@example.test:$scrypt$ln=10,r=8,p=1$U0FMVFNFQ1JFVA==$S0VZU0VDUkVU!!\n"
    users_file.write_text(good + bad)
    result = geosmtp_passwd(srv, "dave@example.test", "--stdin", stdin="dave-pw\n")
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "line 3" in out, out
    for secret in ("U0FMVFNFQ1JFVA", "S0VZU0VDUkVU", "$scrypt$ln", "dave-pw", "carol"):
        assert secret not in out, (secret, out)
    assert users_file.read_text() == good + bad  # nothing written


def test_bad_users_file_on_sighup_keeps_the_old_users(make_server):
    srv = make_server(PLAINTEXT_AUTH)
    users_file = srv.root / "users"
    users_file.write_text(users_file.read_text() + "garbage-line SECRETHASHMATERIAL\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for(lambda: "users file not reloaded" in srv.log())
    assert "line 3" in srv.log() and "SECRETHASHMATERIAL" not in srv.log()
    assert auth_result(srv, ALICE, ALICE_PW, "127.0.4.5") == "235 2.7.0"


def start_with_bad_users_file(tmp_path):
    srv = ServerProcess(tmp_path / "srv")
    (srv.root / "users").write_text(
        "alice@example.test:$scrypt$ln=10,r=8,p=1$U0FMVA==$SECRETKEYMATERIAL!\n")
    result = subprocess.run([sys.executable, "-m", "geosmtp", "start", "-c", str(srv.config_path)],
                            capture_output=True, text=True, timeout=30, cwd=srv.root)
    return srv, result, result.stdout + result.stderr


def test_start_with_a_bad_users_file_fails_without_printing_the_hash(tmp_path):
    _, result, out = start_with_bad_users_file(tmp_path)
    assert result.returncode != 0
    assert "line 1" in out and "SECRETKEYMATERIAL" not in out and "U0FMVA" not in out, out


def test_start_with_a_bad_users_file_is_a_clean_error(tmp_path):
    srv, result, out = start_with_bad_users_file(tmp_path)
    assert result.returncode in (1, 2)
    assert "Traceback" not in out, out
    assert str(srv.root / "users") in out, out


class PtyReader:
    """Everything the child wrote to its terminal, read with bounded waits."""

    def __init__(self, fd: int):
        self.fd = fd
        self.out = bytearray()

    def _read(self, deadline: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child has gone and the terminal is closed
            data = b""
        self.out += data
        return bool(data)

    def wait_for(self, needle: bytes, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.out.count(needle) < count:
            if time.monotonic() >= deadline or not self._read(deadline):
                raise AssertionError(f"waiting for {needle!r} x{count}: {bytes(self.out)!r}")

    def to_eof(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            if time.monotonic() >= deadline:
                raise AssertionError(f"no EOF: {bytes(self.out)!r}")


def test_interactive_passwd_never_echoes(tmp_path):
    srv = ServerProcess(tmp_path / "srv")
    password = "erin-typed-secret-5"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, as for a person typing
        try:
            os.chdir(srv.root)
            os.execv(sys.executable, [sys.executable, "-m", "geosmtp", "passwd", "-c", str(srv.config_path),
                                      "erin@example.test"])
        finally:
            os._exit(127)
    term = PtyReader(fd)
    try:
        term.wait_for(b"Password:", 1)
        os.write(fd, b"first-try\n")
        term.wait_for(b"Repeat for confirmation:", 1)
        os.write(fd, b"mismatch\n")  # click says so and asks again
        term.wait_for(b"Password:", 2)
        os.write(fd, password.encode() + b"\n")
        term.wait_for(b"Repeat for confirmation:", 2)
        os.write(fd, password.encode() + b"\n")
        term.to_eof()
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = bytes(term.out)
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert b"do not match" in text
    for typed in (password.encode(), b"first-try", b"mismatch"):
        assert typed not in text, text
    assert b"erin@example.test set" in text
    store = UserStore.load(srv.root / "users")
    assert verify_password(password, store.users["erin@example.test"])


def test_passwd_keeps_the_users_file_mode(tmp_path):
    """An operator makes the file root:geosmtp 0640 so that the server (running as geosmtp)
    can read it; `sudo geosmtp passwd` must not turn it into root:root 0600, which the server
    then fails to reload on SIGHUP and to open at the next start."""
    srv = ServerProcess(tmp_path / "srv")
    users_file = srv.root / "users"
    os.chmod(users_file, 0o640)
    result = geosmtp_passwd(srv, "dave@example.test", "--stdin", stdin="dave-pw-6\n")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640


# -- more session rules -------------------------------------------------------------------
def test_ehlo_and_rset_keep_the_authentication(sub):
    """SPEC: RSET and a new EHLO clear the transaction only."""
    with authed(sub.submission_port) as c:
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"
        assert c.code("RSET") == "250 2.0.0"
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"
        assert c.cmd("EHLO again.test")[0] == 250
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"
        assert c.cmd("HELO again.test")[0] == 250
        assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"


def test_silence_during_the_exchange_times_out(make_server):
    srv = make_server({**PLAINTEXT_AUTH, "limits": {"command_timeout": 1}})
    with connect(srv.submission_port) as c:
        assert c.cmd("AUTH LOGIN") == (334, [USERNAME_PROMPT])
        start = time.monotonic()
        expect(c.reply(), replies.COMMAND_TIMEOUT)
        assert 0.8 <= time.monotonic() - start < 4
        assert wait_closed(c)


def test_require_tls_listener_refuses_auth_before_starttls(make_server, tls_files):
    files, _ = tls_files
    srv = make_server({"tls": files, "listeners": {"submission": {"tls": "starttls", "require_tls": True}}})
    with connect(srv.submission_port) as c:
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}") == (530, ["5.7.0 Must issue a STARTTLS command first"])


def test_user_with_non_ascii_upper_case_may_send_as_themselves(tmp_path):
    srv = ServerProcess(tmp_path / "srv", {**PLAINTEXT_AUTH, "auth": {"senders": {"Éloi@example.test": ["éloi@other.test"]}}})
    result = geosmtp_passwd(srv, "Éloi@example.test", "--stdin", stdin="eloi-pw-7\n")
    assert result.returncode == 0, result.stderr
    srv.start()
    try:
        with connect(srv.submission_port) as c:
            expect(c.cmd(f"AUTH PLAIN {plain('Éloi@example.test', 'eloi-pw-7')}"), replies.AUTH_OK)
            got = [code(c.cmd("MAIL FROM:<Éloi@example.test> SMTPUTF8")), code(c.cmd("RSET")),
                   code(c.cmd("MAIL FROM:<éloi@other.test> SMTPUTF8"))]
    finally:
        srv.stop()
    assert got == ["250 2.1.0", "250 2.0.0", "250 2.1.0"]
