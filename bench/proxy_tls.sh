#!/usr/bin/env bash
# HTTPS termination benchmark: one nginx backend (plain HTTP); wrk over HTTPS through Flotilla's
# HTTPS listener, HAProxy and nginx (same thread count, same certificate, TLS 1.3, upstream
# keep-alive), in one run: kept-alive connections, and a new TLS connection per request.
#
# Usage: bench/proxy_tls.sh [SECONDS_PER_RUN] [ROUNDS]   (default 10 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

seconds=${1:-10}
rounds=${2:-3}
require wrk:wrk haproxy:haproxy nginx-light:nginx openssl:openssl
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/proxy_tls_bench.py --binary "$binary" --work "$work" --seconds "$seconds" --rounds "$rounds"
