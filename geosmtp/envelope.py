"""The envelope of a queued message, shared by the session, the spool and delivery.

Stored as JSON (one small file per message) so a person and `geosmtp-queue` can read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # permanently; the sender is told (bounce)


@dataclass(slots=True)
class Recipient:
    address: str  # where to deliver (after alias expansion)
    original: str  # what the client gave in RCPT TO (RFC 3464 Original-Recipient)
    status: str = PENDING
    attempts: int = 0
    last_reply: str | None = None  # the last reply for this recipient, "250 2.0.0 ..." style
    updated: float | None = None
    remote: str | None = None  # the host that gave last_reply, "mx1.example.com[192.0.2.1]"; None if we did


@dataclass(slots=True)
class ClientInfo:
    address: str  # the client's IP address
    helo: str | None = None
    listener: str | None = None
    auth_user: str | None = None
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"


@dataclass(slots=True)
class Envelope:
    id: str
    created: float
    sender: str  # "" for the null reverse-path <>
    recipients: list[Recipient]
    client: ClientInfo
    size: int = 0
    body: str = "7BIT"  # "7BIT" or "8BITMIME" (RFC 6152)
    smtputf8: bool = False  # RFC 6531
    attempts: int = 0
    last_attempt: float | None = None
    extra: dict = field(default_factory=dict)  # room for later features without a format change
    # the octets of the message file after its first line, set by the spool at commit: what
    # start-up recovery checks an entry against (None in entries from before it was recorded)
    stored: int | None = None

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == PENDING]

    def to_dict(self) -> dict:
        # written out rather than dataclasses.asdict(), which deep-copies and is slow
        return {
            "id": self.id, "created": self.created, "sender": self.sender,
            "recipients": [
                {"address": r.address, "original": r.original, "status": r.status,
                 "attempts": r.attempts, "last_reply": r.last_reply, "updated": r.updated,
                 "remote": r.remote}
                for r in self.recipients
            ],
            "client": {"address": self.client.address, "helo": self.client.helo,
                       "listener": self.client.listener, "auth_user": self.client.auth_user,
                       "tls": self.client.tls},
            "size": self.size, "body": self.body, "smtputf8": self.smtputf8,
            "attempts": self.attempts, "last_attempt": self.last_attempt, "extra": self.extra,
            "stored": self.stored,
        }

    def to_line(self) -> bytes:
        """One line of JSON ending in LF (JSON escapes every newline inside strings)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
        except RecursionError:  # absurdly nested JSON: a corrupt file, not a crash
            raise ValueError("envelope nested too deeply") from None
        if not isinstance(raw, dict):
            raise ValueError("an envelope is a JSON object")
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        raw["client"] = ClientInfo(**raw["client"])
        return cls(**raw)
