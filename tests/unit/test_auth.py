"""geosmtp.auth: scrypt hashes, the users file, and SASL PLAIN/LOGIN decoding (RFC 4954, 4616).

Nothing here may put a password, a payload or a hash into an exception message: whatever an
exception says can end up in a log line.
"""
import base64

import pytest

from geosmtp import auth
from geosmtp.auth import (
    BadBase64,
    SaslError,
    UserStore,
    decode_response,
    decode_text,
    hash_password,
    parse_plain,
    valid_hash,
    verify_password,
)

LN = 4  # cheap scrypt for tests; the format and the check are the same


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- hash_password / verify_password ------------------------------------------------------
def test_hash_format_and_verify():
    encoded = hash_password("correct horse", ln=LN)
    assert encoded.startswith(f"$scrypt$ln={LN},r=8,p=1$")
    assert valid_hash(encoded)
    assert "correct horse" not in encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse ", encoded)
    assert not verify_password("Correct horse", encoded)
    assert not verify_password("", encoded)


def test_default_cost_is_the_documented_one():
    encoded = hash_password("x")
    assert encoded.startswith(f"$scrypt$ln={auth.SCRYPT_LN},r={auth.SCRYPT_R},p={auth.SCRYPT_P}$")
    assert verify_password("x", encoded)


def test_each_hash_has_its_own_salt():
    a, b = hash_password("same", ln=LN), hash_password("same", ln=LN)
    assert a != b
    assert verify_password("same", a) and verify_password("same", b)


@pytest.mark.parametrize("password", ["pässwörd ✓", "with:colon$and$dollars", "a" * auth.MAX_PASSWORD])
def test_unusual_passwords_round_trip(password):
    assert verify_password(password, hash_password(password, ln=LN))


def test_overlong_password_never_matches():
    long = "a" * (auth.MAX_PASSWORD + 1)
    assert not verify_password(long, hash_password(long, ln=LN))


@pytest.mark.parametrize("encoded", [
    "",
    "plaintext",
    "$scrypt$",
    "$scrypt$ln=4,r=8,p=1$c2FsdA==",  # no key
    "$scrypt$ln=4,r=8$c2FsdA==$a2V5",  # no p
    "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt
    "$scrypt$ln=4,r=8,p=1$not base64$a2V5",
])
def test_garbage_hash_never_matches(encoded):
    assert not valid_hash(encoded)
    assert not verify_password("anything", encoded)


@pytest.mark.parametrize("ln, ok", [(0, False), (1, True), (20, True), (21, False), (99, False)])
def test_valid_hash_bounds_the_cost(ln, ok):
    encoded = hash_password("x", ln=LN).replace(f"ln={LN},", f"ln={ln},")
    assert valid_hash(encoded) is ok


# -- UserStore ----------------------------------------------------------------------------
def store_text(**passwords) -> str:
    return "".join(f"{user}:{hash_password(pw, ln=LN)}\n" for user, pw in passwords.items())


def test_parse_skips_blank_lines_and_comments_and_folds_case():
    h = hash_password("pw", ln=LN)
    store = UserStore.parse(f"# users\n\n   \nAlice@Example.TEST:{h}\n  # indented comment\n  bob@example.test:{h}  \n")
    assert store.users == {"alice@example.test": h, "bob@example.test": h}


SECRET_HASH = hash_password("do-not-print-me", ln=LN)


@pytest.mark.parametrize("bad", [
    f"alice@example.test {SECRET_HASH}",  # no colon
    f"alice:{SECRET_HASH}",  # no @
    "alice@example.test:$scrypt$SECRET-BROKEN-HASH",
    "alice@example.test:do-not-print-me",  # a password where the hash belongs
    f"alice@example.test:{SECRET_HASH.replace(f'ln={LN},', 'ln=30,')}",  # absurd cost
    "alice@example.test:",
], ids=["no-colon", "no-at", "broken-hash", "plain-password", "absurd-cost", "empty-hash"])
def test_parse_error_names_the_line_but_not_its_content(bad):
    good = store_text(**{"bob@example.test": "x"})
    with pytest.raises(ValueError) as info:
        UserStore.parse(f"# comment\n{good}{bad}\n{good}")
    message = str(info.value)
    assert message.startswith("line 3:"), message
    for secret in ("do-not-print-me", "SECRET", "$scrypt$ln", SECRET_HASH.split("$")[-1], "alice"):
        assert secret not in message, (secret, message)
    assert info.value.__cause__ is None or "SECRET" not in str(info.value.__cause__)


def test_dump_parse_round_trip_sorted():
    store = UserStore.parse(store_text(**{"b@x.test": "1", "a@x.test": "2"}))
    text = store.dump()
    assert text.splitlines()[0].startswith("a@x.test:$scrypt$")
    assert UserStore.parse(text) == store


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(store_text(**{"a@x.test": "pw-a"}))
    store = UserStore.load(path)
    assert store.check("a@x.test", "pw-a")


def test_check():
    store = UserStore.parse(store_text(**{"alice@example.test": "alice-pw", "bob@example.test": "bob-pw"}))
    assert store.check("alice@example.test", "alice-pw")
    assert store.check("ALICE@Example.Test", "alice-pw")  # user names are case-insensitive
    assert not store.check("alice@example.test", "bob-pw")
    assert not store.check("alice@example.test", "ALICE-PW")  # passwords are not
    assert not store.check("carol@example.test", "alice-pw")
    assert not store.check("", "")


def test_unknown_user_costs_a_hash_check_too(monkeypatch):
    """A wrong user name must take as long as a wrong password (no user enumeration)."""
    store = UserStore.parse(store_text(**{"alice@example.test": "alice-pw"}))
    calls = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, enc: calls.append(enc) or real(pw, enc))
    assert not store.check("nobody@example.test", "alice-pw")
    assert len(calls) == 1 and valid_hash(calls[0])
    # the dummy hash never matches, whatever the password
    assert not store.check("nobody@example.test", "unknown user, never matches")


# -- decode_response ----------------------------------------------------------------------
def test_decode_response():
    assert decode_response(b64(b"\0alice\0pw")) == b"\0alice\0pw"
    assert decode_response("=") == b""  # RFC 4954 4: "=" is an empty response
    assert decode_response("") == b""


@pytest.mark.parametrize("text", [
    "not base64!",
    "YWxpY2U",  # missing padding
    "YWxp Y2U=",  # embedded space
    "YWxpY2U=YWxpY2U=",  # data after padding
    "*",  # a cancel is handled before decoding; here it is just not base64
    "cGFzc3dvcmTDqQ==é",  # non-ASCII
    "==",
])
def test_bad_base64_is_refused_without_echoing_it(text):
    with pytest.raises(BadBase64) as info:
        decode_response(text)
    assert isinstance(info.value, SaslError)
    assert text not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- parse_plain (RFC 4616) ---------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    (b"\0alice@example.test\0secret", ("alice@example.test", "secret")),
    (b"alice@example.test\0alice@example.test\0secret", ("alice@example.test", "secret")),
    (b"ALICE@example.test\0alice@Example.Test\0secret", ("alice@Example.Test", "secret")),  # same user
    ("\0jöran@example.test\0pässword".encode(), ("jöran@example.test", "pässword")),
    (b"\0alice@example.test\0pass word with spaces ", ("alice@example.test", "pass word with spaces ")),
])
def test_parse_plain(data, expected):
    assert parse_plain(data) == expected


@pytest.mark.parametrize("data", [
    b"",
    b"alice@example.test",
    b"alice@example.test\0secret-pw",  # two fields
    b"\0alice@example.test\0secret-pw\0extra",  # a NUL in the password
    b"\0\0secret-pw",  # empty authcid
    b"\0alice@example.test\0",  # empty password
    b"bob@example.test\0alice@example.test\0secret-pw",  # acting as someone else
    b"\0alice@example.test\0secret-pw\xff",  # not UTF-8
    b"\xff\0alice@example.test\0secret-pw",
])
def test_parse_plain_refuses_without_leaking(data):
    with pytest.raises(SaslError) as info:
        parse_plain(data)
    assert not isinstance(info.value, BadBase64)  # well-formed base64: a failed AUTH, not a 501
    message = str(info.value)
    assert "secret" not in message and "alice" not in message and "bob" not in message
    assert info.value.__cause__ is None


def test_decode_text():
    assert decode_text("jöran".encode()) == "jöran"
    with pytest.raises(SaslError) as info:
        decode_text(b"secret\xff")
    assert "secret" not in str(info.value) and info.value.__cause__ is None
