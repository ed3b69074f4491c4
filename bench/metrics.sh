#!/usr/bin/env bash
# The cost of watching (issue: observability): the agent's CPU and RSS with 100 instances with
# metrics on and off, /metrics render time with 100 apps × 3 instances, and log throughput (lines/s
# an instance writes to its log vs to a plain file). Needs root for cgroups.
#
# Usage: bench/metrics.sh [SECONDS_IDLE]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

require wrk:wrk
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/metrics_bench.py --binary "$binary" --work "$work" --idle "${1:-60}"
