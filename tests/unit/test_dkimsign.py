"""geosmtp.dkim's signer and geosmtp.dkimcanon: the octets dkimpy writes for the same message,
key and time, on a table of awkward messages and on random ones; signatures that dkimpy and
OpenDKIM (opendkim-testmsg, Debian opendkim-tools) verify, and that fail once tampered with.

opendkim-testmsg asks the system resolver for the key and takes no server or port: it runs
in a mount namespace of its own (unshare -m) where /etc/resolv.conf names a DNS server
started here on port 53 of a loopback address picked at random (the tests run as root)."""
from __future__ import annotations

import base64
import random
import re
import shutil
import subprocess
import time

import dkim
import dkim.canonicalization
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnslib import QTYPE, RR, TXT
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from geosmtp import dkimcanon
from geosmtp.dkim import SIGNED_HEADERS, Signer, load_key

NOW = 1796000000.0
DOMAIN = "example.test"
SENDER = "alice@example.test"
HEAD = b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: hello\r\n"
DATE = b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\n"


class Keys:
    """One RSA-2048 and one Ed25519 key: PEM files for geosmtp, dkimpy's own forms, DNS records."""

    def __init__(self, directory):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa_pem = self.rsa.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.NoEncryption())
        self.ed_seed = self.ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
        self.files = {"rsa-sha256": directory / "rsa.pem", "ed25519-sha256": directory / "ed.pem"}
        self.files["rsa-sha256"].write_bytes(self.rsa_pem)
        self.files["ed25519-sha256"].write_bytes(self.ed.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        spki = self.rsa.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        raw = self.ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.records = {"rsa-sha256": "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode(),
                        "ed25519-sha256": "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()}

    def dkimpy_private(self, algorithm: str) -> bytes:
        return self.rsa_pem if algorithm == "rsa-sha256" else base64.b64encode(self.ed_seed)

    def signer(self, algorithm: str, domain: str = DOMAIN, selector: str = "sel") -> Signer:
        return Signer([load_key(domain, selector, self.files[algorithm], algorithm)])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(tmp_path_factory.mktemp("dkimsign"))


@pytest.fixture
def frozen_time(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)  # t= is signed: the same second both ways


def dkimpy_signature(message: bytes, keys: Keys, algorithm: str, domain: str = DOMAIN, selector: str = "sel") -> bytes:
    """What dkimpy writes, asked for the fields our signer picks (from its own parse)."""
    present = {name.lower() for name, _ in dkim.rfc822_parse(message)[0]}
    names = [name for name in SIGNED_HEADERS if name in present] + [b"from"]
    return dkim.sign(message, selector.encode(), domain.encode(), keys.dkimpy_private(algorithm),
                     canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=algorithm.encode(),
                     include_headers=names)


def records_lookup(keys: Keys, domain: str = DOMAIN, selector: str = "sel", algorithm: str = "rsa-sha256"):
    record = keys.records[algorithm].encode()
    return lambda name, timeout=5: record if name == f"{selector}._domainkey.{domain}.".encode() else None


MESSAGES = {
    "plain": HEAD + DATE + b"\r\nHello Bob,\r\n",
    "folded header, WSP runs and trailing WSP": (
        b"From: Alice\r\n  <alice@example.test>  \r\nSubject:  a \t folded\r\n\tsubject  \r\n"
        b"To:\tbob@remote.test\t\r\n\r\nbody\r\n"),
    "repeated fields, From twice": (
        b"From: first@example.test\r\nTo: a@remote.test\r\nSubject: one\r\nTo: b@remote.test\r\n"
        b"Subject: two\r\nFrom: second@example.test\r\n\r\nbody\r\n"),
    "empty body": HEAD + b"\r\n",
    "no empty line": HEAD,
    "no line end at all": HEAD.rstrip(b"\r\n"),
    "no line end after the body": HEAD + b"\r\nlast line",
    "trailing blank lines": HEAD + b"\r\nbody\r\n\r\n\r\n\r\n",
    "a body of blank and white lines": HEAD + b"\r\n\r\n   \r\n\t\r\n \t \r\n",
    "WSP runs in the body": HEAD + b"\r\na  b\t\tc   \r\n \t x \r\n\t\r\nend\t\r\n",
    "non-ASCII octets": (
        b"From: =?utf-8?q?Al=C3=A9?= <alice@example.test>\r\nSubject: caf\xc3\xa9 \xff\r\n"
        b"\r\nna\xefve  \xe9t\xe9 \r\n\x00\x7f\r\n"),
    "bare LF line ends": b"From: alice@example.test\nSubject: lf\n folded\n\nline one\nline two  \n\n",
    "mixed line ends": b"From: alice@example.test\r\nSubject: mixed\n\r\nCRLF\r\nLF\nCR LF again\r\n\n",
    "bare CR": b"From: alice@example.test\r\nSubject: a\rb \r\r\n\r\nx\ry\r\ntail \r\r\n\r\n",
    "CR at the end": HEAD + b"\r\nbody\r\r\n\r\n\r\n",
    "mbox From line": b"From alice@example.test Wed Dec  2 03:00:00 2026\r\n" + HEAD + b"\r\nbody\r\n",
    "odd field names": b"From: alice@example.test\r\nX-Odd:: value\r\n::\r\nX.y~z: 1\r\n\r\nbody\r\n",
    "empty and white values": b"From: alice@example.test\r\nCc:\r\nSubject: \t \r\n\r\nbody\r\n",
    "white continuation line": b"From: alice@example.test\r\nSubject: a\r\n \r\n\tb\r\n\r\nbody\r\n",
    "no header section": b"\r\nonly a body\r\n",
    "many signed fields": HEAD + DATE + (
        b"Message-ID: <1@example.test>\r\nReply-To: r@example.test\r\nCc: c@remote.test\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"In-Reply-To: <0@remote.test>\r\nReferences: <0@remote.test>\r\nList-Id: <l.example.test>\r\n"
        b"List-Unsubscribe: <mailto:u@example.test>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Received: from x by y; Wed, 2 Dec 2026 03:00:00 +0000\r\n\r\nbody\r\n"),
    "100 KB body": HEAD + b"\r\n" + b"".join(b"line %d  with\ttabs \r\n" % i for i in range(5000)),
}


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
@pytest.mark.parametrize("case", list(MESSAGES))
def test_the_very_octets_dkimpy_writes(keys, frozen_time, case, algorithm):
    message = MESSAGES[case]
    ours = keys.signer(algorithm).sign(message, SENDER)
    assert ours == dkimpy_signature(message, keys, algorithm)
    assert ours.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode() + b"; c=relaxed/relaxed;")
    if algorithm == "rsa-sha256":
        assert dkim.verify(ours + message, dnsfunc=records_lookup(keys))


def test_two_keys_of_a_domain_sign_once_each(keys, frozen_time):
    signer = Signer([load_key(DOMAIN, "sel", keys.files[a], a) for a in ("rsa-sha256", "ed25519-sha256")])
    message = MESSAGES["many signed fields"]
    assert signer.sign(message, SENDER) == (dkimpy_signature(message, keys, "rsa-sha256")
                                           + dkimpy_signature(message, keys, "ed25519-sha256"))


@pytest.mark.parametrize("message", [
    HEAD + b"Not a field\r\n\r\nbody\r\n",
    HEAD + b"Subject : a space before the colon\r\n\r\nbody\r\n",
    b" folded first\r\n" + HEAD + b"\r\nbody\r\n",
    HEAD + b": no name\r\n\r\nbody\r\n",
])
def test_a_header_section_dkimpy_refuses_is_refused(keys, message):
    with pytest.raises(Exception):
        dkimpy_signature(message, keys, "rsa-sha256")
    with pytest.raises(dkimcanon.MessageFormatError):
        keys.signer("rsa-sha256").sign(message, SENDER)


FRAGMENTS = [b"a", b"Z", b"0", b" ", b"\t", b"  ", b"\r\n", b"\r", b"\n", b"\xe9", b":", b"\r\n ", b"\r\n\t",
             b";", b"=", b"\r\n\r\n", b"\x00"]


def random_message(rng: random.Random) -> bytes:
    fields = []
    for _ in range(rng.randint(0, 6)):
        name = rng.choice([b"Subject", b"To", b"from", b"X-A", b"Cc"])
        value = b"".join(rng.choice(FRAGMENTS[:9] + [b"\r\n ", b"\r\n\t"]) for _ in range(rng.randint(0, 12)))
        fields.append(name + rng.choice([b":", b": "]) + value.replace(b"\r\n\r\n", b"\r\n x") + b"\r\n")
    body = b"".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40)))
    return b"".join(fields) + b"\r\n" + body


def test_random_messages_read_as_dkimpy_reads_them():
    """Fields and body canonicalised, compared with dkimpy's own functions; a header section
    one refuses, the other refuses too."""
    rng = random.Random(6376)
    relaxed = dkim.canonicalization.Relaxed
    compared = 0
    for _ in range(3000):
        message = random_message(rng)
        try:
            headers, body = dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError):
            with pytest.raises(dkimcanon.MessageFormatError):
                dkimcanon.split(message)
            continue
        fields, our_body = dkimcanon.split(message)
        assert fields == [(n, v.rstrip(b"\r\n")) for n, v in relaxed.canonicalize_headers(headers)], message
        assert dkimcanon.relaxed_body(our_body) == relaxed.canonicalize_body(body), message
        compared += 1
    assert compared > 2000


def test_header_selection_is_bottom_up(keys):
    fields = [(b"from", b"1"), (b"to", b"a"), (b"from", b"2"), (b"to", b"b")]
    assert dkimcanon.select(fields, [b"to", b"from", b"from", b"from", b"cc"]) == [
        (b"to", b"b"), (b"from", b"2"), (b"from", b"1")]


@pytest.mark.parametrize("domain_length", [5, 20, 40, 55, 58, 60, 63, 64, 70, 80, 120])
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_long_domains_fold_into_lines_dkimpy_verifies(keys, domain_length, algorithm):
    """Only base64 is cut to fit a line: a domain longer than a line makes the line longer
    (dkimpy cut it, which broke d= and i=, and could leave a line of spaces alone)."""
    labels, rest = [], domain_length - len(".test")
    while rest > 0:
        labels.append("d" * min(rest, 63))
        rest -= 64
    domain = ".".join(labels + ["test"])
    message = b"From: alice@" + domain.encode() + b"\r\nSubject: s\r\n" + DATE + b"\r\nbody\r\n"
    signature = keys.signer(algorithm, domain=domain).sign(message, SENDER)
    lines = signature.split(b"\r\n")
    assert lines[-1] == b"" and all(line.strip() for line in lines[:-1]), signature
    assert all(len(line) <= 74 or b" " not in line.strip() for line in lines), signature
    assert f"d={domain};".encode() in signature and f"i=@{domain};".encode() in signature
    if algorithm == "rsa-sha256":
        assert dkim.verify(signature + message, dnsfunc=records_lookup(keys, domain))
    if domain_length <= 55:  # below where dkimpy's folding went wrong, the same octets
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "time", lambda: NOW)
            assert keys.signer(algorithm, domain=domain).sign(message, SENDER) == \
                dkimpy_signature(message, keys, algorithm, domain=domain)


# -- OpenDKIM ---------------------------------------------------------------------------------
class _Records(BaseResolver):
    def __init__(self, records: dict[str, str]):
        self.records = records

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).lower()
        if request.q.qtype == QTYPE.TXT and name in self.records:
            value = self.records[name].encode()
            strings = [value[i:i + 255] for i in range(0, len(value), 255)]
            reply.add_answer(RR(name, QTYPE.TXT, ttl=60, rdata=TXT(strings)))
        return reply


@pytest.fixture
def port53_dns(tmp_path):
    """(records dict to fill, resolv.conf path): a DNS server on <random 127.x.y.z>:53."""
    records: dict[str, str] = {}
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", False)
    rng = random.Random()
    servers: list[DNSServer] = []
    for _ in range(20):
        address = f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}"
        try:
            for tcp in (False, True):
                servers.append(DNSServer(_Records(records), address=address, port=53, logger=quiet, tcp=tcp))
            break
        except OSError:  # taken (another test's): another address
            for s in servers:
                s.server.server_close()
            servers = []
    assert servers, "no loopback address with port 53 free for UDP and TCP"
    for s in servers:
        s.start_thread()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:2\n")
    yield records, resolv
    for s in servers:
        s.stop()
        s.server.server_close()


def opendkim_verifies(message: bytes, resolv) -> tuple[bool, str]:
    tool = shutil.which("opendkim-testmsg", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert tool, "opendkim-testmsg is missing: apt-get install opendkim-tools"
    out = subprocess.run(["unshare", "--mount", "sh", "-c", f'mount --bind "$0" /etc/resolv.conf && exec "$1"',
                          str(resolv), tool], input=message, capture_output=True, timeout=60)
    return out.returncode == 0, out.stderr.decode(errors="replace")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_verifies_our_signatures(keys, port53_dns, algorithm):
    records, resolv = port53_dns
    long_domain = "d" * 63 + ".example.test"  # cut tokens in the field's folding
    for domain in (DOMAIN, long_domain):
        records[f"sel._domainkey.{domain}."] = keys.records[algorithm]
        for case in ("many signed fields", "WSP runs in the body", "trailing blank lines", "non-ASCII octets"):
            message = MESSAGES[case].replace(b"example.test", domain.encode())
            if b"\r\nDate:" not in message:  # libopendkim will not read a message without a Date
                message = message.replace(b"\r\n", b"\r\n" + DATE, 1)
            signed = keys.signer(algorithm, domain=domain).sign(message, SENDER) + message
            ok, err = opendkim_verifies(signed, resolv)
            assert ok, (domain, case, err)
            changed_body = re.sub(rb"(\r\n\r\n.*?)[a-z]", rb"\1#", signed, count=1, flags=re.S)
            changed_subject = signed.replace(b"Subject: ", b"Subject: Re: ", 1)
            for tampered in (changed_body, changed_subject):
                assert tampered != signed
                ok, err = opendkim_verifies(tampered, resolv)
                assert not ok and "Bad signature" in err, (domain, case, err)
