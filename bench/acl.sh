#!/usr/bin/env bash
# Access-control and secrets benchmark: GET /v2/apps and a secret read with ACLs off, and with
# --acl default-deny and a token holding 100 policies; Vault KV v2 secret reads/s against Consul KV
# reads/s on the same agent. One wrk connection and eight, median of RUNS.
#
# Usage: bench/acl.sh [RUNS]    (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

runs=${1:-3}
require wrk:wrk
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/acl_bench.py --binary "$binary" --work "$work" --runs "$runs"
