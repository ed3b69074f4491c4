#!/usr/bin/env bash
# The pure scheduler: placements per second on a snapshot of 10,000 nodes already holding 100,000
# instances, 1,000 apps of 20 instances each placed with constraints on (UNIQUE, GROUP_BY, LIKE,
# MAX_PER, UNLIKE+GROUP_BY in turn), one core, through one indexed snapshot as a reconcile pass
# places. The median of the rounds is the figure.
#
# Usage: bench/scheduler.sh [ROUNDS] [extra flotilla-bench options, e.g. --nodes 5000]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-5}
shift || true
echo "==> swift build -c release --product flotilla-bench" >&2
swift build -c release --product flotilla-bench >/dev/null
bench=$(swift build -c release --show-bin-path)/flotilla-bench
# One core, as the target says.
taskset -c 0 "$bench" placement --rounds "$rounds" "$@"
