#!/usr/bin/env bash
# Registry benchmark: KV writes/s, reads/s and watcher wake latency, Flotilla against etcd
# (Debian's etcd-server, started here on loopback), same concurrency and value sizes, both durable.
#
# Usage: bench/registry.sh [SECONDS_PER_PHASE]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

seconds=${1:-10}
require wrk:wrk etcd-server:etcd
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/registry_bench.py --binary "$binary" --work "$work" --seconds "$seconds"
