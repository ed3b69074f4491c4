#!/usr/bin/env bash
# Registry benchmark: KV writes/s, reads/s and watcher wake latency, Flotilla against etcd
# (Debian's etcd-server, started here on loopback), same concurrency and value sizes, both durable.
#
# Usage: bench/registry.sh [SECONDS_PER_PHASE]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
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
python3 bench/registry_bench.py --binary "$binary" --work "$work" --seconds "$seconds"
