import Foundation
import Synchronization

/// The proxy's optional access log: one line per request, in the combined log format extended
/// with the route, the instance and the timings an operator needs at 3 a.m.:
///
///     127.0.0.1 - - [22/Nov/2026:05:10:00 +0000] "GET /api/items HTTP/1.1" 200 512 "-" "curl/8.5.0" route="/api" upstream="127.0.0.1:31001" upstream_ms=1.203 total_ms=1.350
///
/// Lines are appended to a buffer under a lock and written by one background thread every 100 ms,
/// so a request never waits on the disk.
public final class AccessLog: Sendable {
    struct Entry {
        var client: String
        var method: String
        var target: String
        var version: Int
        var status: Int
        var bytes: Int
        var referer: String
        var userAgent: String
        var route: String
        var upstream: String
        /// From the request to the response head, and to the response's end.
        var upstreamSeconds: Double?
        var totalSeconds: Double
    }

    private struct Buffer {
        var bytes: [UInt8] = []
        var stamp = (second: -1, text: "")
        var closed = false
    }

    private let descriptor: Int32
    private let ownsDescriptor: Bool
    private let buffer = Mutex(Buffer())

    /// Opens `path` for appending (created if missing); `-` is standard output.
    public init(path: String) throws {
        if path == "-" {
            descriptor = STDOUT_FILENO
            ownsDescriptor = false
        } else {
            let opened = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
            guard opened >= 0 else {
                throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path, NSLocalizedDescriptionKey: "cannot open access log \(path): \(String(cString: strerror(errno)))"])
            }
            descriptor = opened
            ownsDescriptor = true
        }
        let thread = Thread { [self] in writerLoop() }
        thread.name = "flotilla-access-log"
        thread.start()
    }

    func record(_ entry: Entry) {
        let now = Date()
        let second = Int(now.timeIntervalSince1970)
        buffer.withLock { state in
            if state.stamp.second != second { state.stamp = (second, Self.format(now)) }
            var line = entry.client.isEmpty ? "-" : entry.client
            line += " - - ["
            line += state.stamp.text
            line += "] \""
            line += Self.quoted(entry.method)
            line += " "
            line += Self.quoted(entry.target)
            line += entry.version == 0 ? " HTTP/1.0\" " : " HTTP/1.1\" "
            line += String(entry.status)
            line += " "
            line += String(entry.bytes)
            line += " \""
            line += entry.referer.isEmpty ? "-" : Self.quoted(entry.referer)
            line += "\" \""
            line += entry.userAgent.isEmpty ? "-" : Self.quoted(entry.userAgent)
            line += "\" route=\""
            line += Self.quoted(entry.route)
            line += "\" upstream=\""
            line += entry.upstream.isEmpty ? "-" : entry.upstream
            line += "\" upstream_ms="
            line += entry.upstreamSeconds.map { Self.milliseconds($0) } ?? "-"
            line += " total_ms="
            line += Self.milliseconds(entry.totalSeconds)
            line += "\n"
            state.bytes.append(contentsOf: line.utf8)
        }
    }

    /// Writes what is waiting and stops the writer.
    public func close() {
        buffer.withLock { $0.closed = true }
    }

    private func writerLoop() {
        while true {
            usleep(100_000)
            let (bytes, closed) = buffer.withLock { state -> ([UInt8], Bool) in
                defer { state.bytes.removeAll(keepingCapacity: true) }
                return (state.bytes, state.closed)
            }
            var offset = 0
            while offset < bytes.count {
                let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + offset, bytes.count - offset) }
                if written < 0 {
                    if errno == EINTR { continue }
                    break
                }
                offset += written
            }
            if closed {
                if ownsDescriptor { _ = Foundation.close(descriptor) }
                return
            }
        }
    }

    private static func milliseconds(_ seconds: Double) -> String {
        let micros = Int((seconds * 1_000_000).rounded())
        let fraction = String(micros % 1000)
        return "\(micros / 1000)." + String(repeating: "0", count: 3 - fraction.count) + fraction
    }

    /// Quotes and control characters escaped, so a line stays one line and parseable.
    static func quoted(_ text: String) -> String {
        guard text.utf8.contains(where: { $0 == 0x22 || $0 == 0x5C || $0 < 0x20 || $0 == 0x7F }) else { return text }
        var result = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F {
                    result += "\\x" + String(scalar.value, radix: 16, uppercase: false).leftPadded(to: 2)
                } else {
                    result.unicodeScalars.append(scalar)
                }
            }
        }
        return result
    }

    private static func format(_ date: Date) -> String {
        var seconds = time_t(date.timeIntervalSince1970)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        return "\(two(parts.tm_mday))/\(months[Int(parts.tm_mon)])/\(parts.tm_year + 1900):\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)) +0000"
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
