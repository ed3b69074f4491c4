# Shared by the bench/*.sh scripts: install what a benchmark needs from Debian's packages, and
# build the release binary. Source it from the repository root.

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# require PACKAGE:COMMAND ... — installs the packages whose command is missing.
require() {
    local missing=() entry
    for entry in "$@"; do
        command -v "${entry#*:}" >/dev/null 2>&1 || missing+=("${entry%%:*}")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "==> installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

# Builds the release binary and prints its path.
release_binary() {
    echo "==> swift build -c release" >&2
    swift build -c release >/dev/null
    echo "$(swift build -c release --show-bin-path)/flotilla"
}
