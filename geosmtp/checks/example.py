"""A custom check, as README's "Inbound checks" shows it: refuses one recipient, tags
every message with a header field, and quarantines a subject. Try it with
[[check]] type = "python", module = "geosmtp.checks.example:ExampleCheck"."""
from geosmtp.checks import Check, Verdict


class ExampleCheck(Check):
    """options: refuse (an address), subject (text that quarantines), tag (a field name)."""

    def rcpt(self, facts):
        if facts.recipient.lower() == self.options.get("refuse", "").lower():
            return Verdict.reject("No mail for this recipient", code=550, enhanced="5.7.1")
        return None

    def data(self, facts):
        tag = (self.options.get("tag", "X-Example-Check"), f"checked for [{facts.ip}]")
        subject = facts.header("Subject") or ""
        if self.options.get("subject") and self.options["subject"] in subject:
            return Verdict.quarantine("subject matched", headers=[tag])
        return Verdict.accept(headers=[tag])
