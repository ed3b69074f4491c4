#!/usr/bin/env bash
# Registry benchmark: KV writes/s, reads/s and watcher wake latency, Flotilla against etcd
# (Debian's etcd-server, started here on loopback), same concurrency and value sizes, both durable.
#
# Usage: bench/registry.sh [SECONDS_PER_PHASE] [sqlite|etcd]   (default 10, sqlite; etcd: Flotilla's
# state in the same etcd, so the ratio is Flotilla's overhead over etcd itself)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

seconds=${1:-10}
store=${2:-sqlite}
require wrk:wrk etcd-server:etcd
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/registry_bench.py --binary "$binary" --work "$work" --seconds "$seconds" --store "$store"
