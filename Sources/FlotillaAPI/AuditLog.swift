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
}

/// The append-only audit log (`<data-dir>/audit.log`, one JSON object a line): every write (any
/// method but GET and HEAD) and every request access control refused. Lines are written with
/// O_APPEND in one `write` each, so concurrent requests never interleave inside a line.
public final class AuditLog: Sendable {
    public let path: String
    private let fd: Mutex<Int32>

    public init(path: String) throws {
        self.path = path
        let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw FlotillaError.unavailable("cannot open the audit log \(path): \(String(cString: strerror(errno)))")
        }
        fd = Mutex(descriptor)
    }

    deinit {
        fd.withLock { close($0) }
    }

    public func record(_ entry: AuditEntry) {
        guard var line = try? JSONEncoder().encode(entry) else { return }
        line.append(0x0A)
        fd.withLock { descriptor in
            _ = line.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        }
    }

    /// The last `count` entries (at most), oldest first.
    public func tail(_ count: Int) -> [AuditEntry] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        let lines = data.split(separator: 0x0A).suffix(max(0, count))
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
