// swift-tools-version:6.1
import PackageDescription

/// One strict setting list for every target (Hummingbird's convention): imports are internal unless a
/// file's public API shows the imported types, and existentials are spelled `any`.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "flotilla",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "flotilla", targets: ["flotilla"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        // etcd's v3 API: gRPC over HTTP/2, messages generated once from Protos/etcd.proto.
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
    ],
    targets: [
        // Domain value types, their validation and errors. Foundation only.
        .target(name: "FlotillaCore", swiftSettings: swiftSettings),

        // The indexed, watchable state store: the protocol, SQLite (embedded) and in-memory backends.
        .target(
            name: "FlotillaStore",
            dependencies: [
                "FlotillaCore",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            swiftSettings: swiftSettings
        ),

        // The cluster backend: the store on etcd v3 over gRPC. Its own target, so that only the
        // composition root sees gRPC and protobuf.
        .target(
            name: "FlotillaEtcd",
            dependencies: [
                "FlotillaStore",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            ],
            swiftSettings: swiftSettings
        ),

        // Pure placement, reconciliation and backoff over a snapshot. No I/O.
        .target(
            name: "FlotillaScheduler",
            dependencies: ["FlotillaCore"],
            swiftSettings: swiftSettings
        ),

        // fork/exec with a race-free cgroup join; Flotilla's own, so it lives in C beside the driver.
        .target(name: "CFlotillaSpawn"),
        .target(name: "CFlotillaIO"),

        // Streaming gzip (zlib) and zstd (libzstd, loaded at run time) for image layers.
        .target(name: "CFlotillaArchive", linkerSettings: [.linkedLibrary("z")]),

        // OCI images: references, the registry client, layer unpacking, the image store.
        .target(
            name: "FlotillaImage",
            dependencies: [
                "CFlotillaArchive",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // Node side: the exec and OCI drivers, cgroups, log files, the process reaper.
        .target(
            name: "FlotillaAgent",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "CFlotillaSpawn", "FlotillaImage", "CFlotillaArchive",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),

        // The service registry: Consul-shaped catalog, health, KV and DNS over the store.
        .target(
            name: "FlotillaRegistry",
            dependencies: [
                "FlotillaCore", "FlotillaStore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),

        // The load balancer: HTTP and TCP on its own epoll loops (TLS through swift-nio-ssl), fed route-table snapshots.
        .target(
            name: "FlotillaProxy",
            dependencies: [
                "FlotillaCore", "CFlotillaIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            // The data path's state lives in event-loop-confined handlers; the dynamic exclusivity
            // checks on their properties cost ~2% of the proxy's CPU and guard nothing here.
            swiftSettings: swiftSettings + [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),

        // The control loop: desired state, deployments, reconcile through the scheduler.
        .target(
            name: "FlotillaControl",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "FlotillaScheduler",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),

        // Secrets: the keyring (AES-256-GCM under the operator's key) and Vault's KV v2 engine.
        .target(
            name: "FlotillaSecrets",
            dependencies: [
                "FlotillaCore", "FlotillaStore",
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),

        // HTTP surfaces: Marathon v2, Consul v1, Vault's KV v2, images, operations.
        .target(
            name: "FlotillaAPI",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "FlotillaScheduler", "FlotillaControl", "FlotillaRegistry", "FlotillaImage", "FlotillaSecrets",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),

        // What watches the figures each interval: alert rules (notifications to webhooks and
        // Alertmanager) and autoscaling.
        .target(
            name: "FlotillaWatch",
            dependencies: [
                "FlotillaCore",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),

        // The composition root: one ServiceGroup.
        .target(
            name: "FlotillaServer",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "FlotillaEtcd", "FlotillaScheduler", "FlotillaAgent", "FlotillaControl", "FlotillaAPI",
                "FlotillaRegistry", "FlotillaProxy", "FlotillaImage", "FlotillaSecrets", "FlotillaWatch",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),

        // Subcommands: the agent and the API client commands.
        .target(
            name: "FlotillaCLI",
            dependencies: [
                "FlotillaCore", "FlotillaServer", "FlotillaProxy", "FlotillaAgent", "FlotillaSecrets", "FlotillaStore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: swiftSettings
        ),

        // The pure scheduler's benchmark (bench/scheduler.sh); not part of the product.
        .executableTarget(name: "flotilla-bench", dependencies: ["FlotillaCore", "FlotillaScheduler"], path: "Sources/FlotillaBench", swiftSettings: swiftSettings),
        .executableTarget(
            name: "flotilla",
            dependencies: ["FlotillaCLI", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),

        .testTarget(name: "FlotillaCoreTests", dependencies: ["FlotillaCore"], swiftSettings: swiftSettings),
        .testTarget(
            name: "FlotillaStoreTests",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "FlotillaEtcd", .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings),
        .testTarget(name: "FlotillaSecretsTests", dependencies: ["FlotillaCore", "FlotillaStore", "FlotillaSecrets"], swiftSettings: swiftSettings),
        .testTarget(name: "FlotillaSchedulerTests", dependencies: ["FlotillaCore", "FlotillaScheduler"], swiftSettings: swiftSettings),
        .testTarget(name: "FlotillaWatchTests", dependencies: ["FlotillaCore", "FlotillaWatch"], swiftSettings: swiftSettings),
        .testTarget(name: "FlotillaRegistryTests", dependencies: ["FlotillaCore", "FlotillaStore", "FlotillaRegistry"], swiftSettings: swiftSettings),
        .testTarget(
            name: "FlotillaProxyTests",
            dependencies: [
                "FlotillaCore", "FlotillaProxy",
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FlotillaAgentTests",
            dependencies: [
                "FlotillaCore", "FlotillaAgent",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FlotillaImageTests",
            dependencies: [
                "FlotillaImage", "CFlotillaArchive",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FlotillaAPITests",
            dependencies: [
                "FlotillaCore", "FlotillaStore", "FlotillaControl", "FlotillaAPI",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
