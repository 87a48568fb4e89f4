"""The `geosmtp` console script: monkey-patch first, then hand over to the click CLI.

This is the only place that patches. Library modules never do, and `bin/geosmtp-queue`
(plain file operations) does not patch at all.
"""
from gevent import monkey

monkey.patch_all()

from geosmtp.cli import main  # noqa: E402,F401  (re-exported for the console script)
