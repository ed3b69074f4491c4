import NIOCore

/// A message the proxy cannot pass on, with the status its sender gets for it.
struct HTTP1Error: Error, Equatable, CustomStringConvertible {
    let status: Int
    let reason: String

    static func bad(_ reason: String) -> HTTP1Error { HTTP1Error(status: 400, reason: reason) }

    var description: String { "\(status): \(reason)" }
}

/// The headers the proxy acts on, recognised once while a head is parsed.
enum KnownHeader: UInt8 {
    case other, host, contentLength, transferEncoding, connection, keepAlive, proxyConnection, te, upgrade, expect
    case xForwardedFor, xForwardedProto, xForwardedHost, xRealIP

    /// Hop-by-hop (RFC 9110 §7.6.1): meant for one connection, never forwarded as received.
    /// `Transfer-Encoding` is not here: the proxy relays chunked bodies as they are, framing included.
    var isHopByHop: Bool {
        switch self {
        case .connection, .keepAlive, .proxyConnection, .te, .upgrade: true
        default: false
        }
    }
}

/// One header line, as offsets into the head's bytes (no copies, no strings).
struct HeaderField {
    var kind: KnownHeader
    var nameStart: Int
    var nameEnd: Int
    var valueStart: Int
    var valueEnd: Int
}

/// An HTTP/1.x request or response head parsed in place: the proxy reads the few things it needs
/// (method, target, version, status, framing, connection options, host) and copies the rest of
/// the head through byte for byte. Offsets are relative to `bytes.readerIndex`.
struct HTTP1Head {
    var bytes = ByteBuffer()
    var fields: [HeaderField] = []
    /// Request line: method is `[0, methodEnd)`, the target `[targetStart, targetEnd)`.
    var methodEnd = 0
    var targetStart = 0
    var targetEnd = 0
    /// Status line: the status code, and where the text after the version starts (" 200 OK").
    var status = 0
    var statusRest = 0
    var statusLineEnd = 0
    var minorVersion = 1
    var contentLength: Int64?
    var hasTransferEncoding = false
    /// Chunked is the final transfer coding.
    var chunked = false
    var connectionClose = false
    var connectionKeepAlive = false
    var connectionUpgrade = false
    /// Other header names the `Connection` header lists, lowercased: hop-by-hop too.
    var connectionNames: [String] = []
    var expectContinue = false
    var host: HeaderField?
    var upgrade: HeaderField?

    mutating func reset() {
        fields.removeAll(keepingCapacity: true)
        methodEnd = 0; targetStart = 0; targetEnd = 0
        status = 0; statusRest = 0; statusLineEnd = 0; minorVersion = 1
        contentLength = nil; hasTransferEncoding = false; chunked = false
        connectionClose = false; connectionKeepAlive = false; connectionUpgrade = false
        if !connectionNames.isEmpty { connectionNames = [] }
        expectContinue = false; host = nil; upgrade = nil
    }

    /// Whether the connection may carry another message after this one, by version and `Connection`.
    var keepAlive: Bool {
        if connectionClose { return false }
        return minorVersion >= 1 || connectionKeepAlive
    }

    func string(_ start: Int, _ end: Int) -> String {
        bytes.getString(at: bytes.readerIndex + start, length: end - start) ?? ""
    }

    var method: String { string(0, methodEnd) }
    var target: String { string(targetStart, targetEnd) }
    var hostValue: String { host.map { string($0.valueStart, $0.valueEnd) } ?? "" }
    var upgradeValue: String? { upgrade.map { string($0.valueStart, $0.valueEnd) } }

    /// True for `HEAD`, whose response has no body whatever its headers say.
    var isHeadRequest: Bool {
        methodEnd == 4 && bytes.withUnsafeReadableBytes { $0[0] == 0x48 && $0[1] == 0x45 && $0[2] == 0x41 && $0[3] == 0x44 }
    }

    func value(of field: HeaderField) -> String { string(field.valueStart, field.valueEnd) }

    func name(of field: HeaderField) -> String { string(field.nameStart, field.nameEnd) }
}

/// Finds the end of a head that may arrive over several reads, without searching bytes twice.
struct HeadScanner {
    enum Outcome {
        case incomplete
        case tooLarge
        case complete(length: Int)
    }

    let limit: Int
    private var scanned = 0

    init(limit: Int) {
        self.limit = limit
    }

    mutating func scan(_ bytes: ByteBuffer) -> Outcome {
        let found = bytes.withUnsafeReadableBytes { HTTP1Parser.headLength($0, from: scanned) }
        guard let length = found else {
            if bytes.readableBytes > limit {
                scanned = 0
                return .tooLarge
            }
            scanned = HTTP1Parser.resumePoint(bytes.readableBytes)
            return .incomplete
        }
        scanned = 0
        return length > limit ? .tooLarge : .complete(length: length)
    }

    mutating func reset() { scanned = 0 }
}

/// Finds and parses HTTP/1.x heads. Strict where leniency lets requests be smuggled (whitespace
/// before a colon, folded lines, bare CRs, conflicting lengths), lenient where it costs nothing
/// (a bare LF ends a line).
enum HTTP1Parser {
    /// The length of the head at the start of `bytes` through its blank line, or nil while it has
    /// not all arrived. `from` skips bytes already searched.
    static func headLength(_ bytes: UnsafeRawBufferPointer, from: Int = 0) -> Int? {
        let count = bytes.count
        var index = max(from, 0)
        while index < count {
            guard bytes[index] == 0x0A else {
                index += 1
                continue
            }
            if index + 1 < count, bytes[index + 1] == 0x0A { return index + 2 }
            if index + 2 < count, bytes[index + 1] == 0x0D, bytes[index + 2] == 0x0A { return index + 3 }
            index += 1
        }
        return nil
    }

    /// Where to resume `headLength` after it returned nil for `count` bytes.
    static func resumePoint(_ count: Int) -> Int { max(0, count - 3) }

    static func parseRequest(_ head: inout HTTP1Head) throws(HTTP1Error) {
        try head.bytes.withUnsafeReadableBytes { bytes throws(HTTP1Error) in try parse(bytes, into: &head, request: true) }
    }

    static func parseResponse(_ head: inout HTTP1Head) throws(HTTP1Error) {
        try head.bytes.withUnsafeReadableBytes { bytes throws(HTTP1Error) in try parse(bytes, into: &head, request: false) }
    }

    private static func parse(_ bytes: UnsafeRawBufferPointer, into head: inout HTTP1Head, request: Bool) throws(HTTP1Error) {
        head.reset()
        var lineStart = 0
        var first = true
        while lineStart < bytes.count {
            guard let newline = firstNewline(bytes, from: lineStart) else { throw .bad("header line not terminated") }
            var lineEnd = newline
            if lineEnd > lineStart, bytes[lineEnd - 1] == 0x0D { lineEnd -= 1 }
            defer { lineStart = newline + 1 }
            if first {
                first = false
                if request { try requestLine(bytes, lineStart, lineEnd, &head) } else { try statusLine(bytes, lineStart, lineEnd, &head) }
                continue
            }
            if lineEnd == lineStart { break }
            try field(bytes, lineStart, lineEnd, &head)
        }
        if request {
            if head.hasTransferEncoding {
                // RFC 9112 §6.1: an HTTP/1.0 message with a transfer coding has faulty framing.
                if head.minorVersion == 0 { throw .bad("Transfer-Encoding in an HTTP/1.0 request") }
                if head.contentLength != nil { throw .bad("both Transfer-Encoding and Content-Length") }
                if !head.chunked { throw .bad("Transfer-Encoding must end with chunked") }
            }
            if head.minorVersion == 1 && head.host == nil { throw .bad("missing Host header") }
        }
    }

    private static func firstNewline(_ bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        var index = from
        while index < bytes.count {
            if bytes[index] == 0x0A { return index }
            index += 1
        }
        return nil
    }

    private static func requestLine(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ head: inout HTTP1Head) throws(HTTP1Error) {
        var index = start
        while index < end, isToken(bytes[index]) { index += 1 }
        guard index > start, index < end, bytes[index] == 0x20 else { throw .bad("malformed request line") }
        head.methodEnd = index
        index += 1
        head.targetStart = index
        while index < end, bytes[index] > 0x20, bytes[index] != 0x7F { index += 1 }
        guard index > head.targetStart, index < end, bytes[index] == 0x20 else { throw .bad("malformed request target") }
        head.targetEnd = index
        head.minorVersion = try version(bytes, index + 1, end)
        if index + 9 != end { throw .bad("malformed request line") }
    }

    private static func statusLine(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ head: inout HTTP1Head) throws(HTTP1Error) {
        guard end - start >= 12 else { throw .bad("malformed status line") }
        head.minorVersion = try version(bytes, start, end)
        let digits = start + 9
        guard bytes[start + 8] == 0x20, (digits..<digits + 3).allSatisfy({ isDigit(bytes[$0]) }),
            end == digits + 3 || bytes[digits + 3] == 0x20
        else { throw .bad("malformed status line") }
        head.status = Int(bytes[digits] - 0x30) * 100 + Int(bytes[digits + 1] - 0x30) * 10 + Int(bytes[digits + 2] - 0x30)
        guard head.status >= 100 else { throw .bad("malformed status code") }
        for index in (digits + 3)..<end where isControl(bytes[index]) && bytes[index] != 0x09 { throw .bad("control character in status line") }
        head.statusRest = start + 8
        head.statusLineEnd = end
    }

    /// `HTTP/1.0` or `HTTP/1.1` at `start`: the minor version.
    private static func version(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int) throws(HTTP1Error) -> Int {
        guard end - start >= 8, bytes[start] == 0x48, bytes[start + 1] == 0x54, bytes[start + 2] == 0x54, bytes[start + 3] == 0x50,
            bytes[start + 4] == 0x2F, isDigit(bytes[start + 5]), bytes[start + 6] == 0x2E, isDigit(bytes[start + 7])
        else { throw .bad("malformed HTTP version") }
        guard bytes[start + 5] == 0x31, bytes[start + 7] == 0x30 || bytes[start + 7] == 0x31 else {
            throw HTTP1Error(status: 505, reason: "only HTTP/1.0 and HTTP/1.1 are served on this port")
        }
        return Int(bytes[start + 7] - 0x30)
    }

    private static func field(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ head: inout HTTP1Head) throws(HTTP1Error) {
        if bytes[start] == 0x20 || bytes[start] == 0x09 { throw .bad("folded header lines are not allowed") }
        var index = start
        while index < end, isToken(bytes[index]) { index += 1 }
        guard index > start, index < end, bytes[index] == 0x3A else { throw .bad("malformed header line") }
        let nameEnd = index
        index += 1
        while index < end, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
        let valueStart = index
        var valueEnd = end
        while valueEnd > valueStart, bytes[valueEnd - 1] == 0x20 || bytes[valueEnd - 1] == 0x09 { valueEnd -= 1 }
        for position in valueStart..<valueEnd where isControl(bytes[position]) && bytes[position] != 0x09 {
            throw .bad("control character in a header value")
        }
        let kind = classify(bytes, start, nameEnd - start)
        let field = HeaderField(kind: kind, nameStart: start, nameEnd: nameEnd, valueStart: valueStart, valueEnd: valueEnd)
        head.fields.append(field)
        switch kind {
        case .host:
            if head.host != nil { throw .bad("more than one Host header") }
            head.host = field
        case .contentLength:
            let length = try contentLength(bytes, valueStart, valueEnd)
            if let existing = head.contentLength, existing != length { throw .bad("conflicting Content-Length headers") }
            head.contentLength = length
        case .transferEncoding:
            head.hasTransferEncoding = true
            var sawChunkedLast = head.chunked
            try forEachToken(bytes, valueStart, valueEnd) { (tokenStart, tokenEnd) throws(HTTP1Error) in
                if sawChunkedLast { throw .bad("chunked must be the last transfer coding") }
                sawChunkedLast = equalsLowercase(bytes, tokenStart, tokenEnd - tokenStart, "chunked")
            }
            head.chunked = sawChunkedLast
        case .connection:
            try forEachToken(bytes, valueStart, valueEnd) { (tokenStart, tokenEnd) throws(HTTP1Error) in
                let length = tokenEnd - tokenStart
                if equalsLowercase(bytes, tokenStart, length, "close") {
                    head.connectionClose = true
                } else if equalsLowercase(bytes, tokenStart, length, "keep-alive") {
                    head.connectionKeepAlive = true
                } else if equalsLowercase(bytes, tokenStart, length, "upgrade") {
                    head.connectionUpgrade = true
                } else {
                    head.connectionNames.append(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[tokenStart..<tokenEnd]), as: UTF8.self).lowercased())
                }
            }
        case .upgrade:
            head.upgrade = field
        case .expect:
            head.expectContinue = equalsLowercase(bytes, valueStart, valueEnd - valueStart, "100-continue")
        default:
            break
        }
    }

    /// `Content-Length`: digits, or a list of identical values (RFC 9110 §8.6).
    private static func contentLength(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int) throws(HTTP1Error) -> Int64 {
        var result: Int64?
        try forEachToken(bytes, start, end) { (tokenStart, tokenEnd) throws(HTTP1Error) in
            var value: Int64 = 0
            guard tokenEnd - tokenStart <= 18 else { throw .bad("Content-Length too large") }
            for index in tokenStart..<tokenEnd {
                guard isDigit(bytes[index]) else { throw .bad("invalid Content-Length") }
                value = value * 10 + Int64(bytes[index] - 0x30)
            }
            if let result, result != value { throw .bad("conflicting Content-Length values") }
            result = value
        }
        guard let result else { throw .bad("empty Content-Length") }
        return result
    }

    /// Calls `body` with the bounds of each comma-separated, whitespace-trimmed, non-empty element.
    private static func forEachToken(
        _ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ body: (Int, Int) throws(HTTP1Error) -> Void
    ) throws(HTTP1Error) {
        var index = start
        while index < end {
            while index < end, bytes[index] == 0x20 || bytes[index] == 0x09 || bytes[index] == 0x2C { index += 1 }
            let tokenStart = index
            while index < end, bytes[index] != 0x2C { index += 1 }
            var tokenEnd = index
            while tokenEnd > tokenStart, bytes[tokenEnd - 1] == 0x20 || bytes[tokenEnd - 1] == 0x09 { tokenEnd -= 1 }
            if tokenEnd > tokenStart { try body(tokenStart, tokenEnd) }
        }
    }

    private static func classify(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ length: Int) -> KnownHeader {
        func check(_ literal: StaticString, _ kind: KnownHeader) -> KnownHeader? {
            equalsLowercase(bytes, start, length, literal) ? kind : nil
        }
        switch length {
        case 2: return check("te", .te) ?? .other
        case 4: return check("host", .host) ?? .other
        case 6: return check("expect", .expect) ?? .other
        case 7: return check("upgrade", .upgrade) ?? .other
        case 9: return check("x-real-ip", .xRealIP) ?? .other
        case 10: return check("connection", .connection) ?? check("keep-alive", .keepAlive) ?? .other
        case 14: return check("content-length", .contentLength) ?? .other
        case 15: return check("x-forwarded-for", .xForwardedFor) ?? .other
        case 16: return check("proxy-connection", .proxyConnection) ?? check("x-forwarded-host", .xForwardedHost) ?? .other
        case 17: return check("transfer-encoding", .transferEncoding) ?? check("x-forwarded-proto", .xForwardedProto) ?? .other
        default: return .other
        }
    }

    /// Case-insensitive comparison with a lowercase ASCII literal of letters, digits and `-`.
    static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ length: Int, _ literal: StaticString) -> Bool {
        guard literal.utf8CodeUnitCount == length else { return false }
        let expected = literal.utf8Start
        for offset in 0..<length {
            let byte = bytes[start + offset]
            let want = expected[offset]
            if byte != want && !(want >= 0x61 && want <= 0x7A && byte | 0x20 == want) { return false }
        }
        return true
    }

    @inline(__always) static func isDigit(_ byte: UInt8) -> Bool { byte >= 0x30 && byte <= 0x39 }

    @inline(__always) static func isControl(_ byte: UInt8) -> Bool { byte < 0x20 || byte == 0x7F }

    /// RFC 9110 `tchar`: a bit per ASCII byte (no table, no lazy global on the hot path).
    @inline(__always) static func isToken(_ byte: UInt8) -> Bool {
        switch byte {
        case 0..<64: (0x03FF_6CFA_0000_0000 as UInt64) >> byte & 1 == 1
        case 64..<128: (0x57FF_FFFF_C7FF_FFFE as UInt64) >> (byte - 64) & 1 == 1
        default: false
        }
    }
}
