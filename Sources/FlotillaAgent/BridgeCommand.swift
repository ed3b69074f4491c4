import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Errors of the bridge networking component. Every case renders a message
/// meant for an operator (`description`).
enum BridgeError: Error, CustomStringConvertible, Sendable {
    case commandNotFound(String)
    case spawnFailed(command: [String], errno: Int32)
    case commandFailed(command: [String], status: Int32, stderr: String)
    case commandTimedOut(command: [String], seconds: Double)
    case inputTooLarge(command: [String], bytes: Int)
    case sysctlFailed(path: String, reason: String)
    case invalidCIDR(String, reason: String)
    case invalidConfiguration(String)
    case cidrOverlapsHostRoute(cidr: String, route: String, device: String?)
    case addressPoolExhausted(cidr: String)
    case invalidPortMapping(String)
    case hostPortInUse(hostPort: Int, owner: String)
    case alreadyAttached(instanceID: String)
    case notPrepared(String)
    case stateFile(path: String, reason: String)
    case unexpectedOutput(command: [String], reason: String)

    var description: String {
        switch self {
        case .commandNotFound(let name):
            return "bridge network: command '\(name)' not found (looked in /usr/sbin, /sbin, /usr/bin, /bin and PATH)"
        case .spawnFailed(let command, let code):
            return "bridge network: cannot start `\(BridgeCommand.render(command))`: \(String(cString: strerror(code)))"
        case .commandFailed(let command, let status, let stderr):
            let text = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            return "bridge network: `\(BridgeCommand.render(command))` failed (exit \(status))" + (text.isEmpty ? "" : ": \(text)")
        case .commandTimedOut(let command, let seconds):
            return "bridge network: `\(BridgeCommand.render(command))` did not finish within \(seconds)s and was killed"
        case .inputTooLarge(let command, let bytes):
            return "bridge network: input of \(bytes) bytes for `\(BridgeCommand.render(command))` is too large"
        case .sysctlFailed(let path, let reason):
            return "bridge network: cannot write \(path): \(reason)"
        case .invalidCIDR(let text, let reason):
            return "bridge network: invalid CIDR '\(text)': \(reason)"
        case .invalidConfiguration(let message):
            return "bridge network: \(message)"
        case .cidrOverlapsHostRoute(let cidr, let route, let device):
            let via = device.map { " (dev \($0))" } ?? ""
            return "bridge network: CIDR \(cidr) overlaps the host route \(route)\(via); containers could not reach that network. Choose a free range with --bridge-cidr."
        case .addressPoolExhausted(let cidr):
            return "bridge network: no free address left in \(cidr); choose a larger range with --bridge-cidr"
        case .invalidPortMapping(let message):
            return "bridge network: invalid port mapping: \(message)"
        case .hostPortInUse(let port, let owner):
            return "bridge network: host port \(port)/tcp is already in use by \(owner)"
        case .alreadyAttached(let id):
            return "bridge network: instance '\(id)' is already attached with different port mappings; detach it first"
        case .notPrepared(let message):
            return "bridge network: not prepared: \(message)"
        case .stateFile(let path, let reason):
            return "bridge network: state file \(path): \(reason)"
        case .unexpectedOutput(let command, let reason):
            return "bridge network: unexpected output from `\(BridgeCommand.render(command))`: \(reason)"
        }
    }
}

/// What a finished command produced.
struct BridgeCommandResult: Sendable {
    var command: [String]
    /// Exit status, or 128 + signal number if the process was killed by a signal.
    var status: Int32
    var stdout: Data
    var stderr: Data

    var succeeded: Bool { status == 0 }
    var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
    var stderrText: String { String(decoding: stderr, as: UTF8.self) }
}

/// Runs `ip`, `nft` & co. with posix_spawn: argv arrays only (never a shell),
/// stdin fed from memory, stdout and stderr captured, a timeout, and a
/// minimal environment (`LC_ALL=C` so error texts are stable).
enum BridgeCommand {
    static let searchDirectories = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"]
    static let defaultTimeout: Double = 30
    private static let maximumOutput = 64 << 20

    static func render(_ argv: [String]) -> String {
        argv.map { arg in
            arg.isEmpty || arg.contains(where: { $0 == " " || $0 == "\"" || $0 == "'" || $0 == "\n" })
                ? "'" + arg.replacingOccurrences(of: "'", with: "'\\''") + "'" : arg
        }.joined(separator: " ")
    }

    static func resolve(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        var directories = searchDirectories
        if let path = ProcessInfo.processInfo.environment["PATH"] {
            directories += path.split(separator: ":").map(String.init)
        }
        for directory in directories {
            let candidate = directory + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Runs `argv` and fails only if it cannot be started or times out.
    static func run(_ argv: [String], input: Data? = nil, timeout: Double = defaultTimeout) throws -> BridgeCommandResult {
        precondition(!argv.isEmpty, "empty argv")
        guard let executable = resolve(argv[0]) else { throw BridgeError.commandNotFound(argv[0]) }

        // stdin: the whole input is written into the pipe *before* the child
        // starts, so there is no writer loop and no SIGPIPE if the child exits early.
        let stdinFD: Int32
        if let input {
            let (readEnd, writeEnd) = try makePipe(argv)
            defer { close(writeEnd) }
            if input.count > 0 {
                #if os(Linux)
                if input.count > 65_536 { _ = fcntl(writeEnd, linuxSetPipeSize, Int32(min(input.count, 1 << 20))) }
                let capacity = Int(fcntl(writeEnd, linuxGetPipeSize))
                #else
                let capacity = 16_384
                #endif
                guard input.count <= capacity else {
                    close(readEnd)
                    throw BridgeError.inputTooLarge(command: argv, bytes: input.count)
                }
                let ok = input.withUnsafeBytes { raw -> Bool in
                    var offset = 0
                    while offset < raw.count {
                        let n = write(writeEnd, raw.baseAddress! + offset, raw.count - offset)
                        if n < 0 { if errno == EINTR { continue }; return false }
                        offset += n
                    }
                    return true
                }
                guard ok else {
                    let code = errno
                    close(readEnd)
                    throw BridgeError.spawnFailed(command: argv, errno: code)
                }
            }
            stdinFD = readEnd
        } else {
            stdinFD = open("/dev/null", O_RDONLY | O_CLOEXEC)
            guard stdinFD >= 0 else { throw BridgeError.spawnFailed(command: argv, errno: errno) }
        }
        var stdinOpen = true
        defer { if stdinOpen { close(stdinFD) } }

        let (outRead, outWrite) = try makePipe(argv)
        let errPipe: (Int32, Int32)
        do { errPipe = try makePipe(argv) } catch {
            close(outRead); close(outWrite); throw error
        }
        let (errRead, errWrite) = errPipe
        var readFDs = [outRead, errRead]
        var childEndsOpen = true
        func closeChildEnds() {
            if childEndsOpen { close(outWrite); close(errWrite); childEndsOpen = false }
        }
        defer {
            closeChildEnds()
            for fd in readFDs where fd >= 0 { close(fd) }
        }

        #if os(Linux)
        var actions = posix_spawn_file_actions_t()
        var attributes = posix_spawnattr_t()
        #else
        var actions: posix_spawn_file_actions_t? = nil
        var attributes: posix_spawnattr_t? = nil
        #endif
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // All our descriptors are O_CLOEXEC; dup2 gives the child clean 0/1/2.
        posix_spawn_file_actions_adddup2(&actions, stdinFD, 0)
        posix_spawn_file_actions_adddup2(&actions, outWrite, 1)
        posix_spawn_file_actions_adddup2(&actions, errWrite, 2)
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        posix_spawnattr_setsigdefault(&attributes, &allSignals)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        let environment = ["PATH=/usr/sbin:/sbin:" + path, "LC_ALL=C"]
        let cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnvironment: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in cArguments { free(pointer) }
            for pointer in cEnvironment { free(pointer) }
        }
        var pid: pid_t = 0
        let spawnResult = cArguments.withUnsafeBufferPointer { arguments in
            cEnvironment.withUnsafeBufferPointer { env in
                posix_spawn(&pid, executable, &actions, &attributes, arguments.baseAddress!, env.baseAddress!)
            }
        }
        guard spawnResult == 0 else { throw BridgeError.spawnFailed(command: argv, errno: spawnResult) }
        closeChildEnds()
        close(stdinFD)
        stdinOpen = false

        var output = [Data(), Data()]
        let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
        var timedOut = false
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while readFDs.contains(where: { $0 >= 0 }) {
            let remaining = deadline - ContinuousClock.now
            let remainingMS = remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000
            if remainingMS <= 0 { timedOut = true; break }
            var pollFDs = readFDs.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&pollFDs, nfds_t(pollFDs.count), Int32(min(remainingMS, 1000)))
            if ready < 0 {
                if errno == EINTR { continue }
                break
            }
            if ready == 0 { continue }
            for index in pollFDs.indices where pollFDs[index].fd >= 0 && pollFDs[index].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(readFDs[index], $0.baseAddress!, $0.count) }
                if n > 0 {
                    if output[index].count < maximumOutput { output[index].append(contentsOf: buffer[0..<n]) }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(readFDs[index])
                    readFDs[index] = -1
                }
            }
        }
        if timedOut { kill(pid, SIGKILL) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { status = 127 << 8; break }
        }
        if timedOut { throw BridgeError.commandTimedOut(command: argv, seconds: timeout) }
        let exitStatus = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return BridgeCommandResult(command: argv, status: exitStatus, stdout: output[0], stderr: output[1])
    }

    /// Runs `argv` and throws `BridgeError.commandFailed` (with stderr) unless it exits 0.
    @discardableResult
    static func check(_ argv: [String], input: Data? = nil, timeout: Double = defaultTimeout) throws -> BridgeCommandResult {
        let result = try run(argv, input: input, timeout: timeout)
        guard result.succeeded else {
            let message = result.stderr.isEmpty ? result.stdoutText : result.stderrText
            throw BridgeError.commandFailed(command: argv, status: result.status, stderr: message)
        }
        return result
    }

    /// Feeds an nft script on stdin (`nft -f -`); the script is one atomic transaction.
    @discardableResult
    static func nft(_ script: String) throws -> BridgeCommandResult {
        try check(["nft", "-f", "-"], input: Data(script.utf8))
    }

    // MARK: sysctl via /proc/sys

    static func procSysPath(_ components: [String]) -> String {
        "/proc/sys/" + components.joined(separator: "/")
    }

    static func readSysctl(_ components: [String]) -> String? {
        guard let data = FileManager.default.contents(atPath: procSysPath(components)) else { return nil }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Writes a sysctl directly to /proc/sys (no `sysctl` process); skips the write if already set.
    static func writeSysctl(_ components: [String], _ value: String) throws {
        if readSysctl(components) == value { return }
        let path = procSysPath(components)
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BridgeError.sysctlFailed(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        let bytes = Array((value + "\n").utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        guard written == bytes.count else {
            throw BridgeError.sysctlFailed(path: path, reason: String(cString: strerror(errno)))
        }
    }

    #if os(Linux)
    private static let linuxSetPipeSize: Int32 = 1031  // F_SETPIPE_SZ (not exported to Swift)
    private static let linuxGetPipeSize: Int32 = 1032  // F_GETPIPE_SZ
    #endif

    /// A pipe whose ends are close-on-exec from the start (pipe2 with O_CLOEXEC,
    /// so a process spawned concurrently by another thread cannot inherit them).
    private static func makePipe(_ argv: [String]) throws -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        #if os(Linux)
        // glibc's pipe2 is hidden from Swift (_GNU_SOURCE); look it up instead.
        typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>?, Int32) -> Int32
        if let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "pipe2") {
            let pipe2 = unsafeBitCast(symbol, to: Pipe2.self)
            guard pipe2(&fds, Int32(O_CLOEXEC)) == 0 else { throw BridgeError.spawnFailed(command: argv, errno: errno) }
            return (fds[0], fds[1])
        }
        #endif
        guard pipe(&fds) == 0 else { throw BridgeError.spawnFailed(command: argv, errno: errno) }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        return (fds[0], fds[1])
    }
}
