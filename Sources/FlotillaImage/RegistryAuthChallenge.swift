/// One challenge from a `WWW-Authenticate` header (RFC 7235), e.g.
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"`.
///
/// Hand-parsed rather than split on commas because parameter values are quoted strings that may
/// themselves contain commas (`scope="repository:a:pull,push"`) and escaped quotes, and because one
/// header may carry several challenges (`Basic realm="x", Bearer realm="y"`).
public struct RegistryAuthChallenge: Hashable, Sendable {
    /// The scheme, lowercased (`bearer`, `basic`).
    public var scheme: String
    /// Parameters with lowercased names.
    public var parameters: [String: String]
    /// A token68 credential blob, for schemes that use one instead of parameters.
    public var token68: String?

    public init(scheme: String, parameters: [String: String] = [:], token68: String? = nil) {
        self.scheme = scheme.lowercased()
        self.parameters = parameters
        self.token68 = token68
    }

    public subscript(parameter name: String) -> String? { parameters[name.lowercased()] }

    /// Parses every challenge in the given header values (one header may hold several; several headers
    /// may be present). Malformed trailing input is dropped, never fatal: a registry's odd header should
    /// degrade to "no usable challenge", which the client reports clearly.
    public static func parse(_ headerValues: [String]) -> [RegistryAuthChallenge] {
        headerValues.flatMap { parse(header: $0) }
    }

    /// Parses the challenges in one header value.
    ///
    /// Grammar (RFC 7235 §2.1): `challenge = scheme [ 1*SP ( token68 / #auth-param ) ]`,
    /// `auth-param = token BWS "=" BWS ( token / quoted-string )`, challenges separated by commas. After a
    /// comma, `token =` continues the current challenge's parameters; a token not followed by `=` starts
    /// the next challenge.
    public static func parse(header: String) -> [RegistryAuthChallenge] {
        var scanner = HeaderScanner(Array(header.utf8))
        var result: [RegistryAuthChallenge] = []
        while true {
            scanner.skip { $0 == .space || $0 == .tab || $0 == .comma }
            guard !scanner.atEnd else { break }
            guard let scheme = scanner.token() else {
                // Garbage where a scheme must be: skip to the next comma and resynchronise.
                scanner.position += 1
                scanner.skip { $0 != .comma }
                continue
            }
            var challenge = RegistryAuthChallenge(scheme: scheme)
            scanner.skip { $0 == .space || $0 == .tab }
            var first = true
            while true {
                let save = scanner.position
                guard let name = scanner.token() else { break }
                scanner.skip { $0 == .space || $0 == .tab }
                let isParameter: Bool
                if scanner.peek == .equals {
                    // `name=value` unless what follows the '=' is more '=' padding, a comma or the end (token68).
                    var look = scanner.position + 1
                    while look < scanner.bytes.count, scanner.bytes[look] == .space || scanner.bytes[look] == .tab { look += 1 }
                    let after = look < scanner.bytes.count ? scanner.bytes[look] : nil
                    isParameter = !(after == nil || after == .equals || after == .comma)
                } else {
                    isParameter = false
                }
                if isParameter {
                    scanner.advance()
                    scanner.skip { $0 == .space || $0 == .tab }
                    let value = scanner.peek == .quote ? scanner.quotedString() : (scanner.token() ?? "")
                    challenge.parameters[name.lowercased()] = value
                } else if first {
                    // `Scheme token68`.
                    scanner.position = save
                    challenge.token68 = scanner.token68()
                    break
                } else {
                    // A bare token after a comma: the next challenge's scheme.
                    scanner.position = save
                    break
                }
                first = false
                scanner.skip { $0 == .space || $0 == .tab }
                guard scanner.peek == .comma else { break }
                scanner.skip { $0 == .comma || $0 == .space || $0 == .tab }
                // Peek: `token BWS =` continues this challenge; anything else is the next challenge.
                let afterComma = scanner.position
                let next = scanner.token()
                scanner.skip { $0 == .space || $0 == .tab }
                let continues = next != nil && scanner.peek == .equals
                scanner.position = afterComma
                if !continues { break }
            }
            result.append(challenge)
        }
        return result
    }
}

/// A byte cursor over a header value.
private struct HeaderScanner {
    let bytes: [UInt8]
    var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var atEnd: Bool { position >= bytes.count }
    var peek: UInt8? { position < bytes.count ? bytes[position] : nil }
    func peek(_ offset: Int) -> UInt8? { position + offset < bytes.count ? bytes[position + offset] : nil }
    mutating func advance() { position += 1 }

    mutating func skip(while predicate: (UInt8) -> Bool) {
        while let c = peek, predicate(c) { position += 1 }
    }

    /// RFC 7230 `token` (tchar+).
    mutating func token() -> String? {
        let start = position
        while let c = peek, Self.isTchar(c) { position += 1 }
        return position > start ? String(decoding: bytes[start..<position], as: UTF8.self) : nil
    }

    /// RFC 7235 `token68`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
    mutating func token68() -> String? {
        let start = position
        while let c = peek, Self.isToken68Char(c) { position += 1 }
        guard position > start else { return nil }
        while peek == .equals { position += 1 }
        return String(decoding: bytes[start..<position], as: UTF8.self)
    }

    static func isToken68Char(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return Array("-._~+/".utf8).contains(c)
        }
    }

    /// RFC 7230 `quoted-string`, unescaping `\x`. An unterminated string ends at end of input.
    mutating func quotedString() -> String {
        precondition(peek == .quote)
        position += 1
        var out: [UInt8] = []
        while let c = peek {
            position += 1
            if c == .quote { break }
            if c == .backslash, let next = peek {
                out.append(next)
                position += 1
            } else {
                out.append(c)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func isTchar(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return Array("!#$%&'*+-.^_`|~".utf8).contains(c)
        }
    }
}

extension UInt8 {
    fileprivate static let space = UInt8(ascii: " ")
    fileprivate static let tab = UInt8(ascii: "\t")
    fileprivate static let comma = UInt8(ascii: ",")
    fileprivate static let equals = UInt8(ascii: "=")
    fileprivate static let quote = UInt8(ascii: "\"")
    fileprivate static let backslash = UInt8(ascii: "\\")
}
