import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the test harness itself (not from the code under test).
struct RegistryHarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A fresh temporary directory, removed by `remove()`.
struct RegistryTestDir: Sendable {
    let path: String

    init(_ prefix: String) throws {
        let base = NSTemporaryDirectory().hasSuffix("/") ? String(NSTemporaryDirectory().dropLast()) : NSTemporaryDirectory()
        var template = Array((base + "/\(prefix)-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw RegistryHarnessError("mkdtemp failed")
        }
        path = String(cString: made)
    }

    func file(_ name: String) -> String { path + "/" + name }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs a program to completion, capturing its output; throws on a non-zero exit.
@discardableResult
func runTool(_ arguments: [String], environment: [String: String]? = nil) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Read before waiting so a chatty program cannot fill the pipe and block.
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw RegistryHarnessError("\(arguments.joined(separator: " ")) exited \(process.terminationStatus): \(String(decoding: stderr, as: UTF8.self)) \(String(decoding: stdout, as: UTF8.self))")
    }
    return String(decoding: stdout, as: UTF8.self)
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it back, close).
func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw RegistryHarnessError("socket failed") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let bound = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0 else { throw RegistryHarnessError("bind failed") }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let named = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
    }
    guard named == 0 else { throw RegistryHarnessError("getsockname failed") }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Whether something accepts TCP connections on 127.0.0.1:port.
func isListeningOnLoopback(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = UInt16(port).bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    } == 0
}

/// A long-running child process (registry, token server) stopped by its PID.
final class RegistryTestDaemon: @unchecked Sendable {
    /// The Python the helper servers run on (they need `cryptography`): the test suite's
    /// virtualenv when scripts/test.sh names it, else python3 on PATH.
    static let python = ProcessInfo.processInfo.environment["FLOTILLA_TEST_PYTHON"] ?? "python3"

    let process = Process()
    let logPath: String
    let name: String

    init(name: String, arguments: [String], logPath: String) throws {
        self.name = name
        self.logPath = logPath
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        try process.run()
        try? log.close()
    }

    var pid: Int32 { process.processIdentifier }

    /// Waits until the port accepts connections (or the process dies).
    func waitListening(_ port: Int, timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            // Checked once more after the deadline: a starved task may wake only after it.
            if isListeningOnLoopback(port) { return }
            guard process.isRunning else {
                throw RegistryHarnessError("\(name) exited \(process.terminationStatus): \(log())")
            }
            if ContinuousClock.now >= deadline { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw RegistryHarnessError("\(name) did not listen on \(port): \(log())")
    }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// SIGTERM by PID, then SIGKILL if it lingers; reaps the child.
    func stop() {
        guard process.isRunning else { return }
        kill(pid, SIGTERM)
        for _ in 0..<100 where process.isRunning { usleep(20_000) }
        if process.isRunning { kill(pid, SIGKILL) }
        process.waitUntilExit()
    }
}

/// SHA-256 hex of a file, by the system's `sha256sum` (independent of the code under test).
func sha256sumOf(_ path: String) throws -> String {
    String(try runTool(["sha256sum", path]).prefix(64))
}
