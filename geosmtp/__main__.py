"""`python -m geosmtp`: the same entry point as the `geosmtp` console script (the master
starts its workers this way)."""
from geosmtp import lifeline

lifeline.bind_to_master()  # a worker: first of all, die with the master (geosmtp.lifeline)

from gevent import monkey  # noqa: E402

monkey.patch_all()  # before anything imports socket, ssl or threading

from geosmtp.cli import main  # noqa: E402

main()
