#!/usr/bin/env bash
# Deployment benchmark: seconds from the API call to 100 running (and serving) instances, the
# agent's RSS idle and with 100 instances, and GET /v2/apps latency with 100 apps.
# Builds a release binary, installs wrk if missing, and runs everything on 127.0.0.1.
#
# Usage: bench/deploy.sh [RUNS]    (default 5 runs of the deployment; medians are reported)
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}

if ! command -v wrk >/dev/null 2>&1; then
    echo "==> installing wrk"
    if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq wrk; else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi
fi
command -v cc >/dev/null 2>&1 || { echo "a C compiler (cc) is needed to build bench/tinyhttpd.c" >&2; exit 1; }

echo "==> swift build -c release"
swift build -c release >/dev/null
binary="$(swift build -c release --show-bin-path)/flotilla"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -o "$work/tinyhttpd" bench/tinyhttpd.c

python3 bench/deploy_bench.py --binary "$binary" --server "$work/tinyhttpd" --work "$work" --runs "$runs"
