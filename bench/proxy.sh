#!/usr/bin/env bash
# Load-balancer benchmark: one nginx backend; wrk through Flotilla's proxy, HAProxy and nginx
# (configured here with the same thread count and upstream keep-alive) and directly, in one run;
# throughput and p50/p99 for each, and the agent's RSS before and after a million requests.
#
# Usage: bench/proxy.sh [SECONDS_PER_RUN] [ROUNDS]   (default 10 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
rounds=${2:-3}
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "==> installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

echo "==> swift build -c release"
swift build -c release >/dev/null
binary="$(swift build -c release --show-bin-path)/flotilla"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/proxy_bench.py --binary "$binary" --work "$work" --seconds "$seconds" --rounds "$rounds"
