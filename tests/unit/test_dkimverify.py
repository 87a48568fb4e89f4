"""The "dkim" check against a real DNS server (FakeDNS) with keys made here, signed by dkimpy:
every outcome of RFC 6376 verification as RFC 8601 names it, and hostile input bounded."""
from __future__ import annotations

import base64
import io
import ipaddress
import itertools
import random

import dkim
import dns.resolver
import pytest

from geosmtp.checks.authresults import format_header
from geosmtp.checks.dkimverify import DKIMCheck
from geosmtp.checks.dns import DNS
from geosmtp.checks.interface import CheckContext, Facts
from geosmtp.checks.registry import CheckError, validate_options
from tests.support.dkimkeys import Ed25519Key, RSAKey
from tests.support.dkimkeys import sign as signed_by
from tests.support.fakedns import FakeDNS
from tests.unit.test_dkimsign import FRAGMENTS, MESSAGES, random_message

DOMAIN = "signer.test"
BODY = b"Hello,\r\n\r\nthis is the body.\r\n"
MESSAGE = (b"From: Alice <alice@signer.test>\r\nTo: bob@example.test\r\nSubject: greetings\r\n"
           b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <1@signer.test>\r\n\r\n" + BODY)
_selectors = itertools.count()


@pytest.fixture(scope="module")
def fake_dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture(scope="module")
def rsa_key():
    return RSAKey(2048)


@pytest.fixture(scope="module")
def ed_key():
    return Ed25519Key()


def selector() -> str:
    """A fresh selector per signature: no answer of one test is another's."""
    return f"s{next(_selectors)}"


def publish(fake_dns, key, domain=DOMAIN) -> str:
    sel = selector()
    fake_dns.txt(f"{sel}._domainkey.{domain}", key.record)
    return sel


def sign(message: bytes, key, sel: str, domain: str = DOMAIN, **kw) -> bytes:
    return signed_by(message, key, sel, domain, **kw)


def check(fake_dns, **options) -> DKIMCheck:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = fake_dns.port
    r.timeout = r.lifetime = 2.0
    ctx = CheckContext(hostname="mx.example.test", dns=DNS(r))
    return DKIMCheck(validate_options(DKIMCheck, options), ctx)


def facts(message: bytes) -> Facts:
    return Facts(phase="data", listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.1"),
                 trusted=False, hostname="mx.example.test", open_message=lambda: io.BytesIO(message))


def run(fake_dns, message: bytes, **options):
    verdict = check(fake_dns, **options).data(facts(message))
    assert verdict.action == "accept"
    return verdict


def outcome(verdict) -> list[tuple[str, str]]:
    return [(a.result, a.reason or "") for a in verdict.auth]


# -- the good cases ----------------------------------------------------------------------
def test_rsa_signature_passes(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel)
    v = run(fake_dns, signed)
    (a,) = v.auth
    assert (a.method, a.result, a.reason) == ("dkim", "pass", None)
    props = dict(a.properties)
    b_tag = dkim.util.parse_tag_value(signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1].split(b"\r\nFrom:")[0])[b"b"]
    assert props == {"header.d": DOMAIN, "header.s": sel,
                     "header.b": b"".join(b_tag.split())[:8].decode()}
    assert v.results == {"dkim": [{"result": "pass", "domain": DOMAIN, "selector": sel}]}
    assert f"dkim=pass header.d={DOMAIN} header.s={sel} header.b=" in format_header("mx.example.test", v.auth)


def test_ed25519_signature_passes(fake_dns, ed_key):
    sel = publish(fake_dns, ed_key)
    v = run(fake_dns, sign(MESSAGE, ed_key, sel))
    assert outcome(v) == [("pass", "")]


def test_rsa_and_ed25519_signatures_each_get_an_entry(fake_dns, rsa_key, ed_key):
    sel_rsa, sel_ed = publish(fake_dns, rsa_key), publish(fake_dns, ed_key)
    signed = sign(sign(MESSAGE, rsa_key, sel_rsa), ed_key, sel_ed)  # ed25519 on top
    v = run(fake_dns, signed)
    assert [(r["result"], r["selector"]) for r in v.results["dkim"]] == [("pass", sel_ed), ("pass", sel_rsa)]


def test_relaxed_canonicalization_survives_refolding_and_lf_lines(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel, canonicalize=(b"relaxed", b"relaxed"))
    refolded = signed.replace(b"Subject: greetings", b"Subject:   greetings ").replace(b"\r\n", b"\n")
    assert outcome(run(fake_dns, refolded)) == [("pass", "")]


# -- what breaks a signature ------------------------------------------------------------
def test_body_altered_fails_with_body_hash(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel).replace(b"this is the body", b"this is the b0dy")
    assert outcome(run(fake_dns, signed)) == [("fail", "body hash did not verify")]


def test_signed_header_altered_fails(fake_dns, ed_key):
    sel = publish(fake_dns, ed_key)
    signed = sign(MESSAGE, ed_key, sel).replace(b"Subject: greetings", b"Subject: pay now")
    assert outcome(run(fake_dns, signed)) == [("fail", "signature did not verify")]


def test_second_from_added_after_signing_fails(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel).replace(b"\r\n\r\n", b"\r\nFrom: ceo@bank.test\r\n\r\n", 1)
    assert outcome(run(fake_dns, signed))[0][0] == "fail"


def test_missing_key_is_permerror(fake_dns, rsa_key):
    signed = sign(MESSAGE, rsa_key, selector())  # nothing published
    v = run(fake_dns, signed)
    assert outcome(v) == [("permerror", "no key for signature")]
    assert v.results["dkim"][0]["result"] == "permerror"


def test_revoked_key_is_permerror(fake_dns, rsa_key):
    sel = selector()
    fake_dns.txt(f"{sel}._domainkey.{DOMAIN}", "v=DKIM1; k=rsa; p=")
    assert outcome(run(fake_dns, sign(MESSAGE, rsa_key, sel))) == [("permerror", "key revoked")]


@pytest.mark.parametrize("record, reason", [
    ("v=DKIM1; k=rsa; p=!!!not-base64!!!", "key record: "),
    ("v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30\x03junk").decode(), "key record: "),
    ("this is no tag list", "key record syntax"),
    ("v=DKIM1; k=rsa", "key record has no p="),
    ("v=DKIM2; k=rsa; p=AAAA", "key record version is not DKIM1"),
    ("v=DKIM1; k=dsa; p=AAAA", "key record: "),
    ("\x00\r\n; p=;;", "key record syntax"),
])
def test_junk_key_record_is_permerror(fake_dns, rsa_key, record, reason):
    sel = selector()
    fake_dns.txt(f"{sel}._domainkey.{DOMAIN}", record)
    ((result, why),) = outcome(run(fake_dns, sign(MESSAGE, rsa_key, sel)))
    assert result == "permerror" and why.startswith(reason), why


def test_key_of_another_type_is_permerror(fake_dns, rsa_key, ed_key):
    sel = selector()
    fake_dns.txt(f"{sel}._domainkey.{DOMAIN}", ed_key.record)  # an ed25519 key for an rsa signature
    assert outcome(run(fake_dns, sign(MESSAGE, rsa_key, sel))) == [("permerror", "key type does not match a=")]


def test_key_hash_restriction_is_honoured(fake_dns, rsa_key):
    sel = selector()
    fake_dns.txt(f"{sel}._domainkey.{DOMAIN}", rsa_key.record + "; h=sha1")
    assert outcome(run(fake_dns, sign(MESSAGE, rsa_key, sel))) == [
        ("permerror", "key h= does not allow the signature's hash")]


def test_long_key_record_in_several_strings(fake_dns):
    big = RSAKey(4096)  # its record is over 255 octets: several character-strings
    assert len(big.record) > 600
    sel = publish(fake_dns, big)
    assert outcome(run(fake_dns, sign(MESSAGE, big, sel))) == [("pass", "")]


def test_dns_failure_is_temperror(fake_dns, rsa_key):
    sel = selector()
    fake_dns.servfail(f"{sel}._domainkey.{DOMAIN}")
    ((result, why),) = outcome(run(fake_dns, sign(MESSAGE, rsa_key, sel)))
    assert result == "temperror" and why.startswith("key lookup"), why


def test_rsa_sha1_is_not_accepted(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel, signature_algorithm=b"rsa-sha1")
    assert outcome(run(fake_dns, signed)) == [("policy", "rsa-sha1 is not accepted (RFC 8301)")]


# -- hostile and broken input -----------------------------------------------------------
@pytest.mark.parametrize("field, reason", [
    (b"DKIM-Signature: this is not a tag list\r\n", "signature syntax: "),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; s=x; h=from; bh=AAAA\r\n", "signature: missing b"),
    (b"DKIM-Signature: v=1; a=rsa-md5; d=signer.test; s=x; h=from; bh=AAAA; b=AAAA\r\n", "signature: unknown"),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; i=@evil.test; s=x; h=from; bh=AAAA; b=AAAA\r\n",
     "signature: i= domain"),
    (b"DKIM-Signature: v=1; v=1; d=signer.test\r\n", "signature syntax: "),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; s=x; h=from; bh=AAAA; b=AAAA; x=12\r\n", "signature: x="),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=sig\x00ner.test\r\n\t; s=x\r\n", "signature: missing"),
])
def test_malformed_signature_is_neutral_with_no_dns(fake_dns, field, reason):
    fake_dns.reset_queries()
    v = run(fake_dns, field + MESSAGE)
    ((result, why),) = outcome(v)
    assert result == "neutral" and why.startswith(reason), why
    assert not [q for q in fake_dns.queries if "_domainkey" in q[0]]
    header = format_header("mx.example.test", v.auth)
    assert "\x00" not in header and "\r\n\t" in header and header.count("\r") == header.count("\r\n\t")


def test_control_characters_in_d_never_reach_the_header(fake_dns):
    v = run(fake_dns, b"DKIM-Signature: v=1; a=rsa-sha256; d=a\x01b\x7fc.test; s=x\x00y; h=from; bh=AAAA; b=AAAA\r\n"
                      + MESSAGE)
    header = format_header("mx.example.test", v.auth)
    assert not any(c in header.replace("\r\n\t", "") for c in "\x00\x01\x7f\r\n")


def test_too_many_signatures_are_policy(fake_dns, ed_key):
    sels = [publish(fake_dns, ed_key) for _ in range(7)]
    signed = MESSAGE
    for sel in sels:
        signed = sign(signed, ed_key, sel)
    fake_dns.reset_queries()
    v = run(fake_dns, signed, max_signatures=5)
    results = [r["result"] for r in v.results["dkim"]]
    assert results == ["pass"] * 5 + ["policy"] * 2
    assert len([q for q in fake_dns.queries if "_domainkey" in q[0]]) == 5  # the 2 extra cost nothing
    assert v.auth[-1].reason == "more than 5 signatures: not verified"


def test_huge_header_section_is_not_parsed(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel)
    filler = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"x" * 60) for i in range(13000))  # ~1 MB
    fake_dns.reset_queries()
    v = run(fake_dns, signed.replace(b"\r\n\r\n", b"\r\n" + filler + b"\r\n", 1))
    assert outcome(v) == [("neutral", "header section too large to verify")]
    assert v.results["dkim"] == [{"result": "neutral", "domain": DOMAIN, "selector": sel}]
    assert not fake_dns.queries


def test_huge_header_without_signature_in_reach(fake_dns):
    v = run(fake_dns, b"X-Long: " + b"y" * (2 * 1024 * 1024) + b"\r\n" + MESSAGE)  # one 2 MB line
    assert [(a.result, a.reason) for a in v.auth] == [("neutral", "header section over 65536 octets, not verified")]
    assert v.results == {"dkim": []}


def test_header_size_limit_is_an_option(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    signed = sign(MESSAGE, rsa_key, sel)
    padded = signed.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n", 1)
    assert outcome(run(fake_dns, padded, max_header_size=2048))[0][0] == "neutral"
    assert outcome(run(fake_dns, padded, max_header_size=8192)) == [("pass", "")]


def test_header_dkimpy_cannot_parse_is_neutral(fake_dns, rsa_key):
    sel = publish(fake_dns, rsa_key)
    broken = sign(MESSAGE, rsa_key, sel).replace(b"To: bob", b"no colon on this line\r\nTo: bob", 1)
    ((result, why),) = outcome(run(fake_dns, broken))
    assert result == "neutral" and why.startswith("message header not parsable"), why


def test_unsigned_message_is_none(fake_dns):
    v = run(fake_dns, MESSAGE)
    assert [(a.method, a.result, a.properties) for a in v.auth] == [("dkim", "none", ())]
    assert v.results == {"dkim": []}


def test_empty_message_is_none(fake_dns):
    assert outcome(run(fake_dns, b"")) == [("none", "")]


def test_options_are_validated():
    with pytest.raises(CheckError, match="max_signatures"):
        validate_options(DKIMCheck, {"max_signatures": 0})
    with pytest.raises(CheckError, match="max_signature: Extra inputs"):
        validate_options(DKIMCheck, {"max_signature": 3})
    assert validate_options(DKIMCheck, {}) == {"max_signatures": 5, "max_header_size": 65536}


# -- a signer we did not write -----------------------------------------------------------
def test_message_signed_by_opendkim(fake_dns, tmp_path, rsa_key):
    """OpenDKIM's library signs (opendkim-testmsg, Debian opendkim-tools). That tool signs
    only with rsa-sha1, which RFC 8301 forbids verifiers to accept: we say "policy", while
    dkimpy itself, asked through the same DNS, finds the very signature valid (so "policy"
    is the RFC's rule, not a signature we failed to read)."""
    import shutil
    import subprocess
    tool = shutil.which("opendkim-testmsg", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert tool, "opendkim-testmsg is missing: apt-get install opendkim-tools"
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(rsa_key.private)
    sel = publish(fake_dns, rsa_key)
    out = subprocess.run([tool, "-C", "-d", DOMAIN, "-s", sel, "-k", str(key_file)], input=MESSAGE,
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    signed = out.stdout
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha1; c=relaxed/simple; d=signer.test; s=" + sel.encode())
    v = run(fake_dns, signed)
    assert outcome(v) == [("policy", "rsa-sha1 is not accepted (RFC 8301)")]
    assert v.results["dkim"] == [{"result": "policy", "domain": DOMAIN, "selector": sel}]
    key_dns = check(fake_dns).context.dns
    lookup = lambda name, timeout=5: key_dns.txt(name.decode().rstrip("."))[0]  # noqa: E731
    assert dkim.verify(signed, dnsfunc=lookup, minkey=1024)
    assert not dkim.verify(signed.replace(b"greetings", b"greetingz"), dnsfunc=lookup, minkey=1024)


@pytest.fixture
def opendkim(tmp_path, rsa_key):
    """The OpenDKIM milter (Debian opendkim) signing for signer.test with rsa-sha256,
    started here on its own port; stopped after the test."""
    import shutil
    import socket
    import subprocess
    import time

    from tests.support.server import free_port
    binary = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert binary, "opendkim is missing: apt-get install opendkim"
    port = free_port()
    key_file = tmp_path / "signer.pem"
    key_file.write_bytes(rsa_key.private)
    key_file.chmod(0o600)
    sel = selector()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode s\nDomain {DOMAIN}\nSelector {sel}\nKeyFile {key_file}\n"
                    f"Socket inet:{port}@127.0.0.1\nSignatureAlgorithm rsa-sha256\n"
                    "Canonicalization relaxed/simple\nSyslog no\nRequireSafeKeys no\n"
                    f"PidFile {tmp_path / 'opendkim.pid'}\nBackground no\nUMask 077\n")
    proc = subprocess.Popen([binary, "-f", "-x", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "opendkim did not listen in 10s"
                time.sleep(0.05)
        yield port, sel
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("tamper", [False, True])
def test_message_signed_by_the_opendkim_milter(fake_dns, rsa_key, opendkim, tamper):
    from tests.support.milter import milter_headers
    port, sel = opendkim
    fake_dns.txt(f"{sel}._domainkey.{DOMAIN}", rsa_key.record)
    added = milter_headers("127.0.0.1", port, "alice@signer.test", "bob@example.test", MESSAGE)
    (value,) = [v for n, v in added if n.lower() == "dkim-signature"]
    assert "a=rsa-sha256" in value and f"s={sel}" in value, value
    signed = b"DKIM-Signature: " + value.replace("\r\n", "\n").replace("\n", "\r\n").encode() + b"\r\n" + MESSAGE
    if tamper:
        signed = signed.replace(b"this is the body", b"this is the b0dy")
    v = run(fake_dns, signed)
    assert outcome(v) == ([("fail", "body hash did not verify")] if tamper else [("pass", "")])
    assert dict(v.auth[0].properties)["header.s"] == sel


# -- the same outcomes as dkimpy's verifier -----------------------------------------------
CANONS = [(b"simple", b"simple"), (b"simple", b"relaxed"), (b"relaxed", b"simple"), (b"relaxed", b"relaxed")]


def dkimpy_verdict(key, message: bytes) -> bool:
    """dkimpy's verify(), given the key record we published (a message it cannot parse
    does not verify)."""
    try:
        return dkim.verify(message, dnsfunc=lambda name, timeout=5: key.record.encode(), minkey=1024)
    except dkim.MessageFormatError:
        return False


def our_verdict(fake_dns, message: bytes) -> bool:
    return outcome(run(fake_dns, message)) == [("pass", "")]


@pytest.mark.parametrize("canon", CANONS, ids=lambda c: b"/".join(c).decode())
@pytest.mark.parametrize("length", [False, True], ids=["whole body", "l="])
@pytest.mark.parametrize("case", list(MESSAGES))
def test_every_canonicalisation_verifies_as_dkimpy_does(fake_dns, rsa_key, ed_key, canon, length, case):
    """Signed by dkimpy in each c= (and with l=): our check passes it, and fails it once a
    signed part is changed, exactly when dkimpy's verifier does."""
    key = ed_key if case.startswith("many") else rsa_key
    sel = publish(fake_dns, key)
    names = [b"from", b"to", b"subject", b"cc"]
    signed = sign(MESSAGES[case], key, sel, canonicalize=canon, length=length, include_headers=names)
    # two From fields and one signed: a From added above the signed one, which fails
    assert our_verdict(fake_dns, signed) == dkimpy_verdict(key, signed) == (case != "repeated fields, From twice")
    for tampered in (signed + b"appended line\r\n", signed.replace(b"Subject:", b"Subject: x", 1),
                     signed.replace(b"\r\n\r\n", b"\r\n\r\n\r\n", 1), signed.replace(b"  ", b" "),
                     signed.replace(b"From:", b"from:", 1), b"From: eve@else.test\r\n" + signed):
        assert our_verdict(fake_dns, tampered) == dkimpy_verdict(key, tampered), tampered


def test_random_messages_and_changes_verify_as_dkimpy_says(fake_dns, rsa_key):
    """Random messages, signed in a random c= (with l= or not), then changed at a random
    place by a random fragment: our verdict is dkimpy's every time."""
    rng = random.Random(8463)
    sel = publish(fake_dns, rsa_key)
    compared = passed = 0
    for _ in range(700):
        message = random_message(rng)
        try:
            signed = sign(message, rsa_key, sel, canonicalize=rng.choice(CANONS), length=rng.random() < 0.3,
                          include_headers=[b"from", b"subject", b"to"])
        except Exception:  # a header section dkimpy will not sign
            continue
        at = rng.randrange(len(signed) + 1)
        changed = signed[:at] + rng.choice(FRAGMENTS) + signed[at:] if rng.random() < 0.7 else signed
        ours, theirs = our_verdict(fake_dns, changed), dkimpy_verdict(rsa_key, changed)
        assert ours == theirs, changed
        compared += 1
        passed += ours
    assert compared > 300 and 0.2 * compared < passed < compared  # both outcomes well tried


def test_the_b_value_is_taken_out_as_dkimpy_takes_it_out():
    from geosmtp.checks.dkimverify import _B_VALUE
    rng = random.Random(3)
    pieces = [b" ", b"\t", b"\r\n", b"b", b"=", b";", b"a", b"+", b"\n", b"\r", b"bh", b"Z9/"]
    for _ in range(5000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        assert _B_VALUE.sub(rb"\1", value) == dkim.RE_BTAG.sub(rb"\1", value), value
