public import Foundation

/// How the agent writes its own log lines (`--log-format`): `text` (swift-log's stream format, the
/// default), `logfmt` (`time=… level=… label=… msg="…" key=value`) or `json` (one object a line:
/// `time`, `level`, `label`, `message`, `metadata`).
public enum AgentLogFormat: String, Sendable, CaseIterable {
    case text, logfmt, json

    /// One record, metadata keys sorted, for the structured formats (`text` is swift-log's own).
    public struct Record: Sendable {
        public var time: Date
        public var level: String
        public var label: String
        public var message: String
        public var metadata: [(key: String, value: String)]

        public init(time: Date, level: String, label: String, message: String, metadata: [(key: String, value: String)]) {
            self.time = time
            self.level = level
            self.label = label
            self.message = message
            self.metadata = metadata
        }
    }

    /// The record's line, newline included; nil for `text`.
    public func line(_ record: Record) -> String? {
        switch self {
        case .text:
            return nil
        case .logfmt:
            var fields = [
                "time=" + Timestamp.format(record.time), "level=" + record.level, "label=" + Self.logfmtValue(record.label),
                "msg=" + Self.logfmtQuoted(record.message),
            ]
            for (key, value) in record.metadata where !Self.reserved.contains(key) {
                fields.append(Self.logfmtKey(key) + "=" + Self.logfmtValue(value))
            }
            return fields.joined(separator: " ") + "\n"
        case .json:
            var metadata: [String: JSONValue] = [:]
            for (key, value) in record.metadata { metadata[key] = .string(value) }
            let object: [String: JSONValue] = [
                "time": .string(Timestamp.format(record.time)), "level": .string(record.level), "label": .string(record.label),
                "message": .string(record.message), "metadata": .object(metadata),
            ]
            return String(decoding: JSONValue.object(object).serialized(), as: UTF8.self) + "\n"
        }
    }

    /// Keys the line itself uses; metadata of those names would make it ambiguous.
    static let reserved: Set<String> = ["time", "level", "label", "msg"]

    /// A value bare when it can be (no space, `=`, quote, control character, and not empty), quoted otherwise.
    static func logfmtValue(_ value: String) -> String {
        let bare = !value.isEmpty && value.unicodeScalars.allSatisfy { $0.value > 32 && $0 != "=" && $0 != "\"" && $0 != "\\" && $0.value != 127 }
        return bare ? value : logfmtQuoted(value)
    }

    static func logfmtQuoted(_ value: String) -> String {
        var quoted = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": quoted += "\\\""
            case "\\": quoted += "\\\\"
            case "\n": quoted += "\\n"
            case "\r": quoted += "\\r"
            case "\t": quoted += "\\t"
            default:
                if scalar.value < 32 || scalar.value == 127 {
                    quoted += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
                } else {
                    quoted.unicodeScalars.append(scalar)
                }
            }
        }
        return quoted + "\""
    }

    /// A key: anything but letters, digits and `_-.:/` becomes `_`.
    static func logfmtKey(_ key: String) -> String {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/".unicodeScalars)
        let cleaned = String(String.UnicodeScalarView(key.unicodeScalars.map { allowed.contains($0) ? $0 : "_" }))
        return cleaned.isEmpty ? "_" : cleaned
    }
}
