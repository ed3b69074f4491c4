#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An OS/architecture pair in the Go (`GOOS`/`GOARCH`) spelling that image indexes use.
///
/// Multi-platform images carry one manifest per platform; Flotilla runs Linux containers natively, so the
/// platform it wants is always `linux` plus the machine's architecture, mapped from `uname -m` to Go names
/// (`x86_64` → `amd64`, `aarch64` → `arm64/v8`, `armv7l` → `arm/v7`).
public struct ImagePlatform: Hashable, Sendable, Codable, CustomStringConvertible {
    public var architecture: String
    public var os: String
    /// CPU variant (`v7` for arm, `v8` for arm64); nil when unspecified.
    public var variant: String?
    /// `os.version` (Windows images only; kept so decoding does not lose it).
    public var osVersion: String?
    /// `os.features` (Windows images only).
    public var osFeatures: [String]?

    enum CodingKeys: String, CodingKey {
        case architecture, os, variant
        case osVersion = "os.version"
        case osFeatures = "os.features"
    }

    public init(architecture: String, os: String = "linux", variant: String? = nil) {
        self.architecture = architecture
        self.os = os
        self.variant = variant
        self.osVersion = nil
        self.osFeatures = nil
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        // Both fields are required by the spec; tolerate absence as "" so one odd entry cannot break an index.
        self.architecture = (try? c.decodeIfPresent(String.self, forKey: .architecture)) ?? ""
        self.os = (try? c.decodeIfPresent(String.self, forKey: .os)) ?? ""
        self.variant = (try? c.decodeIfPresent(String.self, forKey: .variant)).flatMap { $0?.isEmpty == false ? $0 : nil }
        self.osVersion = try? c.decodeIfPresent(String.self, forKey: .osVersion)
        self.osFeatures = try? c.decodeIfPresent([String].self, forKey: .osFeatures)
    }

    /// `os/architecture[/variant]`, e.g. `linux/arm/v7`.
    public var description: String {
        var out = "\(os)/\(architecture)"
        if let variant { out += "/\(variant)" }
        return out
    }

    /// Parses `os/arch[/variant]` (e.g. from a job file or a flag).
    public init?(parsing string: String) {
        let parts = string.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard (2...3).contains(parts.count), parts.allSatisfy({ !$0.isEmpty }) else { return nil }
        self.init(architecture: parts[1], os: parts[0], variant: parts.count == 3 ? parts[2] : nil)
    }

    /// The platform of this machine: `linux` and `uname(2)`'s machine mapped to Go's names.
    public static var host: ImagePlatform {
        var info = utsname()
        guard uname(&info) == 0 else { return fromMachine("x86_64") }
        let machine = withUnsafeBytes(of: &info.machine) { raw -> String in
            let bytes = raw.prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
        return fromMachine(machine)
    }

    /// Maps a `uname -m` machine string to the Go-style Linux platform.
    public static func fromMachine(_ machine: String) -> ImagePlatform {
        switch machine {
        case "x86_64", "amd64": return ImagePlatform(architecture: "amd64")
        case "aarch64", "arm64", "armv8l", "armv8b": return ImagePlatform(architecture: "arm64", variant: "v8")
        case "armv7l", "armv7": return ImagePlatform(architecture: "arm", variant: "v7")
        case "armv6l": return ImagePlatform(architecture: "arm", variant: "v6")
        case "armv5tel", "armv5l": return ImagePlatform(architecture: "arm", variant: "v5")
        case "i386", "i486", "i586", "i686": return ImagePlatform(architecture: "386")
        case "ppc64le": return ImagePlatform(architecture: "ppc64le")
        case "s390x": return ImagePlatform(architecture: "s390x")
        case "riscv64": return ImagePlatform(architecture: "riscv64")
        case "mips64": return ImagePlatform(architecture: "mips64")
        case "loongarch64": return ImagePlatform(architecture: "loong64")
        default: return ImagePlatform(architecture: machine)
        }
    }

    /// How well an offered platform fits `self` (the wanted one): nil if it does not run here at all,
    /// lower is better. Variants follow containerd: an entry without variant fits any variant, and an
    /// arm machine runs older arm variants (v7 runs v6 and v5 images).
    func matchRank(of offered: ImagePlatform) -> Int? {
        guard offered.os == os, Self.normalizeArch(offered.architecture) == Self.normalizeArch(architecture) else { return nil }
        guard let wanted = variant else { return offered.variant == nil ? 0 : 1 }
        guard let have = offered.variant else { return 1 }
        if have == wanted { return 0 }
        if architecture == "arm", let w = Int(wanted.dropFirst()), let h = Int(have.dropFirst()),
            wanted.hasPrefix("v"), have.hasPrefix("v"), h < w
        {
            return 1 + (w - h)
        }
        return nil
    }

    private static func normalizeArch(_ arch: String) -> String {
        switch arch {
        case "x86_64", "x86-64": return "amd64"
        case "aarch64": return "arm64"
        default: return arch
        }
    }
}
