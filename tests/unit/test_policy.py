"""geosmtp.policy: relay, local recipients and submission rules, one table per rule."""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import pytest

from geosmtp import replies
from geosmtp.directory import MAX_EXPANSION
from geosmtp.directory.static import ConfigDirectory
from geosmtp.policy import (
    ClientFacts,
    check_mail,
    check_sender,
    is_trusted,
    resolve_rcpt,
)
from geosmtp.protocol import Address, parse_forward_path

IP = ipaddress.ip_address
NET = ipaddress.ip_network

DIRECTORY = ConfigDirectory(
    domains=frozenset({"example.test", "other.test"}),
    users=frozenset({"alice@example.test", "bob@example.test", "keep@example.test", "carol@other.test"}),
    aliases={
        "postmaster@example.test": ("alice@example.test",),
        "team@example.test": ("alice@example.test", "bob@example.test"),
        "keep@example.test": ("keep@example.test", "keep@remote.test"),  # keeps a copy
        "fwd@example.test": ("someone@remote.test",),  # forwarding to another domain
        "nested@example.test": ("team@example.test", "carol@other.test"),
        "dup@example.test": ("team@example.test", "alice@example.test", "bob@example.test"),
        "loop1@example.test": ("loop2@example.test",),
        "loop2@example.test": ("loop1@example.test",),
        "ghost@example.test": ("nobody@example.test",),  # target neither user nor alias
    },
)

STRANGER = ClientFacts(ip=IP("203.0.113.9"), mode="smtp", trusted=False)
TRUSTED = ClientFacts(ip=IP("127.0.0.1"), mode="smtp", trusted=True)
AUTHED = ClientFacts(ip=IP("203.0.113.9"), mode="submission", trusted=False, auth_user="alice")


def rcpt(text: str) -> Address:
    return parse_forward_path(f"TO:<{text}>")[0]


# -- resolve_rcpt -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address, verdict",
    [
        # local domains take mail from anyone: the MX role
        ("alice@example.test", ["alice@example.test"]),
        ("Alice@Example.TEST", ["alice@example.test"]),
        ("carol@other.test", ["carol@other.test"]),
        ("team@example.test", ["alice@example.test", "bob@example.test"]),
        ("keep@example.test", ["keep@example.test", "keep@remote.test"]),
        ("fwd@example.test", ["someone@remote.test"]),  # forwarding is not relaying
        ("nested@example.test", ["alice@example.test", "bob@example.test", "carol@other.test"]),
        ("dup@example.test", ["alice@example.test", "bob@example.test"]),
        ("postmaster", ["alice@example.test"]),  # RFC 5321 4.5.1
        ("Postmaster", ["alice@example.test"]),
        ("postmaster@example.test", ["alice@example.test"]),
        # unknown local users: 550 5.1.1
        ("nobody@example.test", replies.UNKNOWN_USER),
        ("postmaster@other.test", replies.UNKNOWN_USER),
        ("loop1@example.test", replies.UNKNOWN_USER),
        ("ghost@example.test", replies.UNKNOWN_USER),
        ('"alice"@example.test', replies.UNKNOWN_USER),
        # "%" and "!" are just characters of a local part: an unknown user, never a relay
        ("alice%remote.test@example.test", replies.UNKNOWN_USER),
        ("remote.test!alice@example.test", replies.UNKNOWN_USER),
        ("a%b@example.test", replies.UNKNOWN_USER),
        # source routes are stripped by the parser; only the mailbox counts
        ("@remote.test:alice@example.test", ["alice@example.test"]),
        ("@example.test:user@remote.test", replies.RELAY_DENIED),
        # anything else needs a trusted network or AUTH: 554 5.7.1
        ("user@remote.test", replies.RELAY_DENIED),
        ("alice@sub.example.test", replies.RELAY_DENIED),
        ("alice@[127.0.0.1]", replies.RELAY_DENIED),  # address literals are never local
        ("alice@[IPv6:::1]", replies.RELAY_DENIED),
        ("alice%example.test@remote.test", replies.RELAY_DENIED),
    ],
)
def test_resolve_rcpt_for_a_stranger(address, verdict):
    assert resolve_rcpt(STRANGER, rcpt(address), DIRECTORY) == verdict


@pytest.mark.parametrize("client", [TRUSTED, AUTHED], ids=["trusted", "authenticated"])
@pytest.mark.parametrize(
    "address, verdict",
    [
        ("user@remote.test", ["user@remote.test"]),
        ("User@Remote.TEST", ["User@remote.test"]),  # the remote local part is kept as sent
        ("alice@[127.0.0.1]", ["alice@[127.0.0.1]"]),
        ("@a.test:user@remote.test", ["user@remote.test"]),
        ("alice@example.test", ["alice@example.test"]),
        ("nobody@example.test", replies.UNKNOWN_USER),  # relay rights do not invent users
        ("alice%remote.test@example.test", replies.UNKNOWN_USER),
    ],
)
def test_resolve_rcpt_for_a_relay_client(client, address, verdict):
    assert resolve_rcpt(client, rcpt(address), DIRECTORY) == verdict


def test_unknown_user_and_relay_denied_codes():
    assert (replies.UNKNOWN_USER.code, replies.UNKNOWN_USER.enhanced) == (550, "5.1.1")
    assert (replies.RELAY_DENIED.code, replies.RELAY_DENIED.enhanced) == (554, "5.7.1")


def test_postmaster_without_local_domains():
    empty = ConfigDirectory()
    assert resolve_rcpt(STRANGER, rcpt("postmaster"), empty) == replies.UNKNOWN_USER
    assert resolve_rcpt(TRUSTED, rcpt("postmaster"), empty) == replies.UNKNOWN_USER


def test_postmaster_maps_to_primary_domain():
    directory = ConfigDirectory(domains=frozenset({"b.test", "a.test"}),
                               users=frozenset({"postmaster@a.test", "postmaster@b.test"}))
    assert resolve_rcpt(STRANGER, rcpt("postmaster"), directory) == ["postmaster@a.test"]


def test_self_alias_without_a_mailbox_has_no_target():
    directory = ConfigDirectory(domains=frozenset({"x.test"}), aliases={"a@x.test": ("a@x.test",)})
    assert resolve_rcpt(STRANGER, rcpt("a@x.test"), directory) == replies.UNKNOWN_USER


def test_expansion_is_capped():
    users = frozenset(f"u{i}@x.test" for i in range(MAX_EXPANSION + 50))
    directory = ConfigDirectory(domains=frozenset({"x.test"}), users=users,
                               aliases={"all@x.test": tuple(sorted(users))})
    assert len(directory.expand("all@x.test")) == MAX_EXPANSION


class CountingAliases(Mapping):
    """A plain alias table that counts lookups, to measure how much work expansion does."""

    def __init__(self, table):
        self.table, self.lookups = table, 0

    def __getitem__(self, key):
        self.lookups += 1
        return self.table[key]

    def __contains__(self, key):
        self.lookups += 1
        return key in self.table

    def __iter__(self):
        return iter(self.table)

    def __len__(self):
        return len(self.table)


def test_diamond_aliases_expand_in_bounded_work_small():
    # level i -> two aliases of level i+1 -> ... -> one user: a small chain is cheap
    aliases = CountingAliases({"l0@x.test": ("l1a@x.test", "l1b@x.test"),
                               "l1a@x.test": ("u@x.test",), "l1b@x.test": ("u@x.test",)})
    directory = ConfigDirectory(domains=frozenset({"x.test"}), users=frozenset({"u@x.test"}), aliases=aliases)
    assert directory.expand("l0@x.test") == ["u@x.test"]


def test_diamond_aliases_expand_in_bounded_work():
    depth = 14
    table = {}
    for level in range(depth):
        for name in ("a", "b") if level else ("a",):
            table[f"{name}{level}@x.test"] = (f"a{level + 1}@x.test", f"b{level + 1}@x.test")
    for name in ("a", "b"):
        table[f"{name}{depth}@x.test"] = ("u@x.test",)
    aliases = CountingAliases(table)
    directory = ConfigDirectory(domains=frozenset({"x.test"}), users=frozenset({"u@x.test"}), aliases=aliases)
    assert directory.expand("a0@x.test") == ["u@x.test"]
    # 2*depth+1 aliases: the work should grow with the table, not with 2**depth paths
    assert aliases.lookups <= 20 * len(table)


# -- check_mail ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "client, verdict",
    [
        (STRANGER, None),
        (TRUSTED, None),
        (ClientFacts(IP("127.0.0.1"), "submission", trusted=True), replies.AUTH_REQUIRED),  # trust is no AUTH
        (ClientFacts(IP("203.0.113.9"), "submission", trusted=False), replies.AUTH_REQUIRED),
        (AUTHED, None),
        (ClientFacts(IP("203.0.113.9"), "smtp", trusted=False, auth_user="bob"), None),
    ],
)
def test_check_mail(client, verdict):
    assert check_mail(client) == verdict


def test_auth_required_is_530_5_7_0():
    assert (replies.AUTH_REQUIRED.code, replies.AUTH_REQUIRED.enhanced) == (530, "5.7.0")


# -- is_trusted ---------------------------------------------------------------------------
LOOPBACK = [NET("127.0.0.0/8")]
MIXED = [NET("10.0.0.0/8"), NET("2001:db8::/32"), NET("::1/128")]


@pytest.mark.parametrize(
    "ip, networks, trusted",
    [
        ("127.0.0.1", LOOPBACK, True),
        ("127.255.255.254", LOOPBACK, True),
        ("128.0.0.1", LOOPBACK, False),
        ("::ffff:127.0.0.1", LOOPBACK, True),  # an IPv4 client on a dual-stack socket
        ("::ffff:10.1.2.3", MIXED, True),
        ("::ffff:11.1.2.3", MIXED, False),
        ("::1", LOOPBACK, False),
        ("::1", MIXED, True),
        ("2001:db8::25", MIXED, True),
        ("2001:db9::25", MIXED, False),
        ("10.0.0.1", [NET("::/0")], False),  # an IPv6 network never holds an IPv4 address
        ("10.0.0.1", [], False),
        ("::ffff:127.0.0.1", [], False),
    ],
)
def test_is_trusted(ip, networks, trusted):
    assert is_trusted(IP(ip), networks) is trusted


def test_local_directory_helpers():
    assert DIRECTORY.is_local("EXAMPLE.test") and not DIRECTORY.is_local("remote.test")
    assert DIRECTORY.primary_domain() == "example.test"
    assert ConfigDirectory().primary_domain() is None
    assert DIRECTORY.expand("nobody@example.test") is None
    assert DIRECTORY.expand("bob@example.test") == ["bob@example.test"]


# -- check_sender: what an authenticated user may put in MAIL FROM ------------------------
SENDER_DIRECTORY = ConfigDirectory(
    domains=frozenset({"example.test", "other.test"}),
    users=frozenset({"alice@example.test", "bob@example.test"}),
    aliases={"team@example.test": ("alice@example.test", "bob@example.test"),
             "sales@example.test": ("bob@example.test",),
             "fwd@example.test": ("someone@remote.test",)},
)
EXTRA = {"alice@example.test": ["alice@remote.test", "@owned.test"]}


@pytest.mark.parametrize("sender, allowed", [
    (None, True),  # <>: bounces and reports
    ("alice@example.test", True),
    ("ALICE@Example.Test", True),  # ASCII case does not matter
    ("team@example.test", True),  # an alias that delivers to her
    ("alice@remote.test", True),  # listed for her
    ("anyone@owned.test", True),  # a whole domain listed for her
    ("bob@example.test", False),
    ("sales@example.test", False),  # an alias, but not hers
    ("fwd@example.test", False),
    ("alice@other.test", False),
    ("anyone@sub.owned.test", False),  # "@owned.test" is that domain only
    ("alice@example.test.evil.test", False),
    ("someone@remote.test", False),
])
def test_check_sender_table(sender, allowed):
    address = None if sender is None else Address(*sender.rsplit("@", 1))
    if address is not None:
        address = Address(address.local, address.domain.lower())
    verdict = check_sender("alice@example.test", address, SENDER_DIRECTORY, EXTRA)
    assert (verdict is None) == allowed
    if not allowed:
        assert (verdict.code, verdict.enhanced) == (553, "5.7.1")


def test_extra_senders_belong_to_their_user_only():
    bob = check_sender("bob@example.test", Address("alice", "remote.test"), SENDER_DIRECTORY, EXTRA)
    assert bob == replies.SENDER_NOT_OWNED


# -- sub-addresses (recipient_delimiter) -------------------------------------------------------
SUB = ConfigDirectory(
    domains=frozenset({"example.test"}),
    users=frozenset({"alice@example.test", "bob@example.test", "a+b@example.test"}),
    aliases={"team@example.test": ("alice@example.test", "bob@example.test"),
             "alice+spam@example.test": ("bob@example.test",)},
    delimiters="+-",
)


@pytest.mark.parametrize("address, expected", [
    ("alice+lists@example.test", ["alice@example.test"]),
    ("alice-lists@example.test", ["alice@example.test"]),
    ("alice+a-b+c@example.test", ["alice@example.test"]),  # the first delimiter cuts
    ("team+x@example.test", ["alice@example.test", "bob@example.test"]),  # aliases too
    ("alice+spam@example.test", ["bob@example.test"]),  # the whole address wins
    ("a+b@example.test", ["a+b@example.test"]),  # a user whose name has the delimiter
    ("+alice@example.test", replies.UNKNOWN_USER),  # no local part before the delimiter
    ("carol+x@example.test", replies.UNKNOWN_USER),
    ("alice+@example.test", ["alice@example.test"]),
])
def test_sub_addresses_deliver_to_the_base_address(address, expected):
    assert resolve_rcpt(STRANGER, rcpt(address), SUB) == expected


def test_sub_addresses_off():
    off = ConfigDirectory(domains=SUB.domains, users=SUB.users, aliases=SUB.aliases, delimiters="")
    assert resolve_rcpt(STRANGER, rcpt("alice+lists@example.test"), off) == replies.UNKNOWN_USER


def test_a_user_may_send_from_their_sub_addresses():
    assert check_sender("alice@example.test", Address("alice+lists", "example.test"), SUB, {}) is None
    assert check_sender("alice@example.test", Address("bob+x", "example.test"), SUB, {}) == replies.SENDER_NOT_OWNED
