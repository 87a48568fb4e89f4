#!/usr/bin/env python3
"""The fake DNS of the checked shared-harness run (bench/geosmtp-checks-harness.sh): serves
SPF and DMARC for bench.test, the domain smtp-source sends from, and an empty DNSBL zone,
on a free 127.0.0.1 port (UDP and TCP), which it prints, until it is signalled. TTLs of 300 s: geosmtp's resolver
cache answers all but the first questions, as a real resolver's would."""
from __future__ import annotations

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.fakedns import FakeDNS  # noqa: E402


def main() -> int:
    dns = FakeDNS()
    dns.negative_ttl = 300  # 1.0.0.127.bl.bench.test: NXDOMAIN, cached as long
    dns.txt("bench.test", "v=spf1 ip4:127.0.0.0/8 -all", ttl=300)
    dns.txt("_dmarc.bench.test", "v=DMARC1; p=reject", ttl=300)
    dns.start()
    print(dns.port, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    dns.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
