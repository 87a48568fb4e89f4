"""geosmtp.checks.rspamd against a fake rspamd run by the test (a threaded HTTP/1.1 server on
loopback, tests/support/fakerspamd.py): the request exactly, each action, the milter block,
bad, big and slow replies, the kept connection, hostile envelope values."""
from __future__ import annotations

import ipaddress
import json
import time
from functools import partial

import pytest

from geosmtp import metrics
from geosmtp.checks import registry
from geosmtp.checks.engine import CheckSpec, Engine
from geosmtp.checks.interface import CheckContext, Facts
from geosmtp.checks.rspamd import RSpamdCheck, reply_text
from geosmtp.checks.rspamd_client import RspamdBadReply, RspamdUnavailable
from tests.support.fakerspamd import CLOSE, Answer, FakeRspamd, reply
from tests.support.server import free_port

CONTEXT = CheckContext("mx.test", None)
MESSAGE = (b"Received: from client.example ([192.0.2.10])\r\n\tby mx.test with ESMTP id Q1;"
           b" Wed, 02 Dec 2026 03:00:00 +0000\r\n"
           b"From: Alice <alice@sender.example>\r\nTo: bob@example.test\r\nSubject: lunch\r\n"
           b"X-Seen: one\r\nX-Seen: two\r\nX-Seen: three\r\n\r\nHello Bob.\r\n")


@pytest.fixture
def rspamd():
    started = []

    def start(answer=lambda request: None) -> FakeRspamd:
        srv = FakeRspamd(answer).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def stored(tmp_path):
    """A message file as the spool keeps it (an envelope line, then the message) and the
    opener the session gives the checks (positioned after the envelope line)."""
    def store(message: bytes = MESSAGE):
        path = tmp_path / "Q1"
        path.write_bytes(b'{"id": "Q1", "recipients": []}\n' + message)

        def open_message():
            fh = open(path, "rb")
            fh.readline()
            return fh
        return str(path), open_message
    return store


def facts(stored, message: bytes = MESSAGE, **kw) -> Facts:
    path, opener = stored(message)
    base = dict(phase="data", listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.10"),
                trusted=False, hostname="mx.test", helo="client.example", sender="alice@sender.example",
                recipients=("bob@example.test",), queue_id="Q1", message_file=lambda: path, size=len(message),
                open_message=opener)
    base.update(kw)
    return Facts(**base)


def make(url: str, **options) -> RSpamdCheck:
    return registry.make("rspamd", None, {"url": url, "ping_on_start": False, **options}, CONTEXT)


def answering(answer: Answer):
    return lambda request: answer if request.path == "/checkv2" else None


# -- the request ------------------------------------------------------------------------------
def test_request_carries_the_envelope_headers_and_the_stored_message_exactly(rspamd, stored):
    srv = rspamd()
    check = make(srv.url, pass_all=True, mta_name="mx.test")
    f = facts(stored, ptr="mail.sender.example", recipients=("bob@example.test", "carol@example.test"),
              auth_user="alice", tls="TLSv1.3 TLS_AES_256_GCM_SHA384")
    check.data(f)
    (req,) = srv.checks()
    assert req.method == "POST"
    sent = [(n, v) for n, v in req.headers if n not in ("Host", "Content-Length")]
    assert sent == [
        ("IP", "192.0.2.10"), ("Helo", "client.example"), ("Hostname", "mail.sender.example"),
        ("From", "alice@sender.example"), ("Rcpt", "bob@example.test"), ("Rcpt", "carol@example.test"),
        ("Queue-Id", "Q1"), ("User", "alice"), ("TLS-Cipher", "TLS_AES_256_GCM_SHA384"),
        ("TLS-Version", "TLSv1.3"), ("MTA-Name", "mx.test"), ("Pass", "all"),
    ]
    assert req.body == MESSAGE  # from our Received: on, without the spool's envelope line
    assert req.values("Content-Length") == [str(len(MESSAGE))]
    assert req.values("Host") == [f"127.0.0.1:{srv.port}"]


def test_null_sender_and_what_is_not_known_are_left_out(rspamd, stored):
    srv = rspamd()
    make(srv.url).data(facts(stored, sender="", helo=None))
    (req,) = srv.checks()
    names = [n for n, _ in req.headers]
    assert req.values("From") == ["<>"]
    for absent in ("Helo", "Hostname", "User", "TLS-Cipher", "TLS-Version", "MTA-Name", "Pass"):
        assert absent not in names


def test_cr_lf_nul_from_the_client_never_reach_an_http_header_raw(rspamd, stored):
    srv = rspamd()
    make(srv.url).data(facts(stored, helo="evil.example\r\nPass: all", sender="a\r\nUser: admin@x",
                             recipients=("b@example.test\nRcpt: c@x", "d\x00@example.test"),
                             ptr="bad\rname.example"))
    (req,) = srv.checks()
    assert req.values("Helo") == ["evil.example??Pass: all"]
    assert req.values("From") == ["a??User: admin@x"]
    assert req.values("Rcpt") == ["b@example.test?Rcpt: c@x", "d?@example.test"]
    assert req.values("Hostname") == ["bad?name.example"]
    assert req.values("Pass") == [] and req.values("User") == []


def test_a_big_message_is_streamed_whole_with_its_length(rspamd, stored):
    srv = rspamd()
    big = MESSAGE + b"x" * 998 + b"\r\n" + (b"y" * 76 + b"\r\n") * 40000  # about 3 MB
    make(srv.url).data(facts(stored, message=big))
    (req,) = srv.checks()
    assert req.body == big and req.values("Content-Length") == [str(len(big))]


def test_a_small_message_kept_in_memory_is_sent_the_same(rspamd, stored):
    """The session hands small messages over from the octets it kept (io.BytesIO)."""
    import io
    srv = rspamd()
    make(srv.url).data(facts(stored, open_message=partial(io.BytesIO, MESSAGE)))
    (req,) = srv.checks()
    assert req.body == MESSAGE and req.values("Content-Length") == [str(len(MESSAGE))]


def test_utf8_addresses_go_as_utf8(rspamd, stored):
    srv = rspamd()
    make(srv.url).data(facts(stored, sender="jörg@bücher.example", recipients=("zoë@example.test",)))
    (req,) = srv.checks()
    raw = [v.encode("latin-1").decode("utf-8") for v in req.values("From") + req.values("Rcpt")]
    assert raw == ["jörg@bücher.example", "zoë@example.test"]


# -- the actions ------------------------------------------------------------------------------
def test_reject_uses_rspamds_message_made_safe(rspamd, stored):
    srv = rspamd(answering(reply("reject", 16.0, messages={"smtp_message": "Gtube pattern"})))
    v = make(srv.url).data(facts(stored))
    assert v.action == "reject"
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (550, "5.7.1", "Gtube pattern")
    assert "16.00/15.00" in v.reason


@pytest.mark.parametrize("message, text", [
    (None, "Message refused as spam"),
    ("", "Message refused as spam"),
    ("554 5.7.1", "Message refused as spam"),  # codes alone: never a bare code
    ("550", "Message refused as spam"),
    ("550 5.7.1 Spam detected", "Spam detected"),
    ("5.7.1 Listed", "Listed"),
    ("\r\nfirst line\r\nsecond", "first line"),
    ("caf\u00e9 \x00 bad", "caf? ? bad"),
    (42, "Message refused as spam"),
])
def test_reject_text_is_one_printable_line_never_codes_alone(message, text):
    assert reply_text(message, "Message refused as spam") == text


def test_reject_message_from_rspamd_can_be_turned_off(rspamd, stored):
    srv = rspamd(answering(reply("reject", messages={"smtp_message": "You are listed on our secret list"})))
    v = make(srv.url, reject_message_from_rspamd=False).data(facts(stored))
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (550, "5.7.1", "Message refused as spam")


@pytest.mark.parametrize("action, text", [("soft reject", "Try again later"), ("greylist", "Greylisted, try again later")])
def test_soft_reject_and_greylist_defer(rspamd, stored, action, text):
    srv = rspamd(answering(reply(action, 5.0)))
    v = make(srv.url).data(facts(stored))
    assert v.action == "defer"
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (451, "4.7.1", text)


def test_soft_reject_with_rspamds_message(rspamd, stored):
    srv = rspamd(answering(reply("soft reject", messages={"smtp_message": "Ratelimit exceeded"})))
    v = make(srv.url).data(facts(stored))
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (451, "4.7.1", "Ratelimit exceeded")


def test_rewrite_subject_replaces_the_subject(rspamd, stored):
    srv = rspamd(answering(reply("rewrite subject", 9.0, subject="***SPAM*** lunch")))
    v = make(srv.url).data(facts(stored))
    assert v.action == "accept"
    assert ("Subject", 0) in v.remove_headers
    assert ("Subject", "***SPAM*** lunch") in v.headers
    assert ("X-Spam-Score", "9.00") in v.headers


def test_rewrite_subject_non_ascii_is_encoded_and_missing_subject_prefixes_ours(rspamd, stored):
    srv = rspamd(answering(reply("rewrite subject", 9.0, subject="[SPAM] déjeuner\r\nBcc: x@y")))
    v = make(srv.url).data(facts(stored))
    subject = dict(v.headers)["Subject"]
    assert subject.startswith("=?utf-8?") and "\n" not in subject.replace("\r\n ", "")
    from email.header import decode_header, make_header
    assert str(make_header(decode_header(subject))) == "[SPAM] déjeuner  Bcc: x@y"
    srv.answer = answering(reply("rewrite subject", 9.0))
    v = make(srv.url).data(facts(stored))
    assert dict(v.headers)["Subject"] == "***SPAM*** lunch"
    long = " ".join(["word"] * 400)  # 2000 characters: folded, no line over 998
    srv.answer = answering(reply("rewrite subject", 9.0, subject=long))
    subject = dict(make(srv.url).data(facts(stored)).headers)["Subject"]
    assert subject.replace("\r\n", "") == long and max(map(len, subject.split("\r\n"))) <= 78


def test_add_header_flags_and_scores(rspamd, stored):
    srv = rspamd(answering(reply("add header", 7.3)))
    v = make(srv.url).data(facts(stored))
    assert v.action == "accept"
    assert v.headers == (("X-Spam-Score", "7.30"), ("X-Spam-Flag", "YES"))
    assert v.results["rspamd"] == {"action": "add header", "score": 7.3, "required_score": 15.0}


def test_add_header_names_are_configurable_or_it_quarantines(rspamd, stored):
    srv = rspamd(answering(reply("add header", 7.3)))
    v = make(srv.url, spam_flag_header="X-Is-Spam", score_header="X-Rspamd-Score").data(facts(stored))
    assert v.headers == (("X-Rspamd-Score", "7.30"), ("X-Is-Spam", "YES"))
    v = make(srv.url, add_header_action="quarantine").data(facts(stored))
    assert v.action == "quarantine" and "add header" in v.reason and ("X-Spam-Flag", "YES") in v.headers


def test_no_action_accepts_with_the_score_header_unless_turned_off(rspamd, stored):
    srv = rspamd(answering(reply("no action", -0.25)))
    assert make(srv.url).data(facts(stored)).headers == (("X-Spam-Score", "-0.25"),)
    v = make(srv.url, score_header="").data(facts(stored))
    assert v.action == "accept" and v.headers == ()


@pytest.mark.parametrize("action", ["quarantine", "discard"])
def test_rspamds_quarantine_and_discard_quarantine(rspamd, stored, action):
    srv = rspamd(answering(reply(action, 20.0)))
    assert make(srv.url).data(facts(stored)).action == "quarantine"


# -- the milter block -------------------------------------------------------------------------
def test_milter_add_headers_in_every_form_and_bad_ones_dropped(rspamd, stored):
    milter = {"add_headers": {
        "X-Spamd-Bar": "++",
        "X-Spamd-Result": {"value": "default: False [0.50 / 15.00];\n\tARC_NA(0.00)[]", "order": 0},
        "X-Rspamd-Server": [{"value": "scanner1", "order": 1}, {"value": "scanner2", "order": 2}],
        "Bad Name": "x",
        "X-Injected": "ok\r\nBcc: victim@example.test",
        "X-Nul": "a\x00b",
        "X-Number": {"value": 5},
    }, "remove_headers": {}}
    srv = rspamd(answering(reply("no action", 0.5, milter=milter)))
    v = make(srv.url, score_header="").data(facts(stored))
    assert v.headers == (
        ("X-Spamd-Bar", "++"),
        ("X-Spamd-Result", "default: False [0.50 / 15.00];\r\n\tARC_NA(0.00)[]"),
        ("X-Rspamd-Server", "scanner1"), ("X-Rspamd-Server", "scanner2"),
    )


def test_milter_remove_headers_by_index_from_the_start_and_the_end(rspamd, stored):
    milter = {"remove_headers": {"X-Spam": 0, "X-Seen": 2, "x-seen": -1, "Subject": -3, "To": True,
                                 "Bad:Name": 1, "Received": "1"}}
    srv = rspamd(answering(reply("no action", milter=milter)))
    v = make(srv.url).data(facts(stored))
    # three X-Seen fields: -1 is the third; Subject has one field, so -3 names none
    assert v.remove_headers == (("X-Spam", 0), ("X-Seen", 2), ("x-seen", 3))


def test_an_unusable_milter_block_is_ignored(rspamd, stored):
    srv = rspamd(answering(reply("no action", milter=["add_headers"])))
    v = make(srv.url).data(facts(stored))
    assert v.action == "accept" and v.remove_headers == ()


# -- bad replies, rspamd down, timeouts: the engine's on_error -------------------------------
@pytest.mark.parametrize("answer, why", [
    (Answer(b"<html>oops</html>"), "not JSON"),
    (Answer(b"[1, 2]"), "not a JSON object"),
    (Answer(b'{"score": 1}'), "no action"),
    (Answer(b'{"action": "reject", "score": "high"}'), "not a number"),
    (Answer(b'{"action": "reject", "score": NaN}'), "not a number"),
    (Answer(b'{"action": "shrug", "score": 1}'), "action we do not know"),
    (Answer(b'{"error": "bad"}', status=500), "HTTP 500"),
    (Answer(b"\xff\xfe\x00"), "not JSON"),
])
def test_junk_replies_raise_bad_reply(rspamd, stored, answer, why):
    srv = rspamd(answering(answer))
    with pytest.raises(RspamdBadReply, match=why):
        make(srv.url).data(facts(stored))


def test_an_oversized_reply_is_unusable_declared_or_not(rspamd, stored):
    big = json.dumps({"action": "no action", "score": 0, "pad": "x" * 2_000_000}).encode()
    srv = rspamd(answering(Answer(big)))
    with pytest.raises(RspamdBadReply, match="over max_reply_size"):
        make(srv.url).data(facts(stored))
    srv.answer = answering(Answer(big, no_length=True))
    with pytest.raises(RspamdBadReply, match="over max_reply_size"):
        make(srv.url).data(facts(stored))
    srv.answer = answering(Answer(json.dumps({"action": "no action", "score": 0, "pad": "x" * 5000}).encode()))
    with pytest.raises(RspamdBadReply):
        make(srv.url, max_reply_size=4096).data(facts(stored))


def test_a_slow_reply_times_out_at_read_timeout(rspamd, stored):
    srv = rspamd(answering(Answer(reply().body, delay=2.0)))
    started = time.monotonic()
    with pytest.raises(RspamdUnavailable, match="no reply .* in 0.3s"):
        make(srv.url, read_timeout=0.3).data(facts(stored))
    assert time.monotonic() - started < 1.5


def test_a_dripping_reply_gets_no_more_than_read_timeout_in_all(rspamd, stored):
    srv = rspamd(answering(Answer(reply().body, drip=0.05)))  # each octet in time, the whole far too late
    started = time.monotonic()
    with pytest.raises(RspamdUnavailable, match="no reply"):
        make(srv.url, read_timeout=0.5).data(facts(stored))
    assert time.monotonic() - started < 1.5


def test_rspamd_down_or_closing_is_unavailable(rspamd, stored):
    with pytest.raises(RspamdUnavailable, match="cannot connect"):
        make(f"http://127.0.0.1:{free_port()}").data(facts(stored))
    srv = rspamd(lambda request: CLOSE)
    with pytest.raises(RspamdUnavailable, match="closed|reset"):
        make(srv.url).data(facts(stored))


def test_the_engine_applies_on_error_logs_and_counts(rspamd, stored):
    srv = rspamd(answering(Answer(b"junk")))
    spec = CheckSpec("rspamd-test", make(srv.url))
    before = metrics.CHECK_ERRORS.labels("rspamd-test", "error")._value.get()
    reply_ = Engine([spec], "mx.test").session().run(facts(stored))
    assert (reply_.code, reply_.enhanced) == (451, "4.3.0")
    assert metrics.CHECK_ERRORS.labels("rspamd-test", "error")._value.get() == before + 1
    spec = CheckSpec("rspamd-test2", make(srv.url), on_error="accept")
    assert Engine([spec], "mx.test").session().run(facts(stored)) is None


# -- the kept connection ----------------------------------------------------------------------
def test_a_kept_connection_is_reused(rspamd, stored):
    srv = rspamd()
    check = make(srv.url)
    for _ in range(5):
        check.data(facts(stored))
    assert len(srv.checks()) == 5 and srv.connections == 1 and check.client.opened == 1
    check.close()
    check.data(facts(stored))  # after close(): still works, keeps nothing
    assert check.client._idle == []


def test_connection_close_from_the_server_is_honoured(rspamd, stored):
    srv = rspamd(answering(reply(close=True)))  # what rspamd's normal worker does
    check = make(srv.url)
    for _ in range(3):
        assert check.data(facts(stored)).action == "accept"
    assert srv.connections == 3 and check.client._idle == []


def test_a_kept_connection_the_server_dropped_is_retried_once_afresh(rspamd, stored):
    def answer(request):
        if request.path != "/checkv2":
            return None
        return CLOSE if request.connection == 1 and len(srv.checks()) == 2 else reply()
    srv = rspamd(answer)
    check = make(srv.url)
    check.data(facts(stored))
    assert check.data(facts(stored)).action == "accept"  # the 2nd request lost on connection 1, sent again
    assert srv.connections == 2 and [r.connection for r in srv.checks()] == [1, 1, 2]


def test_after_an_error_the_connection_is_not_kept(rspamd, stored):
    srv = rspamd(answering(Answer(b"junk-" * 10, drip=0.02)))
    check = make(srv.url, read_timeout=0.2)
    with pytest.raises(RspamdUnavailable):
        check.data(facts(stored))
    assert check.client._idle == []


# -- start, options -------------------------------------------------------------------------------
def test_ping_says_whether_rspamd_answers(rspamd):
    srv = rspamd()
    assert make(srv.url).ping() is True
    assert srv.requests[-1].path == "/ping" and srv.requests[-1].method == "GET"
    assert make(f"http://127.0.0.1:{free_port()}").ping() is False
    srv.answer = lambda request: Answer(b"no", status=404)
    assert make(srv.url).ping() is False


def test_ping_on_start_runs_in_the_background(rspamd):
    import gevent
    srv = rspamd()
    registry.make("rspamd", None, {"url": srv.url}, CONTEXT)
    gevent.sleep(0.3)
    assert [r.path for r in srv.requests] == ["/ping"]
    from loguru import logger
    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        url = f"http://127.0.0.1:{free_port()}"
        registry.make("rspamd", None, {"url": url, "connect_timeout": 0.2}, CONTEXT)  # never raises
        gevent.sleep(0.3)
    finally:
        logger.remove(sink)
    assert any(m.startswith(f"rspamd at {url} is not answering: cannot connect") for m in seen), seen


@pytest.mark.parametrize("options, problem", [
    ({"url": "http://localhost:11333"}, "not an IP address"),
    ({"url": "https://127.0.0.1:11333"}, "must be"),
    ({"url": "unix:relative.sock"}, "absolute path"),
    ({"spam_flag_header": "X Spam"}, "not a header field name"),
    ({"score_header": "X:Score"}, "not a header field name"),
    ({"add_header_action": "drop"}, "add_header_action"),
    ({"mta_name": "mx\r\nX: y"}, "control character"),
    ({"max_reply_size": 10}, "max_reply_size"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_options_are_refused_at_load(options, problem):
    with pytest.raises(registry.CheckError, match=problem):
        registry.make("rspamd", None, {"ping_on_start": False, **options}, CONTEXT)


def test_url_forms():
    from geosmtp.checks.rspamd_client import parse_url
    assert parse_url("http://127.0.0.1:11333")[1:] == (("127.0.0.1", 11333), "127.0.0.1:11333")
    assert parse_url("http://[::1]:11333/")[1:] == (("::1", 11333), "[::1]:11333")
    assert parse_url("http://127.0.0.1")[1] == ("127.0.0.1", 11333)
    assert parse_url("unix:/run/rspamd/normal.sock")[1] == "/run/rspamd/normal.sock"


def test_unix_socket_url(tmp_path, stored):
    """rspamd's worker on a unix socket (bind_socket = "/run/rspamd/normal.sock")."""
    import socketserver
    import threading
    from tests.support.fakerspamd import _Handler

    path = tmp_path / "rspamd.sock"
    fake = FakeRspamd()

    class UnixHTTP(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    httpd = UnixHTTP(str(path), partial(_UnixHandler, _Handler))
    httpd.fake = fake
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        v = make(f"unix:{path}").data(facts(stored))
        assert v.action == "accept" and fake.checks()[0].body == MESSAGE
    finally:
        httpd.shutdown()
        httpd.server_close()


def _UnixHandler(base, request, client_address, server):
    return base(request, ("unix", 0), server)


# -- required: /readyz ------------------------------------------------------------------------
def test_required_watches_rspamd_and_says_when_it_is_down(rspamd, stored):
    import gevent
    state = {"down": False}
    srv = rspamd(lambda request: CLOSE if request.path == "/ping" and state["down"] else None)
    check = registry.make("rspamd", None, {"url": srv.url, "required": True, "ping_interval": "0.1s"}, CONTEXT)
    gevent.sleep(0.2)
    assert check.readiness() is None
    state["down"] = True
    gevent.sleep(0.3)
    problem = check.readiness()
    assert problem.startswith(f"rspamd at {srv.url} is not answering (") and "closed" in problem
    state["down"] = False
    gevent.sleep(0.3)
    assert check.readiness() is None
    pings = len([r for r in srv.requests if r.path == "/ping"])
    check.close()  # the watch ends with the check
    gevent.sleep(0.3)
    assert len([r for r in srv.requests if r.path == "/ping"]) == pings
    assert make(srv.url).readiness() is None  # not required: never unready


def test_built_off_the_hub_the_watch_starts_at_first_use(rspamd):
    """A reload builds checks in a threadpool thread: nothing is spawned on that thread's hub."""
    import gevent
    srv = rspamd()
    pool = gevent.get_hub().threadpool
    check = pool.spawn(registry.make, "rspamd", None,
                       {"url": srv.url, "required": True, "ping_interval": "0.1s"}, CONTEXT).get()
    gevent.sleep(0.2)
    assert srv.requests == [] and check._watch is None
    assert check.readiness() is None  # starts it, here on the server's hub
    gevent.sleep(0.2)
    assert [r.path for r in srv.requests][:1] == ["/ping"]
    check.close()
