import Foundation

/// One RFC 5424 syslog message, as the log forwarder sends instances' lines:
///
/// ```
/// <14>1 2026-11-22T09:31:23.310Z node-1 shop-web shop_web.5f0c… - [flotilla@32473 app="/shop/web" instance="shop_web.5f0c…" node="node-1" stream="stdout"] GET /cart 200
/// ```
///
/// Header fields are cut to RFC 5424's lengths and to printable US-ASCII (anything else becomes
/// `_`, an empty field `-`); structured-data values escape `"`, `\` and `]`; the message is the
/// line's bytes as written (no BOM), cut on a UTF-8 boundary when the whole would pass a bound.
public struct SyslogMessage: Sendable, Equatable {
    public enum Severity: Int, Sendable {
        case emergency = 0, alert, critical, error, warning, notice, informational, debug
    }

    /// RFC 5424's facility 1, "user-level messages".
    public static let userFacility = 1

    /// The SD-ID of the element carrying an instance line's origin. `32473` is the private
    /// enterprise number RFC 5612 reserves for documentation: Flotilla has none of its own, and an
    /// SD-ID with `@` must name one.
    public static let structuredDataID = "flotilla@32473"

    public struct StructuredData: Sendable, Equatable {
        public var id: String
        public var parameters: [(name: String, value: String)]

        public init(id: String, parameters: [(name: String, value: String)]) {
            self.id = id
            self.parameters = parameters
        }

        public static func == (left: Self, right: Self) -> Bool {
            left.id == right.id && left.parameters.map(\.name) == right.parameters.map(\.name)
                && left.parameters.map(\.value) == right.parameters.map(\.value)
        }
    }

    public var facility: Int
    public var severity: Severity
    public var millis: Int64
    public var hostname: String
    public var appName: String
    public var processID: String
    public var messageID: String
    public var structuredData: [StructuredData]
    public var text: [UInt8]

    public init(
        facility: Int = SyslogMessage.userFacility, severity: Severity, millis: Int64, hostname: String, appName: String,
        processID: String = "-", messageID: String = "-", structuredData: [StructuredData], text: [UInt8]
    ) {
        self.facility = facility
        self.severity = severity
        self.millis = millis
        self.hostname = hostname
        self.appName = appName
        self.processID = processID
        self.messageID = messageID
        self.structuredData = structuredData
        self.text = text
    }

    /// The APP-NAME for an app id: its service name (`/shop/web` is `shop-web`), at most 48 characters.
    public static func appName(of appID: String) -> String {
        let trimmed = appID.drop { $0 == "/" }
        return trimmed.isEmpty ? "flotilla" : trimmed.replacingOccurrences(of: "/", with: "-")
    }

    /// The message's bytes; with `maxBytes`, the text is cut so that the whole fits (the header and
    /// structured data are never cut).
    public func serialized(maxBytes: Int? = nil) -> [UInt8] {
        var output: [UInt8] = []
        output.reserveCapacity(160 + text.count)
        output += "<\(facility * 8 + severity.rawValue)>1 ".utf8
        output += Timestamp.format(Date(timeIntervalSince1970: Double(millis) / 1000)).utf8
        for (field, limit) in [(hostname, 255), (appName, 48), (processID, 128), (messageID, 32)] {
            output.append(UInt8(ascii: " "))
            Self.appendHeaderField(field, limit: limit, to: &output)
        }
        output.append(UInt8(ascii: " "))
        if structuredData.isEmpty {
            output.append(UInt8(ascii: "-"))
        } else {
            for element in structuredData {
                output.append(UInt8(ascii: "["))
                Self.appendName(element.id, limit: 255, to: &output)
                for parameter in element.parameters {
                    output.append(UInt8(ascii: " "))
                    Self.appendName(parameter.name, limit: 32, to: &output)
                    output += "=\"".utf8
                    Self.appendEscaped(parameter.value, to: &output)
                    output.append(UInt8(ascii: "\""))
                }
                output.append(UInt8(ascii: "]"))
            }
        }
        guard !text.isEmpty else { return output }
        output.append(UInt8(ascii: " "))
        var length = text.count
        if let maxBytes, output.count + length > maxBytes {
            length = max(0, maxBytes - output.count)
            // Never end inside a UTF-8 sequence: back off over continuation bytes and their lead.
            if length < text.count, length > 0, text[length] & 0xC0 == 0x80 {
                while length > 0, text[length] & 0xC0 == 0x80 { length -= 1 }
            }
        }
        output += text[..<length]
        return output
    }

    /// RFC 6587's octet counting, for TCP: `LENGTH SP MESSAGE`.
    public static func octetCounted(_ message: [UInt8]) -> [UInt8] {
        Array("\(message.count) ".utf8) + message
    }

    static func appendHeaderField(_ field: String, limit: Int, to output: inout [UInt8]) {
        var written = 0
        for byte in field.utf8 {
            guard written < limit else { break }
            output.append((33...126).contains(byte) ? byte : UInt8(ascii: "_"))
            written += 1
        }
        if written == 0 { output.append(UInt8(ascii: "-")) }
    }

    /// An SD-ID or PARAM-NAME: printable US-ASCII but `=`, space, `]` and `"`.
    static func appendName(_ name: String, limit: Int, to output: inout [UInt8]) {
        var written = 0
        for byte in name.utf8 {
            guard written < limit else { break }
            let allowed = (33...126).contains(byte) && byte != UInt8(ascii: "=") && byte != UInt8(ascii: "]") && byte != UInt8(ascii: "\"")
            output.append(allowed ? byte : UInt8(ascii: "_"))
            written += 1
        }
        if written == 0 { output.append(UInt8(ascii: "_")) }
    }

    /// A PARAM-VALUE: UTF-8, with `"`, `\` and `]` escaped by a backslash (RFC 5424 section 6.3.3).
    static func appendEscaped(_ value: String, to output: inout [UInt8]) {
        for byte in value.utf8 {
            if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") || byte == UInt8(ascii: "]") { output.append(UInt8(ascii: "\\")) }
            output.append(byte)
        }
    }
}
