#!/bin/sh
# GEOSMTP_CMD for the shared harness (/work/shared/bench/bench.py); see bench/README.md.
# The harness starts servers with the working directory set to its scratch dir
# ($BENCH_SCRATCH, default /tmp/geosmtp-bench); geosmtp-bench.toml's relative paths land there.
# Starts from an empty spool: entries left in active/ by an earlier invocation would
# otherwise be redelivered (and re-deferred) during the first cell and upset its count.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
case "$(pwd)" in
  /tmp/*) rm -rf ./geosmtp-bench-spool ./geosmtp-bench-mail ;;
  *) echo "geosmtp-harness.sh: run from the harness scratch dir under /tmp, not $(pwd)" >&2; exit 2 ;;
esac
exec "${GEOSMTP:-$HERE/../.venv/bin/geosmtp}" start -c "${GEOSMTP_BENCH_CONFIG:-$HERE/geosmtp-bench.toml}"
