#!/usr/bin/env bash
# Cluster benchmark: one etcd and three agents (127.0.0.2-4, all --server) on loopback.
# - 300 instances of one app (no ports, `sleep`) from the API call to all TASK_RUNNING;
# - leader failover: kill -9 of the leader until a survivor leads and takes a write.
# Medians over RUNS (default 3).
#
# Usage: bench/cluster.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

runs=${1:-3}
require etcd-server:etcd
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/cluster_bench.py --binary "$binary" --work "$work" --runs "$runs"
