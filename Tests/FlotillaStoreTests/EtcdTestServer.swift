import FlotillaEtcd
import FlotillaStore
import Foundation
import Logging

/// A real etcd (Debian's etcd-server) on loopback with ephemeral ports and a temporary data
/// directory, started once per test process and shared: each test works under its own key prefix.
/// A watchdog shell ends etcd and removes its data when the test process goes away.
actor EtcdTestServer {
    static let shared = EtcdTestServer()
    /// A second server for tests that compact (which would pull history from under the others).
    static let compacting = EtcdTestServer()

    struct Unavailable: Error, CustomStringConvertible {
        let description: String
    }

    private var starting: Task<String, any Error>?

    /// The etcd binary, or nil when it is not installed (tests that need it are then skipped,
    /// unless FLOTILLA_REQUIRE_ETCD=1 says the run must have it: scripts/test.sh sets it).
    static let binary: String? = {
        let paths = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin"]
        return paths.map { $0 + "/etcd" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }()

    static let required = ProcessInfo.processInfo.environment["FLOTILLA_REQUIRE_ETCD"] == "1"
    static var available: Bool { binary != nil || required }

    /// `host:port` of the running server, starting it on first use.
    func start() async throws -> String {
        // One start for every caller: the actor is reentrant at the awaits below.
        if let starting { return try await starting.value }
        let task = Task { try await Self.launch() }
        starting = task
        return try await task.value
    }

    private static func launch() async throws -> String {
        guard let binary = Self.binary else {
            throw Unavailable(description: "etcd is not installed (apt-get install etcd-server; scripts/test.sh does)")
        }
        for _ in 0..<5 {
            let client = try Self.freePort()
            let peer = try Self.freePort()
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("flotilla-etcd-\(UUID().uuidString)").path
            let command = """
                \(binary) --name test --data-dir \(directory) \
                --listen-client-urls http://127.0.0.1:\(client) --advertise-client-urls http://127.0.0.1:\(client) \
                --listen-peer-urls http://127.0.0.1:\(peer) --initial-advertise-peer-urls http://127.0.0.1:\(peer) \
                --initial-cluster test=http://127.0.0.1:\(peer) > \(directory).log 2>&1 &
                etcd=$!
                alive() { state=$(sed 's/.*) //' /proc/\(getpid())/stat 2>/dev/null | cut -d' ' -f1); [ -n "$state" ] && [ "$state" != Z ]; }
                while alive && kill -0 $etcd 2>/dev/null; do sleep 1; done
                kill $etcd 2>/dev/null; wait $etcd 2>/dev/null; rm -rf \(directory) \(directory).log
                """
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", command]
            // Not the test process's output: the runner reads that to its end before it reaps us.
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            let address = "127.0.0.1:\(client)"
            if await Self.answers(address) { return address }
            // A port taken under us, most likely: try again with new ones.
            process.terminate()
        }
        throw Unavailable(description: "etcd did not start on loopback")
    }

    /// A store on the shared server under a fresh prefix.
    static func store(on server: EtcdTestServer = shared, prefix: String = "/test-\(UUID().uuidString)/") async throws -> EtcdStateStore {
        let endpoint = try await server.start()
        return try await EtcdStateStore.connect(
            EtcdConfiguration(url: "etcd://" + endpoint, prefix: prefix, requestTimeout: .seconds(10)), logger: Logger(label: "test"))
    }

    static func etcdctl(on server: EtcdTestServer = shared, _ arguments: [String]) async throws -> String {
        let endpoint = try await server.start()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["etcdctl", "--endpoints", "http://" + endpoint] + arguments
        process.environment = ["ETCDCTL_API": "3", "PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: output, as: UTF8.self)
    }

    private static func answers(_ address: String) async -> Bool {
        for _ in 0..<100 {
            if let store = try? await EtcdStateStore.connect(
                EtcdConfiguration(url: address, prefix: "/probe/", requestTimeout: .milliseconds(500)), logger: Logger(label: "probe"))
            {
                store.close()
                return true
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return false
    }

    /// A port the kernel just handed out on loopback (closed again, so etcd can bind it).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Unavailable(description: "socket: \(errno)") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else { throw Unavailable(description: "bind: \(errno)") }
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
