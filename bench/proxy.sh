#!/usr/bin/env bash
# Load-balancer benchmark: one nginx backend; wrk through Flotilla's proxy, HAProxy and nginx
# (configured here with the same thread count and upstream keep-alive) and directly, in one run;
# throughput and p50/p99 for each, and the agent's RSS before and after a million requests.
#
# Usage: bench/proxy.sh [SECONDS_PER_RUN] [ROUNDS]   (default 10 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

seconds=${1:-10}
rounds=${2:-3}
require wrk:wrk haproxy:haproxy nginx-light:nginx
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/proxy_bench.py --binary "$binary" --work "$work" --seconds "$seconds" --rounds "$rounds"
