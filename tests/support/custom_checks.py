"""Checks written for tests, loaded by a real server as `type = "python"` checks (the server
process gets the repository on PYTHONPATH). Each does one thing a test can see."""
from __future__ import annotations

import time

from geosmtp.checks import AuthResult, Check, Verdict


class Fails(Check):
    """Raises in the phase named by options["phase"] (default rcpt)."""

    def __getattr__(self, name):
        if name == self.options.get("phase", "rcpt"):
            def broken(facts):
                raise RuntimeError("this check is broken")
            return broken
        raise AttributeError(name)


class Hangs(Check):
    def rcpt(self, facts):
        time.sleep(float(self.options.get("seconds", 30)))  # patched: a greenlet sleep


class Returns(Check):
    """Returns something that is not a Verdict."""

    def mail(self, facts):
        return "OK"


class Gatekeeper(Check):
    """Refuses or closes at a phase for one client address, sender or HELO name."""

    def connect(self, facts):
        if str(facts.ip) == self.options.get("close_ip"):
            return Verdict.close("You are not welcome here")
        if str(facts.ip) == self.options.get("defer_ip"):
            return Verdict.defer("Come back later")
        return None

    def helo(self, facts):
        if facts.helo == self.options.get("bad_helo"):
            return Verdict.reject("That is not your name", code=550, enhanced="5.7.1")
        return None

    def mail(self, facts):
        if facts.sender == self.options.get("defer_sender"):
            return Verdict.defer("Sender deferred", code=450, enhanced="4.7.1")
        return Verdict.accept(results={"seen_sender": facts.sender})

    def rcpt(self, facts):
        if self.options.get("hold_rcpt") == facts.recipient:
            return Verdict.quarantine(f"held for {facts.recipient}")
        return Verdict.accept(headers=[("X-Seen-Sender", facts.results.get("seen_sender", "?"))])


class Signs(Check):
    """Records a method for Authentication-Results and removes X-Remove-Me fields."""

    records_auth = True

    def data(self, facts):
        return Verdict(auth=(AuthResult("x-test", "pass", (("header.from", "example.org"),)),),
                       remove_headers=(("X-Remove-Me", 0),))
