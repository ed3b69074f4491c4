#!/usr/bin/env bash
# Runs Flotilla's whole test suite: `swift build`, `swift test`, then the Python tests against the
# freshly built binary: the Marathon client compatibility tests (tests/compat) and the integration
# tests of the agent and CLI (tests/integration).
#
# Works on a fresh Debian 12 machine that has the Swift toolchain and python3: it installs the
# few apt packages the tests need and a Python virtualenv (.venv/) with the pinned client
# libraries, and reuses both on later runs.
#
# Usage: scripts/test.sh [--swift-only | --python-only]
set -euo pipefail

cd "$(dirname "$0")/.."

readonly VENV=.venv
readonly REQUIREMENTS=tests/compat/requirements.txt  # for every Python suite
readonly PYTHON_SUITES=(tests/compat tests/integration)
# The load balancer's tests measure behaviour under load: they run alone, after the others.
readonly ALONE_SUITE=tests/integration/test_proxy.py
readonly VENV_MARKER=$VENV/.requirements.sha256

usage() {
    cat <<'EOF'
Usage: scripts/test.sh [--swift-only | --python-only]

  (no option)     swift build, swift test, then the Python tests
                  (tests/compat: Marathon client compatibility, tests/integration: agent and CLI)
  --swift-only    swift build and swift test only
  --python-only   swift build and the Python tests only (--compat-only is an old name for it)
EOF
}

run_swift_tests=1
run_python_tests=1
for arg in "$@"; do
    case $arg in
        --swift-only) run_python_tests=0 ;;
        --python-only | --compat-only) run_swift_tests=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ $run_swift_tests -eq 0 && $run_python_tests -eq 0 ]]; then
    echo "--swift-only and --python-only exclude each other" >&2
    exit 2
fi

section() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf '\n==> FAILED: %s\n' "$*" >&2
    exit 1
}

# --- system packages ------------------------------------------------------------------------

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "not root and no sudo: cannot run '$*'" >&2
        return 1
    fi
}

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "apt-get not available: install these packages by hand: $*" >&2
        return 1
    fi
    if [[ $apt_updated -eq 0 ]]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"
}

ensure_system_packages() {
    # package:proof that it is installed — a command on PATH, an absolute file, or "dpkg" (ask dpkg).
    # The container tests need runc, the image tools (umoci, skopeo), a registry (docker-registry,
    # htpasswd for its basic auth) and a static busybox to build images from; the bridge needs nft;
    # the build needs zlib's header; the cluster's store tests run a real etcd (and etcdctl); the
    # metrics tests scrape the agent with a real Prometheus and send alerts to a real Alertmanager;
    # the autoscaling test loads an app with wrk; the log forwarding tests send instances' lines to
    # a real rsyslog.
    local wanted=(
        curl:curl procps:ps dnsutils:dig zlib1g-dev:/usr/include/zlib.h
        runc:runc crun:crun umoci:umoci skopeo:skopeo docker-registry:docker-registry apache2-utils:htpasswd busybox-static:dpkg
        nftables:nft iproute2:ip conntrack:conntrack etcd-server:etcd etcd-client:etcdctl
        prometheus:prometheus prometheus-alertmanager:prometheus-alertmanager wrk:wrk rsyslog:rsyslogd
    )
    local missing=() entry package proof
    local PATH="$PATH:/usr/sbin:/sbin"
    for entry in "${wanted[@]}"; do
        package=${entry%%:*}
        proof=${entry#*:}
        if [[ $proof == dpkg ]]; then
            dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
        elif [[ $proof == /* ]]; then
            [[ -e $proof ]] || missing+=("$package")
        else
            command -v "$proof" >/dev/null 2>&1 || missing+=("$package")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "all present: ${wanted[*]%%:*}"
    else
        echo "installing: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
}

# --- Python virtualenv ----------------------------------------------------------------------

ensure_venv() {
    local wanted
    wanted=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)

    if "$VENV/bin/python" -c '' 2>/dev/null \
        && [[ -f $VENV_MARKER && $(<"$VENV_MARKER") == "$wanted" ]]; then
        echo "reusing $VENV ($REQUIREMENTS unchanged)"
        return
    fi

    if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV"; then
            echo "python3 -m venv failed; installing python3-venv"
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi

    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQUIREMENTS"
    echo "$wanted" >"$VENV_MARKER"
    echo "installed $REQUIREMENTS into $VENV"
}

# --- steps ----------------------------------------------------------------------------------

command -v swift >/dev/null 2>&1 || die "swift is not on PATH"
command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH"

section "system packages"
ensure_system_packages || die "installing system packages"

# The Swift tests use it too: their registry token server is Python with `cryptography`.
section "python virtualenv ($VENV)"
ensure_venv || die "setting up $VENV"
export FLOTILLA_TEST_PYTHON=$PWD/$VENV/bin/python
export FLOTILLA_REQUIRE_ETCD=1  # the store contract runs against a real etcd (installed above)

section "swift build"
SECONDS=0
swift build || die "swift build"
bin_path=$(swift build --show-bin-path | tail -n 1)
flotilla_bin=$bin_path/flotilla
[[ -x $flotilla_bin ]] || die "swift build produced no executable at $flotilla_bin"
echo "built $flotilla_bin in ${SECONDS}s"

results=()
failures=0

# Runs one test step; a failure is recorded and the remaining steps still run.
run_tests() {
    local name=$1
    shift
    section "$name"
    SECONDS=0
    local status=0
    "$@" || status=$?
    if [[ $status -eq 0 ]]; then
        results+=("$name: passed (${SECONDS}s)")
    else
        results+=("$name: FAILED with exit code $status (${SECONDS}s)")
        failures=$((failures + 1))
    fi
}

if [[ $run_swift_tests -eq 1 ]]; then
    run_tests "swift test" swift test
fi

# The Python suites: tests/compat and tests/integration (without the load balancer's tests) side
# by side, each agent on its own ports and directories; then the load balancer's tests alone.
# Each part's output is printed whole when it ends; the last line adds them up.
run_python_suites() {
    local logs status=0 part
    logs=$(mktemp -d)
    local pytest=(env FLOTILLA_BIN="$flotilla_bin" "$VENV/bin/python" -m pytest -v -p no:cacheprovider)
    "${pytest[@]}" tests/compat >"$logs/compat.log" 2>&1 &
    local compat=$!
    "${pytest[@]}" tests/integration --ignore="$ALONE_SUITE" >"$logs/integration.log" 2>&1 &
    local integration=$!
    wait "$compat" || status=1
    wait "$integration" || status=1
    "${pytest[@]}" "$ALONE_SUITE" >"$logs/proxy.log" 2>&1 || status=1
    local passed=0 failed=0 skipped=0
    for part in compat integration proxy; do
        printf '\n--- %s ---\n' "$part"
        cat "$logs/$part.log"
        local last count
        last=$(grep -E '^=+ .*(passed|failed|error)' "$logs/$part.log" | tail -n 1 || true)
        for count in $(grep -oE '[0-9]+ passed' <<<"$last" | grep -oE '[0-9]+' || true); do passed=$((passed + count)); done
        for count in $(grep -oE '[0-9]+ (failed|errors?)' <<<"$last" | grep -oE '[0-9]+' || true); do failed=$((failed + count)); done
        for count in $(grep -oE '[0-9]+ skipped' <<<"$last" | grep -oE '[0-9]+' || true); do skipped=$((skipped + count)); done
    done
    printf '\npython: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
    # The failing tests again, last, where a reader of the tail of the output sees them.
    grep -hE '^(FAILED|ERROR) ' "$logs"/*.log | cut -c1-300 || true
    rm -rf "$logs"
    return $status
}

if [[ $run_python_tests -eq 1 ]]; then
    run_tests "python tests (${PYTHON_SUITES[*]})" run_python_suites
fi

section "summary"
printf '  %s\n' "${results[@]}"
if [[ $failures -gt 0 ]]; then
    exit 1
fi
