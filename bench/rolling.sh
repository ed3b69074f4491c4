#!/usr/bin/env bash
# Rolling-restart benchmark: 20 instances with HTTP health checks every second, restarted under
# two upgrade strategies; reports the total time against the minimum the strategy and the check
# interval allow, and the agent's CPU use during the restart. Everything runs on 127.0.0.1.
#
# Usage: bench/rolling.sh [RUNS]    (default 3 runs per strategy; medians are reported)
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3}
command -v cc >/dev/null 2>&1 || { echo "a C compiler (cc) is needed to build bench/tinyhttpd.c" >&2; exit 1; }

echo "==> swift build -c release"
swift build -c release >/dev/null
binary="$(swift build -c release --show-bin-path)/flotilla"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -o "$work/tinyhttpd" bench/tinyhttpd.c

python3 bench/rolling_bench.py --binary "$binary" --server "$work/tinyhttpd" --work "$work" --runs "$runs"
