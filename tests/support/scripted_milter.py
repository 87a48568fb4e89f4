"""A milter whose answers a test scripts, written with Debian's python3-milter (pymilter on
libmilter). Run by Debian's /usr/bin/python3, not our venv:

    /usr/bin/python3 tests/support/scripted_milter.py SCRIPT.json

The script (JSON): "port"; "reply": {step: answer} with step one of connect, helo, envfrom,
envrcpt, data, header, eoh, body, eom and answer one of continue, accept, reject, tempfail,
discard, or ["reply", code, xcode, line, ...] (a reply code: smfi_setreply, or with several
lines smfi_setmlreply); "rcpt_reply": {address: answer} for single recipients; "eom": a list
of modifications made at the end of the message ([name, args...]: addheader, insheader,
chgheader, chgfrom, addrcpt, delrcpt, replacebody, quarantine); "log": a file where each
step is written as one JSON line (its arguments and the macros asked for), read by the test
(without "log", nothing is written).
"""
import json
import sys

import Milter

SCRIPT = json.load(open(sys.argv[1]))
MACROS = ["j", "{daemon_name}", "v", "_", "{client_addr}", "{client_name}", "{client_ptr}", "i",
          "{auth_authen}", "{auth_type}", "{mail_addr}", "{rcpt_addr}", "{tls_version}", "{cipher}"]


def record(step, **what):
    if "log" not in SCRIPT:  # a pass-through (bench/checks.py): nothing written
        return
    with open(SCRIPT["log"], "a") as fh:
        fh.write(json.dumps({"step": step, **what}) + "\n")


class Scripted(Milter.Base):
    def __init__(self):
        self.id = Milter.uniqueID()

    def _macros(self):
        out = {}
        for name in MACROS:
            value = self.getsymval(name)
            if value is not None:
                out[name] = value
        return out

    def _answer(self, step, answer=None):
        answer = answer if answer is not None else SCRIPT.get("reply", {}).get(step, "continue")
        if isinstance(answer, list):
            _, code, xcode, *lines = answer
            self.setreply(code, xcode, *lines) if lines else self.setreply(code, xcode)
            return Milter.REJECT if code.startswith("5") else Milter.TEMPFAIL
        return {"continue": Milter.CONTINUE, "accept": Milter.ACCEPT, "reject": Milter.REJECT,
                "tempfail": Milter.TEMPFAIL, "discard": Milter.DISCARD}[answer]

    def connect(self, hostname, family, hostaddr):
        record("connect", hostname=hostname, addr=str(hostaddr[0]) if hostaddr else None, macros=self._macros())
        return self._answer("connect")

    def hello(self, name):
        record("helo", name=name, macros=self._macros())
        return self._answer("helo")

    def envfrom(self, sender, *params):
        record("envfrom", sender=sender, params=list(params), macros=self._macros())
        return self._answer("envfrom")

    def envrcpt(self, rcpt, *params):
        record("envrcpt", rcpt=rcpt, macros=self._macros())
        bare = rcpt.strip("<>")
        return self._answer("envrcpt", SCRIPT.get("rcpt_reply", {}).get(bare))

    def data(self):
        record("data", macros=self._macros())
        return self._answer("data")

    def header(self, name, value):
        record("header", name=name, value=value)
        return self._answer("header")

    def eoh(self):
        record("eoh", macros=self._macros())
        return self._answer("eoh")

    def body(self, chunk):
        record("body", size=len(chunk), text=chunk.decode("utf-8", "replace")[:2000])
        return self._answer("body")

    def eom(self):
        record("eom", macros=self._macros())
        for name, *args in SCRIPT.get("eom", []):
            if name == "addheader":
                self.addheader(args[0], args[1])
            elif name == "insheader":
                self.addheader(args[1], args[2], args[0])
            elif name == "chgheader":
                self.chgheader(args[0], args[1], args[2])
            elif name == "chgfrom":
                self.chgfrom(args[0])
            elif name == "addrcpt":
                self.addrcpt(args[0])
            elif name == "delrcpt":
                self.delrcpt(args[0])
            elif name == "replacebody":
                self.replacebody(args[0].encode())
            elif name == "quarantine":
                self.quarantine(args[0])
        return self._answer("eom")

    def abort(self):
        record("abort")
        return Milter.CONTINUE

    def close(self):
        record("close")
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = Scripted
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT | Milter.DELRCPT
                     | Milter.CHGFROM | Milter.QUARANTINE)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    Milter.runmilter("scripted", f"inet:{SCRIPT['port']}@127.0.0.1", 30)
