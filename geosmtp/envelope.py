"""The envelope of a queued message, shared by the session, the spool and delivery.

Stored as JSON (one small file per message) so a person and `geosmtp-queue` can read it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == PENDING]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        raw["client"] = ClientInfo(**raw["client"])
        return cls(**raw)
