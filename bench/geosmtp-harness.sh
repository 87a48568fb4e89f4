#!/bin/sh
# GEOSMTP_CMD for the shared harness (/work/shared/bench/bench.py); see bench/README.md.
# The harness starts servers with the working directory set to its scratch dir
# ($BENCH_SCRATCH, default /tmp/geosmtp-bench); geosmtp-bench.toml's relative paths land there.
#
# Every run starts on an empty spool (entries left in active/ by an earlier run would be
# redelivered during the first cell and upset its count), and the spool is deleted when the
# server has stopped, not before it starts. On this machine's ext4 (no journal) the inode
# allocator passes over every inode freed in the last minutes one at a time, so creating a
# file right after deleting tens of thousands costs 0.3-0.9 ms instead of about 20 us
# (bench/README.md, "Deleting before measuring"). The Postfix anchor also deletes its queue
# at the end (`postfix stop; postsuper -d ALL`).
HERE=$(cd "$(dirname "$0")" && pwd)
case "$(pwd)" in
  /tmp/*) ;;
  *) echo "geosmtp-harness.sh: run from the harness scratch dir under /tmp, not $(pwd)" >&2; exit 2 ;;
esac
# a spool left behind by a run that was killed is set aside (a rename frees no inode)
for d in geosmtp-bench-spool geosmtp-bench-mail; do
  if [ -e "$d" ]; then mv "$d" "$d.old.$$"; fi
done

config=${GEOSMTP_BENCH_CONFIG:-$HERE/geosmtp-bench.toml}
# GEOSMTP_WORKERS=N: the same config with [server] workers = N (written to the scratch dir)
if [ -n "$GEOSMTP_WORKERS" ]; then
  case "$GEOSMTP_WORKERS" in
    *[!0-9]*) echo "geosmtp-harness.sh: GEOSMTP_WORKERS must be a number" >&2; exit 2 ;;
  esac
  sed "s/^\[server\]\$/[server]\nworkers = $GEOSMTP_WORKERS/" "$config" > ./geosmtp-bench-workers.toml
  config=./geosmtp-bench-workers.toml
fi
"${GEOSMTP:-$HERE/../.venv/bin/geosmtp}" start -c "$config" &
server=$!
trap 'kill -TERM $server 2>/dev/null' TERM INT HUP
status=0
wait $server || status=$?
while kill -0 $server 2>/dev/null; do  # the first wait ends when the trap runs
  status=0
  wait $server || status=$?
done
rm -rf ./geosmtp-bench-spool ./geosmtp-bench-mail ./geosmtp-bench-spool.old.* ./geosmtp-bench-mail.old.*
exit $status
