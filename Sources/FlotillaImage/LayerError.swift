import Glibc

/// Why a layer could not be read or unpacked.
///
/// Layers are untrusted bytes from a registry, so every failure names the
/// offending entry and says what was wrong in words an operator can act on
/// (a corrupt download, a hostile image, a missing library, a full disk).
public enum LayerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The entry is well-formed but would write outside the layer root, through a
    /// symlink, or otherwise somewhere it must not. Suggests a hostile or broken image.
    case unsafeEntry(path: String, reason: String)
    /// The tar stream itself is broken (checksum, truncation, absurd fields).
    /// `entry` is the last entry name known at that point, if any.
    case malformedArchive(entry: String?, reason: String)
    /// The compressed stream is corrupt or truncated, or its decoder is unavailable.
    case decompression(String)
    /// A system call failed while writing the layer (permissions, disk full...).
    case system(path: String, operation: String, errno: Int32)
    /// The entry is valid but cannot be represented here (e.g. whiteouts without root).
    case unsupported(path: String, reason: String)

    public var description: String {
        switch self {
        case let .unsafeEntry(path, reason):
            return "refusing layer entry \(quoted(path)): \(reason)"
        case let .malformedArchive(entry?, reason):
            return "malformed layer archive at entry \(quoted(entry)): \(reason)"
        case let .malformedArchive(nil, reason):
            return "malformed layer archive: \(reason)"
        case let .decompression(message):
            return "cannot decompress layer: \(message)"
        case let .system(path, operation, code):
            return "cannot \(operation) \(quoted(path)): \(errorString(code)) (errno \(code))"
        case let .unsupported(path, reason):
            return "cannot unpack layer entry \(quoted(path)): \(reason)"
        }
    }
}

/// Quotes a name for messages, escaping control characters so that a hostile
/// entry name cannot forge log lines or terminal escapes.
func quoted(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        default:
            if scalar.value < 0x20 || scalar.value == 0x7f {
                out += "\\u{\(String(scalar.value, radix: 16))}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    if out.utf8.count > 300 {
        out = String(out.prefix(200)) + "…"
    }
    return out + "\""
}

func errorString(_ code: Int32) -> String {
    guard let p = strerror(code) else { return "error \(code)" }
    return String(cString: p)
}
