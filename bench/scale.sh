#!/usr/bin/env bash
# One node at scale (issue: 1,000 apps, 10,000 instances): start and destroy 1,000 instances,
# render /v2/apps with 1,000 apps, event delivery to 100 subscribers, then 10,000 instances
# (all running, RSS, idle CPU, listings, destroy). Needs root for cgroups; a few GB of memory.
#
# Usage: bench/scale.sh [INSTANCES_IN_THE_LAST_PHASE [PHASES]]   (defaults 10000 1234)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

big=${1:-10000}
phases=${2:-1234}
require wrk:wrk
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/scale_bench.py --binary "$binary" --work "$work" --big "$big" --phases "$phases"
