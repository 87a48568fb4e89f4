"""geosmtp.checks.policyd: a Postfix policy delegation client against a policy server run
by the test (a threaded socket server on loopback): the request, the actions, bad replies,
timeouts and the kept connection."""
from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import replace
from types import MappingProxyType

import gevent
import pytest

from geosmtp.checks import registry
from geosmtp.checks.access_actions import UnusableReply, to_verdict
from geosmtp.checks.engine import CheckSpec, Engine
from geosmtp.checks.interface import CheckContext, Facts, phases_of
from geosmtp.checks.policyd import CONNECTION_KEY, TX_KEY, PolicyCheck, encode_request
from tests.support.policyserver import CLOSE, SILENT, FakePolicyServer

CONTEXT = CheckContext("mx.test", None)


def facts(phase="rcpt", **kw) -> Facts:
    base = dict(phase=phase, listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.10"),
                trusted=False, hostname="mx.test", helo="client.example", sender="alice@sender.example",
                recipient="bob@example.test" if phase == "rcpt" else None)
    base.update(kw)
    return Facts(**base)


def make(address: str, **options) -> PolicyCheck:
    return registry.make("policy", None, {"address": address, **options}, CONTEXT)


def learnt(f: Facts, verdict) -> Facts:
    """The next Facts of the same transaction, carrying what the verdict recorded (as the engine does)."""
    return replace(f, results=MappingProxyType({**f.results, **verdict.results}))


@pytest.fixture
def server():
    started = []

    def start(answer=lambda request: "action=DUNNO", **kw) -> FakePolicyServer:
        srv = FakePolicyServer(answer, **kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


# -- the request ------------------------------------------------------------------------------
def test_rcpt_request_has_postfix_attributes_and_one_instance_per_transaction(server):
    srv = server()
    check = make(srv.address)
    f = facts(ptr="mail.sender.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384")
    v1 = check.rcpt(f)
    f2 = learnt(f, v1)
    check.rcpt(replace(f2, recipient="carol@example.test", recipients=("bob@example.test",)))
    first, second = srv.requests
    assert first == {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "helo_name": "client.example", "queue_id": "", "sender": "alice@sender.example",
        "recipient": "bob@example.test", "recipient_count": "0", "client_address": "192.0.2.10",
        "client_name": "mail.sender.example", "reverse_client_name": "mail.sender.example",
        "instance": first["instance"], "encryption_protocol": "TLSv1.3",
        "encryption_cipher": "TLS_AES_256_GCM_SHA384",
    }
    assert first["instance"] and second["instance"] == first["instance"]
    assert second["recipient"] == "carol@example.test"
    assert srv.raw[0].endswith(b"\n\n") and srv.raw[0].count(b"\n\n") == 1
    check.rcpt(facts())  # the next transaction: its results start empty
    assert srv.requests[2]["instance"] != first["instance"]


def test_end_of_message_request_counts_recipients_and_names_one(server):
    srv = server()
    check = make(srv.address, phases=["data"])
    check.data(facts("data", recipients=("bob@example.test",), queue_id="Q1", size=1234))
    check.data(facts("data", recipients=("bob@example.test", "carol@example.test"), queue_id="Q2", size=99))
    one, two = srv.requests
    assert (one["protocol_state"], one["recipient"], one["recipient_count"], one["queue_id"], one["size"]) == \
        ("END-OF-MESSAGE", "bob@example.test", "1", "Q1", "1234")
    assert (two["recipient"], two["recipient_count"], two["size"]) == ("", "2", "99")


def test_connection_phases_share_a_connection_instance(server):
    srv = server()
    check = make(srv.address, phases=["connect", "helo", "mail"])
    assert phases_of(check) == ("connect", "helo", "mail")
    assert not hasattr(check, "rcpt")
    f = facts("connect", helo=None, sender=None, recipient=None)
    v = check.connect(f)
    assert CONNECTION_KEY in v.results and TX_KEY not in v.results
    f = learnt(replace(f, phase="helo", helo="client.example"), v)
    check.helo(f)
    check.mail(replace(f, phase="mail", sender=""))
    connect, helo, mail = srv.requests
    assert (connect["protocol_state"], helo["protocol_state"], mail["protocol_state"]) == ("CONNECT", "EHLO", "MAIL")
    assert connect["helo_name"] == "" and connect["sender"] == "" and connect["client_name"] == "unknown"
    assert helo["instance"] == connect["instance"] and mail["instance"] != connect["instance"]
    assert mail["sender"] == ""  # the null sender <>


def test_sasl_username_and_policy_context(server):
    srv = server()
    check = make(srv.address, policy_context="mx-inbound")
    check.rcpt(facts(auth_user="alice@example.test"))
    assert srv.requests[0]["sasl_username"] == "alice@example.test"
    assert srv.requests[0]["policy_context"] == "mx-inbound"


@pytest.mark.parametrize("field, value", [
    ("helo", "evil.example\r\nclient_address=127.0.0.1"),
    ("helo", "evil.example\nclient_address=127.0.0.1\n\nrequest=smtpd_access_policy"),
    ("sender", "a@b.example\x00client_address=127.0.0.1"),
    ("ptr", "host.example\rclient_address=127.0.0.1"),
    ("recipient", "bob@example.test\nrecipient=postmaster@example.test"),
])
def test_cr_lf_nul_never_split_an_attribute(server, field, value):
    srv = server()
    check = make(srv.address)
    assert check.rcpt(facts(**{field: value})).action == "accept"
    assert len(srv.requests) == 1  # one request, not two
    raw = srv.raw[0]
    lines = raw.split(b"\n")
    assert [line for line in lines if line.startswith(b"client_address=")] == [b"client_address=192.0.2.10"]
    assert b"\r" not in raw and b"\x00" not in raw
    assert raw.count(b"\n") == len(srv.requests[0]) + 1  # one line per attribute, then the empty line
    sent = srv.requests[0]["client_name" if field == "ptr" else {"helo": "helo_name"}.get(field, field)]
    assert sent == value.replace("\r", "?").replace("\n", "?").replace("\x00", "?")


def test_request_values_are_bounded_and_utf8():
    raw = encode_request([("sender", "j\u00f6rg@b\u00fccher.example"), ("helo_name", "x" * 100_000)])
    assert "jörg@bücher.example".encode() in raw and len(raw) < 2100


# -- the actions ------------------------------------------------------------------------------
ACTIONS = [  # action, verdict, code, enhanced, text
    ("OK", "accept", None, None, None),
    ("dunno", "accept", None, None, None),
    ("1699999999", "accept", None, None, None),  # all-numerical: OK (pop-before-smtp stamps)
    ("550", "accept", None, None, None),  # all-numerical before anything else, as Postfix reads it
    ("REJECT", "reject", 550, "5.7.1", "Refused by policy"),
    ("reject Go away", "reject", 550, "5.7.1", "Go away"),
    ("REJECT 5.7.23 SPF fail", "reject", 550, "5.7.23", "SPF fail"),
    ("554 5.7.1 Spam", "reject", 554, "5.7.1", "Spam"),
    ("550 Mail appeared to be SPAM", "reject", 550, "5.7.1", "Mail appeared to be SPAM"),
    ("550 4.7.1 wrong class", "reject", 550, "5.7.1", "wrong class"),
    ("5.7.2", "reject", 550, "5.7.2", "Refused by policy"),
    ("5.7.2 Listed", "reject", 550, "5.7.2", "Listed"),
    ("DEFER", "defer", 450, "4.7.1", "Try again later"),
    ("defer_if_permit Greylisted, see http://example/", "defer", 450, "4.7.1", "Greylisted, see http://example/"),
    ("451 4.7.1 Please try later", "defer", 451, "4.7.1", "Please try later"),
    ("450 5.7.1 wrong class", "defer", 450, "4.7.1", "wrong class"),
    ("4.2.0 busy", "defer", 450, "4.2.0", "busy"),
    ("421 Go away now", "close", 421, "4.7.1", "Go away now"),
    ("521 5.7.1 Botnet", "close", 521, "5.7.1", "Botnet"),
    ("DEFER_IF_REJECT maybe", "accept", None, None, None),
    ("HOLD suspicious", "quarantine", None, None, None),
    ("DISCARD spam", "quarantine", None, None, None),
    ("WARN odd client", "accept", None, None, None),
    ("FILTER smtp:[127.0.0.1]:10025", "accept", None, None, None),
    ("REDIRECT abuse@example.test", "accept", None, None, None),
    ("BCC archive@example.test", "accept", None, None, None),
    ("permit_mynetworks", "accept", None, None, None),
]


@pytest.mark.parametrize("action, kind, code, enhanced, text", ACTIONS)
def test_action_mapping(server, action, kind, code, enhanced, text):
    srv = server(lambda request: f"action={action}")
    verdict = make(srv.address).rcpt(facts())
    assert verdict.action == kind, verdict
    if code is None:
        assert verdict.reply is None
    else:
        assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.text) == (code, enhanced, text)
        assert verdict.reply.close == (kind == "close")


def test_hold_and_discard_say_why_in_the_quarantine():
    assert to_verdict("HOLD suspicious").reason == "policy service HOLD: suspicious"
    assert "held instead" in to_verdict("DISCARD").reason


def test_prepend_adds_a_header_field(server):
    srv = server(lambda request: "action=PREPEND X-Greylist: delayed 301 seconds by postgrey-1.37")
    verdict = make(srv.address).rcpt(facts())
    assert verdict.action == "accept"
    assert verdict.headers == (("X-Greylist", "delayed 301 seconds by postgrey-1.37"),)


@pytest.mark.parametrize("action", ["PREPEND no colon here", "PREPEND : empty name", "PREPEND Bad Name: x",
                                    "PREPEND"])
def test_a_malformed_prepend_is_ignored(action):
    verdict = to_verdict(action)
    assert verdict.action == "accept" and verdict.headers == () and "ignored" in verdict.reason


def test_reply_text_with_control_characters_is_made_safe(server):
    srv = server(lambda request: b"action=550 5.7.1 bad\x00\rtext\x7f\n\n")
    reply = make(srv.address).rcpt(facts()).reply
    assert reply.to_bytes() == b"550 5.7.1 bad??text?\r\n"


def test_other_attributes_and_crlf_line_ends_are_accepted(server):
    srv = server(lambda request: b"foo=bar\r\naction=REJECT no\r\naction=OK\r\n\r\n")
    verdict = make(srv.address).rcpt(facts())
    assert verdict.action == "reject" and verdict.reply.text == "no"  # the first action counts


JUNK = ["action=", "action=   ", "action=55 x", "action=250 Ok", "action=600 What", "action=2.0.0 ok",
        "action=5.7", "action=5500 x", "action=\uff15\uff15\uff10 x", "result=OK", "action5=OK"]


@pytest.mark.parametrize("reply", JUNK)
def test_junk_replies_apply_default_action(server, reply):
    srv = server(lambda request: reply)
    verdict = make(srv.address).rcpt(facts())
    assert (verdict.action, verdict.reply.code, verdict.reply.enhanced) == ("defer", 451, "4.3.5")
    assert "policy service" in verdict.reason


@pytest.mark.parametrize("default, kind, code", [("accept", "accept", None), ("reject", "reject", 550),
                                                 ("defer", "defer", 451)])
def test_default_action_is_configurable(server, default, kind, code):
    srv = server(lambda request: "nothing=here")
    verdict = make(srv.address, default_action=default).rcpt(facts())
    assert verdict.action == kind and (verdict.reply.code if verdict.reply else None) == code


def test_a_reply_over_8k_is_unusable_and_the_connection_dropped(server):
    big = lambda request: "action=REJECT " + "x" * 9000 if request["recipient"] == "big@example.test" else "action=OK"
    srv = server(big)
    check = make(srv.address)
    verdict = check.rcpt(facts(recipient="big@example.test"))
    assert verdict.action == "defer" and verdict.reply.enhanced == "4.3.5"
    assert check.rcpt(facts()).action == "accept"
    assert srv.connections == 2  # the stream was out of step: not kept


def test_an_endless_reply_without_empty_line_is_cut_at_8k(server):
    srv = server(lambda request: b"action=OK\n" + b"x" * 100_000)
    started = time.monotonic()
    verdict = make(srv.address, read_timeout=5).rcpt(facts())
    assert verdict.reply.enhanced == "4.3.5" and time.monotonic() - started < 2


def test_a_reply_cut_short_is_unusable(server):
    srv = server(lambda request: b"action=REJ")  # then the server waits for the next request
    check = make(srv.address, read_timeout=0.5)
    assert check.rcpt(facts()).reply.enhanced == "4.3.5"


def test_unsolicited_bytes_after_the_reply_drop_the_connection(server):
    srv = server(lambda request: b"action=OK\n\naction=REJECT\n\n")
    check = make(srv.address)
    assert check.rcpt(facts()).action == "accept"
    assert check.rcpt(facts()).action == "accept"  # not the stale REJECT
    assert srv.connections == 2


# -- timeouts and failures --------------------------------------------------------------------
def test_a_server_that_never_answers_gives_default_action_once(server):
    srv = server(lambda request: SILENT)
    check = make(srv.address, read_timeout=0.5)
    started = time.monotonic()
    verdict = check.rcpt(facts())
    took = time.monotonic() - started
    assert verdict.action == "defer" and verdict.reply.enhanced == "4.3.5"
    assert 0.45 < took < 0.9  # no second try on a slow server
    assert len(srv.requests) == 1


def test_the_engine_timeout_bounds_the_call_and_the_stream_is_not_reused(server):
    answers = iter([SILENT, "action=REJECT second"])
    srv = server(lambda request: next(answers))
    check = make(srv.address, read_timeout=10)
    engine = Engine([CheckSpec("policy", check, timeout=0.3, on_error="defer")], "mx.test")
    session = engine.session()
    started = time.monotonic()
    reply = session.run(facts())
    assert time.monotonic() - started < 1
    assert (reply.code, reply.enhanced) == (451, "4.3.0")  # the engine's on_error
    reply = session.run(facts())
    assert reply.text == "second" and srv.connections == 2


def test_connection_refused_tries_again_then_default_action():
    from tests.support.server import free_port
    check = make(f"127.0.0.1:{free_port()}", retry_delay=0.2)
    started = time.monotonic()
    verdict = check.rcpt(facts())
    assert verdict.action == "defer" and "cannot connect" in verdict.reason
    assert 0.2 <= time.monotonic() - started < 1


def test_connect_timeout(monkeypatch):
    check = make("192.0.2.1:10023", connect_timeout=0.3, try_limit=1)  # TEST-NET-1: never answers
    import geosmtp.checks.policy_client as pc

    class Hanging:  # a connect that never completes, without sending anything anywhere
        def __init__(self, *a):
            pass

        def settimeout(self, t):
            self.t = t

        def connect(self, addr):
            gevent.sleep(self.t)
            raise pc.socket.timeout("timed out")

        def close(self):
            pass

    monkeypatch.setattr(pc.socket, "socket", Hanging)
    started = time.monotonic()
    verdict = check.rcpt(facts())
    assert "timed out after 0.3s" in verdict.reason and time.monotonic() - started < 0.6


# -- the kept connection ----------------------------------------------------------------------
def test_the_connection_is_kept_across_requests(server):
    srv = server()
    check = make(srv.address)
    for n in range(5):
        check.rcpt(facts(recipient=f"r{n}@example.test"))
    assert len(srv.requests) == 5 and srv.connections == 1 and check.client.opened == 1


def test_a_connection_the_server_closed_is_reopened(server):
    srv = server()
    check = make(srv.address)
    check.rcpt(facts())
    srv.drop_connections()
    time.sleep(0.1)
    assert check.rcpt(facts()).action == "accept"
    assert srv.connections == 2 and len(srv.requests) == 2


def test_a_connection_that_dies_under_the_request_is_tried_once_more(server):
    answers = iter(["action=OK", CLOSE, "action=REJECT fresh"])
    srv = server(lambda request: next(answers))
    check = make(srv.address, retry_delay=5)
    check.rcpt(facts())
    started = time.monotonic()
    verdict = check.rcpt(facts())  # the kept one reads the request and closes: a new one answers
    assert verdict.reply.text == "fresh" and srv.connections == 2
    assert time.monotonic() - started < 1  # a dead kept connection is reopened at once


def test_try_limit_one_does_not_try_again(server):
    answers = iter(["action=OK", CLOSE, "action=REJECT fresh"])
    srv = server(lambda request: next(answers))
    check = make(srv.address, try_limit=1)
    check.rcpt(facts())
    verdict = check.rcpt(facts())
    assert verdict.reply.enhanced == "4.3.5" and "closed the connection" in verdict.reason


def test_max_idle_and_max_ttl_retire_connections(server):
    srv = server()
    idle = make(srv.address, max_idle=0.2)
    idle.rcpt(facts())
    time.sleep(0.3)
    idle.rcpt(facts())
    assert idle.client.opened == 2
    ttl = make(srv.address, max_ttl=0.3, max_idle=60)
    for _ in range(4):
        ttl.rcpt(facts())
        time.sleep(0.12)
    assert ttl.client.opened == 2


def test_a_connection_inherited_through_fork_is_not_used(server, monkeypatch):
    srv = server()
    check = make(srv.address)
    check.rcpt(facts())
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    check.rcpt(facts())
    assert check.client.opened == 2


def test_concurrent_sessions_never_share_a_socket(server):
    def slow_echo(request):
        time.sleep(0.01)
        return f"action=REJECT {request['recipient']}"
    srv = server(slow_echo)
    check = make(srv.address, max_connections=4)
    jobs = [gevent.spawn(check.rcpt, facts(recipient=f"r{n}@example.test")) for n in range(40)]
    gevent.joinall(jobs, timeout=20)
    assert [job.value.reply.text for job in jobs] == [f"r{n}@example.test" for n in range(40)]
    assert srv.peak <= 4 and check.client.opened <= 4
    assert len(check.client._idle) <= 4


def test_close_releases_kept_connections(server):
    srv = server()
    check = make(srv.address)
    check.rcpt(facts())
    check.close()
    deadline = time.monotonic() + 2
    while srv._open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not srv._open
    # a session still open after the reload may ask once more: nothing is kept after that
    assert check.rcpt(facts()).action == "accept"
    assert check.client._idle == [] and srv.connections == 2


def test_unix_socket(server, tmp_path):
    srv = server(lambda request: "action=DEFER_IF_PERMIT Greylisted", unix_path=tmp_path / "policy.sock")
    verdict = make(srv.address).rcpt(facts())
    assert (verdict.action, verdict.reply.code) == ("defer", 450)


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options, problem", [
    ({"address": "localhost:10023"}, "not an IP address"),
    ({"address": "127.0.0.1"}, "IP:port"),
    ({"address": "unix:relative/path"}, "absolute path"),
    ({"address": "127.0.0.1:10023", "phases": ["rcpt", "rcpt"]}, "twice"),
    ({"address": "127.0.0.1:10023", "phases": ["end"]}, "phases"),
    ({"address": "127.0.0.1:10023", "phases": []}, "phases"),
    ({"address": "127.0.0.1:10023", "timeout_per_request": 3}, "timeout_per_request"),
    ({"address": "127.0.0.1:10023", "default_action": "DUNNO"}, "default_action"),
])
def test_bad_options_are_refused(options, problem):
    with pytest.raises(registry.CheckError, match=problem):
        registry.make("policy", None, options, CONTEXT)


def test_options_read_durations():
    check = make("[::1]:10023", read_timeout="3s", max_idle="5m")
    assert (check.client.read_timeout, check.client.max_idle) == (3.0, 300.0)


def test_to_verdict_never_raises_other_than_unusable():
    samples = ["", " ", "\x00", "5", "55", "555", "5.", "5.7.1.1", "4.7.1\x00", "REJECT\x00x", "PREPEND \x00: x",
               "x" * 10_000, "\udcff", "4" * 500, "5.999.999 x", "5.1234.1 x"]
    for action in samples:
        try:
            verdict = to_verdict(action)
        except UnusableReply:
            continue
        assert verdict.action in ("accept", "reject", "defer", "close", "quarantine")


def test_end_of_message_keeps_the_transactions_instance(server):
    """As the session runs it: DATA ends the transaction before the message is read, and
    the end-of-data checks get what MAIL and RCPT learnt."""
    srv = server()
    check = make(srv.address, phases=["rcpt", "data"])
    session = Engine([CheckSpec("policy", check)], "mx.test").session()
    assert session.run(facts()) is None
    learnt = session.tx
    session.end_transaction()
    outcome = session.data(facts("data", recipients=("bob@example.test",), results=session.results()),
                           learnt, rewrite=lambda edit: None)
    assert outcome.refusal is None
    rcpt, end = srv.requests
    assert end["protocol_state"] == "END-OF-MESSAGE" and end["instance"] == rcpt["instance"]
