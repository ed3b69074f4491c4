#!/usr/bin/env bash
# Rolling-restart benchmark: 20 instances with HTTP health checks every second, restarted under
# two upgrade strategies; reports the total time against the minimum the strategy allows, and
# the agent's CPU use during the restart. Everything runs on 127.0.0.1.
#
# Usage: bench/rolling.sh [RUNS]    (default 3 runs per strategy; medians are reported)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

runs=${1:-3}
require gcc:cc
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -o "$work/tinyhttpd" bench/tinyhttpd.c
python3 bench/rolling_bench.py --binary "$binary" --server "$work/tinyhttpd" --work "$work" --runs "$runs"
