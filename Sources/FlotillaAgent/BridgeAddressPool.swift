import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 address, stored host-order. Encodes as the dotted quad.
struct BridgeIPv4Address: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    var value: UInt32

    init(_ value: UInt32) { self.value = value }

    /// Strict dotted quad: four decimal octets 0...255, no leading zeros, nothing else.
    init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var result: UInt32 = 0
        for part in parts {
            guard (1...3).contains(part.count), part.allSatisfy({ $0.isASCII && $0.isNumber }),
                  part.count == 1 || part.first != "0",
                  let octet = UInt32(part), octet <= 255 else { return nil }
            result = result << 8 | octet
        }
        value = result
    }

    var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }

    static func < (lhs: Self, rhs: Self) -> Bool { lhs.value < rhs.value }

    init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let address = BridgeIPv4Address(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "bad IPv4 address '\(text)'"))
        }
        self = address
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An IPv4 network `a.b.c.d/n`. Encodes as its text.
struct BridgeCIDR: Hashable, Sendable, Codable, CustomStringConvertible {
    static let shortestBridgePrefix = 8
    static let longestBridgePrefix = 28

    let network: BridgeIPv4Address
    let prefixLength: Int

    /// Any prefix 0...32; host bits are masked off.
    init(network: BridgeIPv4Address, prefixLength: Int) {
        precondition((0...32).contains(prefixLength))
        self.prefixLength = prefixLength
        self.network = BridgeIPv4Address(network.value & BridgeCIDR.mask(prefixLength))
    }

    /// Parses a CIDR usable for a bridge: /8 ... /28, host bits zero, not in a
    /// reserved range (0/8, loopback, link-local, multicast, class E).
    static func parse(_ text: String) throws -> BridgeCIDR {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let pieces = trimmed.split(separator: "/", omittingEmptySubsequences: false)
        guard pieces.count == 2 else { throw BridgeError.invalidCIDR(text, reason: "expected a.b.c.d/prefix") }
        guard let address = BridgeIPv4Address(pieces[0]) else {
            throw BridgeError.invalidCIDR(text, reason: "'\(pieces[0])' is not an IPv4 address")
        }
        guard (1...2).contains(pieces[1].count), pieces[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let prefix = Int(pieces[1]), (0...32).contains(prefix) else {
            throw BridgeError.invalidCIDR(text, reason: "'\(pieces[1])' is not a prefix length 0...32")
        }
        guard prefix >= shortestBridgePrefix else {
            throw BridgeError.invalidCIDR(text, reason: "prefix /\(prefix) is shorter than /\(shortestBridgePrefix)")
        }
        guard prefix <= longestBridgePrefix else {
            throw BridgeError.invalidCIDR(text, reason: "prefix /\(prefix) is longer than /\(longestBridgePrefix) (too few addresses)")
        }
        let cidr = BridgeCIDR(network: address, prefixLength: prefix)
        guard cidr.network == address else {
            throw BridgeError.invalidCIDR(text, reason: "host bits are set; did you mean \(cidr)?")
        }
        let reserved: [(String, BridgeCIDR)] = [
            ("0.0.0.0/8 (this network)", BridgeCIDR(network: BridgeIPv4Address(0), prefixLength: 8)),
            ("127.0.0.0/8 (loopback)", BridgeCIDR(network: BridgeIPv4Address(0x7f00_0000), prefixLength: 8)),
            ("169.254.0.0/16 (link-local)", BridgeCIDR(network: BridgeIPv4Address(0xa9fe_0000), prefixLength: 16)),
            ("224.0.0.0/3 (multicast and reserved)", BridgeCIDR(network: BridgeIPv4Address(0xe000_0000), prefixLength: 3)),
        ]
        for (name, range) in reserved where range.overlaps(cidr) {
            throw BridgeError.invalidCIDR(text, reason: "overlaps \(name)")
        }
        return cidr
    }

    /// Lenient parsing for route tables: `a.b.c.d` (= /32) or `a.b.c.d/n` with any n.
    static func parseRoute(_ text: String) -> BridgeCIDR? {
        let pieces = text.split(separator: "/", omittingEmptySubsequences: false)
        guard (1...2).contains(pieces.count), let address = BridgeIPv4Address(pieces[0]) else { return nil }
        guard pieces.count == 2 else { return BridgeCIDR(network: address, prefixLength: 32) }
        guard let prefix = Int(pieces[1]), (0...32).contains(prefix) else { return nil }
        return BridgeCIDR(network: address, prefixLength: prefix)
    }

    static func mask(_ prefixLength: Int) -> UInt32 {
        prefixLength == 0 ? 0 : ~UInt32(0) << UInt32(32 - prefixLength)
    }

    var mask: UInt32 { BridgeCIDR.mask(prefixLength) }
    var broadcast: BridgeIPv4Address { BridgeIPv4Address(network.value | ~mask) }
    /// The first address; it lives on the bridge.
    var gateway: BridgeIPv4Address { BridgeIPv4Address(network.value + 1) }
    var firstAssignable: BridgeIPv4Address { BridgeIPv4Address(network.value + 2) }
    var lastAssignable: BridgeIPv4Address { BridgeIPv4Address(broadcast.value - 1) }
    /// Addresses a container can get (without network, gateway, broadcast).
    var assignableCount: Int { prefixLength >= 31 ? 0 : Int((UInt64(1) << UInt64(32 - prefixLength)) - 3) }
    var description: String { "\(network)/\(prefixLength)" }

    func contains(_ address: BridgeIPv4Address) -> Bool { address.value & mask == network.value }

    func overlaps(_ other: BridgeCIDR) -> Bool {
        let common = BridgeCIDR.mask(min(prefixLength, other.prefixLength))
        return network.value & common == other.network.value & common
    }

    init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try BridgeCIDR.parse(text) } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "\(error)"))
        }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// Container addresses of one bridge subnet: owner (instance ID) → address.
/// Skips the network address, the gateway (first address) and broadcast.
/// Allocation continues after the last address handed out and wraps, so a
/// freed address is reused only once the others have been used (stale ARP
/// entries in peers age out meanwhile) — but it is reused.
struct BridgeAddressPool: Codable, Sendable, Equatable {
    let cidr: BridgeCIDR
    private(set) var allocations: [String: BridgeIPv4Address]
    private var lastAllocated: BridgeIPv4Address?

    init(cidr: BridgeCIDR) {
        self.cidr = cidr
        allocations = [:]
        lastAllocated = nil
    }

    var gateway: BridgeIPv4Address { cidr.gateway }
    var capacity: Int { cidr.assignableCount }

    func address(of owner: String) -> BridgeIPv4Address? { allocations[owner] }

    /// The owner's address; allocates one if it has none.
    mutating func allocate(for owner: String) throws -> BridgeIPv4Address {
        if let existing = allocations[owner] { return existing }
        let used = Set(allocations.values.map(\.value))
        let first = cidr.firstAssignable.value, last = cidr.lastAssignable.value
        var candidate = lastAllocated.map { $0.value &+ 1 } ?? first
        for _ in 0..<capacity {
            if candidate < first || candidate > last { candidate = first }
            if !used.contains(candidate) {
                let address = BridgeIPv4Address(candidate)
                allocations[owner] = address
                lastAllocated = address
                return address
            }
            candidate += 1
        }
        throw BridgeError.addressPoolExhausted(cidr: cidr.description)
    }

    @discardableResult
    mutating func release(owner: String) -> BridgeIPv4Address? {
        allocations.removeValue(forKey: owner)
    }

    /// Checks that every allocation is an assignable address of the CIDR and unique.
    func validate() throws {
        var seen = Set<UInt32>()
        for (owner, address) in allocations {
            guard cidr.contains(address), address >= cidr.firstAssignable, address <= cidr.lastAssignable,
                  seen.insert(address.value).inserted else {
                throw BridgeError.invalidConfiguration("address pool \(cidr): bad allocation \(address) for '\(owner)'")
            }
        }
    }

    /// Loads a pool saved with `save(to:)`; a missing file gives an empty pool.
    /// A saved pool for another CIDR is an error unless it holds no allocations.
    static func load(from url: URL, cidr: BridgeCIDR) throws -> BridgeAddressPool {
        guard let data = try BridgeStateFile.readData(url) else { return BridgeAddressPool(cidr: cidr) }
        let pool: BridgeAddressPool
        do { pool = try JSONDecoder().decode(BridgeAddressPool.self, from: data) } catch {
            throw BridgeError.stateFile(path: url.path, reason: "cannot decode: \(error)")
        }
        if pool.cidr != cidr {
            guard pool.allocations.isEmpty else {
                throw BridgeError.invalidConfiguration(
                    "\(url.path) holds \(pool.allocations.count) allocation(s) in \(pool.cidr), not \(cidr); detach them before changing --bridge-cidr")
            }
            return BridgeAddressPool(cidr: cidr)
        }
        try pool.validate()
        return pool
    }

    func save(to url: URL) throws {
        try BridgeStateFile.writeAtomically(BridgeStateFile.encode(self), to: url)
    }
}

/// Small, atomically replaced JSON state files.
enum BridgeStateFile {
    static func encode(_ value: some Encodable) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(value)
    }

    /// The file's contents, or nil if it does not exist.
    static func readData(_ url: URL) throws -> Data? {
        let fd = open(url.path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw BridgeError.stateFile(path: url.path, reason: String(cString: strerror(errno)))
        }
        defer { close(fd) }
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw BridgeError.stateFile(path: url.path, reason: String(cString: strerror(errno)))
            }
            if n == 0 { return data }
            data.append(contentsOf: buffer[0..<n])
        }
    }

    /// Write to a temporary file in the same directory, fsync, rename over
    /// the target, fsync the directory: readers see the old or the new file.
    static func writeAtomically(_ data: Data, to url: URL) throws {
        let directory = url.deletingLastPathComponent().path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let temporary = url.path + ".tmp.\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
        func failure(_ what: String) -> BridgeError {
            BridgeError.stateFile(path: url.path, reason: "\(what): \(String(cString: strerror(errno)))")
        }
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw failure("cannot create \(temporary)") }
        var ok = data.withUnsafeBytes { raw -> Bool in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 { if errno == EINTR { continue }; return false }
                offset += n
            }
            return true
        }
        if ok { ok = fsync(fd) == 0 }
        let error = failure("cannot write \(temporary)")
        close(fd)
        guard ok else { unlink(temporary); throw error }
        guard rename(temporary, url.path) == 0 else {
            let renameError = failure("cannot rename \(temporary)")
            unlink(temporary)
            throw renameError
        }
        let directoryFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryFD >= 0 { _ = fsync(directoryFD); close(directoryFD) }
    }

    static func remove(_ url: URL) {
        unlink(url.path)
    }
}
