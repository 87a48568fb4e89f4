#!/bin/sh
# GEOSMTP_CMD for the shared harness, geosmtp with SPF + DNSBL + DKIM + DMARC checks on
# (bench/geosmtp-bench-checks.toml): starts the fake DNS those checks ask (bench/checks_dns.py),
# writes the config with its port into the scratch dir, and runs geosmtp-harness.sh on it.
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${GEOSMTP_PYTHON:-$HERE/../.venv/bin/python}
fifo=./checks-dns.port.$$
rm -f "$fifo"; mkfifo "$fifo"
"$PY" "$HERE/checks_dns.py" > "$fifo" &
dns=$!
read -r port < "$fifo"
rm -f "$fifo"
sed "s/DNS_PORT/$port/" "$HERE/geosmtp-bench-checks.toml" > ./geosmtp-bench-checks.toml
GEOSMTP_BENCH_CONFIG=./geosmtp-bench-checks.toml "$HERE/geosmtp-harness.sh" &
server=$!
trap 'kill -TERM $server 2>/dev/null' TERM INT HUP
status=0
wait $server || status=$?
while kill -0 $server 2>/dev/null; do
  status=0
  wait $server || status=$?
done
kill -TERM $dns 2>/dev/null
wait $dns 2>/dev/null
exit $status
