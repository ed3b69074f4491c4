#!/usr/bin/env bash
# Container benchmarks, side by side with the peers in one run: pulling a 50 MB image from a
# loopback registry (Flotilla vs skopeo copy), container start to listening (Flotilla vs podman
# run, both with runc), and 50 containers of one image started at once.
#
# Usage: sudo bench/containers.sh [RUNS]    (default 5; medians are reported)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh

runs=${1:-5}
[[ $(id -u) -eq 0 ]] || { echo "containers need root: run with sudo" >&2; exit 1; }
require runc:runc umoci:umoci skopeo:skopeo docker-registry:docker-registry podman:podman busybox-static:busybox
binary=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/containers_bench.py --binary "$binary" --work "$work" --runs "$runs"
