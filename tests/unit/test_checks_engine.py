"""The check engine and its parts, without a server: verdicts are validated data; a phase's
checks run in order and stop at the first refusal; failures and timeouts get on_error; the
end of DATA writes our Authentication-Results, removes forged ones and the fields checks
name; header splitting and config tables."""
from __future__ import annotations

import io
import ipaddress
import os

import gevent
import pytest

from geosmtp import config
from geosmtp.checks import AuthResult, Check, Verdict
from geosmtp.checks import headers as hdr
from geosmtp.checks.authresults import authserv_id, format_header, is_ours
from geosmtp.checks.engine import CheckSpec, Engine
from geosmtp.checks.interface import Facts, make_reply, safe_text
from geosmtp.replies import Reply


def facts(phase="rcpt", **kw) -> Facts:
    base = dict(phase=phase, listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.7"), trusted=False,
                hostname="mx.example.test", helo="client.test", sender="a@sender.test", recipient="b@example.test")
    base.update(kw)
    return Facts(**base)


class Says(Check):
    """Gives one verdict at one phase and remembers what it saw."""

    def __init__(self, verdict, phase="rcpt"):
        super().__init__({}, None)
        self.verdict, self.phase, self.seen = verdict, phase, []
        setattr(self, phase, self._answer)

    def _answer(self, f):
        self.seen.append(f)
        return self.verdict() if callable(self.verdict) else self.verdict


def engine(*checks, **spec) -> Engine:
    return Engine([CheckSpec(f"c{i}", c, phases=(c.phase,), **spec) for i, c in enumerate(checks)], "mx.example.test")


# -- verdicts and replies ---------------------------------------------------------------------
def test_a_verdict_is_checked_as_it_is_made():
    with pytest.raises(ValueError):
        Verdict("reject", reply=Reply(451, "4.7.1", "no"))  # a reject carries a 5xx
    with pytest.raises(ValueError):
        Verdict("maybe")
    with pytest.raises(ValueError):
        Verdict.accept(headers=[("Bad Name", "x")])
    with pytest.raises(ValueError):
        Verdict.accept(headers=[("X-Ok", "one\r\nInjected: yes")])
    folded = Verdict.accept(headers=[("X-Ok", "one\r\n\ttwo")])
    assert folded.headers == (("X-Ok", "one\r\n\ttwo"),)


@pytest.mark.parametrize("code, enhanced, text, want", [
    (550, "5.7.2", "", "550 5.7.2 Refused"),  # a bare enhanced code (Postfix CVE-2026-43964)
    (550, "4.7.1", "x", "550 5.7.1 x"),  # the class must match the code
    (451, "junk", "later", "451 4.7.1 later"),
    (554, None, "a\r\nRCPT TO:<x>\x00", "554 a??RCPT TO:<x>?"),
])
def test_replies_from_outside_are_made_safe(code, enhanced, text, want):
    assert str(make_reply(code, enhanced, text)) == want


def test_a_reply_code_out_of_range_is_refused():
    for code in (250, 600, "550"):
        with pytest.raises(ValueError):
            make_reply(code, None, "x")
    assert safe_text("x" * 500) == "x" * 400


# -- the engine ---------------------------------------------------------------------------------
def test_a_phase_runs_in_order_and_stops_at_the_first_refusal():
    first = Says(Verdict.accept(headers=[("X-A", "1")], results={"a": 1}))
    second = Says(Verdict.reject("no", code=550, enhanced="5.7.1"))
    third = Says(None)
    s = engine(first, second, third).session()
    assert str(s.run(facts())) == "550 5.7.1 no"
    assert len(first.seen) == len(second.seen) == 1 and third.seen == []
    assert second.seen[0].results == {"a": 1}  # what the first recorded, the second saw
    assert s.tx.headers == [("X-A", "1")]


def test_quarantine_and_fields_add_up_and_end_with_the_transaction():
    s = engine(Says(Verdict.quarantine("one")), Says(Verdict.quarantine("two"))).session()
    assert s.run(facts()) is None
    assert s.tx.quarantine == ["c0: one", "c1: two"]
    s.end_transaction()
    assert s.tx.quarantine == []


def test_trusted_and_authenticated_clients_are_skipped_unless_asked():
    check = Says(Verdict.reject())
    assert engine(check).session().run(facts(trusted=True)) is None
    assert engine(check).session().run(facts(auth_user="alice@example.test")) is None
    assert engine(check, skip_trusted=False).session().run(facts(trusted=True)).code == 550


@pytest.mark.parametrize("on_error, want", [("accept", None), ("defer", "451 4.3.0"), ("reject", "550 5.7.1")])
def test_a_failure_or_a_timeout_gets_on_error(on_error, want):
    def boom():
        raise OSError("backend down")

    def slow():
        gevent.sleep(5)

    for behaviour in (boom, slow, lambda: "not a verdict"):
        s = engine(Says(behaviour), on_error=on_error, timeout=0.2).session()
        reply = s.run(facts())
        assert (reply and f"{reply.code} {reply.enhanced}") == want


@pytest.mark.parametrize("verdict, want", [
    (Verdict.reject("go away"), "554 5.7.1 go away"),
    (Verdict.defer("later"), "421 4.7.1 later"),
    (Verdict.close("bye"), "554 5.7.0 bye"),
])
def test_at_connect_a_refusal_ends_the_connection(verdict, want):
    reply = engine(Says(verdict, phase="connect")).session().run(facts("connect", helo=None, sender=None))
    assert str(reply) == want and reply.close


def test_the_end_of_data_writes_ours_and_removes_forged_fields(tmp_path):
    message = (b"Received: from x\r\nAuthentication-Results: MX.Example.Test (forged);\r\n dkim=pass\r\n"
               b"Authentication-Results: other.test; spf=pass\r\nX-Drop: 1\r\nX-Drop: 2\r\nSubject: s\r\n\r\nbody\r\n")
    path, open_message, rewrite, _ = _stored(tmp_path, message)
    check = Says(Verdict(auth=(AuthResult("spf", "pass", (("smtp.mailfrom", "sender.test"),)),),
                         headers=(("X-Mine", "yes"),), remove_headers=(("x-drop", 2),)), phase="data")
    e = Engine([CheckSpec("c", check, phases=("data",))], "mx.example.test", records_auth=True)
    s = e.session()
    out = s.data(facts("data", open_message=open_message), s.tx, rewrite)
    assert out.refusal is None
    assert out.prefix() == ("Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=sender.test\r\n"
                            "X-Mine: yes\r\n")
    assert path.read_bytes() == (b"{}\nReceived: from x\r\nAuthentication-Results: other.test; spf=pass\r\n"
                                 b"X-Drop: 1\r\nSubject: s\r\n\r\nbody\r\n")


# -- Authentication-Results and header fields ------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    ("mx.example.test; spf=pass", "mx.example.test"),
    ("  (comment (nested)) mx.example.test 1; none", "mx.example.test"),
    ('"mx.example.test"; dkim=pass', "mx.example.test"),
    ("mx.example.test;spf=pass", "mx.example.test"),
    ("", ""),
])
def test_the_authserv_id_is_found_past_comments(value, want):
    assert authserv_id(value) == want


def test_ours_is_case_and_dot_insensitive_and_well_formed():
    assert is_ours("MX.EXAMPLE.TEST.; spf=pass", "mx.example.test")
    assert not is_ours("mx.example.test.evil.test; spf=pass", "mx.example.test")
    value = format_header("mx.example.test", [AuthResult("dkim", "fail", (("header.d", "a b;c"),), reason='x "y"\r\n')])
    assert value == 'mx.example.test;\r\n\tdkim=fail reason="x \\"y\\"" header.d="a b;c"'
    assert format_header("mx.example.test", []) == "mx.example.test; none"


def test_fields_split_with_their_offsets_and_removed_exactly():
    section = b"A: 1\r\nB: 2\r\n  more\r\nno colon here\r\nA: 3\r\n\r\n"
    fields = hdr.parse_fields(section)
    assert [(f.name, f.value) for f in fields] == [("A", "1"), ("B", "2  more"), ("A", "3")]
    assert hdr.field_indices(fields, [("a", 0)]) == {0, 2}
    assert hdr.field_indices(fields, [("a", 2), ("b", 5)]) == {2}
    src = io.BytesIO(section + b"body\r\n")
    r, w = os.pipe()
    hdr.copy_without(src, w, section, fields, {1})
    os.close(w)
    assert os.read(r, 1000) == b"A: 1\r\nno colon here\r\nA: 3\r\n\r\nbody\r\n"
    os.close(r)


# -- [[check]] tables ------------------------------------------------------------------------------
BASE = {"listener": [{"name": "mx", "address": "127.0.0.1:2525"},
                     {"name": "sub", "address": "127.0.0.1:2587", "mode": "submission", "auth": False}]}
EXAMPLE = {"type": "python", "module": "geosmtp.checks.example:ExampleCheck"}


@pytest.mark.parametrize("checks, problem", [
    ([{**EXAMPLE, "refuse": "x"}], "a python check's own settings go in options"),
    ([{**EXAMPLE, "listeners": ["nope"]}], "no listener named nope"),
    ([EXAMPLE, EXAMPLE], "check names must be unique"),
    ([{**EXAMPLE, "on_error": "ignore"}], "on_error"),
    ([{"type": "python"}], "a python check names its class"),
    ([{"type": "python", "module": "geosmtp.checks.example"}], "is not \"package.module:Class\""),
])
def test_bad_check_tables_are_named(checks, problem):
    with pytest.raises(config.ConfigError) as exc:
        config.validate({**BASE, "check": checks})
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_checks_run_on_mx_listeners_unless_named():
    c = config.validate({**BASE, "check": [EXAMPLE, {**EXAMPLE, "name": "both", "listeners": ["mx", "sub"]}]})
    mx, sub = c.listener
    assert [x.label for x in c.checks_of(mx)] == ["python", "both"]
    assert [x.label for x in c.checks_of(sub)] == ["both"]


def test_the_shipped_config_s_commented_checks_are_valid():
    """conf/geosmtp.toml's [[check]] examples, uncommented, load (every key they name exists)."""
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "conf" / "geosmtp.toml").read_text()
    lines, on = [], False
    for line in text.splitlines():
        if line.startswith("# [[check]]"):
            on = True
        elif on and not line.startswith("# ") and line != "#":
            on = False
        if on and (line.startswith("# [") or "=" in line or line.startswith("# ]")):
            lines.append(line[2:])
    tables = tomllib.loads("\n".join(lines))["check"]
    assert {t["type"] for t in tables} == {"fcrdns", "dnsbl", "spf", "dkim", "dmarc", "greylist", "policy", "python", "rspamd",
                                            "milter"}
    listeners = [{"name": "smtp", "address": "127.0.0.1:2525"},
                 {"name": "submission", "address": "127.0.0.1:2587", "mode": "submission", "auth": False}]
    config.validate({"listener": listeners, "check": tables})

# -- edits: the seam for milters (fields inside the header section, body, envelope) -------------
def _stored(tmp_path, message: bytes):
    path = tmp_path / "m"
    path.write_bytes(b"{}\n" + message)

    def open_message():
        fh = open(path, "rb")
        fh.readline()
        return fh

    rewrites = []

    def rewrite(edit):
        rewrites.append(1)
        with open(path, "rb") as src, open(tmp_path / "new", "wb") as out:
            out.write(src.readline())
            out.flush()
            edit(src, out.fileno())
        os.replace(tmp_path / "new", path)

    return path, open_message, rewrite, rewrites


def test_edits_are_applied_once_in_order_after_every_data_check(tmp_path):
    from geosmtp.checks import edits as ed
    message = b"Received: from x\r\nSubject: old\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\nold body\r\n"
    path, open_message, rewrite, rewrites = _stored(tmp_path, message)
    body = io.BytesIO(b"new\nbody")
    first = Says(Verdict(edits=(ed.HeaderInsert(0, "X-Top", "t"), ed.HeaderChange("subject", 1, "new"),
                                ed.SenderChange("<s@example.test>"))), phase="data")
    second = Says(Verdict(edits=(ed.HeaderInsert(99, "X-End", "e\r\n\tfolded"), ed.BodyReplace(body),
                                 ed.HeaderChange("X-Missing", 1, "added"), ed.HeaderChange("X-Missing", 3, "")),
                          remove_headers=(("x-drop", 1),)), phase="data")
    e = Engine([CheckSpec("a", first, phases=("data",)), CheckSpec("b", second, phases=("data",))], "mx.example.test")
    s = e.session()
    out = s.data(facts("data", open_message=open_message), s.tx, rewrite)
    assert out.refusal is None and len(rewrites) == 1
    assert path.read_bytes() == (b"{}\nX-Top: t\r\nReceived: from x\r\nsubject: new\r\nX-Keep: 2\r\n"
                                 b"X-End: e\r\n\tfolded\r\nX-Missing: added\r\n\r\nnew\r\nbody\r\n")
    assert out.envelope == (ed.SenderChange("<s@example.test>"),)


def test_edits_are_not_applied_when_a_later_check_refuses(tmp_path):
    from geosmtp.checks import edits as ed
    path, open_message, rewrite, rewrites = _stored(tmp_path, b"Subject: s\r\n\r\nbody\r\n")
    e = Engine([CheckSpec("a", Says(Verdict(edits=(ed.HeaderInsert(0, "X", "y"),)), phase="data"), phases=("data",)),
                CheckSpec("b", Says(Verdict.reject("no"), phase="data"), phases=("data",))], "mx.example.test")
    s = e.session()
    out = s.data(facts("data", open_message=open_message), s.tx, rewrite)
    assert str(out.refusal) == "550 5.7.1 no" and not rewrites


def test_a_failing_rewrite_refuses_with_451_and_nothing_half_done(tmp_path):
    from geosmtp.checks import edits as ed
    _path, open_message, _rewrite, _ = _stored(tmp_path, b"Subject: s\r\n\r\nbody\r\n")

    def broken(edit):
        raise OSError("disk gone")

    e = Engine([CheckSpec("a", Says(Verdict(edits=(ed.HeaderInsert(0, "X", "y"),)), phase="data"),
                          phases=("data",))], "mx.example.test")
    s = e.session()
    out = s.data(facts("data", open_message=open_message), s.tx, broken)
    assert str(out.refusal) == "451 4.3.0 Temporary local problem, try again later"


def test_edits_are_validated_as_they_are_made():
    from geosmtp.checks import edits as ed
    for bad in (lambda: ed.HeaderInsert(0, "Bad Name", "v"), lambda: ed.HeaderInsert(0, "X", "a\r\nInjected: 1"),
                lambda: ed.HeaderChange("X", 0, "v"), lambda: Verdict(edits=("not an edit",))):
        with pytest.raises(ValueError):
            bad()


def test_envelope_edits_follow_rcpt_rules_and_keep_every_recipient_seen():
    from geosmtp.checks import edits as ed
    from geosmtp.envelope import ClientInfo, Envelope, Recipient
    from geosmtp.protocol import parse_address

    def envelope():
        return Envelope(id="q", created=0.0, sender="a@sender.test",
                        recipients=[Recipient("alice@example.test", "alice@example.test")],
                        client=ClientInfo(address="192.0.2.1", helo="h", listener="mx"), size=1)

    def resolve(address):
        if not address.endswith("@example.test"):
            raise ed.EditRefused(f"added recipient <{address}>: 554 5.7.1 relay denied")
        return [address.lower()]

    env = envelope()
    assert ed.apply_envelope(env, [ed.RecipientAdd("<Bob@example.test>"), ed.RecipientRemove("<alice@example.test>"),
                                   ed.SenderChange("<>")], resolve, parse_address, False) is None
    assert (env.sender, [r.address for r in env.recipients]) == ("", ["bob@example.test"])
    for refused in (ed.RecipientAdd("<x@elsewhere.test>"), ed.RecipientAdd("not-an-address"),
                    ed.SenderChange("<b\u00e9@example.test>"), ed.SenderChange("<a@b\r\n.test>")):
        env = envelope()
        with pytest.raises(ed.EditRefused):
            ed.apply_envelope(env, [refused], resolve, parse_address, False)
        assert env.sender == "a@sender.test"  # all or nothing
    env = envelope()
    reason = ed.apply_envelope(env, [ed.RecipientRemove("alice@example.test")], resolve, parse_address, False)
    assert reason and [r.address for r in env.recipients] == ["alice@example.test"]  # held, never dropped


def test_crlf_lines_across_chunks():
    from geosmtp.checks.edits import crlf_lines
    assert b"".join(crlf_lines([b"a\r", b"\nb\n", b"c\rd"])) == b"a\r\nb\r\nc\r\nd\r\n"
    assert b"".join(crlf_lines([b"x\r"])) == b"x\r\n"
    assert b"".join(crlf_lines([])) == b""


def test_end_session_reaches_the_checks_that_want_it_and_never_raises():
    ended = []

    class Keeps(Check):
        def rcpt(self, f):
            return None

        def end_session(self, f):
            ended.append(f.session)
            raise RuntimeError("broken")

    e = Engine([CheckSpec("k", Keeps({}, None))], "mx.example.test")
    e.session().end_session(facts("end", session="abc"))
    assert ended == ["abc"]


def test_ipv4_clients_of_a_dual_stack_listener_are_seen_by_their_ipv4_address():
    """A DNSBL or greylist key made from "::ffff:192.0.2.1" would match nothing, or everybody."""
    from geosmtp.server import unmapped
    assert unmapped("::ffff:192.0.2.1") == "192.0.2.1"
    assert unmapped("2001:db8::1") == "2001:db8::1" and unmapped("192.0.2.1") == "192.0.2.1"


def test_the_checks_dns_keeps_answers_no_longer_than_a_resolver_would():
    import dns.resolver

    from geosmtp.checks import dns as checks_dns

    class Resolver:
        asked = 0

        def resolve(self, *a, **kw):
            Resolver.asked += 1
            raise dns.resolver.NoAnswer()

    memo = checks_dns.DNS(Resolver(), clock=lambda: now[0])
    now = [0.0]
    memo._resolve = lambda qname, rdtype: ([], 10 ** 9)  # a negative TTL of 30 years
    assert memo.query("example.test", "TXT") == []
    now[0] = checks_dns.MAX_NEGATIVE_TTL + 1
    memo._resolve = lambda qname, rdtype: (["fresh"], 60)
    assert memo.query("example.test", "TXT") == ["fresh"]  # asked again after 3 h


def test_text_from_a_filter_that_is_not_utf8_never_reaches_the_envelope_raw():
    """A milter's quarantine reason (or a property) with a lone surrogate and CR/LF: one safe
    line, which the envelope's UTF-8 JSON can hold (no crash of the session at commit)."""
    v = Verdict.quarantine("bad\udcff\r\nInjected: 1")
    assert v.reason == "bad???Injected: 1" and v.reason.encode("utf-8")
    with pytest.raises(ValueError):
        Verdict.accept(headers=[("X-A", "\udcff")])
    value = format_header("mx.example.test", [AuthResult("x", "pass", (("header.d", "a\udcffb"),))])
    assert value.encode("utf-8")


def test_a_header_section_too_large_to_scan_is_refused_not_passed_half_checked(tmp_path):
    """A forged Authentication-Results past the part of the header section we read would
    survive: such a message is refused (552 5.3.4) when our A-R is written."""
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 900) for i in range(300))
    message = filler + b"Authentication-Results: mx.example.test; dkim=pass\r\n\r\nbody\r\n"
    path, open_message, rewrite, _ = _stored(tmp_path, message)
    e = Engine([], "mx.example.test", records_auth=True)
    s = e.session()
    out = s.data(facts("data", open_message=open_message), s.tx, rewrite)
    assert str(out.refusal) == "552 5.3.4 Message header section too large"
    (tmp_path / "small").mkdir()
    small = _stored(tmp_path / "small", b"Subject: s\r\n\r\nbody\r\n")
    assert s.data(facts("data", open_message=small[1]), s.tx, small[2]).refusal is None
