"""The "config" directory backend: [local] domains, users and aliases and [auth] users_file,
read once when the server builds its parts (and again on reload). Answers from memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from geosmtp.directory import Directory, Entry


@dataclass(frozen=True)
class ConfigDirectory(Directory):
    """The local domains, the mailboxes, the aliases (all keys lower-case) and the users'
    password hashes (None: no users file, so no AUTH)."""

    domains: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    delimiters: str = "+"
    hashes: Mapping[str, str] | None = None

    @property
    def authenticates(self) -> bool:
        return self.hashes is not None

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def entry(self, address: str) -> Entry | None:
        targets = self.aliases.get(address, ())
        mailbox = address in self.users
        return Entry(mailbox, tuple(targets)) if mailbox or targets else None

    def password_hash(self, user: str) -> str | None:
        return None if self.hashes is None else self.hashes.get(user)

    def primary_domain(self) -> str | None:
        return min(self.domains) if self.domains else None

    def describe(self) -> str:
        users = "no users file" if self.hashes is None else f"{len(self.hashes)} users"
        return (f"the configuration ({len(self.domains)} local domains, {len(self.users)} mailboxes, "
                f"{len(self.aliases)} aliases, {users})")
