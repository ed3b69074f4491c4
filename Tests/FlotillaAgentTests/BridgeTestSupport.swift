import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import FlotillaAgent

enum BridgeTestSupport {
    static var isRoot: Bool { getuid() == 0 }

    static func randomHex(_ count: Int) -> String {
        String((0..<count).map { _ in "0123456789abcdef".randomElement()! })
    }

    /// Second octet for this test process (10.2xx.y.0/24), random per run.
    static let runOctet = Int.random(in: 200...254)

    /// A /24 in 10.2xx.y.0/24 that overlaps no current host route; `index`
    /// separates the tests of one run from each other.
    static func freeCIDR(index: Int) throws -> String {
        let routes = try BridgeNetwork.hostRoutes()
        var second = runOctet
        for _ in 0..<50 {
            let text = "10.\(second).\(index).0/24"
            let cidr = try BridgeCIDR.parse(text)
            if BridgeNetwork.overlappingRoute(for: cidr, in: routes, bridgeName: "-") == nil { return text }
            second = Int.random(in: 200...254)
        }
        throw BridgeError.invalidConfiguration("no free test CIDR")
    }

    /// A TCP port in 20000-32000 (below the ephemeral range) with no listener.
    static func freeHostPort(avoiding: Set<Int> = []) -> Int {
        let listening = BridgeNetwork.listeningTCPPorts()
        while true {
            let port = Int.random(in: 20_000...32_000)
            if !listening.contains(port) && !avoiding.contains(port) { return port }
        }
    }

    /// A UDP server that answers each datagram with "echo:" and the datagram.
    static let udpEchoServer = """
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", int(sys.argv[1])))
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(b"echo:" + data, peer)
        """

    /// Sends `message` from 127.0.0.1:`sourcePort` to 127.0.0.1:`port` over UDP; returns the
    /// answer, or nil if none came within `timeout` seconds.
    static func udpExchange(port: Int, sourcePort: Int, message: String, timeout: Double = 1) throws -> String? {
        let script = """
            import socket, sys
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(sys.argv[2])))
            s.settimeout(float(sys.argv[4]))
            s.sendto(sys.argv[3].encode(), ("127.0.0.1", int(sys.argv[1])))
            try:
                sys.stdout.write(s.recv(2048).decode())
            except (socket.timeout, ConnectionRefusedError):
                sys.exit(3)
            """
        let result = try BridgeCommand.run(["python3", "-c", script, String(port), String(sourcePort), message, String(timeout)], timeout: timeout + 5)
        return result.status == 0 ? result.stdoutText : nil
    }

    static func makeTemporaryDirectory(_ label: String) throws -> URL {
        let url = URL(fileURLWithPath: "/tmp/flotilla-bridge-test-\(label)-\(randomHex(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// `curl` to `url` (from the host, or inside `namespace`); returns (exit status, body).
    static func curl(_ url: String, namespace: String? = nil, timeout: Double = 5, extra: [String] = []) throws -> (Int32, String) {
        var argv = ["curl", "-sS", "--max-time", String(timeout)] + extra + [url]
        if let namespace { argv = ["ip", "netns", "exec", namespace] + argv }
        let result = try BridgeCommand.run(argv, timeout: timeout + 5)
        return (result.status, result.stdoutText)
    }

    static func waitUntil(timeout: Double, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return try condition()
    }
}

/// One prepared BridgeNetwork with unique names, plus what a test started;
/// `cleanup()` removes all of it (call it in a `defer`).
final class BridgeTestBed {
    let network: BridgeNetwork
    let stateDirectory: URL
    let webRoot: URL
    private(set) var processes: [Process] = []
    var extraLinks: [String] = []

    init(index: Int, prepare: Bool = true) throws {
        stateDirectory = try BridgeTestSupport.makeTemporaryDirectory("state")
        webRoot = try BridgeTestSupport.makeTemporaryDirectory("www")
        let hex = BridgeTestSupport.randomHex(6)
        network = try BridgeNetwork(configuration: BridgeNetworkConfiguration(
            stateDirectory: stateDirectory,
            bridgeName: "flt" + hex,
            cidr: try BridgeTestSupport.freeCIDR(index: index),
            namePrefix: "fltt" + hex))
        if prepare {
            do { try network.prepare() } catch { cleanup(); throw error }
        }
    }

    /// Starts `busybox httpd` serving `webRoot` on `address:port`, inside
    /// `namespace` or (nil) in the host's namespace.
    @discardableResult
    func startHTTPServer(namespace: String?, address: String = "0.0.0.0", port: Int) throws -> Process {
        let busybox = ["busybox", "httpd", "-f", "-p", "\(address):\(port)", "-h", webRoot.path]
        if let namespace { return try startInNamespace(namespace, busybox) }
        return try startProcess(BridgeCommand.resolve("busybox")!, Array(busybox.dropFirst()))
    }

    /// Starts `argv` inside `namespace` (`ip netns exec`), stopped by `cleanup()`.
    @discardableResult
    func startInNamespace(_ namespace: String, _ argv: [String]) throws -> Process {
        try startProcess(BridgeCommand.resolve("ip")!, ["netns", "exec", namespace] + argv)
    }

    private func startProcess(_ executable: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        processes.append(process)
        return process
    }

    /// Starts busybox httpd on `address` at a free host port and returns the port once it
    /// listens. A port picked as free can be taken by the time httpd binds it (other tests run
    /// beside this one), so a server that exits or never listens is retried on another port.
    func startHostHTTPServer(address: String = "127.0.0.1", avoiding: Set<Int> = []) throws -> Int {
        var tried = avoiding
        for _ in 0..<5 {
            let port = BridgeTestSupport.freeHostPort(avoiding: tried)
            tried.insert(port)
            let process = try startHTTPServer(namespace: nil, address: address, port: port)
            let listening = BridgeTestSupport.waitUntil(timeout: 10) {
                !process.isRunning || BridgeNetwork.listeningTCPPorts().contains(port)
            }
            usleep(200_000)  // httpd exits at once when its bind fails; give it that moment
            if listening && process.isRunning { return port }
            stop(process)
        }
        throw BridgeTestError("busybox httpd did not listen on \(address) after 5 ports")
    }

    func stop(_ process: Process) {
        // SIGKILL: children of the test process inherit a signal mask that blocks SIGTERM.
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        processes.removeAll { $0 === process }
    }

    func cleanup() {
        for process in processes { stop(process) }
        do { try network.destroy() } catch { Issue.record("destroy failed: \(error)") }
        for link in extraLinks { _ = try? BridgeCommand.run(["ip", "link", "del", "dev", link]) }
        try? FileManager.default.removeItem(at: stateDirectory)
        try? FileManager.default.removeItem(at: webRoot)
    }

    func writeFile(_ name: String, _ content: String) throws {
        try Data(content.utf8).write(to: webRoot.appendingPathComponent(name))
    }

    func nftTable() throws -> String {
        let result = try BridgeCommand.run(["nft", "list", "table", "ip", network.tableName])
        return result.succeeded ? result.stdoutText : ""
    }
}

struct BridgeTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
