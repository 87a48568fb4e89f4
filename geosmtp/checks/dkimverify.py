"""The "dkim" check: every DKIM-Signature of the message verified (RFC 6376), at end of DATA.

The message is read by geosmtp.dkimcanon (the octets dkimpy would hash, tested side by
side), its tags by geosmtp.dkimtags, hashed with hashlib, and the signature checked by
OpenSSL (`cryptography`); dkimpy still reads the key records (once per record). This module decides what each outcome means in
Authentication-Results terms (RFC 8601 2.7.1) and keeps hostile input bounded:

    pass       the signature verified
    fail       it was acceptable but did not verify (body hash or signature mismatch)
    neutral    it could not be processed: syntax errors in the signature, a header section
               over max_header_size, a message header that does not parse
    permerror  no key record, a revoked key (p= empty), a key record that is junk, a key
               that does not fit the signature (k=, h=, t=s), an RSA key under 1024 bits
    temperror  the key could not be fetched now (DNS timeout, SERVFAIL)
    policy     not accepted here: beyond max_signatures, rsa-sha1 (RFC 8301 3.1)
    none       the message has no signature (one "dkim=none" entry)

The work is split in three so that DNS never runs in a thread and the CPU never runs on the
hub: the message is parsed in the threadpool, the keys are fetched here on our resolver
(context.dns, with the greenlet's timeout), and the signatures are verified in the threadpool
with a dnsfunc that answers from the keys already fetched.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field

from geosmtp import dkimcanon, dkimcrypto, dkimtags
from geosmtp.checks import headers as hdr
from geosmtp.checks.dns import BadName, TempError
from geosmtp.checks.interface import AuthResult, Check, Facts, Verdict, safe_text

MIN_RSA_BITS = 1024  # RFC 8301 3.2: smaller keys MUST NOT be considered valid
B_PREFIX = 8  # characters of b= in header.b (RFC 6008 2: at least 8)
_WSP = re.compile(rb"\s+")
_BYTES_REPR = re.compile(r"b'([^']*)'")
_LOOSE_TAG = re.compile(rb"(?:^|;)\s*([ds])\s*=\s*([^;\s]*)")
_H_SEP = re.compile(rb"\s*:\s*")
# the b= tag's value, taken out of the signature's own field for its hash (RFC 6376 3.7):
# what dkimpy takes out (its folding white space is any run of \s; a test compares both
# on random input), in runs of base64 rather than one octet at a time, ten times faster
_B_VALUE = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")
dkimcrypto.use_openssl()  # dkimpy's key parser (evaluate_pk) on OpenSSL, each key parsed once


class DKIMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_signatures: int = Field(5, ge=1, le=50)  # more are recorded as "policy", not verified
    max_header_size: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)  # octets


@dataclass
class Signature:
    """One DKIM-Signature field and what became of it."""

    index: int  # among the message's DKIM-Signature fields, from the top (dkimpy's idx)
    domain: str = ""
    selector: str = ""
    b: str = ""
    tags: dict = field(default_factory=dict)
    result: str | None = None  # set as soon as it is known
    reason: str = ""

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def decide(self, result: str, reason: str = "") -> None:
        self.result, self.reason = result, reason

    def auth(self) -> AuthResult:
        props = tuple((k, v) for k, v in (("header.d", self.domain), ("header.s", self.selector),
                                          ("header.b", self.b)) if v)
        return AuthResult("dkim", self.result or "neutral", props, safe_text(self.reason, 200) or None)

    def fact(self) -> dict:
        return {"result": self.result or "neutral", "domain": self.domain.lower(), "selector": self.selector}


def _said(exc: Exception) -> str:
    """dkimpy's message without the b'...' of Python's bytes repr ("missing b'b'=" → "missing b=")."""
    return _BYTES_REPR.sub(r"\1", str(exc))


def _text(value: bytes) -> str:
    return safe_text(value.decode("utf-8", "replace"), 253)


def _loose_ids(value: bytes) -> tuple[str, str]:
    """d= and s= read from a field too broken for the tag-list parser, for the report only."""
    found = {m.group(1): m.group(2) for m in _LOOSE_TAG.finditer(_WSP.sub(b" ", value))}
    return _text(found.get(b"d", b"")), _text(found.get(b"s", b""))


# -- reading the message ------------------------------------------------------------------
def read_message(open_message, max_header: int) -> tuple[bytes, bool]:
    """(the message, True) or (the start of its header section, False) when the header
    section is over `max_header` octets; read in the threadpool."""
    with open_message() as fh:
        section = hdr.read_header_section(fh, max_header + 1)
        # ends with its blank line, or the message ends there (the probe reads past only
        # when the section is cut, and then nothing more is read)
        complete = section.endswith(b"\r\n\r\n") or section == b"\r\n" or not fh.read(1)
        if not complete or len(section) > max_header:
            return section[:max_header], False
        return section + fh.read(), True


def _signature_fields(section: bytes) -> list[bytes]:
    """The raw values of the DKIM-Signature fields, by our lenient parser (any bytes)."""
    return [section[f.start:f.end].partition(b":")[2] for f in hdr.parse_fields(section)
            if f.name.lower() == "dkim-signature"]


# -- the three steps ----------------------------------------------------------------------
class Parsed:
    """A message as the verifier reads it: the header fields as written (see
    dkimcanon.split_raw) and the canonical bodies' hashes, each computed once for all the
    signatures that ask for it."""

    def __init__(self, message: bytes):
        self.fields, self.body = dkimcanon.split_raw(message)  # MessageFormatError
        self._body_hashes: dict[tuple[bytes, int | None], bytes] = {}

    def signature_values(self) -> list[bytes]:
        return [value for lname, _, value in self.fields if lname == b"dkim-signature"]

    def body_hash(self, canon: bytes, length: int | None) -> bytes:
        key = (canon, length)
        if key not in self._body_hashes:
            body = (dkimcanon.relaxed_body if canon == b"relaxed" else dkimcanon.simple_body)(self.body)
            self._body_hashes[key] = hashlib.sha256(body if length is None else body[:length]).digest()
        return self._body_hashes[key]

    def header_hash(self, canon: bytes, names: list[bytes], index: int) -> bytes:
        """The SHA-256 of the fields `names` selects (RFC 6376 5.4.2) and of signature
        field `index` (among the DKIM-Signatures) with its b= emptied, no final CRLF."""
        relaxed = canon == b"relaxed"

        def canonical(lname: bytes, name: bytes, value: bytes) -> bytes:
            if relaxed:
                return lname + b":" + dkimcanon.relaxed_value(value.replace(b"\r\n", b"")) + b"\r\n"
            return name + b":" + value

        used: dict[bytes, int] = {}
        h = hashlib.sha256()
        for wanted in names:  # each name takes the last instance not yet taken, bottom up
            i = used.get(wanted, len(self.fields))
            while i > 0:
                i -= 1
                if self.fields[i][0] == wanted:
                    h.update(canonical(*self.fields[i]))
                    break
            used[wanted] = i
        lname, name, value = [f for f in self.fields if f[0] == b"dkim-signature"][index]
        h.update(canonical(lname, name, _B_VALUE.sub(rb"\1", value)).rstrip())
        return h.digest()


def prepare(message: bytes, complete: bool, max_signatures: int) -> tuple[Parsed | None, list[Signature]]:
    """Parse the message and each signature's tags (threadpool): the parsed message and
    the signatures, those already decided marked so."""
    if not complete:
        sigs = []
        for i, value in enumerate(_signature_fields(message)):
            s = Signature(i)
            s.domain, s.selector = _loose_ids(value)
            s.decide("neutral", "header section too large to verify")
            sigs.append(s)
        return None, sigs
    try:
        parsed = Parsed(message)
    except Exception as exc:  # MessageFormatError, or whatever odd input trips on
        sigs = []
        for i, value in enumerate(_signature_fields(message.partition(b"\r\n\r\n")[0] + b"\r\n")):
            s = Signature(i)
            s.domain, s.selector = _loose_ids(value)
            s.decide("neutral", f"message header not parsable: {type(exc).__name__}")
            sigs.append(s)
        return None, sigs
    return parsed, [_read_signature(i, v, max_signatures) for i, v in enumerate(parsed.signature_values())]


def _read_signature(index: int, value: bytes, max_signatures: int) -> Signature:
    sig = Signature(index)
    try:
        tags = dkimtags.parse(value)
    except Exception as exc:  # dkimtags.TagError, or a bug on odd input
        sig.domain, sig.selector = _loose_ids(value)
        sig.decide("neutral", f"signature syntax: {_said(exc)}")
        return sig
    sig.tags = tags
    sig.domain = _text(tags.get(b"d", b""))
    sig.selector = _text(tags.get(b"s", b""))
    sig.b = _text(_WSP.sub(b"", tags.get(b"b", b""))[:B_PREFIX])
    if index >= max_signatures:
        sig.decide("policy", f"more than {max_signatures} signatures: not verified")
        return sig
    try:
        dkimtags.check_signature(tags)
    except Exception as exc:  # dkimtags.TagError; a KeyError or UnicodeError on odd input
        sig.decide("neutral", f"signature: {_said(exc)}")
        return sig
    if tags[b"a"].lower() == b"rsa-sha1":
        sig.decide("policy", "rsa-sha1 is not accepted (RFC 8301)")
    elif (not sig.domain or not sig.selector or "\ufffd" in sig.key_name
          or sig.domain.encode() != tags.get(b"d") or sig.selector.encode() != tags.get(b"s")):
        # what we would ask DNS and report must be what dkimpy verifies against, octet for
        # octet: a control character or a name cut short is not a domain name
        sig.decide("neutral", "signature: d= or s= is not a domain name")
    return sig


def fetch_keys(dns, sigs: list[Signature]) -> dict[str, bytes]:
    """The key record of every signature still undecided, from our resolver (on the hub);
    signatures whose key cannot be had are decided here."""
    keys: dict[str, bytes | None] = {}
    for sig in sigs:
        if sig.result is not None:
            continue
        name = sig.key_name
        if name not in keys:
            try:
                records = dns.txt(name)
                keys[name] = records[0] if records else None
                if not records:
                    sig.decide("permerror", "no key for signature")
            except TempError as exc:
                keys[name] = None
                sig.decide("temperror", f"key lookup: {exc}")
            except BadName as exc:
                keys[name] = None
                sig.decide("permerror", f"key name: {exc}")
        elif keys[name] is None:
            sig.decide("permerror", "no key for signature")
    return {name: key for name, key in keys.items() if key is not None}


def verify(parsed: Parsed, sigs: list[Signature], keys: dict[str, bytes]) -> None:
    """Verify every signature still undecided (threadpool)."""
    for sig in sigs:
        if sig.result is not None:
            continue
        try:
            problem = key_problem(keys.get(sig.key_name), sig.tags)
            if problem:
                sig.decide("permerror", problem)
            else:
                sig.decide(*_verify_one(parsed, sig, _key_record(keys[sig.key_name])))
        except Exception as exc:  # a bug on hostile input: never the session's crash
            sig.decide("neutral", f"not verifiable: {type(exc).__name__}")


def _verify_one(parsed: Parsed, sig: Signature, record: tuple) -> tuple[str, str]:
    """RFC 6376 6.1.3 for one signature whose key fits it: (result, reason)."""
    tags = sig.tags
    c = tags.get(b"c", b"simple/simple").split(b"/")
    if len(c) == 1:
        c.append(b"simple")
    if len(c) != 2 or not all(x in (b"simple", b"relaxed") for x in c):
        return "neutral", "signature: unknown canonicalisation in c="
    length = int(tags[b"l"]) if b"l" in tags else None
    bh = base64.b64decode(b"".join(tags[b"bh"].split()))
    if parsed.body_hash(c[1], length) != bh:
        return "fail", "body hash did not verify"
    names = [x.lower() for x in _H_SEP.split(tags[b"h"])]
    if b"from" in names:  # a From added above the signed one must break it, as dkimpy has it
        names.append(b"from")
    digest = parsed.header_hash(c[0], names, sig.index)
    signature = base64.b64decode(b"".join(tags[b"b"].split()))
    _, ktag, _, _, public, bits = record
    if ktag == b"ed25519":
        try:
            public.verify(signature, digest)  # RFC 8463: Ed25519 over the SHA-256 digest
        except InvalidSignature:
            return "fail", "signature did not verify"
        return "pass", ""
    try:
        ok = dkimcrypto.verify_digest(digest, signature, public)
    except TypeError as exc:
        return "permerror", f"key: {exc}"
    if not ok:
        return "fail", "signature did not verify"
    if bits < MIN_RSA_BITS:
        return "permerror", f"key: public key too small: {bits}"
    return "pass", ""


def key_problem(record: bytes | None, sig_tags: dict) -> str:
    """Why the key record cannot verify this signature (RFC 6376 3.6.1, 6.1.2), or ""."""
    if record is None:
        return "no key for signature"
    problem, ktag, hashes, flags, _, _ = _key_record(record)
    if problem:
        return problem
    algorithm = sig_tags.get(b"a", b"").lower()
    if ktag is None or not algorithm.startswith(ktag + b"-"):
        return "key type does not match a="
    if hashes is not None and algorithm.partition(b"-")[2] not in hashes:
        return "key h= does not allow the signature's hash"
    if b"s" in flags and b"i" in sig_tags:
        if sig_tags[b"i"].rpartition(b"@")[2].lower() != sig_tags[b"d"].lower():
            return "key t=s: i= domain must be d="
    return ""


_NO_KEY = (None, None, frozenset(), None, 0)


@lru_cache(maxsize=1024)  # the same few keys sign most mail: each record is read once
def _key_record(record: bytes) -> tuple:
    """(problem or "", key type, the hashes h= allows or None, the t= flags, the public key,
    its size in bits) of a key record."""
    try:
        key = dkimtags.parse(record)
    except Exception:
        return ("key record syntax", *_NO_KEY)
    if b"p" not in key:
        return ("key record has no p=", *_NO_KEY)
    if not key[b"p"].strip():
        return ("key revoked", *_NO_KEY)
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return ("key record version is not DKIM1", *_NO_KEY)
    try:
        public, bits, ktag, tlsrpt = dkim.evaluate_pk(b"key", record)
        if ktag == b"ed25519":
            public = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public))
    except Exception as exc:  # KeyFormatError, binascii.Error, a parse error deep in dkimpy
        return (safe_text(f"key record: {_said(exc)}", 120), *_NO_KEY)
    if tlsrpt:  # RFC 8460 3: a key for TLS reports only
        return ("key is for TLS reports only (s=tlsrpt)", *_NO_KEY)
    hashes = key.get(b"h")
    allowed = None if hashes is None else frozenset(h.strip().lower() for h in hashes.split(b":"))
    return "", ktag, allowed, frozenset(f.strip() for f in key.get(b"t", b"").split(b":")), public, bits


INLINE_SIZE = 32 * 1024  # octets: a message up to this size is verified on the hub (< 1 ms)


def _direct(fn, *args):
    return fn(*args)


def _no_signature() -> Verdict:
    return Verdict.accept(results={"dkim": []}, auth=[AuthResult("dkim", "none")])


# -- the check ----------------------------------------------------------------------------
class DKIMCheck(Check):
    """Verify the message's DKIM signatures; one Authentication-Results entry per signature
    and results["dkim"] = [{"result", "domain", "selector"}, ...] for DMARC."""

    Options = DKIMOptions
    records_auth = True

    def data(self, facts: Facts) -> Verdict:
        if facts.open_message is None:
            return _no_signature()
        max_header = self.options.get("max_header_size", 64 * 1024)
        max_sigs = self.options.get("max_signatures", 5)
        section = facts.header_section()  # read once for every check of the phase
        if len(section) <= max_header and facts.header_section_whole() and b"dkim-signature" not in section.lower():
            # unsigned (no field of that name, however written): nothing to read, parse or hash
            return _no_signature()
        # hashing and RSA cost little for a small message: hand-offs to the threadpool would
        # cost more than they spare the hub
        run = self.context.run if (facts.size or 0) > INLINE_SIZE else _direct
        message, complete = run(read_message, facts.open_message, max_header)
        parsed, sigs = run(prepare, message, complete, max_sigs)
        if not sigs:
            if not complete:
                return Verdict.accept(results={"dkim": []}, auth=[AuthResult(
                    "dkim", "neutral", reason=f"header section over {max_header} octets, not verified")])
            return _no_signature()
        if parsed is not None:
            keys = fetch_keys(self.context.dns, sigs)
            run(verify, parsed, sigs, keys)
        return Verdict.accept(results={"dkim": [s.fact() for s in sigs]}, auth=[s.auth() for s in sigs])
