"""geosmtp-queue: the operator's tool for the spool (list, show, summary, flush, hold, release,
delete, bounce, requeue), in three layers, one module a job:

    entries.py    reading the spool: find an entry (the one locate-and-retry loop), list,
                  filter, count, read a message; answers data, prints nothing
    changes.py    changing it: one transition by rename for flush, hold, release and
                  requeue; delete; bounce; each answers a Result
    wake.py       telling the running server to look at incoming/ now (SIGUSR1)
    as_text.py    what a person reads
    as_json.py    what a program reads (--json)
    commands.py   the click wiring: options, ids, output streams, exit status

Plain file operations (no monkey-patching), safe while the server runs: it reads, and where it
changes anything it does so by rename through the Spool, like the server. An entry in active/
belongs to the delivery under way: only `delete` touches it; `flush` answers that it is being
delivered (what the operator asked for is under way); anything else answers "busy".

After flush, release, requeue and bounce the running server is told to look at incoming/ at
once: its pid is in the spool's lock file, which it holds locked (flock) while it runs, and
SIGUSR1 means "look at the queue now". No server running (the lock is free): nothing is sent,
and the server sees the changes when it starts.
"""
