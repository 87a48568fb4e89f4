"""What can go wrong on the way out, carrying the reply that says so.

A TransientError means "try again later" (the recipient is deferred); a PermanentError means
"this will never work" (the recipient is bounced). Either carries a Reply, from the remote
server or made by us, and the remote host it came from, if any.
"""
from __future__ import annotations

from geosmtp.replies import Reply


class DeliveryError(Exception):
    def __init__(self, reply: Reply, remote: str | None = None):
        super().__init__(str(reply))
        self.reply = reply
        self.remote = remote


class TransientError(DeliveryError):
    pass


class PermanentError(DeliveryError):
    pass


def error_for(reply: Reply, remote: str | None = None) -> DeliveryError:
    """The error a non-2xx reply means: 5xx permanent, anything else transient."""
    cls = PermanentError if reply.code >= 500 else TransientError
    return cls(reply, remote)
