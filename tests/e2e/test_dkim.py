"""End to end: DKIM signing (RFC 6376, RFC 8463) of relayed mail, checked with dkimpy.

Keys are made here with `openssl` (RSA 2048 and Ed25519), configured as [[dkim.key]] and
published as TXT records at <selector>._domainkey.example.test in the fake DNS; dkimpy
verifies what arrives at the fake MX by asking that same fake DNS.

tests/support/toml.py cannot write a list of tables inside a table ({"dkim": {"key": [..]}}
raises TypeError), so the [[dkim.key]] entries are appended to the written config here.
"""
from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import dkim
import dns.resolver
import pytest

from geosmtp.dkim import Signer, load_key
from tests.support.e2e import connect, queue_id, send_message
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import FakeMX, pick_port
from tests.support.server import PASSWORDS, ServerProcess

MX1 = "127.0.0.10"
DOMAIN = "example.test"
RSA_SELECTOR, ED_SELECTOR = "rsa2048", "ed2024"
SENDER = "alice@example.test"


# -- keys -------------------------------------------------------------------------------------
def openssl(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True, timeout=60).stdout


class KeyPair:
    def __init__(self, path: Path, algorithm: str, selector: str):
        self.path, self.algorithm, self.selector = path, algorithm, selector
        spki = openssl("pkey", "-in", str(path), "-pubout", "-outform", "DER")
        if algorithm == "ed25519-sha256":
            assert len(spki) == 44  # SPKI prefix (12 bytes) + the raw 32-byte public key
            self.txt = "v=DKIM1; k=ed25519; p=" + base64.b64encode(spki[-32:]).decode()
        else:
            self.txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()

    def entry(self) -> dict:
        return {"domain": DOMAIN, "selector": self.selector, "key_file": str(self.path),
                "algorithm": self.algorithm}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("dkim-keys")
    rsa, ed = d / "rsa.pem", d / "ed25519.pem"
    openssl("genrsa", "-out", str(rsa), "2048")
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(ed))
    return {"rsa": KeyPair(rsa, "rsa-sha256", RSA_SELECTOR), "ed": KeyPair(ed, "ed25519-sha256", ED_SELECTOR)}


# -- the fake internet and the server ---------------------------------------------------------
@pytest.fixture
def fake_dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def mx(fake_dns):
    with FakeMX(MX1, pick_port([MX1]), name="mx1.remote.test") as m:
        fake_dns.mx("remote.test", [(10, "mx1.remote.test")])
        fake_dns.a("mx1.remote.test", MX1)
        yield m


def relay_config(dns_: FakeDNS, port: int) -> dict:
    return {
        "relay": {"dns_servers": [dns_.address], "port": port, "connect_timeout": 2,
                  "command_timeout": 3, "data_timeout": 3, "dns_timeout": 2},
        "queue": {"scan_interval": 0.2, "retry_schedule": [1]},
        # AUTH on the submission port without TLS (loopback only, for the test)
        "listeners": {"submission": {"allow_plaintext_auth": True}},
    }


def toml_table_array(name: str, items: list[dict]) -> str:
    out = []
    for item in items:
        out.append(f"\n[[{name}]]")
        out.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in item.items())
    return "\n".join(out) + "\n"


def dkim_server(root: Path, dns_: FakeDNS, port: int, entries: list[dict]) -> ServerProcess:
    """A ServerProcess (not started) whose config has these [[dkim.key]] entries."""
    srv = ServerProcess(root, relay_config(dns_, port))
    srv.config["dkim"] = {"key": entries}
    srv.config_path.write_text(srv.config_path.read_text() + toml_table_array("dkim.key", entries))
    return srv


@pytest.fixture
def server(tmp_path, fake_dns, mx, keys):
    fake_dns.txt(f"{RSA_SELECTOR}._domainkey.{DOMAIN}", keys["rsa"].txt)
    fake_dns.txt(f"{ED_SELECTOR}._domainkey.{DOMAIN}", keys["ed"].txt)
    srv = dkim_server(tmp_path / "srv", fake_dns, mx.port, [keys["rsa"].entry(), keys["ed"].entry()])
    srv.start()
    yield srv
    srv.stop()


def submit(srv: ServerProcess, rcpts, body: bytes, sender: str = SENDER, source: str | None = "127.0.0.2",
           port: int | None = None) -> str:
    with connect(port or srv.port, source=source) as c:
        return queue_id(send_message(c, sender, list(rcpts), body))


def message(subject: str, from_: str = "Alice <alice@example.test>") -> bytes:
    return (f"From: {from_}\r\nTo: bob@remote.test\r\nSubject: {subject}\r\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@example.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Hello Bob,\r\n.a line with a leading dot\r\n\r\n  trailing spaces   \r\n\r\n\r\n").encode()


# -- reading signatures -----------------------------------------------------------------------
def header_fields(data: bytes, name: bytes) -> list[bytes]:
    """The raw header fields called `name` (with their folded continuation lines)."""
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    fields = re.findall(rb"^[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", head, re.M)
    return [f for f in fields if f.split(b":", 1)[0].strip().lower() == name.lower()]


def tags(field: bytes) -> dict[str, str]:
    value = field.split(b":", 1)[1].decode()
    value = re.sub(r"\s+", "", value)
    return dict(part.split("=", 1) for part in value.split(";") if part)


def dns_lookup(fake: FakeDNS):
    """A dkimpy dnsfunc asking the fake DNS (with dnspython, over UDP then TCP)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = fake.port
    resolver.lifetime = resolver.timeout = 2.0
    asked: list[str] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name.decode())
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    dnsfunc.asked = asked
    return dnsfunc


def verify_each(data: bytes, dnsfunc) -> list[bool]:
    """dkimpy's verdict on each signature, in header order (a verification error is False)."""
    n = len(header_fields(data, b"DKIM-Signature"))
    out = []
    for i in range(n):
        try:
            out.append(bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            out.append(False)
    return out


# -- the tests ----------------------------------------------------------------------------------
def test_relayed_mail_carries_rsa_and_ed25519_signatures_that_verify(server, mx, fake_dns):
    qid = submit(server, ["bob@remote.test"], message("signed"))
    [msg] = mx.wait_for_messages(1, timeout=15)
    data = msg.data
    sigs = header_fields(data, b"DKIM-Signature")
    assert len(sigs) == 2, data[:2000]
    assert data.startswith(b"DKIM-Signature:")  # in front of everything, Received: included
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only
    by_alg = {tags(s)["a"]: tags(s) for s in sigs}
    assert set(by_alg) == {"rsa-sha256", "ed25519-sha256"}
    assert by_alg["rsa-sha256"]["s"] == RSA_SELECTOR and by_alg["ed25519-sha256"]["s"] == ED_SELECTOR
    for t in by_alg.values():
        assert t["v"] == "1" and t["d"] == DOMAIN
        assert t["c"] == "relaxed/relaxed"
        signed = t["h"].lower().split(":")
        assert signed.count("from") == 2, signed  # From oversigned: a second From: breaks it
        assert {"subject", "date", "message-id", "to"} <= set(signed)
        assert "received" not in signed and "dkim-signature" not in signed
    dnsfunc = dns_lookup(fake_dns)
    assert verify_each(data, dnsfunc) == [True, True]
    assert dkim.verify(data, dnsfunc=dnsfunc)
    assert {f"{RSA_SELECTOR}._domainkey.{DOMAIN}.", f"{ED_SELECTOR}._domainkey.{DOMAIN}."} <= set(dnsfunc.asked)
    # the checks are real: a changed subject, body or an added From: fails both
    assert verify_each(data.replace(b"Subject: signed", b"Subject: changed"), dnsfunc) == [False, False]
    assert verify_each(data.replace(b"Hello Bob", b"Hello Eve"), dnsfunc) == [False, False]
    head, _, body = data.partition(b"\r\n\r\n")
    assert verify_each(head + b"\r\nFrom: mallory@evil.test\r\n\r\n" + body, dnsfunc) == [False, False]
    server.wait_for(lambda: not (server.spool / "msg" / qid).exists())


def test_relaxed_canonicalization_survives_whitespace_changes(server, mx, fake_dns):
    submit(server, ["bob@remote.test"], message("relaxed"))
    [msg] = mx.wait_for_messages(1, timeout=15)
    changed = msg.data.replace(b"Subject: relaxed", b"Subject:   relaxed").replace(
        b"trailing spaces   \r\n", b"trailing spaces\r\n")
    assert changed != msg.data
    assert verify_each(changed, dns_lookup(fake_dns)) == [True, True]


def test_authenticated_submission_is_signed(server, mx, fake_dns):
    c = connect(server.submission_port, source="127.0.0.1")
    try:
        token = base64.b64encode(f"\0{SENDER}\0{PASSWORDS[SENDER]}".encode()).decode()
        assert c.code(f"AUTH PLAIN {token}") == "235 2.7.0"
        queue_id(send_message(c, SENDER, ["bob@remote.test"], message("submitted")))
    finally:
        c.close()
    [msg] = mx.wait_for_messages(1, timeout=15)
    assert len(header_fields(msg.data, b"DKIM-Signature")) == 2
    assert verify_each(msg.data, dns_lookup(fake_dns)) == [True, True]


def test_untrusted_client_forwarded_mail_is_not_signed(server, mx):
    """127.0.0.1 is neither trusted nor authenticated: its mail to fwd@example.test (an alias
    forwarding to someone@remote.test) leaves through the relay, and a From: in our own
    domain must not earn it our signature."""
    submit(server, ["fwd@example.test"], message("forged", from_="alice@example.test"),
           sender="stranger@elsewhere.test", source="127.0.0.1")
    [msg] = mx.wait_for_messages(1, timeout=15)
    assert msg.rcpt_tos == ["someone@remote.test"]
    assert b"Subject: forged" in msg.data
    assert header_fields(msg.data, b"DKIM-Signature") == []


def test_mail_for_a_domain_without_a_key_is_relayed_unsigned(server, mx):
    submit(server, ["bob@remote.test"], message("nokey", from_="someone@unsigned.test"),
           sender="someone@unsigned.test")
    [msg] = mx.wait_for_messages(1, timeout=15)
    assert b"Subject: nokey" in msg.data
    assert header_fields(msg.data, b"DKIM-Signature") == []


def test_foreign_from_is_signed_for_the_envelope_senders_domain(server, mx, fake_dns):
    """No key for the From: domain: the envelope sender's domain (ours) signs instead."""
    submit(server, ["bob@remote.test"], message("fallback", from_="someone@unsigned.test"), sender=SENDER)
    [msg] = mx.wait_for_messages(1, timeout=15)
    sigs = header_fields(msg.data, b"DKIM-Signature")
    assert [tags(s)["d"] for s in sigs] == [DOMAIN, DOMAIN]
    assert verify_each(msg.data, dns_lookup(fake_dns)) == [True, True]


def test_a_retry_sends_the_same_signature_bytes(server, mx, fake_dns):
    answers = iter(["451 4.3.0 try again later"])
    mx.final_reply = lambda m: next(answers, "250 2.0.0 Ok: queued")
    qid = submit(server, ["bob@remote.test"], message("retried"))
    [msg] = mx.wait_for_messages(1, timeout=20)  # the retry comes after about a second
    assert [t.reply[:3] for t in mx.transactions] == ["451", "250"]
    first, second = (header_fields(t.data, b"DKIM-Signature") for t in mx.transactions)
    assert len(first) == 2
    assert first == second  # byte for byte: signed once, kept with the spool entry
    assert mx.transactions[0].data == mx.transactions[1].data
    assert verify_each(msg.data, dns_lookup(fake_dns)) == [True, True]
    server.wait_for(lambda: not (server.spool / "msg" / qid).exists())


def test_a_retry_after_a_restart_sends_the_same_signature_bytes(server, mx, fake_dns):
    mx.final_reply = "451 4.3.0 try again later"
    submit(server, ["bob@remote.test"], message("restarted"))
    mx.wait_for(lambda: len(mx.transactions) >= 1, 15)
    server.stop()
    mx.final_reply = "250 2.0.0 Ok: queued"
    server.start()
    [msg] = mx.wait_for_messages(1, timeout=20)
    sigs = [header_fields(t.data, b"DKIM-Signature") for t in mx.transactions]
    assert all(s == sigs[0] for s in sigs) and len(sigs[0]) == 2
    assert verify_each(msg.data, dns_lookup(fake_dns)) == [True, True]


@pytest.mark.parametrize("problem", ["garbage", "missing", "wrong-algorithm", "ed25519-as-rsa", "public-key",
                                     "encrypted", "short-rsa"])
def test_a_bad_key_file_stops_the_server_from_starting(tmp_path, fake_dns, keys, problem):
    bad = tmp_path / f"bad-{problem}.pem"
    algorithm = "rsa-sha256"
    if problem == "garbage":
        bad.write_text("this is not a key\n")
    elif problem == "wrong-algorithm":  # an RSA key said to be ed25519
        bad.write_bytes(keys["rsa"].path.read_bytes())
        algorithm = "ed25519-sha256"
    elif problem == "ed25519-as-rsa":  # algorithm left at its default, rsa-sha256
        bad.write_bytes(keys["ed"].path.read_bytes())
    elif problem == "public-key":
        bad.write_bytes(openssl("pkey", "-in", str(keys["rsa"].path), "-pubout"))
    elif problem == "encrypted":
        bad.write_bytes(openssl("pkey", "-in", str(keys["rsa"].path), "-aes256", "-passout", "pass:secret"))
    elif problem == "short-rsa":
        bad.write_bytes(openssl("genrsa", "512"))
    entry = {"domain": DOMAIN, "selector": "bad", "key_file": str(bad), "algorithm": algorithm}
    srv = dkim_server(tmp_path / "srv", fake_dns, 2525, [keys["ed"].entry(), entry])
    with pytest.raises(RuntimeError) as exc:
        srv.start(timeout=20)
    try:
        assert srv.proc.returncode not in (None, 0)
        assert str(bad) in srv.log(), srv.log()[-2000:]
        assert "Traceback" not in srv.log()
    finally:
        srv.kill()
    assert "server exited" in str(exc.value)


def sign_and_verify(key_file: Path, algorithm: str, selector: str, txt: str) -> bool:
    signer = Signer([load_key(DOMAIN, selector, key_file, algorithm)])
    msg = message("unit")
    signed = signer.sign(msg, SENDER) + msg
    records = {f"{selector}._domainkey.{DOMAIN}.".encode(): txt.encode()}
    return verify_each(signed, lambda name, timeout=5: records.get(name)) == [True]


def test_rsa_keys_in_pkcs1_and_pkcs8_both_load(keys, tmp_path):
    rsa = keys["rsa"]
    assert rsa.path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # openssl 3: PKCS#8
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(openssl("rsa", "-in", str(rsa.path), "-traditional"))
    assert pkcs1.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    for path in (rsa.path, pkcs1):
        assert sign_and_verify(path, rsa.algorithm, rsa.selector, rsa.txt)


def test_ed25519_key_with_crlf_line_ends_loads(keys, tmp_path):
    ed = keys["ed"]
    crlf = tmp_path / "ed-crlf.pem"
    crlf.write_bytes(ed.path.read_bytes().replace(b"\n", b"\r\n"))
    assert sign_and_verify(crlf, ed.algorithm, ed.selector, ed.txt)


def test_rsa_key_with_crlf_line_ends_loads(keys, tmp_path):
    """PEM allows CRLF (RFC 7468 2). At a1cbdd4 such an RSA key was refused with "rsa-sha256
    needs an RSA key (Private key not found)": dkimpy's parser wants LF."""
    rsa = keys["rsa"]
    crlf = tmp_path / "rsa-crlf.pem"
    crlf.write_bytes(rsa.path.read_bytes().replace(b"\n", b"\r\n"))
    assert sign_and_verify(crlf, rsa.algorithm, rsa.selector, rsa.txt)


def test_good_keys_load_and_signing_cost(keys):
    """Not a benchmark: print what one signature costs here, so a slow-down shows in -s."""
    body = message("cost") + b"x" * 70 * 1000 + b"\r\n"
    for which in ("rsa", "ed"):
        k = keys[which]
        signer = Signer([load_key(DOMAIN, k.selector, k.path, k.algorithm)])
        signer.sign(body, SENDER)  # warm up
        n = 5
        start = time.perf_counter()
        for _ in range(n):
            out = signer.sign(body, SENDER)
        per = (time.perf_counter() - start) / n
        assert out.startswith(b"DKIM-Signature:") and out.endswith(b"\r\n")
        print(f"\ndkim {k.algorithm}: {per * 1000:.1f} ms per ~70 KB message")


def test_sighup_loads_new_dkim_keys_for_the_next_message(tmp_path, fake_dns, mx, keys):
    """The signer is one of the parts a reload builds again: after SIGHUP with only the
    Ed25519 key left, the next message carries that one signature, and it verifies."""
    fake_dns.txt(f"{RSA_SELECTOR}._domainkey.{DOMAIN}", keys["rsa"].txt)
    fake_dns.txt(f"{ED_SELECTOR}._domainkey.{DOMAIN}", keys["ed"].txt)
    srv = dkim_server(tmp_path / "srv", fake_dns, mx.port, [keys["rsa"].entry()])
    srv.start()
    try:
        submit(srv, ["bob@remote.test"], message("before"))
        [before] = mx.wait_for_messages(1, timeout=15)
        assert [tags(s)["s"] for s in header_fields(before.data, b"DKIM-Signature")] == [RSA_SELECTOR]
        text = srv.config_path.read_text()
        srv.config_path.write_text(text[:text.index("\n[[dkim.key]]")] + toml_table_array("dkim.key", [keys["ed"].entry()]))
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(lambda: "reload: configuration from" in srv.log())
        submit(srv, ["bob@remote.test"], message("after"))
        msgs = mx.wait_for_messages(2, timeout=15)
        after = next(m for m in msgs if b"Subject: after" in m.data)
        assert [tags(s)["s"] for s in header_fields(after.data, b"DKIM-Signature")] == [ED_SELECTOR]
        assert verify_each(after.data, dns_lookup(fake_dns)) == [True]
    finally:
        srv.stop()
