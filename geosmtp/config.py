"""Load geosmtp's TOML configuration and validate it once, reporting every error by key.

Only `server` and `cli` read this module; every other part gets plain values in its
constructor, so tests build them without a file.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from geosmtp.protocol import PathError, parse_address


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists one line per bad key."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """`30`, `30s`, `5m`, `4h`, `5d` → seconds. Used for every time value in the file."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"4h\" or \"5d\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"4h\" or \"5d\"")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: object) -> int:
    """`10485760`, `"10M"`, `"512k"` → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760 or \"10M\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError("expected a size such as 10485760 or \"10M\"")
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_hostname(name: str) -> bool:
    """Dot-separated LDH labels of 1-63 octets (RFC 1123 2.1), 253 octets at most."""
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _duration_or_zero(value: object) -> float:
    """A duration, or 0 (`0`, `"0s"`) where zero means "never wait" (turns a cache off)."""
    if not isinstance(value, bool) and isinstance(value, (int, float, str)) and re.fullmatch(
            r"\s*0+(?:\.0+)?\s*[smhd]?\s*", str(value)):
        return 0.0
    return parse_duration(value)


DurationOrZero = Annotated[float, BeforeValidator(_duration_or_zero)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    hostname: str = Field(default_factory=socket.getfqdn)
    spool_dir: Path = Path("./var/spool")
    # How a commit is made durable (geosmtp.groupcommit), spool and Maildirs: "syncfs"
    # flushes the whole filesystem once for every commit in flight (fast, but it also waits
    # for whatever else was written there); "fsync" flushes each file and directory touched
    spool_flush: Literal["syncfs", "fsync"] = "syncfs"
    # started as root: bind the ports, open the spool, then become this user (and group;
    # default: the user's own) before accepting anything (geosmtp.privileges)
    user: str | None = None
    group: str | None = None
    # SMTP worker processes: 1 runs everything in one process; N > 1 starts N processes that
    # accept on the master's listening sockets, and the master runs the one queue manager
    workers: int = Field(1, ge=1, le=64)
    # RFC 5321 2.3.8: lines end in CRLF. A bare LF or CR in DATA is rejected (550 5.6.0), or
    # with "normalize" rewritten to CRLF. The end of data is <CRLF>.<CRLF> either way.
    bare_newline: Literal["reject", "normalize"] = "reject"
    # RFC 2920 3.1: a client that sends before the greeting, or past DATA before the 354,
    # gets 554 5.5.0 and the session ends (Postfix 3.9's smtpd_forbid_unauth_pipelining).
    # Clients from relay.trusted_networks and authenticated clients are never checked.
    forbid_unauth_pipelining: bool = True
    # SIGTERM: /readyz says 503 at once; the listeners close after drain_delay (time for a
    # load balancer to notice); open sessions may finish their transaction for drain_timeout,
    # then get 421 4.3.2. An idle session gets its 421 as soon as the listeners close.
    drain_delay: Annotated[float, BeforeValidator(lambda v: 0.0 if v in (0, "0", "0s") else parse_duration(v))] = 0.0
    drain_timeout: Duration = 30.0

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not is_hostname(v):
            raise ValueError("must be a host name such as mail.example.com")
        return v.lower()


class ListenerConfig(_Section):
    name: str
    address: str
    mode: Literal["smtp", "submission"] = "smtp"
    # Park every message accepted here in queue/hold/ until an operator releases it
    # (geosmtp-queue release): Postfix's HOLD action, for quarantine or staging.
    hold: bool = False
    # "starttls" offers STARTTLS (RFC 3207); "implicit" is TLS from the first byte (RFC 8314,
    # port 465). Both need [tls].
    tls: Literal["none", "starttls", "implicit"] = "none"
    require_tls: bool = False  # refuse mail commands until STARTTLS (530 5.7.0)
    auth: bool | None = None  # offer AUTH here; default: on submission listeners only
    allow_plaintext_auth: bool = False  # AUTH without TLS (only for loopback or a trusted LAN)
    # HAProxy PROXY protocol v1/v2 in front of every connection, required from proxy_trusted
    # (the balancers) and refused from anywhere else; the real client address then drives
    # policy, limits, logs and Received:. The header must arrive within proxy_timeout.
    proxy_protocol: bool = False
    proxy_trusted: list[Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                  BeforeValidator(lambda v: _network(v))]] = []
    proxy_timeout: Annotated[float, BeforeValidator(lambda v: parse_duration(v))] = 5.0

    @model_validator(mode="after")
    def _proxy(self) -> "ListenerConfig":
        if self.proxy_protocol and not self.proxy_trusted:
            raise ValueError("proxy_protocol needs proxy_trusted, the balancers' networks")
        return self

    @property
    def offers_auth(self) -> bool:
        return self.mode == "submission" if self.auth is None else self.auth

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        split_hostport(v)
        return v

    @property
    def host(self) -> str:
        return split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address)[1]


def split_hostport(value: str) -> tuple[str, int]:
    """`"127.0.0.1:2525"`, `"[::1]:25"` → (host, port); ValueError otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if not m:
        raise ValueError('must be "host:port", e.g. "127.0.0.1:2525" or "[::1]:2525"')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    return host, port


class LimitsConfig(_Section):
    max_message_size: Size = 36_700_160  # 35 MiB
    max_recipients: int = Field(100, ge=100)  # RFC 5321 4.5.3.1.8: at least 100
    max_line_length: int = Field(10_000, ge=1000)  # RFC 5321 4.5.3.1.6 allows no fewer than 1000
    command_timeout: Duration = 300.0  # RFC 5321 4.5.3.2.7: server timeout 5 minutes
    data_timeout: Duration = 180.0  # RFC 5321 4.5.3.2.5: data block 3 minutes
    # a whole DATA body: it starts with data_deadline in hand and earns 1 s per min_data_rate
    # octets, saving up no more than data_deadline (Postfix smtpd_min_data_rate); 451 4.4.2
    data_deadline: Duration = 300.0
    min_data_rate: Size = 500  # octets per second
    max_connections: int = Field(1000, ge=1)  # per listener and per process (worker)
    max_connections_per_ip: int = Field(20, ge=1)  # an IPv6 client counts by its /64
    max_errors: int = Field(20, ge=1)
    # stress (Postfix STRESS_README): past this share of max_connections open on a listener,
    # its sessions, open ones too, get timeouts of at most stress_timeout, a minimum data rate
    # of at least stress_min_data_rate and at most stress_max_errors; normal again a tenth of
    # max_connections below it. A new client finding the listener full takes the slot of the
    # session that has sent nothing useful for longest (421 4.7.0 to that one).
    stress_threshold: float = Field(0.8, gt=0, le=1)
    stress_timeout: Duration = 10.0
    stress_min_data_rate: Size = 1000
    stress_max_errors: int = Field(3, ge=1)
    # accepted messages per hour (451 4.7.1 past it); 0 means no limit
    messages_per_hour_per_ip: int = Field(0, ge=0)
    messages_per_hour_per_user: int = Field(0, ge=0)
    auth_failures_per_hour_per_ip: int = Field(30, ge=0)  # then AUTH is refused (421 4.7.0)


class CertificateConfig(_Section):
    """[[tls.certificate]]: one more certificate, for the SNI names it lists."""

    cert_file: Path
    key_file: Path
    names: list[str] = []  # "mx.example.com" or "*.example.org" (one label)

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            bare = name[2:] if name.startswith("*.") else name
            if not is_hostname(bare):
                raise ValueError(f"{name!r} is not a host name or *.domain")
            out.append(name.lower())
        return out


# TLS 1.2: forward-secret AEAD suites only (no CBC, no static RSA key exchange)
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"
# TLS 1.3: OpenSSL's own default (all three are AEAD and forward-secret)
DEFAULT_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
_CIPHERSUITE = re.compile(r"TLS_[A-Z0-9_]+(:TLS_[A-Z0-9_]+)*")


class TLSConfig(_Section):
    # the default certificate; [[tls.certificate]] adds more, chosen by the client's SNI
    cert_file: Path | None = None
    key_file: Path | None = None
    certificate: list[CertificateConfig] = []
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    handshake_timeout: Duration = 30.0
    ciphers: str = DEFAULT_CIPHERS  # OpenSSL cipher string, TLS 1.2
    ciphersuites: str = DEFAULT_CIPHERSUITES  # TLS 1.3
    session_tickets: bool = False

    @field_validator("ciphers")
    @classmethod
    def _ciphers(cls, v: str) -> str:
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(v)
        except ssl.SSLError:
            raise ValueError(f"{v!r}: OpenSSL selects no cipher with this string") from None
        return v

    @field_validator("ciphersuites")
    @classmethod
    def _ciphersuites(cls, v: str) -> str:
        if not _CIPHERSUITE.fullmatch(v):
            raise ValueError(f"{v!r} is not a list like TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
        return v

    @model_validator(mode="after")
    def _some_certificate(self) -> "TLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is None and not self.certificate:
            raise ValueError("needs cert_file and key_file, or a [[tls.certificate]]")
        return self

    def certificates(self) -> list[CertificateConfig]:
        """Every certificate, the default first (cert_file, else the first [[tls.certificate]])."""
        top = [CertificateConfig(cert_file=self.cert_file, key_file=self.key_file)] if self.cert_file else []
        return top + list(self.certificate)


class AuthConfig(_Section):
    users_file: Path | None = None  # address:scrypt-hash lines; `geosmtp passwd` writes it
    # an authenticated user may use as sender only their own address, the aliases that
    # deliver to them, and what `senders` lists for them ("@domain" for a whole domain)
    restrict_sender: bool = True
    senders: dict[str, list[str]] = {}
    max_failures: int = Field(3, ge=1)  # per session, then 421 4.7.0

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for user, allowed in v.items():
            keys = []
            for a in allowed:
                keys.append(a.lower() if a.startswith("@") else _address_key(a, "sender"))
            out[_address_key(user, "user")] = keys
        return out


def _address_key(value: str, where: str) -> str:
    try:
        addr = parse_address(value)
    except PathError as exc:
        raise ValueError(f"{where} {value!r}: {exc.reason}") from None
    return addr.key


def _lmtp_address(v: str | None) -> str | None:
    if v is not None:
        from geosmtp.delivery.lmtp import parse_address as parse_lmtp

        parse_lmtp(v)  # ValueError says what is wrong
    return v


LMTPAddress = Annotated[str | None, AfterValidator(_lmtp_address)]


def _duration_or_zero(value: object) -> float:
    return 0.0 if value in (0, "0", "0s") and not isinstance(value, bool) else parse_duration(value)


class DirectoryConfig(_Section):
    """[directory]: where local domains, mailboxes, aliases and AUTH users come from."""

    # "config": [local] domains/users/aliases and [auth] users_file; "sqlite": the file at
    # `path`; "postgresql": the database at `url`. Make the tables with `geosmtp directory init`.
    backend: Literal["config", "sqlite", "postgresql"] = "config"
    path: Path = Path("./var/directory.sqlite")  # sqlite
    # postgresql: a libpq URL or "key=value" string; the password better in password_file
    url: str | None = None
    password_file: Path | None = None
    # the longest one lookup may take: waiting for a pooled connection, connecting (libpq's
    # minimum is 2 s), the statement (statement_timeout); SQLite: waiting for a lock
    timeout: Duration = 2.0
    pool_size: int = Field(4, ge=1, le=100)  # postgresql: connections per process at most
    # how long an answer ("no such address" too) is kept in each process: a mailbox added to
    # the database is live everywhere within this time; 0 asks the database every time
    cache_ttl: Annotated[float, BeforeValidator(_duration_or_zero)] = 5.0
    cache_size: int = Field(10000, ge=0)  # answers kept per process at most

    @model_validator(mode="after")
    def _url(self) -> "DirectoryConfig":
        if self.backend == "postgresql" and not self.url:
            raise ValueError('backend = "postgresql" needs url = "postgresql://user@host:5432/dbname"')
        return self


class DomainDelivery(_Section):
    """[local.domain."example.org"]: how one local domain's mail is delivered."""

    delivery: Literal["maildir", "lmtp"] = "maildir"
    lmtp: LMTPAddress = None


class LocalConfig(_Section):
    domains: list[str] = []
    # "maildir": write <maildir_root>/<domain>/<user>/ ourselves; "lmtp": hand the message to
    # an LMTP server (Dovecot) at `lmtp`, "unix:/run/dovecot/lmtp" or "host:port"
    delivery: Literal["maildir", "lmtp"] = "maildir"
    lmtp: LMTPAddress = None
    domain: dict[str, DomainDelivery] = {}  # per domain, instead of the two above
    maildir_root: Path = Path("./var/mail")
    users: list[str] = []
    aliases: dict[str, list[str]] = {}
    # "alice+lists@" delivers to alice (each character is a delimiter, as in Postfix); ""
    # turns sub-addresses off
    recipient_delimiter: str = "+"

    @field_validator("recipient_delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        bad = [c for c in v if not (c.isascii() and c.isprintable()) or c in '@."\\ ']
        if bad or len(set(v)) != len(v):
            raise ValueError(f"{v!r}: delimiters are distinct printable ASCII characters other than @ . \" \\ and space")
        return v

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            if not is_hostname(d):
                raise ValueError(f"{d!r} is not a domain name")
            out.append(d.lower())
        return out

    @field_validator("users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        out = []
        for u in v:
            key = _address_key(u, "user")
            local = key.rpartition("@")[0]
            # the local part becomes a directory name under maildir_root/<domain>/
            if local.startswith(".") or "/" in local or "\0" in local:
                raise ValueError(f"user {u!r}: local part cannot be a mailbox directory name")
            out.append(key)
        return out

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for name, targets in v.items():
            if not targets:
                raise ValueError(f"alias {name!r} has no targets")
            out[_address_key(name, "alias")] = [_address_key(t, "alias target") for t in targets]
        return out

    @model_validator(mode="after")
    def _all_local(self) -> "LocalConfig":
        problems = [f"{where}delivery = \"lmtp\" needs an lmtp address"
                     for where, item in [("", self), *((f"domain {d!r}: ", v) for d, v in self.domain.items())]
                     if item.delivery == "lmtp" and not (item.lmtp or self.lmtp)]
        problems += [
            f"{addr!r} is not in one of local.domains"
            for addr in [*self.users, *self.aliases]
            if addr.rpartition("@")[2] not in self.domains
        ]
        problems += [
            f"alias {name!r}: {t!r} is neither a user nor an alias"
            for name, targets in self.aliases.items()
            for t in targets
            if t.rpartition("@")[2] in self.domains and t not in self.users and t not in self.aliases
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR string such as \"127.0.0.0/8\"")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a network such as \"127.0.0.0/8\"") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


TLSMode = Literal["opportunistic", "required", "verify"]


def _dns_server(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected \"address\" or \"address:port\"")
    host, port = split_hostport(value) if value.count(":") == 1 or value.startswith("[") else (value, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayConfig(_Section):
    trusted_networks: list[Network] = []
    # Outbound delivery. DNS servers as "ip" or "ip:port"; empty: the system's resolv.conf.
    dns_servers: list[Annotated[str, BeforeValidator(_dns_server)]] = []
    port: int = Field(25, ge=1, le=65535)  # the port of every MX (tests and staging change it)
    helo_name: str | None = None  # EHLO name; default server.hostname
    # STARTTLS: "opportunistic" uses TLS when offered and falls back to plaintext (RFC 7435);
    # "required" insists on TLS; "verify" also checks the certificate against the MX name.
    tls: TLSMode = "opportunistic"
    tls_policy: dict[str, TLSMode] = {}  # per destination domain (or smarthost host)
    ca_file: Path | None = None  # trust anchors for "verify"; default: the system's
    # Send everything through one relay, "host:port", instead of by MX.
    smarthost: str | None = None
    smarthost_user: str | None = None  # AUTH PLAIN, only ever over TLS
    smarthost_password_file: Path | None = None
    per_destination: int = Field(10, ge=1, le=1000)  # parallel connections per destination
    connect_timeout: Duration = 30.0
    # RFC 5321 4.5.3.2: 5 minutes for the greeting and each command, 10 minutes after the
    # final dot. The body is sent block by block, each block within 3 minutes.
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    dns_timeout: Duration = 10.0
    idle_time: Duration = 5.0  # how long an idle connection is kept for the next message

    @field_validator("helo_name")
    @classmethod
    def _helo(cls, v: str | None) -> str | None:
        if v is not None and not is_hostname(v):
            raise ValueError("must be a host name such as mail.example.com")
        return v

    @field_validator("smarthost")
    @classmethod
    def _smarthost(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v

    @field_validator("tls_policy")
    @classmethod
    def _policy_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not is_hostname(key):
                raise ValueError(f"{key!r} is not a domain")
        return {key.lower(): mode for key, mode in v.items()}

    @model_validator(mode="after")
    def _auth(self) -> "RelayConfig":
        if (self.smarthost_user is None) != (self.smarthost_password_file is None):
            raise ValueError("smarthost_user and smarthost_password_file go together")
        if self.smarthost_user is not None and self.smarthost is None:
            raise ValueError("smarthost_user needs smarthost")
        return self


class DKIMKey(_Section):
    domain: str
    selector: str
    key_file: Path
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"

    @field_validator("domain", "selector")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_hostname(v):
            raise ValueError("must be a DNS name")
        return v.lower()


class DKIMConfig(_Section):
    key: list[DKIMKey] = []


class QueueConfig(_Section):
    # deliveries in flight (Postfix's default_process_limit is 100)
    concurrency: int = Field(100, ge=1, le=1000)
    # of which at most this many for one destination (an MX domain, the smarthost, an LMTP
    # server; Postfix's default_destination_concurrency_limit): a slow or dead destination
    # never takes the whole pool. Counted in messages; [relay] per_destination bounds the
    # connections. A Maildir has no limit. Above concurrency it is concurrency.
    destination_concurrency: int = Field(20, ge=1, le=1000)
    # RFC 5321 4.5.4.1: retry at least 30 minutes apart, give up after 4-5 days. Postfix starts
    # at 5 minutes and doubles; the last interval repeats.
    retry_schedule: list[Duration] = [300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0, 14400.0]
    max_lifetime: Duration = 5 * 86400.0
    scan_interval: Duration = 30.0  # how often deferred/ is looked at
    # Tell the sender once that a message is still undelivered after this long (a "delayed"
    # DSN); absent: never.
    delay_warning: Duration | None = None

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one interval")
        return v


class LogConfig(_Section):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


class MetricsConfig(_Section):
    # /metrics (Prometheus), /healthz and /readyz over HTTP; absent: no HTTP server
    address: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v


def _redis_url(v: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be redis://[:password@]host:port/db, rediss://... (TLS) or unix:///path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host")
    return v


class RedisConfig(_Section):
    """[redis]: what several nodes (and the workers of one) share. Present: the rate and
    connection limits, greylisting and the MX/A/AAAA cache use it (each can be turned off)."""

    url: Annotated[str, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: ask these "host:port" for the address of `sentinel_master` (url then
    # gives only the password, the database number and the scheme: rediss:// for TLS)
    sentinel: list[str] = []
    sentinel_master: str = "geosmtp"
    tls: bool = False  # as rediss://: TLS to Redis, the certificate checked against ca_file
    ca_file: Path | None = None  # default: the system's trust anchors
    connect_timeout: Duration = 0.5
    timeout: Duration = 0.5  # every command: a slower answer counts as Redis being down
    pool_size: int = Field(32, ge=1, le=1000)  # connections per process; calls wait for a free one
    key_prefix: str = "geosmtp:"
    limits: bool = True  # messages and AUTH failures per hour, connections per client, fleet-wide
    greylist: bool = True  # greylist triplets (a check with store_file keeps its file)
    dns_cache: bool = True  # MX, A and AAAA answers, for their TTL
    # Redis down or slower than timeout, for the limits: "allow" lets the client through
    # (uncounted, as without limits); "defer" answers as if over the limit (4xx). Logged
    # at most once a minute, counted in geosmtp_redis_errors. Greylisting applies its
    # check's on_error; the DNS cache asks DNS.
    on_redis_error: Literal["allow", "defer"] = "allow"
    # a node's share of the connection counts lives this long without the node renewing it
    # (every third of it): a node that dies stops counting against its clients within this
    connection_lease: Duration = 30.0
    # each process answers the limits from its own view of the shared counts, asking Redis
    # again for a key when its view is older than this (its own events counted at once, the
    # other processes' within this): a burst reaching P processes at once can pass a limit
    # by what the other P - 1 admit within it. 0: every check waits for Redis (exact)
    refresh: DurationOrZero = Field(0.5, le=60)

    @field_validator("sentinel")
    @classmethod
    def _sentinels(cls, v: list[str]) -> list[str]:
        for item in v:
            split_hostport(item)
        return v


class CheckConfig(BaseModel):
    """One [[check]] table: the keys every check has, and its own (validated by the check
    type's Options model; a python check's go in `options`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    name: str | None = None  # in logs and metrics; default: the type
    module: str | None = None  # type = "python": "package.module:Class"
    options: dict = {}  # type = "python": passed to the class as they are
    timeout: Duration = 20.0  # for one call; then on_error
    on_error: Literal["accept", "defer", "reject"] = "defer"
    skip_trusted: bool = True  # not for authenticated clients or trusted networks
    listeners: list[str] | None = None  # default: every listener with mode = "smtp"

    @property
    def label(self) -> str:
        return self.name or self.type

    def check_options(self) -> dict:
        return dict(self.options) if self.type == "python" else dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self) -> "CheckConfig":
        from geosmtp.checks import registry  # the check modules load only when checks are named
        if self.type == "python" and self.model_extra:
            raise ValueError(f"unknown key(s) {', '.join(sorted(self.model_extra))} "
                             "(a python check's own settings go in options)")
        try:
            cls = registry.class_of(self.type, self.module)
            registry.validate_options(cls, self.check_options())
        except registry.CheckError as exc:
            raise ValueError(str(exc)) from None
        return self


class Config(_Section):
    server: ServerConfig = ServerConfig()
    listener: list[ListenerConfig] = Field(min_length=1)
    limits: LimitsConfig = LimitsConfig()
    local: LocalConfig = LocalConfig()
    relay: RelayConfig = RelayConfig()
    queue: QueueConfig = QueueConfig()
    log: LogConfig = LogConfig()
    tls: TLSConfig | None = None
    auth: AuthConfig = AuthConfig()
    directory: DirectoryConfig = DirectoryConfig()
    dkim: DKIMConfig = DKIMConfig()
    metrics: MetricsConfig = MetricsConfig()
    redis: RedisConfig | None = None  # absent: every count and cache in this process
    check: list[CheckConfig] = []  # [[check]], run in this order

    def checks_of(self, listener: "ListenerConfig") -> list[CheckConfig]:
        return [c for c in self.check
                if (listener.name in c.listeners if c.listeners is not None else listener.mode == "smtp")]

    @model_validator(mode="after")
    def _listeners(self) -> "Config":
        problems = []
        names = [item.name for item in self.listener]
        if len(names) != len(set(names)):
            problems.append("listener names must be unique")
        addresses = [item.address for item in self.listener]
        if len(addresses) != len(set(addresses)):
            problems.append("two listeners cannot share an address")
        for item in self.listener:
            if item.tls != "none" and self.tls is None:
                problems.append(f"listener {item.name!r}: tls = {item.tls!r} needs a [tls] section")
            if item.require_tls and item.tls != "starttls":
                problems.append(f"listener {item.name!r}: require_tls needs tls = \"starttls\"")
            if item.offers_auth and self.auth.users_file is None and self.directory.backend == "config":
                problems.append(f"listener {item.name!r}: AUTH needs [auth] users_file (or an SQL [directory])")
        problems += self._directory_problems()
        labels = [c.label for c in self.check]
        if len(labels) != len(set(labels)):
            problems.append("check names must be unique (set name = \"...\" on a second check of a type)")
        for c in self.check:
            unknown = set(c.listeners or ()) - set(names)
            if unknown:
                problems.append(f"check {c.label!r}: no listener named {', '.join(sorted(unknown))}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


    def _directory_problems(self) -> list[str]:
        """With an SQL directory, the domains, mailboxes, aliases and users are in the database
        only (two sources would disagree); per-domain delivery may name any of its domains."""
        local, backend = self.local, self.directory.backend
        if backend == "config":
            return [f"local.domain: {d!r} is not in local.domains" for d in local.domain if d not in local.domains]
        named = [key for key, value in (("local.domains", local.domains), ("local.users", local.users),
                                        ("local.aliases", local.aliases), ("auth.users_file", self.auth.users_file))
                 if value]
        return [f"{key}: not used with [directory] backend = {backend!r} (the database holds them; "
                f"see geosmtp directory --help)" for key in named]


def _where(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def validate(data: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{_where(err['loc'])}: {msg}")
        raise ConfigError(source, problems) from None


def load(path: str | Path) -> Config:
    """Read and validate a TOML file; ConfigError lists every problem at once."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return validate(data, str(path))
