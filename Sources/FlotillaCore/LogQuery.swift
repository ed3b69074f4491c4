public import Foundation

/// What `GET /flotilla/v1/logs?app=` asks for, read from its query parameters and checked: every
/// mistake is a `badRequest` that says what was wrong.
///
/// - `stream`: `stdout`, `stderr` or `both` (the default).
/// - `since`, `until`: an RFC 3339 time (`2024-06-01T10:00:00Z`, `…+02:00`) or a duration back
///   from now (`10m`, `1h30m`, `2d`).
/// - `grep`: keeps lines that contain it; with `regex=true` it is a regular expression (ICU syntax,
///   as `NSRegularExpression` reads it). A flag rather than a `/…/` form, so a plain search for a
///   path such as `/health/` means what it says.
/// - `lines`: how many of the newest matching lines to start with (100; 0 for none, with `follow`).
/// - `follow=true`, `format=json` (NDJSON) or `text`.
public struct LogQuery: Sendable {
    public var streams: [LogStream] = [.stdout, .stderr]
    public var sinceMillis: Int64?
    public var untilMillis: Int64?
    public var pattern: LogPattern?
    public var lines = 100
    public var follow = false
    public var json = false

    public init() {}

    public init(parameters: [String: String], now: Date = Date()) throws(FlotillaError) {
        switch parameters["stream"] ?? "both" {
        case "stdout": streams = [.stdout]
        case "stderr": streams = [.stderr]
        case "both": streams = [.stdout, .stderr]
        case let other: throw .badRequest("unknown stream '\(other)': use stdout, stderr or both")
        }
        sinceMillis = try parameters["since"].map { (text) throws(FlotillaError) in try Self.millis(text, parameter: "since", now: now) }
        untilMillis = try parameters["until"].map { (text) throws(FlotillaError) in try Self.millis(text, parameter: "until", now: now) }
        if let text = parameters["lines"] {
            guard let count = Int(text), count >= 0 else { throw .badRequest("lines must be a whole number of lines, 0 or more; got '\(text)'") }
            lines = count
        }
        follow = try Self.flag(parameters["follow"], "follow")
        switch parameters["format"] ?? "text" {
        case "text": json = false
        case "json", "ndjson": json = true
        case let other: throw .badRequest("unknown format '\(other)': use text or json")
        }
        let regex = try Self.flag(parameters["regex"], "regex")
        if let grep = parameters["grep"], !grep.isEmpty {
            pattern = regex ? try LogPattern(regex: grep) : .substring(grep)
        }
    }

    /// Whether a line passes the time bounds and the pattern.
    public func matches(_ line: LogLine) -> Bool {
        if let sinceMillis, line.millis < sinceMillis { return false }
        if let untilMillis, line.millis > untilMillis { return false }
        return pattern?.matches(line.text) ?? true
    }

    /// `since`/`until` as milliseconds since 1970: an RFC 3339 time, or a duration before `now`.
    static func millis(_ text: String, parameter: String, now: Date) throws(FlotillaError) -> Int64 {
        if let date = Timestamp.parse(text) ?? rfc3339(text) { return Int64((date.timeIntervalSince1970 * 1000).rounded(.down)) }
        if let seconds = LogDuration.seconds(text), !text.isEmpty {
            return Int64(((now.timeIntervalSince1970 - seconds) * 1000).rounded(.down))
        }
        throw .badRequest("\(parameter)='\(text)' is neither an RFC 3339 time (2024-06-01T10:00:00Z) nor a duration back from now (10m, 1h30m, 2d)")
    }

    /// RFC 3339 with an offset, or without fractional seconds, which `Timestamp.parse` leaves out.
    static func rfc3339(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text)
    }

    static func flag(_ value: String?, _ name: String) throws(FlotillaError) -> Bool {
        switch value?.lowercased() {
        case nil, "false", "0", "no": return false
        case "", "true", "1", "yes": return true
        case let other?: throw .badRequest("\(name) must be true or false, not '\(other)'")
        }
    }
}

/// What `grep` keeps: lines containing a substring, or matching a regular expression.
public enum LogPattern: Sendable {
    case substring(String)
    case regex(LogRegex)

    public init(regex text: String) throws(FlotillaError) {
        do {
            self = .regex(LogRegex(try NSRegularExpression(pattern: text)))
        } catch {
            throw .badRequest("grep '\(text)' is not a valid regular expression (\(error.localizedDescription)); without regex=true it is a plain substring")
        }
    }

    public func matches(_ text: String) -> Bool {
        switch self {
        case .substring(let needle): return text.contains(needle)
        case .regex(let regex): return regex.matches(text)
        }
    }
}

/// A compiled expression; matching does not mutate it, so it is shared between requests' tasks.
public final class LogRegex: @unchecked Sendable {
    let expression: NSRegularExpression

    init(_ expression: NSRegularExpression) {
        self.expression = expression
    }

    func matches(_ text: String) -> Bool {
        expression.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) != nil
    }
}
