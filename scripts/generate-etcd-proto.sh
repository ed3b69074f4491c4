#!/usr/bin/env bash
# Generates the Swift messages and gRPC client stubs for etcd's v3 API from Protos/etcd.proto.
# Run once after changing the .proto; the output is committed (a build-time plugin would cost
# every build, and CI, minutes). Needs protoc (Debian: protobuf-compiler); builds the two protoc
# plugins from swift-protobuf and grpc-swift-protobuf in a scratch package outside the checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/Sources/FlotillaEtcd/Generated"
work="${FLOTILLA_PROTOC_PLUGINS:-${TMPDIR:-/tmp}/flotilla-protoc-plugins}"

command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }

mkdir -p "$work/Sources/placeholder"
cat > "$work/Package.swift" <<'SWIFT'
// swift-tools-version:6.1
import PackageDescription
let package = Package(
    name: "plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
    ],
    targets: [.target(name: "placeholder")]
)
SWIFT
echo "// nothing" > "$work/Sources/placeholder/placeholder.swift"
(cd "$work" && swift build -c release --product protoc-gen-swift && swift build -c release --product protoc-gen-grpc-swift-2)
bin="$(cd "$work" && swift build -c release --show-bin-path)"

mkdir -p "$out"
rm -f "$out"/*.swift
protoc -I "$root/Protos" \
    --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
    --plugin=protoc-gen-grpc-swift="$bin/protoc-gen-grpc-swift-2" \
    --swift_out="$out" --swift_opt=Visibility=Internal \
    --grpc-swift_out="$out" --grpc-swift_opt=Visibility=Internal,Server=false,Client=true \
    "$root/Protos/etcd.proto"
echo "generated: $(ls "$out")"
