/// An app's path identifier, Marathon's `PathId`: `/shop/cart`. Always absolute and normalised.
public struct AppID: Sendable, Hashable, Comparable, Codable, CustomStringConvertible {
    /// The path segments, each a valid DNS-style label: lowercase letters, digits, `-` and `.` inside.
    public let segments: [String]

    /// Parses and normalises a path (`shop/cart`, `/shop/./cart/`, `/shop/x/../cart` are all `/shop/cart`).
    /// Throws a `FieldError` message when a segment is not allowed.
    public init(_ raw: String) throws(FlotillaError) {
        var segments: [String] = []
        for part in raw.split(separator: "/", omittingEmptySubsequences: true) {
            switch part {
            case ".": continue
            case "..":
                if segments.isEmpty {
                    throw .invalid([FieldError("/id", "path '\(raw)' climbs above the root")])
                }
                segments.removeLast()
            default:
                let segment = String(part)
                guard AppID.isValidSegment(segment) else {
                    throw .invalid([
                        FieldError(
                            "/id",
                            "'\(raw)' is not a valid path: each segment must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
                        )
                    ])
                }
                segments.append(segment)
            }
        }
        guard !segments.isEmpty else {
            throw .invalid([FieldError("/id", "an app id must name at least one path segment")])
        }
        self.segments = segments
    }

    public init(from decoder: any Decoder) throws {
        let raw = try decoder.singleValueContainer().decode(String.self)
        self = try AppID(raw)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(path)
    }

    /// `/shop/cart`
    public var path: String { "/" + segments.joined(separator: "/") }
    public var description: String { path }

    /// `shop_cart`: the prefix of instance ids and the form used in storage keys (`_` never appears
    /// in a segment, so the mapping is one to one and no id is a key prefix of another).
    public var flatName: String { segments.joined(separator: "_") }

    /// `shop-cart`: the default service name in the registry.
    public var serviceName: String { segments.joined(separator: "-") }

    /// Whether `other` is this path or below it (`/shop` contains `/shop/cart`).
    public func contains(_ other: AppID) -> Bool {
        other.segments.count >= segments.count && Array(other.segments.prefix(segments.count)) == segments
    }

    public static func < (lhs: AppID, rhs: AppID) -> Bool { lhs.path < rhs.path }

    static func isValidSegment(_ segment: String) -> Bool {
        let bytes = Array(segment.utf8)
        guard let first = bytes.first, let last = bytes.last else { return false }
        func isAlphanumeric(_ byte: UInt8) -> Bool {
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
        }
        guard isAlphanumeric(first), isAlphanumeric(last) else { return false }
        return bytes.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: ".") }
    }
}
