import FlotillaCore
import Foundation
public import Hummingbird
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One line of the audit log: who did what, when, and what became of it. Never a body, a token or
/// a query string's `token`: only the method, the path and the token's accessor.
public struct AuditEntry: Codable, Sendable, Equatable {
    public var time: String
    /// The token's accessor (not its secret), "anonymous" without one, "unknown" for a bad one.
    public var accessor: String
    public var tokenName: String?
    public var client: String
    public var method: String
    public var path: String
    public var status: Int
    /// "allowed", or "denied" when access control refused it.
    public var decision: String

    public init(
        time: String, accessor: String, tokenName: String?, client: String, method: String, path: String, status: Int, decision: String
    ) {
        self.time = time
        self.accessor = accessor
        self.tokenName = tokenName
        self.client = client
        self.method = method
        self.path = path
        self.status = status
        self.decision = decision
    }
}

/// The append-only audit log (`<data-dir>/audit.log`, one JSON object a line): every write (any
/// method but GET and HEAD) and every request access control refused. Lines are written with
/// O_APPEND in one `write` each, so concurrent requests never interleave inside a line.
///
/// When a line would take the file past `maxBytes`, it is rotated: `audit.log` becomes
/// `audit.log.1`, `.1` becomes `.2`, …, and the oldest beyond `keep` files is removed, so the log
/// holds at most about `maxBytes × (keep + 1)`. (An outside rotator that copies and truncates
/// works too: writes append wherever the file ends.)
public final class AuditLog: Sendable {
    public let path: String
    public let maxBytes: Int64
    public let keep: Int
    private struct File {
        var descriptor: Int32
        var size: Int64
    }
    private let file: Mutex<File>

    public init(path: String, maxBytes: Int64 = 64 << 20, keep: Int = 5) throws {
        self.path = path
        self.maxBytes = max(4096, maxBytes)
        self.keep = max(1, keep)
        file = Mutex(try Self.open(path))
    }

    deinit {
        file.withLock { close($0.descriptor) }
    }

    private static func open(_ path: String) throws -> File {
        let descriptor = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw FlotillaError.unavailable("cannot open the audit log \(path): \(String(cString: strerror(errno)))")
        }
        return File(descriptor: descriptor, size: max(0, Int64(lseek(descriptor, 0, SEEK_END))))
    }

    public func record(_ entry: AuditEntry) {
        guard var line = try? JSONEncoder().encode(entry) else { return }
        line.append(0x0A)
        file.withLock { file in
            if file.size > 0, file.size + Int64(line.count) > maxBytes { rotate(&file) }
            let written = line.withUnsafeBytes { write(file.descriptor, $0.baseAddress, $0.count) }
            if written > 0 { file.size += Int64(written) }
        }
    }

    /// Shifts the files by one and starts an empty `audit.log`. A failure keeps writing where it was.
    private func rotate(_ file: inout File) {
        unlink("\(path).\(keep)")
        for index in stride(from: keep - 1, through: 1, by: -1) {
            rename("\(path).\(index)", "\(path).\(index + 1)")
        }
        guard rename(path, "\(path).1") == 0, let fresh = try? Self.open(path) else { return }
        close(file.descriptor)
        file = fresh
    }

    /// The last `count` entries (at most), oldest first, from the rotated files too when the
    /// current one holds fewer.
    public func tail(_ count: Int) -> [AuditEntry] {
        var lines: [Data.SubSequence] = []
        for index in 0...keep where lines.count < count {
            guard let data = FileManager.default.contents(atPath: index == 0 ? path : "\(path).\(index)") else { break }
            lines = data.split(separator: 0x0A).suffix(max(0, count - lines.count)) + lines
        }
        return lines.compactMap { try? JSONDecoder().decode(AuditEntry.self, from: Data($0)) }
    }

    /// The path of a request as the log keeps it: no query string (a `?token=` must not land here).
    static func loggedPath(_ path: String) -> String {
        String(path.prefix(1024))
    }
}

/// `GET /flotilla/v1/audit?n=100`: the newest entries of this node's audit log, oldest first.
public struct AuditRoutes: Sendable {
    let audit: AuditLog

    public init(audit: AuditLog) {
        self.audit = audit
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/audit") { request, _ in
            let count = request.uri.queryParameters["n"].flatMap { Int($0) } ?? 100
            guard (1...100_000).contains(count) else { return APIResponse.marathonError(FlotillaError.badRequest("n must be 1 to 100000")) }
            let entries = audit.tail(count)
            let body = (try? JSONEncoder().encode(entries)) ?? Data("[]".utf8)
            return APIResponse.json(bytes: Array(body))
        }
    }
}
