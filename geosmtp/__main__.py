"""`python -m geosmtp`: the same entry point as the `geosmtp` console script."""
from gevent import monkey

monkey.patch_all()  # first, before anything imports socket, ssl or threading

from geosmtp.cli import main  # noqa: E402

main()
