"""geosmtp.protocol: command lines, reverse/forward paths and MAIL/RCPT parameters.

Table-driven: every row is one input the wire can carry and the verdict RFC 5321 4.1.2 /
4.1.3 (and RFC 6531 for UTF-8) asks for. Property tests at the end check that nothing but
ProtocolError / PathError can escape the parser, whatever the client sends.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geosmtp import replies
from geosmtp.protocol import (
    MAX_DOMAIN,
    MAX_LOCAL,
    MAX_PATH,
    Address,
    Command,
    PathError,
    ProtocolError,
    parse_address,
    parse_command,
    parse_domain,
    parse_forward_path,
    parse_params,
    parse_reverse_path,
)

PROPERTY = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- parse_command ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, verb, arg",
    [
        (b"MAIL FROM:<a@b.test>", "MAIL", "FROM:<a@b.test>"),
        (b"mail FROM:<a@b.test>", "MAIL", "FROM:<a@b.test>"),  # verbs are case-insensitive
        (b"MaIl FROM:<a@b.test>", "MAIL", "FROM:<a@b.test>"),
        (b"QUIT", "QUIT", ""),
        (b"NOOP   ", "NOOP", ""),  # trailing spaces removed
        (b"RCPT TO:<a@b.test>  ", "RCPT", "TO:<a@b.test>"),
        (b"EHLO client.test", "EHLO", "client.test"),
        (b"EHLO  client.test", "EHLO", " client.test"),  # only one separating space is eaten
        (b"NOOP a\tb", "NOOP", "a\tb"),
        (b"A" * 16, "A" * 16, ""),  # the longest verb accepted
        ("MAIL FROM:<ü@bücher.test>".encode(), "MAIL", "FROM:<ü@bücher.test>"),  # RFC 6531
        (b"DATA", "DATA", ""),
    ],
)
def test_parse_command_valid(line, verb, arg):
    assert parse_command(line) == Command(verb, arg)


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"", replies.UNKNOWN_COMMAND),
        (b" QUIT", replies.UNKNOWN_COMMAND),  # no leading space before the verb
        (b"QU1T", replies.UNKNOWN_COMMAND),
        (b"A" * 17, replies.UNKNOWN_COMMAND),  # verbs are 1-16 letters
        (b"MAIL\tFROM:<a@b.test>", replies.UNKNOWN_COMMAND),  # SP separates the verb
        (b"MAIL-FROM", replies.UNKNOWN_COMMAND),
        ("ÉHLO x".encode(), replies.UNKNOWN_COMMAND),
        (b"\x00", replies.NUL_IN_COMMAND),
        (b"MAIL FROM:<a@b.test>\x00", replies.NUL_IN_COMMAND),
        (b"MAIL FROM:<a\x00b@x.test>", replies.NUL_IN_COMMAND),
        (b"\x00QUIT", replies.NUL_IN_COMMAND),
        (b"\xff\x00", replies.NUL_IN_COMMAND),  # NUL is reported even in invalid UTF-8
        (b"\xff", replies.NOT_UTF8),
        (b"MAIL FROM:<\xc3(@x.test>", replies.NOT_UTF8),  # truncated 2-byte sequence
        (b"MAIL FROM:<\xc0\xaf@x.test>", replies.NOT_UTF8),  # overlong "/"
        (b"MAIL FROM:<\xed\xa0\x80@x.test>", replies.NOT_UTF8),  # UTF-8 encoded surrogate
        (b"MAIL FROM:<\xf4\x90\x80\x80@x.test>", replies.NOT_UTF8),  # above U+10FFFF
        (b"EHLO \xe9t\xe9.test", replies.NOT_UTF8),  # Latin-1
    ],
)
def test_parse_command_invalid(line, reply):
    with pytest.raises(ProtocolError) as info:
        parse_command(line)
    assert info.value.reply == reply


# -- parse_reverse_path (MAIL FROM) -------------------------------------------------------
LOCAL_64 = "l" * 64
# "<" + 64 + "@" + domain + ">" = 256 octets: the longest path RFC 5321 4.5.3.1.3 allows
DOMAIN_189 = "b" * 63 + "." + "c" * 63 + "." + "d" * 61
assert len(LOCAL_64) + 1 + len(DOMAIN_189) + 2 == MAX_PATH


@pytest.mark.parametrize(
    "arg, expected, params",
    [
        ("FROM:<a@b.test>", Address("a", "b.test"), ""),
        ("from:<a@b.test>", Address("a", "b.test"), ""),  # keyword is case-insensitive
        ("From:<a@b.test>", Address("a", "b.test"), ""),
        ("FROM: <a@b.test>", Address("a", "b.test"), ""),  # tolerated like Postfix does
        ("FROM:   <a@b.test>", Address("a", "b.test"), ""),
        ("FROM:<>", None, ""),  # RFC 5321 4.5.5: the null reverse-path
        ("FROM:<> SIZE=10", None, "SIZE=10"),
        ("FROM: <>", None, ""),
        ("FROM:<a@b.test> SIZE=100 BODY=8BITMIME", Address("a", "b.test"), "SIZE=100 BODY=8BITMIME"),
        ("FROM:<a@b.test>   SIZE=100  ", Address("a", "b.test"), "SIZE=100"),
        ("FROM:<Alice@Example.TEST>", Address("Alice", "example.test"), ""),  # domain folded only
        ("FROM:<a.b.c@x.test>", Address("a.b.c", "x.test"), ""),
        ("FROM:<!#$%&'*+/=?^_`{|}~-@x.test>", Address("!#$%&'*+/=?^_`{|}~-", "x.test"), ""),
        ("FROM:<u@localhost>", Address("u", "localhost"), ""),
        ("FROM:<u@a-b.test>", Address("u", "a-b.test"), ""),
        ("FROM:<u@123.test>", Address("u", "123.test"), ""),
        ("FROM:<u@xn--bcher-kva.test>", Address("u", "xn--bcher-kva.test"), ""),
        # RFC 5321 4.1.1.3 and appendix C: source routes are accepted and ignored
        ("FROM:<@a.test,@b.test:u@c.test>", Address("u", "c.test"), ""),
        ("FROM:<@a.test:u@c.test>", Address("u", "c.test"), ""),
        ("FROM:<@a.test:\"x:y\"@c.test>", Address('"x:y"', "c.test"), ""),
        # RFC 5321 4.1.2 Quoted-string local parts keep their quotes
        ('FROM:<"a b"@x.test>', Address('"a b"', "x.test"), ""),
        ('FROM:<"a\\"b"@x.test>', Address('"a\\"b"', "x.test"), ""),
        ('FROM:<"a\\\\b"@x.test>', Address('"a\\\\b"', "x.test"), ""),
        ('FROM:<"a@b"@x.test>', Address('"a@b"', "x.test"), ""),
        ('FROM:<"a>b"@x.test>', Address('"a>b"', "x.test"), ""),  # ">" inside quotes
        ('FROM:<"a\\">b"@x.test> SIZE=1', Address('"a\\">b"', "x.test"), "SIZE=1"),
        ('FROM:<""@x.test>', Address('""', "x.test"), ""),  # *QcontentSMTP: may be empty
        # RFC 5321 4.1.3 address literals, stored in canonical form
        ("FROM:<u@[127.0.0.1]>", Address("u", "[127.0.0.1]"), ""),
        ("FROM:<u@[IPv6:::1]>", Address("u", "[IPv6:::1]"), ""),
        ("FROM:<u@[ipv6:0:0:0:0:0:0:0:1]>", Address("u", "[IPv6:::1]"), ""),
        ("FROM:<u@[IPv6:2001:DB8::1]>", Address("u", "[IPv6:2001:db8::1]"), ""),
        ("FROM:<u@[IPv6:::ffff:192.0.2.1]>", Address("u", "[IPv6:::ffff:c000:201]"), ""),
        # RFC 5321 4.5.3.1.1 / 4.5.3.1.3: limits are inclusive
        (f"FROM:<{LOCAL_64}@x.test>", Address(LOCAL_64, "x.test"), ""),
        (f"FROM:<{LOCAL_64}@{DOMAIN_189}>", Address(LOCAL_64, DOMAIN_189), ""),
        ("FROM:<" + "é" * 32 + "@x.test>", Address("é" * 32, "x.test"), ""),  # 64 octets
        # RFC 6531 3.3: UTF-8 is parsed here; whether SMTPUTF8 was given is the session's call
        ("FROM:<ü@bücher.test>", Address("ü", "bücher.test"), ""),
        ('FROM:<"ü x"@x.test>', Address('"ü x"', "x.test"), ""),
    ],
)
def test_reverse_path_valid(arg, expected, params):
    assert parse_reverse_path(arg) == (expected, params)


# angle brackets missing or broken: a command syntax error (501 5.5.4), PathError.brackets
@pytest.mark.parametrize(
    "arg",
    [
        "",
        "FROM:",
        "FROM:a@b.test",  # RFC 5321 4.1.2: Reverse-path = Path = "<" ... ">"
        "FROM:<a@b.test",
        "FROM:a@b.test>",
        "FROM <a@b.test>",  # no colon
        "FROM : <a@b.test>",
        "TO:<a@b.test>",  # wrong keyword for MAIL
        "FROMX:<a@b.test>",
        "FROM:<a@b.test>SIZE=1",  # params need a space
        "FROM:<a@b.test>>",
        "FROM:<a@b.test>\tSIZE=1",
        'FROM:<"a@b.test>',  # quote never closed, so neither is the path
        'FROM:<a"b@x.test>',
        'FROM:<"a"b"@x.test>',
        "FROM:<>x",
    ],
)
def test_reverse_path_syntax_error(arg):
    with pytest.raises(PathError) as info:
        parse_reverse_path(arg)
    assert info.value.brackets


# well-bracketed but not an address: 501 5.1.7 / 5.1.3, PathError without .brackets
@pytest.mark.parametrize(
    "path",
    [
        "a",  # no domain
        "a@",
        "@b.test",
        "a@b.test.",  # trailing dot: not a Domain (RFC 5321 4.1.2)
        "a@.b.test",
        "a@b..test",
        "a@-b.test",
        "a@b-.test",
        "a@b_c.test",
        "a@b test",
        "a@" + "x" * 64 + ".test",  # a label is at most 63 octets
        "a..b@x.test",
        ".a@x.test",
        "a.@x.test",
        "a b@x.test",
        '"a\\é"@x.test',  # quoted-pairSMTP is "\" %d32-126
        "a\x01b@x.test",
        "a\x7f@x.test",
        "a\x00b@x.test",  # NUL never (parse_command refuses it first, this is the backstop)
        "a@b\x00.test",
        "a<b@x.test",
        "a@b.test@c.test",
        "a@[127.0.0.256]",
        "a@[1.2.3]",
        "a@[127.0.0.01]",  # leading zeros are ambiguous (octal)
        "a@[]",
        "a@[IPv6:]",
        "a@[IPv6:::g]",
        "a@[IPv6:1.2.3.4]",
        "a@[IPv6:1::2::3]",
        "a@[IPv4:127.0.0.1]",  # only IPv6 has a registered tag (RFC 5321 4.1.3)
        "a@[ 127.0.0.1]",
        "a@[127.0.0.1",
        "a@127.0.0.1]",
        "a@[127.0.0.1].test",
        "l" * 65 + "@x.test",  # RFC 5321 4.5.3.1.1: 64 octets
        "é" * 32 + "l@x.test",  # 65 octets, 33 characters: octets count
        f"{LOCAL_64}@{DOMAIN_189}x",  # 257 octets with brackets (4.5.3.1.3)
        "@a.test",  # a source route needs its ":"
        "@a.test,b.test:u@c.test",  # every hop starts with "@"
        "@a.test,,@b.test:u@c.test",
        "@:u@c.test",
        "@a..test:u@c.test",
        "@a.test:",
        "@a.test:u",
        "@a.test:@b.test:u@c.test",
    ],
)
def test_reverse_path_bad_address(path):
    with pytest.raises(PathError) as info:
        parse_reverse_path(f"FROM:<{path}>")
    assert not info.value.brackets
    assert info.value.reason


def test_path_length_counts_octets_not_characters():
    # 126 two-octet characters + "@x.test": 252 + 7 + 2 brackets = 261 octets > 256
    local = "é" * 32
    domain = "ü" * 31 + "." + "ü" * 31 + "." + "ü" * 30 + ".test"
    assert len(f"<{local}@{domain}>") <= MAX_PATH < len(f"<{local}@{domain}>".encode())
    with pytest.raises(PathError, match="too long"):
        parse_reverse_path(f"FROM:<{local}@{domain}>")


# -- parse_forward_path (RCPT TO) ---------------------------------------------------------
@pytest.mark.parametrize(
    "arg, expected, params",
    [
        ("TO:<a@b.test>", Address("a", "b.test"), ""),
        ("to:<a@B.test>", Address("a", "b.test"), ""),
        ("TO: <a@b.test>", Address("a", "b.test"), ""),
        ("TO:<a@b.test> NOTIFY=NEVER", Address("a", "b.test"), "NOTIFY=NEVER"),
        # RFC 5321 4.5.1: <postmaster> without a domain must be accepted, in any case
        ("TO:<postmaster>", Address("postmaster", ""), ""),
        ("TO:<Postmaster>", Address("postmaster", ""), ""),
        ("TO:<POSTMASTER> X=1", Address("postmaster", ""), "X=1"),
        ("TO:<postmaster@x.test>", Address("postmaster", "x.test"), ""),
        ("TO:<@relay.test:u@c.test>", Address("u", "c.test"), ""),
        ("TO:<@a.test,@b.test:u@c.test>", Address("u", "c.test"), ""),
        ("TO:<u@[IPv6:::1]>", Address("u", "[IPv6:::1]"), ""),
        ('TO:<"a b"@x.test>', Address('"a b"', "x.test"), ""),
        ("TO:<a%b@x.test>", Address("a%b", "x.test"), ""),  # just local-part characters
        ("TO:<b!a@x.test>", Address("b!a", "x.test"), ""),
    ],
)
def test_forward_path_valid(arg, expected, params):
    assert parse_forward_path(arg) == (expected, params)


def test_postmaster_has_no_domain():
    addr, _ = parse_forward_path("TO:<postmaster>")
    assert str(addr) == "postmaster" and addr.key == "postmaster"


@pytest.mark.parametrize(
    "arg, brackets",
    [
        ("TO:<>", False),  # the null path is only a reverse-path
        ("TO:a@b.test", True),
        ("TO:<a@b.test", True),
        ("FROM:<a@b.test>", True),
        ("TO <a@b.test>", True),
        ("TO:<postmaster", True),
        ("TO:<postmaster >", False),
        ("TO:<a@b.test.>", False),
        ("TO:<@a.test u@c.test>", False),
        ("TO:<" + "l" * 65 + "@x.test>", False),
    ],
)
def test_forward_path_invalid(arg, brackets):
    with pytest.raises(PathError) as info:
        parse_forward_path(arg)
    assert info.value.brackets is brackets


# -- parse_address: RFC 6531 needs SMTPUTF8 for non-ASCII ----------------------------------
@pytest.mark.parametrize(
    "text",
    ["ü@x.test", "a@bücher.test", '"ü"@x.test', "用户@例子.test", "a@xn--bcher-kva.ü"],
)
def test_non_ascii_address_needs_utf8(text):
    assert not parse_address(text).is_ascii


def test_ascii_address_without_utf8():
    addr = parse_address("Alice@Example.TEST")
    assert addr == Address("Alice", "example.test")
    assert addr.is_ascii and addr.key == "alice@example.test" and str(addr) == "Alice@example.test"


def test_kelvin_sign_domain_still_needs_utf8():
    # "\u212a" is not ASCII, so RFC 6531 requires SMTPUTF8; lower-casing must not hide that
    assert not parse_address("a@\u212a.test").is_ascii


def test_malformed_non_ascii_is_a_syntax_error():
    with pytest.raises(PathError):
        parse_address("ü..x@x.test")


# -- parse_domain -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "domain, canonical",
    [
        ("Example.TEST", "example.test"),
        ("a", "a"),
        ("a-b.c-d.test", "a-b.c-d.test"),
        ("x" * 63 + ".test", "x" * 63 + ".test"),
        (".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4)),  # 255 octets (4.5.3.1.2)
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8:0:0:0:0:0:1]", "[IPv6:2001:db8::1]"),
        ("[IPV6:::1]", "[IPv6:::1]"),
        ("Bücher.test", "bücher.test"),
    ],
)
def test_parse_domain_valid(domain, canonical):
    assert parse_domain(domain) == canonical


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a.test.",
        ".a.test",
        "a..test",
        "-a.test",
        "a-.test",
        "a_b.test",
        "a b.test",
        "a\x00.test",
        "x" * 64 + ".test",
        ".".join(["a" * 63] * 3 + ["a" * 62, "a"]),  # 256 octets
        "[300.1.1.1]",
        "[1.2.3.4.5]",
        "[IPv6:::1::2]",
        "[IPv6:12345::]",
        "[::1]",  # IPv6 needs its tag
        "[127.0.0.1",
        "[example.test]",
    ],
)
def test_parse_domain_invalid(domain):
    with pytest.raises(PathError):
        parse_domain(domain)
    if len(domain.encode()) > MAX_DOMAIN:
        with pytest.raises(PathError, match="too long"):
            parse_domain(domain)


@pytest.mark.parametrize("literal", ["[IPv6:fe80::1%eth0]", "[IPv6:::1%a\x01b]", "[IPv6:::1%x y]",
                                     "[IPv6:::1%\x1b[31mRED]", "[IPv6:::1%\x7f]"])
def test_ipv6_literal_with_zone_id_is_refused(literal):
    with pytest.raises(PathError):
        parse_domain(literal)


def test_no_control_characters_in_a_parsed_sender():
    # anyone may send MAIL FROM to the MX; the sender reaches logs and Return-Path:
    with pytest.raises(PathError):
        parse_reverse_path("FROM:<u@[IPv6:::1%\x1b[31mRED]>")


# -- parse_params -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("   ", {}),
        ("SIZE=100", {"SIZE": "100"}),
        ("size=100 body=8bitmime smtputf8", {"SIZE": "100", "BODY": "8bitmime", "SMTPUTF8": None}),
        ("  SIZE=1   BODY=7BIT  ", {"SIZE": "1", "BODY": "7BIT"}),
        ("X-FOO=bar", {"X-FOO": "bar"}),
        ("9X=1", {"9X": "1"}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("ENVID=a+2Bb", {"ENVID": "a+2Bb"}),
        ("X=ü", {"X": "ü"}),  # RFC 6531 3.3 widens esmtp-value to UTF-8
        ("X=!~", {"X": "!~"}),
    ],
)
def test_parse_params_valid(text, expected):
    assert parse_params(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "=1",  # empty keyword
        "SIZE=",  # esmtp-value is 1*(...)
        "-X=1",  # esmtp-keyword starts with ALPHA / DIGIT
        "SI_ZE=1",
        "SIZE=1=2",  # "=" (%d61) is not in esmtp-value
        "SIZE=a\x01b",
        "SIZE=a\x7f",
        "SIZE=\x00",
        "KEY\x7f=1",
        "ÜBER=1",
        "SIZE=1 SIZE=2",  # duplicates refused
        "size=1 SIZE=1",  # keywords are case-insensitive
        "SMTPUTF8 smtputf8",
        "BODY=7BIT BODY",
    ],
)
def test_parse_params_invalid(text):
    with pytest.raises(ProtocolError) as info:
        parse_params(text)
    assert info.value.reply.code == 501 and info.value.reply.enhanced == "5.5.4"


@pytest.mark.parametrize("sep", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2028", "\u3000"])
def test_parse_params_only_space_separates(sep):
    # RFC 5321 4.1.2: Mail-parameters = esmtp-param *(SP esmtp-param); esmtp-value is
    # %d33-60 / %d62-126 (plus UTF-8): these characters are neither a separator nor a value
    with pytest.raises(ProtocolError):
        parse_params(f"SIZE=1{sep}BODY=7BIT")


# -- properties: nothing but ProtocolError / PathError escapes ----------------------------
@PROPERTY
@given(st.binary(max_size=600))
def test_parse_command_total_on_bytes(line):
    try:
        cmd = parse_command(line)
    except ProtocolError as exc:
        assert exc.reply.code == 500
        return
    assert isinstance(cmd, Command)
    assert cmd.verb.isascii() and cmd.verb.isalpha() and cmd.verb == cmd.verb.upper()
    assert 1 <= len(cmd.verb) <= 16
    assert not cmd.arg.endswith(" ") and "\0" not in cmd.arg


# characters that matter to the path grammar, so examples go deep into it
_PATHISH = st.text(alphabet=st.sampled_from(list('<>@":.,[]\\ aZ0-%!\x00\x01é\u212aIPv6f:')), max_size=60)
_ARGS = st.one_of(
    st.text(max_size=300),
    _PATHISH,
    st.builds(lambda kw, p, rest: f"{kw}<{p}>{rest}",
              st.sampled_from(["FROM:", "TO:", "from: ", "TO:  "]), _PATHISH, st.text(max_size=20)),
)


def _check_path_result(addr):
    if addr is None:
        return
    assert isinstance(addr, Address)
    assert "\0" not in str(addr)
    assert len(addr.local.encode()) <= MAX_LOCAL
    assert addr.domain == addr.domain.lower()


@PROPERTY
@given(_ARGS)
def test_parse_reverse_path_total(arg):
    try:
        addr, params = parse_reverse_path(arg)
    except (PathError, ProtocolError):
        return
    _check_path_result(addr)
    assert isinstance(params, str) and params == params.strip(" ")


@PROPERTY
@given(_ARGS)
def test_parse_forward_path_total(arg):
    try:
        addr, params = parse_forward_path(arg)
    except (PathError, ProtocolError):
        return
    assert addr is not None
    _check_path_result(addr)
    assert isinstance(params, str)


_ASCII_PATH = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@PROPERTY
@given(_ASCII_PATH)
def test_forward_path_canonical_form_reparses_to_itself(path):
    try:
        addr, _ = parse_forward_path(f"TO:<{path}>")
    except PathError:
        return
    assert parse_forward_path(f"TO:<{addr}>") == (addr, "")


@PROPERTY
@given(st.one_of(st.text(max_size=200),
                 st.text(alphabet=st.sampled_from(list("SIZE=BODY8 XA-=<>\x00\x7fü\t")), max_size=60)))
def test_parse_params_total(text):
    try:
        params = parse_params(text)
    except ProtocolError as exc:
        assert exc.reply.code == 501
        return
    assert isinstance(params, dict)
    for key, value in params.items():
        assert key == key.upper() and key[:1].isalnum()
        assert value is None or (value and "=" not in value)
