"""The `geosmtp` console script: monkey-patch first, then hand over to the click CLI.

This and `geosmtp/__main__.py` (how the master starts its workers) are the only
places that patch. Library modules never do, and `bin/geosmtp-queue`
(plain file operations) does not patch at all.
"""
from gevent import monkey

monkey.patch_all()

from geosmtp.cli import main  # noqa: E402,F401  (re-exported for the console script)
