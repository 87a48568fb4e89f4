"""geosmtp.bounce: RFC 3464 delivery status notifications, checked with the stdlib email parser."""
from __future__ import annotations

import email
import email.policy
import io
import quopri
import re
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp import bounce
from geosmtp.bounce import DELAYED, FAILED, build, header_section, should_notify, status_of
from geosmtp.envelope import ClientInfo, Envelope, Recipient

MTA = "mx.example.test"
CREATED = 1_700_000_000.5  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = 1_700_003_600.0
UPDATED = 1_700_003_000.0  # Tue, 14 Nov 2023 23:03:20 +0000
RETRY_UNTIL = 1_700_432_000.0  # Sun, 19 Nov 2023 22:13:20 +0000
HEADERS = b"Received: by mx.example.test\r\nFrom: s@remote.test\r\nSubject: hi\r\n\r\n"


def envelope(*rcpts: Recipient, sender: str = "s@remote.test", qid: str = "0123456789ABCDEF01") -> Envelope:
    return Envelope(id=qid, created=CREATED, sender=sender, recipients=list(rcpts),
                    client=ClientInfo("192.0.2.1"))


def rejected(address: str = "alice@remote.test", original: str | None = None,
             reply: str | None = "550 5.1.1 <alice@remote.test>: user unknown",
             remote: str | None = "mx1.remote.test[127.0.0.10]", updated: float | None = UPDATED) -> Recipient:
    return Recipient(address, original if original is not None else address, status="failed",
                     attempts=1, last_reply=reply, updated=updated, remote=remote)


def make(*rcpts: Recipient, kind: str = FAILED, headers: bytes = HEADERS, sender: str = "s@remote.test",
         **kw) -> bytes:
    env = envelope(*(rcpts or (rejected(),)), sender=sender)
    return build(env, env.recipients, kind=kind, reporting_mta=kw.pop("reporting_mta", MTA),
                 original_headers=headers, now=NOW, **kw)


def parse(dsn: bytes) -> EmailMessage:
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert not msg.defects
    assert all(not part.defects for part in msg.walk())
    return msg


def raw_parts(dsn: bytes) -> list[tuple[bytes, bytes]]:
    """(part header, part body) of each body part, split by hand on the boundary."""
    boundary = parse(dsn).get_boundary().encode()
    _, _, rest = dsn.partition(b"\r\n\r\n")
    chunks = rest.split(b"\r\n--" + boundary)
    assert chunks[-1] == b"--\r\n"  # the close delimiter, then nothing
    out = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        out.append((head, body))
    return out


def status_blocks(dsn: bytes) -> list[dict[str, str]]:
    """The delivery-status part as blocks of fields: [per-message, per-recipient...].

    Split by hand, so it works for message/global-delivery-status too, which the stdlib
    email package does not know; each block is then parsed (and unfolded) by it."""
    [body] = [b for h, b in raw_parts(dsn) if b"delivery-status" in h]
    blocks = body.split(b"\r\n\r\n")
    assert blocks[-1].endswith(b"\r\n")
    out = []
    for block in blocks:
        parsed = email.message_from_bytes(block.rstrip(b"\r\n") + b"\r\n", policy=email.policy.default)
        assert parsed.get_payload() == ""
        fields = {name: str(value) for name, value in parsed.items()}
        assert len(fields) == len(parsed.keys())  # no field twice in a block
        out.append(fields)
    return out


def text_of(dsn: bytes) -> str:
    part = next(parse(dsn).iter_parts())
    return part.get_content()


# -- should_notify ------------------------------------------------------------------------
def test_should_notify():
    assert should_notify(envelope(rejected())) is True
    assert should_notify(envelope(rejected(), sender="")) is False  # never a bounce for a bounce


# -- structure ----------------------------------------------------------------------------
def test_failed_dsn_structure_and_top_headers():
    dsn = make(message_id="dsn1@mx.example.test")
    msg = parse(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["To"].addresses[0].addr_spec == "s@remote.test"
    assert b"\r\nTo: <s@remote.test>\r\n" in dsn
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == "Tue, 14 Nov 2023 23:13:20 +0000"
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["Message-ID"] == "<dsn1@mx.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version", "Content-Type"):
        assert len(msg.get_all(name)) == 1
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[0].get_content_charset() == "utf-8"
    assert dsn.isascii()  # an ASCII DSN is 7-bit from end to end


def test_message_id_is_generated_or_given():
    first, second = parse(make())["Message-ID"], parse(make())["Message-ID"]
    assert re.fullmatch(r"<[0-9a-f]+@mx\.example\.test>", first)
    assert first != second
    assert parse(make(message_id="<given@x.test>"))["Message-ID"] == "<given@x.test>"
    assert parse(make(message_id="given@x.test"))["Message-ID"] == "<given@x.test>"


def test_original_headers_part_is_the_header_section():
    dsn = make()
    part = list(parse(dsn).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_content().replace("\r\n", "\n") == HEADERS.decode().replace("\r\n", "\n").rstrip("\n") + "\n"
    [_, _, (_, body)] = raw_parts(dsn)
    assert body == HEADERS[:-2]  # the header lines, each with its CRLF, and no body


def test_no_original_headers_leaves_out_part_three():
    msg = parse(make(headers=b""))
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "message/delivery-status"]
    assert "attached" not in text_of(make(headers=b""))


def test_original_headers_are_normalised():
    # LF-only, a body after the empty line, a last line without an end: CRLF header lines only
    dsn = make(headers=b"Subject: hi\nFrom: a@b\n\nbody line\n--not-a-boundary\n")
    [_, _, (_, body)] = raw_parts(dsn)
    assert body == b"Subject: hi\r\nFrom: a@b\r\n"
    dsn = make(headers=b"Subject: hi\r\nX-Cut: no end")
    assert raw_parts(dsn)[2][1] == b"Subject: hi\r\nX-Cut: no end\r\n"


# -- delivery-status fields ---------------------------------------------------------------
def test_per_message_fields():
    [per_message, _] = status_blocks(make())
    assert per_message == {"Reporting-MTA": f"dns; {MTA}", "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000"}


def test_every_per_recipient_field():
    rcpt = rejected(address="alice@remote.test", original="Alias@Example.TEST")
    [_, fields] = status_blocks(make(rcpt))
    assert fields == {
        "Original-Recipient": "rfc822; Alias@Example.TEST",
        "Final-Recipient": "rfc822; alice@remote.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.remote.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 <alice@remote.test>: user unknown",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 23:03:20 +0000",
    }
    assert list(fields) == ["Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
                            "Diagnostic-Code", "Last-Attempt-Date"]


def test_stdlib_reads_the_delivery_status_part():
    part = list(parse(make(rejected(), rejected("bob@remote.test", reply="554 5.7.1 no"))).iter_parts())[1]
    blocks = part.get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; alice@remote.test", "rfc822; bob@remote.test"]
    assert blocks[0]["Reporting-MTA"] == f"dns; {MTA}"


def test_original_recipient_only_when_it_differs():
    [_, fields] = status_blocks(make(rejected(original="alice@remote.test")))
    assert "Original-Recipient" not in fields


def test_several_recipients_in_order():
    rcpts = [
        rejected("a@one.test", reply="550 5.1.1 no such user", remote="mx.one.test[192.0.2.1]"),
        rejected("b@two.test", original="list@local.test", reply="552 5.2.2 mailbox full",
                 remote="mx.two.test[192.0.2.2]", updated=None),
        rejected("c@local.test", reply="550 5.1.1 Mailbox does not exist", remote=None),
        rejected("d@three.test", reply=None, remote=None, updated=None),
    ]
    dsn = make(*rcpts)
    per_message, *blocks = status_blocks(dsn)
    assert [b["Final-Recipient"] for b in blocks] == [f"rfc822; {r.address}" for r in rcpts]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.2.2", "5.1.1", "5.0.0"]
    assert [b["Action"] for b in blocks] == ["failed"] * 4
    assert [b.get("Remote-MTA") for b in blocks] == ["dns; mx.one.test", "dns; mx.two.test", None, None]
    assert [b.get("Original-Recipient") for b in blocks] == [None, "rfc822; list@local.test", None, None]
    assert "Last-Attempt-Date" in blocks[0] and "Last-Attempt-Date" not in blocks[1]
    text = text_of(dsn)
    for r in rcpts:
        assert f"<{r.address}>" in text
        if r.last_reply:
            assert r.last_reply in text


def test_missing_remote_gives_no_remote_mta_or_diagnostic_code():
    [_, fields] = status_blocks(make(rejected(reply="550 5.1.1 Mailbox does not exist", remote=None)))
    assert "Remote-MTA" not in fields and "Diagnostic-Code" not in fields
    assert fields["Status"] == "5.1.1"
    text = text_of(make(rejected(reply="550 5.1.1 Mailbox does not exist", remote=None)))
    assert "Reason: 550 5.1.1 Mailbox does not exist" in text
    assert "Remote host" not in text and "Reply:" not in text


def test_remote_without_a_reply_has_no_diagnostic_code():
    [_, fields] = status_blocks(make(rejected(reply=None)))
    assert fields["Remote-MTA"] == "dns; mx1.remote.test"
    assert "Diagnostic-Code" not in fields
    assert fields["Status"] == "5.0.0"


def test_remote_given_only_as_an_address_literal():
    [_, fields] = status_blocks(make(rejected(remote="[192.0.2.7]")))
    assert fields["Remote-MTA"] == "dns; [192.0.2.7]"


def test_local_temporary_failure_that_expired_keeps_its_4xx_status():
    [_, fields] = status_blocks(make(rejected(reply="451 4.3.0 Mailbox write failed", remote=None)))
    assert fields["Action"] == "failed" and fields["Status"] == "4.3.0"


# -- delayed ------------------------------------------------------------------------------
def test_delayed_dsn():
    rcpts = [rejected(reply="451 4.7.1 greylisted, try later"), rejected("bob@remote.test", reply=None, remote=None)]
    dsn = make(*rcpts, kind=DELAYED, retry_until=RETRY_UNTIL)
    msg = parse(dsn)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, first, second = status_blocks(dsn)
    assert first["Action"] == second["Action"] == "delayed"
    assert first["Status"] == "4.7.1"
    assert second["Status"] == "4.0.0"  # no reply yet: the default for delayed
    assert first["Will-Retry-Until"] == second["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    text = " ".join(text_of(dsn).split())  # unwrapped
    assert "until Sun, 19 Nov 2023 22:13:20 +0000" in text
    assert "You do not need to do anything" in text
    assert "could not be delivered" not in text


def test_delayed_without_retry_until_has_no_will_retry_until():
    _, fields = status_blocks(make(kind=DELAYED))
    assert "Will-Retry-Until" not in fields
    assert "keep trying for a while" in " ".join(text_of(make(kind=DELAYED)).split())


def test_failed_never_has_will_retry_until():
    _, fields = status_blocks(make(kind=FAILED, retry_until=RETRY_UNTIL))
    assert "Will-Retry-Until" not in fields
    assert "could not be delivered" in text_of(make())


# -- the human-readable part ----------------------------------------------------------------
def test_text_part_names_queue_id_host_recipients_and_replies():
    text = text_of(make(rejected(), rejected("bob@other.test", original="b@alias.test", reply="554 5.7.1 spam")))
    assert "0123456789ABCDEF01" in text
    assert MTA in text
    assert "<alice@remote.test>" in text and "550 5.1.1 <alice@remote.test>: user unknown" in text
    assert "mx1.remote.test[127.0.0.10]" in text
    assert "<bob@other.test> (originally <b@alias.test>)" in text and "554 5.7.1 spam" in text


def test_non_ascii_reply_in_an_ascii_dsn_stays_7bit():
    dsn = make(rejected(reply="550 5.1.1 Benutzer unbekannt: Müller"))
    assert dsn.isascii()
    part = next(parse(dsn).iter_parts())
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Benutzer unbekannt: Müller" in part.get_content()
    _, fields = status_blocks(dsn)
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: M\\x{FC}ller"
    assert parse(dsn).get_content_type() == "multipart/report"
    assert [p.get_content_type() for p in parse(dsn).iter_parts()][1] == "message/delivery-status"


# -- RFC 6533 -----------------------------------------------------------------------------
def test_non_ascii_recipient_uses_global_types():
    dsn = make(rejected("用户@例子.广告", reply="550 5.1.1 unknown"), rejected())
    msg = parse(dsn)
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    _, first, second = status_blocks(dsn)
    assert first["Final-Recipient"] == "utf-8; 用户@例子.广告"
    assert second["Final-Recipient"] == "rfc822; alice@remote.test"  # an ASCII address keeps rfc822
    assert "<用户@例子.广告>" in text_of(dsn)
    dsn.decode("utf-8")  # valid UTF-8 throughout


def test_non_ascii_original_recipient():
    _, fields = status_blocks(make(rejected("u@local.test", original="ü@例え.jp")))
    assert fields["Original-Recipient"] == "utf-8; ü@例え.jp"
    assert fields["Final-Recipient"] == "rfc822; u@local.test"


def test_non_ascii_sender():
    dsn = make(sender="søren@例え.jp")
    msg = parse(dsn)
    # (the stdlib parser keeps 8-bit header bytes as surrogates, so look at the bytes)
    assert "\r\nTo: <søren@例え.jp>\r\n".encode() in dsn
    assert list(msg.iter_parts())[1].get_content_type() == "message/global-delivery-status"


def test_non_ascii_original_headers_use_global_headers():
    dsn = make(headers="Subject: grüße\r\n\r\n".encode())
    parts = list(parse(dsn).iter_parts())
    assert [p.get_content_type() for p in parts[1:]] == ["message/global-delivery-status", "message/global-headers"]
    assert raw_parts(dsn)[2][1] == "Subject: grüße\r\n".encode()
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"
    assert parse(dsn)["Content-Transfer-Encoding"] == "8bit"


def test_original_headers_not_utf8_become_valid_utf8():
    dsn = make(headers=b"Subject: caf\xe9\r\n\r\n")
    dsn.decode("utf-8")
    assert raw_parts(dsn)[2][1] == "Subject: caf\ufffd\r\n".encode()


# -- injection, boundary, line ends -------------------------------------------------------
INJECTION = "550 5.1.1 x\r\nBcc: evil@x"


def test_header_injection_in_a_remote_reply():
    dsn = make(rejected(reply=INJECTION), rejected("bob@remote.test", reply="550 5.1.1 y\nBcc: evil@y\r\n\r\nX: z"))
    msg = parse(dsn)
    assert msg["Bcc"] is None
    assert not re.search(rb"^Bcc:", dsn, re.MULTILINE)
    assert not re.search(rb"^X: z", dsn, re.MULTILINE)
    _, first, second = status_blocks(dsn)
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 x Bcc: evil@x"
    assert second["Diagnostic-Code"] == "smtp; 550 5.1.1 y Bcc: evil@y X: z"
    assert first["Status"] == "5.1.1"
    assert "Bcc" not in first and "Bcc" not in second


def test_header_injection_through_addresses_host_and_ids():
    evil = "\r\nBcc: evil@x\r\n"
    env = envelope(rejected(f"a@b.test{evil}", original=f"o@b.test{evil}", remote=f"mx.test{evil}[192.0.2.1]"),
                   sender=f"s@remote.test{evil}", qid=f"Q{evil}")
    dsn = build(env, env.recipients, kind=FAILED, reporting_mta=f"mx.example.test{evil}",
                original_headers=HEADERS, now=NOW, message_id=f"id@x{evil}")
    assert not re.search(rb"^Bcc:", dsn, re.MULTILINE)
    msg = parse(dsn)
    assert msg["Bcc"] is None
    assert b"\r\nTo: <s@remote.test Bcc: evil@x>\r\n" in dsn  # garbage, but on one line
    assert "\n" not in msg["Message-ID"]
    for block in status_blocks(dsn):
        assert "Bcc" not in block


def test_control_characters_are_removed_from_fields():
    _, fields = status_blocks(make(rejected(reply="550 5.1.1 a\x00b\x1bc\x7fd\u2028e\x85f\tg")))
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 a b c d e f g"


def test_boundary_does_not_occur_in_the_content(monkeypatch):
    taken = "0" * 32
    tokens = iter([taken, taken, "1" * 32])
    monkeypatch.setattr(bounce, "_random_token", lambda: next(tokens))
    headers = f"Subject: hi\r\nX-Trap: --=_geosmtp_{taken}\r\n\r\n".encode()
    dsn = make(headers=headers)
    msg = parse(dsn)
    assert msg.get_boundary() == "=_geosmtp_" + "1" * 32
    assert len(list(msg.iter_parts())) == 3
    assert raw_parts(dsn)[2][1] == headers[:-2]


def test_boundary_is_random_and_only_delimits():
    dsn = make(rejected(), rejected("bob@remote.test"))
    boundary = parse(dsn).get_boundary()
    assert boundary != parse(make()).get_boundary()
    assert 1 <= len(boundary) <= 70  # RFC 2046 5.1.1
    assert dsn.count(b"--" + boundary.encode()) == 4  # three parts and the close delimiter
    assert re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]+", boundary)


def assert_crlf_only(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert data.endswith(b"\r\n")
    for line in data.split(b"\r\n"):
        assert len(line) < 998


@pytest.mark.parametrize("dsn", [
    pytest.param(lambda: make(), id="failed"),
    pytest.param(lambda: make(kind=DELAYED, retry_until=RETRY_UNTIL), id="delayed"),
    pytest.param(lambda: make(headers=b"A: b\nC: d\r\rE: f\n\n"), id="lf-headers"),
    pytest.param(lambda: make(rejected(reply="550 5.1.1 Müller\nBcc: x")), id="qp"),
    pytest.param(lambda: make(rejected("用户@例子.广告")), id="global"),
    pytest.param(lambda: make(headers=b""), id="no-headers"),
])
def test_crlf_everywhere(dsn):
    assert_crlf_only(dsn())


def test_long_values_are_folded_and_lines_stay_short():
    long_reply = "550 5.7.1 " + " ".join(["blocked"] * 800)
    unbroken = "550 5.7.1 " + "x" * 5000
    dsn = make(rejected(reply=long_reply), rejected("bob@remote.test", reply=unbroken),
               headers=b"Subject: " + b"y" * 3000 + b"\r\n\r\n")
    assert_crlf_only(dsn)
    _, first, second = status_blocks(dsn)
    assert first["Diagnostic-Code"] == f"smtp; {long_reply}"  # folded, and unfolded again by the parser
    assert second["Diagnostic-Code"].startswith("smtp; 550 5.7.1 xxx")
    assert max(len(line) for line in raw_parts(dsn)[0][1].split(b"\r\n")) <= 76


def test_build_refuses_what_is_no_dsn():
    env = envelope(rejected(), sender="")
    with pytest.raises(ValueError):
        build(env, env.recipients, kind=FAILED, reporting_mta=MTA, original_headers=HEADERS, now=NOW)
    env = envelope(rejected())
    with pytest.raises(ValueError):
        build(env, [], kind=FAILED, reporting_mta=MTA, original_headers=HEADERS, now=NOW)
    with pytest.raises(ValueError):
        build(env, env.recipients, kind="delivered", reporting_mta=MTA, original_headers=HEADERS, now=NOW)


def test_build_is_deterministic_but_for_the_random_parts(monkeypatch):
    monkeypatch.setattr(bounce, "_random_token", lambda: "f" * 32)
    assert make(message_id="a@b") == make(message_id="a@b")


def test_quoted_printable_part_decodes():
    dsn = make(rejected(reply="550 5.1.1 " + "ü" * 200))
    [(head, body), *_] = raw_parts(dsn)
    assert b"quoted-printable" in head
    assert "ü" * 200 in "".join(quopri.decodestring(body).decode().split())  # wrapped, but all there


# -- status_of ----------------------------------------------------------------------------
@pytest.mark.parametrize("reply, default, expected", [
    ("550 5.1.1 User unknown", "5.0.0", "5.1.1"),
    ("550 User unknown", "5.0.0", "5.0.0"),
    ("451 try again", "5.0.0", "4.0.0"),
    ("451 4.7.1 greylisted", "5.0.0", "4.7.1"),
    ("250 2.0.0 Ok", "5.0.0", "2.0.0"),
    ("250 Ok", "5.0.0", "2.0.0"),
    (None, "5.0.0", "5.0.0"),
    (None, "4.0.0", "4.0.0"),
    ("", "4.0.0", "4.0.0"),
    ("550", "4.0.0", "5.0.0"),
    ("550 5.1.1", "4.0.0", "5.1.1"),
    ("550-5.1.1 first line\r\n550 5.1.1 last line", "4.0.0", "5.1.1"),
    ("552 5.3.4 Message size exceeds fixed limit", "5.0.0", "5.3.4"),
    ("550 5.123.456 three digits each", "4.0.0", "5.123.456"),
    ("550 5.1234.1 four digits", "4.0.0", "5.0.0"),
    ("550 5.1.1234 four digits", "4.0.0", "5.0.0"),
    ("550 5.1.1x trailing", "4.0.0", "5.0.0"),
    ("550 5.1. missing detail", "4.0.0", "5.0.0"),
    ("550 5..1 missing subject", "4.0.0", "5.0.0"),
    ("550 4.1.1 class mismatch", "4.0.0", "5.0.0"),
    ("451 5.1.1 class mismatch", "5.0.0", "4.0.0"),
    ("550 3.1.1 bad class", "4.0.0", "5.0.0"),
    ("550 6.1.1 bad class", "4.0.0", "5.0.0"),
    ("550 ٥.١.١ arabic digits", "4.0.0", "5.0.0"),
    ("٥٥٠ 5.1.1 arabic digits", "4.0.0", "4.0.0"),
    ("354 start mail input", "5.0.0", "5.0.0"),
    ("199 nonsense", "5.0.0", "5.0.0"),
    ("650 6.0.0 nonsense", "5.0.0", "5.0.0"),
    ("5501 5.1.1 four digit code", "4.0.0", "4.0.0"),
    ("55 short", "4.0.0", "4.0.0"),
    ("550x 5.1.1", "4.0.0", "4.0.0"),
    (" 550 5.1.1 leading space", "4.0.0", "4.0.0"),
    ("connection refused", "4.0.0", "4.0.0"),
    ("550\t5.1.1 tab", "4.0.0", "4.0.0"),
])
def test_status_of(reply, default, expected):
    assert status_of(reply, default) == expected


STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
digits = st.text(alphabet="0123456789", min_size=1, max_size=3)


@given(first=st.sampled_from("245"), rest=st.text(alphabet="0123456789", min_size=2, max_size=2),
       sep=st.sampled_from(" -"), subject=digits, detail=digits,
       text=st.one_of(st.just(""), st.text(max_size=40).map(lambda t: " " + t)))
def test_status_of_takes_a_well_formed_enhanced_code(first, rest, sep, subject, detail, text):
    reply = f"{first}{rest}{sep}{first}.{subject}.{detail}{text}"
    assert status_of(reply, "x") == f"{first}.{subject}.{detail}"


@given(first=st.sampled_from("245"), rest=st.text(alphabet="0123456789", min_size=2, max_size=2),
       cls=st.sampled_from("0123456789"), subject=digits, detail=digits)
def test_status_of_ignores_an_enhanced_code_of_another_class(first, rest, cls, subject, detail):
    reply = f"{first}{rest} {cls}.{subject}.{detail} text"
    expected = f"{first}.{subject}.{detail}" if cls == first else f"{first}.0.0"
    assert status_of(reply, "x") == expected


@given(reply=st.one_of(st.none(), st.text(max_size=30),
                       st.from_regex(r"\A[0-9]{3}[ -][0-9]\.[0-9]{1,4}\.[0-9]{1,4}( .*)?\Z")),
       default=st.sampled_from(["5.0.0", "4.0.0"]))
def test_status_of_always_gives_a_status_code(reply, default):
    result = status_of(reply, default)
    assert result == default or STATUS_RE.fullmatch(result)
    if result != default:
        assert result[0] == reply[0]


# -- header_section -----------------------------------------------------------------------
def test_header_section_normal_message():
    fh = io.BytesIO(b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\nmore\r\n")
    assert header_section(fh) == b"Subject: hi\r\nFrom: a@b\r\n\r\n"


def test_header_section_from_the_current_position():
    fh = io.BytesIO(b"{\"envelope\": 1}\nSubject: hi\r\n\r\nbody\r\n")
    fh.readline()
    assert header_section(fh) == b"Subject: hi\r\n\r\n"


def test_header_section_message_without_body():
    assert header_section(io.BytesIO(b"Subject: hi\r\nFrom: a@b\r\n\r\n")) == b"Subject: hi\r\nFrom: a@b\r\n\r\n"


def test_header_section_without_blank_line():
    assert header_section(io.BytesIO(b"Subject: hi\r\nFrom: a@b\r\n")) == b"Subject: hi\r\nFrom: a@b\r\n"
    # the last line without an end gets one
    assert header_section(io.BytesIO(b"Subject: hi\r\nFrom: a@b")) == b"Subject: hi\r\nFrom: a@b\r\n"
    assert header_section(io.BytesIO(b"Subject: hi\r\nFrom: a@b\r")) == b"Subject: hi\r\nFrom: a@b\r\n"


def test_header_section_lf_only_input():
    fh = io.BytesIO(b"Subject: hi\nFrom: a@b\n\nbody\n")
    assert header_section(fh) == b"Subject: hi\r\nFrom: a@b\r\n\r\n"


def test_header_section_empty_input_and_empty_header():
    assert header_section(io.BytesIO(b"")) == b""
    assert header_section(io.BytesIO(b"\r\nbody\r\n")) == b"\r\n"


def test_header_section_over_limit_is_cut_at_a_line():
    lines = [f"X-Header-{i}: {'v' * 50}\r\n".encode() for i in range(100)]
    data = b"".join(lines) + b"\r\nbody\r\n"
    got = header_section(io.BytesIO(data), limit=1000)
    assert len(got) <= 1000
    assert got == b"".join(lines[: 1000 // len(lines[0])])
    assert header_section(io.BytesIO(data), limit=len(lines[0])) == lines[0]
    assert header_section(io.BytesIO(data), limit=len(lines[0]) - 1) == b""
    assert header_section(io.BytesIO(data), limit=0) == b""
    # the default limit: 64 KiB
    big = b"X: " + b"y" * 100 + b"\r\n"
    got = header_section(io.BytesIO(big * 2000 + b"\r\n"))
    assert len(got) <= 64 * 1024 and got == big * (64 * 1024 // len(big))


def test_header_section_long_line_reads_a_bounded_amount():
    fh = io.BytesIO(b"X: " + b"y" * 10_000_000)
    assert header_section(fh, limit=100) == b""
    assert fh.tell() <= 101


def test_header_section_lf_line_growing_past_the_limit():
    # "ab\n" is 3 octets read but 4 as a CRLF line
    assert header_section(io.BytesIO(b"ab\ncd\n"), limit=7) == b"ab\r\n"
    assert header_section(io.BytesIO(b"ab\ncd\n"), limit=8) == b"ab\r\ncd\r\n"


header_line = st.binary(min_size=1, max_size=60).map(
    lambda b: b.replace(b"\r", b"x").replace(b"\n", b"y"))


@settings(max_examples=300)
@given(lines=st.lists(header_line, max_size=12), blank=st.booleans(), body=st.binary(max_size=40),
       eol=st.sampled_from([b"\r\n", b"\n"]), limit=st.integers(min_value=0, max_value=800))
def test_header_section_limit(lines, blank, body, eol, limit):
    data = b"".join(line + eol for line in lines) + (eol + body if blank else b"")
    expected_lines = [line + b"\r\n" for line in lines] + ([b"\r\n"] if blank else [])
    expected, size = [], 0
    for line in expected_lines:  # the longest run of whole lines that fits
        if size + len(line) > limit:
            break
        expected.append(line)
        size += len(line)
    got = header_section(io.BytesIO(data), limit=limit)
    assert got == b"".join(expected)
    assert len(got) <= limit
    if got:
        assert_crlf_only(got)
    if limit >= len(data) * 2:
        assert got == b"".join(expected_lines)


class _Unseekable(io.BytesIO):
    """A stream header_section reads line by line (its one-read path needs to seek)."""

    def seekable(self) -> bool:
        return False


@settings(max_examples=500)
@given(pieces=st.lists(st.sampled_from([b"a", b": ", b"\r\n", b"\n", b"\r", b" ", b"\r\n\r\n", b"X-Y"]), max_size=40),
       limit=st.sampled_from([0, 3, 10, 40, 64 * 1024]), lead=st.binary(max_size=3))
def test_header_section_in_one_read_is_the_line_by_line_one(pieces, limit, lead):
    """Both ways give the same octets and leave the stream at the same place."""
    data = lead + b"".join(pieces) + b"tail"
    fast, slow = io.BytesIO(data), _Unseekable(data)
    fast.read(len(lead)), slow.read(len(lead))
    assert header_section(fast, limit) == header_section(slow, limit)
    assert fast.read() == slow.read()
