#!/usr/bin/env bash
# Deployment benchmark: seconds from the API call to 100 running (and serving) instances, the
# agent's RSS idle and with 100 instances, and GET /v2/apps latency with 100 apps.
#
# Usage: bench/deploy.sh [RUNS]    (default 5 runs of the deployment; medians are reported)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

runs=${1:-5}
require wrk:wrk gcc:cc
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -o "$work/tinyhttpd" bench/tinyhttpd.c
python3 bench/deploy_bench.py --binary "$binary" --server "$work/tinyhttpd" --work "$work" --runs "$runs"
