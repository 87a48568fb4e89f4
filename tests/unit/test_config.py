"""geosmtp.config: one validation pass that names every bad key, and the shipped file."""
from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest

from geosmtp.config import Config, ConfigError, load, parse_duration, parse_size, validate

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "geosmtp.toml"
LISTENER = {"name": "smtp", "address": "127.0.0.1:2525"}


def minimal(**sections) -> dict:
    data = {"listener": [dict(LISTENER)]}
    data.update(copy.deepcopy(sections))
    return data


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data, "test.toml")
    assert str(info.value).startswith("test.toml: ")
    return info.value.problems


def keys(data: dict) -> list[str]:
    return [p.partition(": ")[0] for p in problems(data)]


# -- the shipped file and the defaults ----------------------------------------------------
def test_shipped_config_validates():
    config = load(SHIPPED)
    assert isinstance(config, Config)
    assert [(item.name, item.mode) for item in config.listener] == [("smtp", "smtp"), ("submission", "submission")]
    assert config.limits.max_recipients >= 100  # RFC 5321 4.5.3.1.8
    assert config.limits.max_line_length >= 1000  # RFC 5321 4.5.3.1.6
    assert config.limits.max_message_size == 35 * 1024 * 1024
    assert config.limits.command_timeout == 300 and config.limits.data_timeout == 180
    assert config.queue.retry_schedule[0] == 300 and config.queue.retry_schedule[-1] == 4 * 3600
    assert config.queue.max_lifetime == 5 * 86400
    # every alias target exists, every user is local
    for user in config.local.users:
        assert user.rpartition("@")[2] in config.local.domains
    assert ipaddress.ip_address("127.0.0.1") in config.relay.trusted_networks[0]


def test_minimal_config_gets_defaults():
    config = validate(minimal())
    assert config.listener[0].host == "127.0.0.1" and config.listener[0].port == 2525
    assert config.listener[0].mode == "smtp"
    assert config.listener[0].hold is False
    assert config.limits.max_recipients == 100
    assert config.server.bare_newline == "reject"
    assert config.local.domains == [] and config.relay.trusted_networks == []
    assert config.queue.retry_schedule and config.queue.max_lifetime == 5 * 86400


def test_listener_hold():
    # accepted mail waits in queue/hold/ until an operator releases it
    config = validate({"listener": [dict(LISTENER, hold=True), {"name": "other", "address": "127.0.0.1:2526"}]})
    assert [item.hold for item in config.listener] == [True, False]
    assert all(item.hold is False for item in load(SHIPPED).listener)
    assert keys({"listener": [dict(LISTENER, hold=None)]}) == ["listener[0].hold"]


def test_config_is_frozen():
    config = validate(minimal())
    with pytest.raises(Exception):
        config.limits.max_recipients = 5  # type: ignore[misc]


# -- every error at once, by dotted key ---------------------------------------------------
def test_every_error_reported_at_once():
    data = {
        "listener": [dict(LISTENER), {"name": "bad name!", "address": "nope", "mode": "lmtp"}],
        "limits": {"max_recipients": 5, "command_timeout": "5x", "bogus": 1},
        "queue": {"concurrency": 0},
        "server": {"bare_newline": "lenient"},
        "zzz": {},
    }
    found = keys(data)
    for key in [
        "listener[1].name",
        "listener[1].address",
        "listener[1].mode",
        "limits.max_recipients",
        "limits.command_timeout",
        "limits.bogus",
        "queue.concurrency",
        "server.bare_newline",
        "zzz",
    ]:
        assert key in found, (key, found)
    assert len(found) == 9


@pytest.mark.parametrize(
    "data, key",
    [
        (minimal(extra=1), "extra"),
        (minimal(server={"hostnme": "x"}), "server.hostnme"),
        (minimal(limits={"max_recipient": 100}), "limits.max_recipient"),
        (minimal(local={"user": []}), "local.user"),
        (minimal(relay={"trusted": []}), "relay.trusted"),
        (minimal(queue={"retry": []}), "queue.retry"),
        (minimal(log={"lvl": "INFO"}), "log.lvl"),
        ({"listener": [dict(LISTENER, port=25)]}, "listener[0].port"),
    ],
)
def test_unknown_keys_are_refused(data, key):
    assert problems(data) == [f"{key}: unknown key"]


def test_missing_or_empty_listener():
    assert keys({}) == ["listener"]
    assert keys({"listener": []}) == ["listener"]
    assert keys({"listener": [{"address": "127.0.0.1:25"}]}) == ["listener[0].name"]


@pytest.mark.parametrize(
    "address, host, port",
    [("127.0.0.1:2525", "127.0.0.1", 2525), ("[::1]:25", "::1", 25), ("localhost:65535", "localhost", 65535),
     ("0.0.0.0:1", "0.0.0.0", 1)],
)
def test_listener_address_valid(address, host, port):
    listener = validate({"listener": [{"name": "a", "address": address}]}).listener[0]
    assert (listener.host, listener.port) == (host, port)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:123456", ":25", "::1:25", "[::1]", "a b:25",
     "127.0.0.1:x"],
)
def test_listener_address_invalid(address):
    assert keys({"listener": [{"name": "a", "address": address}]}) == ["listener[0].address"]


def test_listener_names_and_addresses_unique():
    assert problems({"listener": [dict(LISTENER), dict(LISTENER, address="127.0.0.1:2526")]}) == [
        "(top level): listener names must be unique"
    ]
    assert problems({"listener": [dict(LISTENER), dict(LISTENER, name="other")]}) == [
        "(top level): two listeners cannot share an address"
    ]


# -- durations and sizes ------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, seconds",
    [(30, 30.0), (0.5, 0.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0),
     ("5d", 432000.0), ("1.5h", 5400.0), (" 5m ", 300.0), ("10 m", 600.0)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds
    assert validate(minimal(limits={"command_timeout": value})).limits.command_timeout == seconds


@pytest.mark.parametrize("value", ["5x", "", "-5", "5 minutes", "m", "5mm", "1e3", 0, -1, "0s", True, None, [5]])
def test_bad_durations(value):
    assert keys(minimal(limits={"data_timeout": value})) == ["limits.data_timeout"]


@pytest.mark.parametrize(
    "value, octets",
    [(100, 100), ("100", 100), ("512k", 512 * 1024), ("10M", 10 * 1024**2), ("10m", 10 * 1024**2),
     ("10MB", 10 * 1024**2), ("1G", 1024**3), ("35M", 36_700_160)],
)
def test_sizes(value, octets):
    assert parse_size(value) == octets
    assert validate(minimal(limits={"max_message_size": value})).limits.max_message_size == octets


@pytest.mark.parametrize("value", ["1.5M", 1.5, "0", 0, -1, "-1M", "10T", "M", True, "", None])
def test_bad_sizes(value):
    assert keys(minimal(limits={"max_message_size": value})) == ["limits.max_message_size"]


def test_retry_schedule_items_are_durations():
    config = validate(minimal(queue={"retry_schedule": ["5m", 30, "4h"], "max_lifetime": "5d"}))
    assert config.queue.retry_schedule == [300.0, 30.0, 14400.0]
    assert config.queue.max_lifetime == 432000.0
    assert keys(minimal(queue={"retry_schedule": []})) == ["queue.retry_schedule"]
    assert keys(minimal(queue={"retry_schedule": ["5m", "soon"]})) == ["queue.retry_schedule[1]"]


# -- limits -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "limits, key",
    [
        ({"max_recipients": 99}, "limits.max_recipients"),  # RFC 5321 4.5.3.1.8: at least 100
        ({"max_line_length": 999}, "limits.max_line_length"),  # 4.5.3.1.6: at least 1000
        ({"max_connections": 0}, "limits.max_connections"),
        ({"max_connections_per_ip": 0}, "limits.max_connections_per_ip"),
        ({"max_errors": 0}, "limits.max_errors"),
        ({"max_recipients": "many"}, "limits.max_recipients"),
        ({"data_deadline": "0s"}, "limits.data_deadline"),
        ({"data_deadline": "soon"}, "limits.data_deadline"),
        ({"min_data_rate": 0}, "limits.min_data_rate"),
        ({"min_data_rate": "fast"}, "limits.min_data_rate"),
        ({"stress_threshold": 0}, "limits.stress_threshold"),
        ({"stress_threshold": 1.2}, "limits.stress_threshold"),
        ({"stress_threshold": "most"}, "limits.stress_threshold"),
        ({"stress_timeout": "-1s"}, "limits.stress_timeout"),
        ({"stress_min_data_rate": -5}, "limits.stress_min_data_rate"),
        ({"stress_max_errors": 0}, "limits.stress_max_errors"),
    ],
)
def test_limit_bounds(limits, key):
    assert keys(minimal(limits=limits)) == [key]


def test_data_deadline_and_stress_defaults_and_units():
    lim = validate(minimal()).limits
    assert (lim.data_deadline, lim.min_data_rate) == (300.0, 500)  # Postfix's 500 B/s
    assert (lim.stress_threshold, lim.stress_timeout, lim.stress_min_data_rate, lim.stress_max_errors) == \
        (0.8, 10.0, 1000, 3)
    lim = validate(minimal(limits={"data_deadline": "2m", "min_data_rate": "1k", "stress_threshold": 1,
                                   "stress_timeout": "5s", "stress_min_data_rate": "4k"})).limits
    assert (lim.data_deadline, lim.min_data_rate, lim.stress_threshold) == (120.0, 1024, 1.0)
    assert (lim.stress_timeout, lim.stress_min_data_rate) == (5.0, 4096)
    shipped = load(SHIPPED).limits
    assert (shipped.data_deadline, shipped.min_data_rate, shipped.stress_threshold) == (300.0, 500, 0.8)


def test_limit_minimums_accepted():
    config = validate(minimal(limits={"max_recipients": 100, "max_line_length": 1000}))
    assert config.limits.max_recipients == 100 and config.limits.max_line_length == 1000


# -- [local] ------------------------------------------------------------------------------
def test_local_is_normalised_to_lower_case():
    config = validate(minimal(local={
        "domains": ["Example.TEST"],
        "users": ["Alice@Example.test"],
        "aliases": {"Team@EXAMPLE.test": ["ALICE@example.test", "Someone@Remote.TEST"]},
    }))
    assert config.local.domains == ["example.test"]
    assert config.local.users == ["alice@example.test"]
    assert config.local.aliases == {"team@example.test": ["alice@example.test", "someone@remote.test"]}


def test_alias_may_name_itself_and_other_aliases():
    local = {
        "domains": ["x.test"],
        "users": ["a@x.test", "b@x.test"],
        "aliases": {"a@x.test": ["a@x.test", "fwd@remote.test"], "all@x.test": ["team@x.test"],
                    "team@x.test": ["a@x.test", "b@x.test"]},
    }
    assert validate(minimal(local=local)).local.aliases["all@x.test"] == ["team@x.test"]


@pytest.mark.parametrize(
    "local, fragment",
    [
        ({"domains": ["x.test"], "users": ["a@y.test"]}, "'a@y.test' is not in one of local.domains"),
        ({"domains": ["x.test"], "aliases": {"a@y.test": ["b@remote.test"]}}, "'a@y.test' is not in one of"),
        ({"domains": ["x.test"], "users": ["a@x.test"], "aliases": {"b@x.test": ["c@x.test"]}},
         "'c@x.test' is neither a user nor an alias"),
        ({"domains": ["x.test"], "users": ["a@x.test"], "aliases": {"b@x.test": []}}, "has no targets"),
        ({"domains": ["x.test"], "users": ["not an address"]}, "user 'not an address'"),
        ({"domains": ["x.test"], "users": ["a/b@x.test"]}, "mailbox directory name"),
        ({"domains": ["x.test"], "aliases": {"b@x.test": ["bad..target@x.test"]}}, "alias target"),
        ({"domains": ["bad domain"]}, "is not a domain name"),
        ({"domains": ["x.test."]}, "is not a domain name"),
    ],
)
def test_local_errors(local, fragment):
    found = problems(minimal(local=local))
    assert len(found) == 1 and found[0].startswith("local")
    assert fragment in found[0]


def test_every_local_cross_check_problem_is_reported():
    found = problems(minimal(local={
        "domains": ["x.test"],
        "users": ["a@x.test", "stray@y.test"],
        "aliases": {"b@x.test": ["ghost@x.test"]},
    }))
    assert any("stray@y.test" in p for p in found)
    assert any("ghost@x.test" in p for p in found)


def test_local_and_other_sections_reported_together():
    found = keys(minimal(local={"domains": ["x.test"], "users": ["a@y.test"]}, limits={"max_recipients": 1}))
    assert sorted(found) == ["limits.max_recipients", "local"]


# -- other sections -----------------------------------------------------------------------
def test_trusted_networks():
    config = validate(minimal(relay={"trusted_networks": ["10.0.0.0/8", "::1/128", "192.0.2.7/24", "192.0.2.9"]}))
    nets = config.relay.trusted_networks
    assert nets[0] == ipaddress.ip_network("10.0.0.0/8")
    assert nets[2] == ipaddress.ip_network("192.0.2.0/24")  # host bits allowed
    assert nets[3] == ipaddress.ip_network("192.0.2.9/32")
    assert keys(minimal(relay={"trusted_networks": ["10.0.0.0/8", "nope", 5]})) == [
        "relay.trusted_networks[1]", "relay.trusted_networks[2]"
    ]


@pytest.mark.parametrize("hostname, expected", [("Mail.Example.TEST", "mail.example.test"), ("a", "a")])
def test_hostname(hostname, expected):
    assert validate(minimal(server={"hostname": hostname})).server.hostname == expected


@pytest.mark.parametrize("hostname", ["bad host", "-a.test", "a.test-", "", "a_b.test", "ü.test"])
def test_bad_hostname(hostname):
    assert keys(minimal(server={"hostname": hostname})) == ["server.hostname"]


@pytest.mark.parametrize("section, value", [
    ("server", {"hostname": "mail..example.test"}),
    ("server", {"hostname": "mail.-x.test"}),
    ("local", {"domains": ["a..test"]}),
    ("local", {"domains": ["a.-b.test"]}),
])
def test_names_with_bad_labels_are_refused(section, value):
    # RFC 1035 2.3.1 / RFC 5321 4.1.2: a Domain is sub-domains of letters, digits and
    # inner hyphens; "a..b" can never match a parsed address and is no name to greet with
    assert keys(minimal(**{section: value}))[0].startswith(section)


def test_log_level_any_case():
    assert validate(minimal(log={"level": "debug"})).log.level == "DEBUG"
    assert keys(minimal(log={"level": "loud", "format": "xml"})) == ["log.level", "log.format"]


def test_bare_newline_modes():
    assert validate(minimal(server={"bare_newline": "normalize"})).server.bare_newline == "normalize"


# -- load() -------------------------------------------------------------------------------
def test_load_toml(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[listener]]\nname = "a"\naddress = "127.0.0.1:2525"\n[limits]\ndata_timeout = "1m"\n')
    assert load(path).limits.data_timeout == 60.0
    assert load(str(path)).listener[0].name == "a"


def test_load_reports_keys_with_file_name(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[listener]]\nname = "a"\naddress = "nope"\n[limits]\nmax_recipients = 1\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path)
    assert [p.partition(":")[0] for p in info.value.problems] == ["listener[0].address", "limits.max_recipients"]


@pytest.mark.parametrize("text", ["[listener\n", "a = \n", "x = 'unterminated\n", "[a]\n[a]\n", "\x00"])
def test_bad_toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("not valid TOML")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert info.value.problems[0].startswith("cannot read")


# -- [redis] --------------------------------------------------------------------------------
def test_redis_section():
    assert validate(minimal()).redis is None  # absent: every count in its own process
    r = validate(minimal(redis={"url": "rediss://:pw@10.0.0.20:6380/1", "sentinel": ["10.0.0.21:26379"],
                                "timeout": 0.2})).redis
    assert (r.url, r.sentinel, r.timeout, r.on_redis_error) == ("rediss://:pw@10.0.0.20:6380/1",
                                                               ["10.0.0.21:26379"], 0.2, "allow")
    assert r.limits and r.greylist and r.dns_cache and r.connection_lease == 30
    assert keys(minimal(redis={"url": "http://x/"})) == ["redis.url"]
    assert keys(minimal(redis={"url": "redis:///0"})) == ["redis.url"]
    assert keys(minimal(redis={"sentinel": ["10.0.0.21"]})) == ["redis.sentinel"]
    assert keys(minimal(redis={"on_redis_error": "reject"})) == ["redis.on_redis_error"]
    assert keys(minimal(redis={"urls": "redis://x"})) == ["redis.urls"]
    # the view's refresh: 0.5 s by default, 0 (every check waits for Redis) allowed
    assert validate(minimal(redis={})).redis.refresh == 0.5
    assert [validate(minimal(redis={"refresh": v})).redis.refresh for v in (0, "0s", "0.25s")] == [0, 0, 0.25]
    assert keys(minimal(redis={"refresh": "-1s"})) == keys(minimal(redis={"refresh": "2h"})) == ["redis.refresh"]


def test_the_fleet_example_is_a_valid_configuration_of_what_it_shares():
    """conf/deploy/node.toml (README "Running several nodes") loads, and shares what it says:
    limits, greylisting and the DNS cache through Redis, the directory in PostgreSQL, every
    listener behind the balancer's PROXY header."""
    config = load(SHIPPED.parent / "deploy" / "node.toml")
    assert config.redis is not None and config.redis.limits and config.redis.greylist and config.redis.dns_cache
    assert config.directory.backend == "postgresql" and config.directory.cache_ttl > 0
    assert all(item.proxy_protocol and item.proxy_trusted for item in config.listener)
    assert config.metrics.address and not config.metrics.address.startswith("127.")
