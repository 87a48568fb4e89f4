"""The milter check against an in-process milter that answers what each test says: the
negotiated steps are skipped or not waited for, replies become verdicts, modifications
become edits, and a milter that misbehaves gets the default action within its timeout."""
from __future__ import annotations

import io
import ipaddress
import struct
import time

import gevent
import pytest
from gevent.server import StreamServer

from geosmtp.checks import edits as ed
from geosmtp.checks import milter_codec as mc
from geosmtp.checks.interface import CheckContext, Facts
from geosmtp.checks.milter import MilterCheck, MilterOptions

MESSAGE = b"Received: from x\r\nSubject: hi\r\n folded\r\n\r\nbody\r\n"


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return mc.packet(cmd, data)


class Milter:
    """Negotiates `protocol`/`actions`, then answers each command from `answers` (command ->
    bytes to send; default continue) and records the commands it got."""

    def __init__(self, protocol=0, actions=mc.ACTIONS_OFFERED, answers=None, optneg=None):
        self.protocol, self.actions, self.answers = protocol, actions, answers or {}
        self.optneg = optneg
        self.got: list[tuple[bytes, bytes]] = []
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.address = f"inet:127.0.0.1:{self.server.server_port}"

    def handle(self, sock, _addr):
        buf = b""
        while True:
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            n = struct.unpack(">I", buf[:4])[0]
            cmd, data, buf = buf[4:5], buf[5:4 + n], buf[4 + n:]
            self.got.append((cmd, data))
            if cmd == mc.SMFIC_OPTNEG:
                sock.sendall(self.optneg if self.optneg is not None else
                             pkt(b"O", struct.pack(">III", 6, self.actions, self.protocol)))
                continue
            if cmd in (mc.SMFIC_MACRO, mc.SMFIC_ABORT) or cmd == mc.SMFIC_QUIT:
                continue
            _skip, nr = mc.STEPS.get(cmd, (0, 0))
            if self.protocol & nr:
                continue
            answer = self.answers.get(cmd, pkt(b"c"))
            if answer == "hang":  # then gone, without a word (never a late write into another test)
                gevent.sleep(30)
                return
            if answer == "reset":
                return
            sock.sendall(answer)

    def commands(self) -> bytes:
        return b"".join(c for c, _ in self.got if c not in (mc.SMFIC_MACRO,))


def check(address, **options) -> MilterCheck:
    opts = MilterOptions(address=address, **options).model_dump()
    return MilterCheck(opts, CheckContext(hostname="mx.example.test", dns=None))


def facts(phase, tmp_path=None, **kw) -> Facts:
    base = dict(phase=phase, listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.7"), trusted=False,
                hostname="mx.example.test", helo="client.test", sender="a@sender.test", session="s1")
    if phase == "data":
        base.update(queue_id="Q1", open_message=lambda: io.BytesIO(MESSAGE))
    base.update(kw)
    return Facts(**base)


def run_session(c: MilterCheck, rcpts=("b@example.test",)):
    out = [c.connect(facts("connect")), c.helo(facts("helo")), c.mail(facts("mail"))]
    out += [c.rcpt(facts("rcpt", recipient=r)) for r in rcpts]
    out.append(c.data(facts("data")))
    c.end_session(facts("end"))
    gevent.sleep(0.1)  # the milter reads what was sent last
    return out


def test_every_step_in_order_headers_without_ours_and_quit():
    m = Milter()
    assert run_session(check(m.address)) == [None] * 5
    assert m.commands() == b"OCHMRTLNBEQ"
    headers = [d for c, d in m.got if c == mc.SMFIC_HEADER]
    assert headers == [b"Subject\x00hi\n folded\x00"]  # Sendmail's form: LF between folded lines
    macros = [d for c, d in m.got if c == mc.SMFIC_MACRO]
    assert macros[0].startswith(b"Cj\x00mx.example.test\x00{daemon_name}\x00mx\x00")
    assert any(d.startswith(b"E") and b"i\x00Q1\x00" in d for d in macros)


def test_skipped_steps_are_not_sent_and_no_reply_steps_not_waited_for():
    m = Milter(protocol=mc.SMFIP_NOHELO | mc.SMFIP_NOHDRS | mc.SMFIP_NR_RCPT | mc.SMFIP_NR_BODY | mc.SMFIP_NOEOH)
    assert run_session(check(m.address)) == [None] * 5
    assert m.commands() == b"OCMRTBEQ"


def test_a_rejected_recipient_is_refused_alone_and_an_unfinished_message_aborted():
    m = Milter(answers={mc.SMFIC_RCPT: pkt(b"y", b"550 5.1.1 no such user\x00")})
    c = check(m.address)
    c.connect(facts("connect"))
    c.mail(facts("mail"))
    v = c.rcpt(facts("rcpt", recipient="x@example.test"))
    assert str(v.reply) == "550 5.1.1 no such user"
    c.mail(facts("mail"))  # the next transaction: the first is aborted before it
    assert m.commands().endswith(b"MRAM")


def test_modifications_become_edits():
    answers = {mc.SMFIC_BODYEOB: pkt(b"h", b"X-A\x00one\x00") + pkt(b"i", struct.pack(">I", 0) + b"X-B\x00two\x00")
               + pkt(b"m", struct.pack(">I", 1) + b"Received\x00\x00") + pkt(b"e", b"<n@x.test>\x00")
               + pkt(b"+", b"<c@example.test>\x00") + pkt(b"-", b"<b@example.test>\x00")
               + pkt(b"b", b"new ") + pkt(b"b", b"body") + pkt(b"q", b"why\x00") + pkt(b"p") + pkt(b"a")}
    m = Milter(answers=answers)
    v = run_session(check(m.address))[-1]
    assert v.action == "quarantine" and "why" in v.reason
    body = [e for e in v.edits if isinstance(e, ed.BodyReplace)]
    assert body[0].body.seek(0) == 0 and body[0].body.read() == b"new body"
    assert [e for e in v.edits if not isinstance(e, ed.BodyReplace)] == [
        ed.HeaderInsert(1 << 31, "X-A", "one"), ed.HeaderInsert(0, "X-B", "two"),
        ed.HeaderChange("Received", 2, ""),  # the milter counts without our Received:
        ed.SenderChange("<n@x.test>"), ed.RecipientAdd("<c@example.test>"), ed.RecipientRemove("<b@example.test>")]


def test_modifications_of_one_message_are_bounded_in_all():
    """Each packet is bounded by max_reply_size; their sum too (three 400 KB header fields are
    more than a message may be given): the default action, not a worker out of memory."""
    big = pkt(b"h", b"X-Big\x00" + b"v" * 400_000 + b"\x00")
    m = Milter(answers={mc.SMFIC_BODYEOB: big * 3 + pkt(b"c")})
    v = run_session(check(m.address))[-1]
    assert v is not None and v.action == "defer" and not v.edits


@pytest.mark.parametrize("answers, optneg", [
    ({mc.SMFIC_MAIL: pkt(b"h", b"X\x00v\x00")}, None),  # a modification before the end of the message
    ({mc.SMFIC_MAIL: pkt(b"Z")}, None),  # an unknown reply
    ({mc.SMFIC_MAIL: pkt(b"c", b"extra")}, None),  # data where none belongs
    ({mc.SMFIC_MAIL: pkt(b"y", b"250 fine\x00")}, None),  # a reply code that refuses nothing
    ({mc.SMFIC_MAIL: struct.pack(">I", 100 * 1024 * 1024) + b"h"}, None),  # 100 MB announced
    ({mc.SMFIC_MAIL: "reset"}, None),
    ({mc.SMFIC_MAIL: "hang"}, None),
    ({}, pkt(b"O", struct.pack(">III", 9, 0, 0))),  # a version we do not speak
])
def test_a_misbehaving_milter_gets_the_default_action_in_time_for_the_rest_of_the_session(answers, optneg):
    m = Milter(answers=answers, optneg=optneg)
    c = check(m.address, command_timeout=0.5, connect_timeout=0.5)
    began = time.monotonic()
    first = c.connect(facts("connect"))
    v = first or c.mail(facts("mail"))
    assert time.monotonic() - began < 1.5
    assert str(v.reply) == "451 4.7.1 Service unavailable - try again later"
    assert str(c.rcpt(facts("rcpt", recipient="b@example.test")).reply).startswith("451 4.7.1")


def test_default_accept_leaves_the_milter_out():
    c = check("inet:127.0.0.1:9", default_action="accept", connect_timeout=0.5)  # nothing listens
    assert run_session(c) == [None] * 5


def test_accept_at_connect_ends_the_conversation():
    m = Milter(answers={mc.SMFIC_CONNECT: pkt(b"a")})
    assert run_session(check(m.address)) == [None] * 5
    assert m.commands() == b"OCQ"


def test_reject_at_helo_refuses_every_later_command():
    m = Milter(answers={mc.SMFIC_HELO: pkt(b"r")})
    c = check(m.address)
    assert c.connect(facts("connect")) is None
    assert str(c.helo(facts("helo")).reply) == "550 5.7.1 Command rejected"
    assert str(c.mail(facts("mail")).reply) == "550 5.7.1 Command rejected"


def test_a_header_value_from_the_milter_can_never_start_a_field_or_end_the_header_section():
    evil = b"X-A\x00one\r\nBcc: victim@example.test\n\nbody\x07\x00"
    m = Milter(answers={mc.SMFIC_BODYEOB: pkt(b"h", evil) + pkt(b"c")})
    v = run_session(check(m.address))[-1]
    (edit,) = v.edits
    assert edit == ed.HeaderInsert(1 << 31, "X-A", "one\r\n\tBcc: victim@example.test\r\n\tbody?")


def test_the_milter_s_own_macro_lists_and_the_configured_ones():
    symlist = struct.pack(">I", mc.SMFIM_ENVFROM) + b"{client_addr} i\x00"
    m = Milter(optneg=pkt(b"O", struct.pack(">III", 6, 0, 0) + symlist))
    c = check(m.address, macros={"rcpt": ["{client_addr}"]})
    run_session(c)
    macros = {d[:1]: d[1:] for c_, d in m.got if c_ == mc.SMFIC_MACRO}
    assert macros[b"M"] == b"{client_addr}\x00192.0.2.7\x00"  # what it asked for (no queue id yet)
    assert macros[b"R"] == b"{client_addr}\x00192.0.2.7\x00"  # what the config says


@pytest.mark.parametrize("code, want", [(b"4", "421 4.7.0 Service shutting down"),
                                        (b"f", "421 4.7.0 Connection failed")])
def test_shutdown_and_connection_failure_close_the_session(code, want):
    m = Milter(answers={mc.SMFIC_MAIL: pkt(code)})
    c = check(m.address)
    c.connect(facts("connect"))
    v = c.mail(facts("mail"))
    assert v.action == "close" and str(v.reply) == want
    assert c.rcpt(facts("rcpt", recipient="b@example.test")).action == "close"


def test_skip_ends_the_body_and_change_header_zero_means_the_first():
    m = Milter(protocol=mc.SMFIP_SKIP, answers={
        mc.SMFIC_BODY: pkt(b"s"), mc.SMFIC_BODYEOB: pkt(b"m", struct.pack(">I", 0) + b"Subject\x00new\x00") + pkt(b"c")})
    v = run_session(check(m.address))[-1]
    assert v.edits == (ed.HeaderChange("Subject", 1, "new"),)
    assert m.commands().count(mc.SMFIC_BODY) == 1


def test_discard_at_the_end_is_a_quarantine_and_at_connect_an_error():
    m = Milter(answers={mc.SMFIC_BODYEOB: pkt(b"d")})
    v = run_session(check(m.address))[-1]
    assert v.action == "quarantine" and "discard" in v.reason
    m = Milter(answers={mc.SMFIC_CONNECT: pkt(b"d")})
    assert str(check(m.address).connect(facts("connect")).reply) == "451 4.7.1 Service unavailable - try again later"


def test_a_message_accepted_early_is_not_sent_and_the_next_is_aborted_first():
    m = Milter(answers={mc.SMFIC_RCPT: pkt(b"a")})
    c = check(m.address)
    c.connect(facts("connect"))
    c.mail(facts("mail"))
    assert c.rcpt(facts("rcpt", recipient="b@example.test")) is None
    assert c.rcpt(facts("rcpt", recipient="c@example.test")) is None  # not sent: accepted already
    assert c.data(facts("data")) is None
    c.mail(facts("mail"))
    assert m.commands() == b"OCMRAM"


def test_a_nul_cr_or_lf_from_the_client_never_breaks_a_packet():
    m = Milter()
    c = check(m.address)
    c.connect(facts("connect", ptr="host\x00.test"))
    c.helo(facts("helo", helo="a\x00b\r\nc"))
    c.mail(facts("mail", sender="x\x00y@sender.test"))
    c.rcpt(facts("rcpt", recipient="r\x00@example.test"))
    c.end_session(facts("end"))
    gevent.sleep(0.1)
    got = {cmd: data for cmd, data in m.got if cmd in (mc.SMFIC_CONNECT, mc.SMFIC_HELO, mc.SMFIC_MAIL, mc.SMFIC_RCPT)}
    assert got[mc.SMFIC_CONNECT].startswith(b"host?.test\x004")
    assert got[mc.SMFIC_HELO] == b"a?b??c\x00"  # a milter may copy it into a field it writes
    assert got[mc.SMFIC_MAIL] == b"<x?y@sender.test>\x00"
    assert got[mc.SMFIC_RCPT] == b"<r?@example.test>\x00"
