import Foundation
import Synchronization

/// Answers DNS questions from the registry's current view, Consul's way:
/// `<svc>.service.<domain>` (A of passing instances, shuffled), `<tag>.<svc>.service.<domain>`,
/// RFC 2782 `_<svc>._<tag>.service.<domain>` (SRV; `_tcp` means any tag), SRV with node targets
/// and their addresses as additionals, and `<node>.node.<domain>`; the datacenter may appear
/// before the domain. Instances whose checks are passing or warning are answered (Consul's default,
/// `only_passing = false`); critical ones are not. Unknown names, and services with no instance
/// left to answer, are NXDOMAIN, as in Consul. `d.c.b.a.in-addr.arpa` PTR names a node (or else a
/// service) at that address.
public struct DNSResolver: Sendable {
    public let domain: String
    public let ttl: UInt32
    let view: RegistryViewBox

    public init(domain: String, ttl: UInt32, view: RegistryViewBox) {
        self.domain = domain.lowercased().trimmingCharacters(in: CharacterSet(charactersIn: "."))
        self.ttl = ttl
        self.view = view
    }

    /// The full response to a raw query, sized for UDP (`udp`) or TCP. Nil when there is nothing
    /// to answer (not even a header).
    public func respond(to packet: [UInt8], udp: Bool) -> [UInt8]? {
        let query: DNSQuery
        do {
            query = try DNSMessage.parse(packet)
        } catch {
            switch error {
            case .tooShort: return nil
            case .malformed(let id, let flags): return flags & 0x8000 == 0 ? DNSMessage.error(id: id, flags: flags, code: .formatError) : nil
            }
        }
        guard query.isQuery else { return nil }
        let limit = udp ? (query.ednsPayloadSize ?? 512) : 65_535
        guard query.opcode == 0 else { return DNSMessage.response(to: query, code: .notImplemented, answers: [], limit: limit) }
        guard let question = query.questions.first else { return DNSMessage.response(to: query, code: .formatError, answers: [], limit: limit) }
        let (code, answers, additional) = answer(question, in: view.current)
        let authority = answers.isEmpty && code != .refused ? [soa()] : []
        return DNSMessage.response(to: query, code: code, answers: answers, authority: authority, additional: additional, limit: limit)
    }

    func soa() -> DNSRecord {
        DNSRecord(
            name: domain, ttl: ttl,
            data: .soa(primary: "ns.\(domain)", mailbox: "hostmaster.\(domain)", serial: UInt32(truncatingIfNeeded: view.current.index(of: .services)), refresh: 3600, retry: 600, expire: 86_400, minimum: ttl))
    }

    func answer(_ question: DNSQuestion, in view: RegistryView) -> (DNSResponseCode, [DNSRecord], [DNSRecord]) {
        if question.name.hasSuffix(".in-addr.arpa") || question.name == "in-addr.arpa" { return reverse(question, in: view) }
        var labels = question.name.split(separator: ".").map(String.init)
        let domainLabels = domain.split(separator: ".").map(String.init)
        guard labels.count > domainLabels.count, Array(labels.suffix(domainLabels.count)) == domainLabels else { return (.refused, [], []) }
        labels.removeLast(domainLabels.count)
        if labels.count >= 3, labels.last == view.datacenter.lowercased(), ["service", "node", "addr"].contains(labels[labels.count - 2]) {
            labels.removeLast()
        }
        guard let kind = labels.popLast(), !labels.isEmpty else { return (.nameError, [], []) }
        let wantsA = question.type == DNSType.a.rawValue || question.type == DNSType.any.rawValue
        switch kind {
        case "addr":
            // `<hex IPv4>.addr.<dc>.<domain>`: the target of an SRV record whose service address
            // differs from its node's.
            guard labels.count == 1, let address = Self.address(fromHex: labels[0]) else { return (.nameError, [], []) }
            guard wantsA else { return (.noError, [], []) }
            return (.noError, [DNSRecord(name: question.name, ttl: ttl, data: .a(address))], [])
        case "node":
            guard let node = view.nodes.first(where: { $0.name.lowercased() == labels.joined(separator: ".") }) else { return (.nameError, [], []) }
            guard wantsA, let address = Self.ipv4(node.address) else { return (.noError, [], []) }
            return (.noError, [DNSRecord(name: question.name, ttl: ttl, data: .a(address))], [])
        case "service":
            var service: String
            var tag: String?
            if labels.count == 2, labels[0].hasPrefix("_"), labels[1].hasPrefix("_") {
                service = String(labels[0].dropFirst())
                let protocolOrTag = String(labels[1].dropFirst())
                tag = protocolOrTag == "tcp" ? nil : protocolOrTag
            } else if labels.count == 1 {
                service = labels[0]
            } else if labels.count == 2 {
                tag = labels[0]
                service = labels[1]
            } else {
                return (.nameError, [], [])
            }
            service = service.lowercased()
            let all = view.services.filter { $0.name.lowercased() == service }
            guard !all.isEmpty else { return (.nameError, [], []) }
            let passing = all.filter { entry in
                view.status(of: entry) != .critical && (tag == nil || entry.tags.contains { $0.lowercased() == tag })
            }.shuffled()
            guard !passing.isEmpty else { return (.nameError, [], []) }
            let nodes = Dictionary(view.nodes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
            if question.type == DNSType.srv.rawValue {
                var answers: [DNSRecord] = []
                var additional: [DNSRecord] = []
                var seenTargets: Set<String> = []
                for entry in passing {
                    let nodeAddress = nodes[entry.node]?.address ?? ""
                    let address = entry.address.isEmpty ? nodeAddress : entry.address
                    // A service at its node's address points at the node; one elsewhere gets a
                    // target of its own, as Consul does, so every port resolves to its own host.
                    let target: String
                    if address == nodeAddress || Self.ipv4(address) == nil {
                        target = "\(entry.node.lowercased()).node.\(view.datacenter.lowercased()).\(domain)"
                    } else {
                        target = "\(Self.hex(Self.ipv4(address)!)).addr.\(view.datacenter.lowercased()).\(domain)"
                    }
                    answers.append(DNSRecord(name: question.name, ttl: ttl, data: .srv(priority: 1, weight: 1, port: UInt16(clamping: entry.port), target: target)))
                    if seenTargets.insert(target).inserted, let ipv4 = Self.ipv4(address) {
                        additional.append(DNSRecord(name: target, ttl: ttl, data: .a(ipv4)))
                    }
                }
                return (.noError, answers, additional)
            }
            guard wantsA else { return (.noError, [], []) }
            var seen: Set<[UInt8]> = []
            var answers: [DNSRecord] = []
            for entry in passing {
                let address = entry.address.isEmpty ? nodes[entry.node]?.address ?? "" : entry.address
                if let ipv4 = Self.ipv4(address), seen.insert(ipv4).inserted {
                    answers.append(DNSRecord(name: question.name, ttl: ttl, data: .a(ipv4)))
                }
            }
            return (.noError, answers, [])
        default:
            return (.nameError, [], [])
        }
    }

    /// PTR for an IPv4 address: the node there, or else a service registered at it.
    func reverse(_ question: DNSQuestion, in view: RegistryView) -> (DNSResponseCode, [DNSRecord], [DNSRecord]) {
        let octets = question.name.split(separator: ".").dropLast(2).reversed().map(String.init)
        guard octets.count == 4, let address = Self.ipv4(octets.joined(separator: ".")) else { return (.nameError, [], []) }
        let dc = view.datacenter.lowercased()
        let target: String
        if let node = view.nodes.first(where: { Self.ipv4($0.address) == address }) {
            target = "\(node.name.lowercased()).node.\(dc).\(domain)"
        } else if let service = view.services.first(where: { Self.ipv4($0.address) == address }) {
            target = "\(service.name.lowercased()).service.\(dc).\(domain)"
        } else {
            return (.nameError, [], [])
        }
        guard question.type == DNSType.ptr.rawValue || question.type == DNSType.any.rawValue else { return (.noError, [], []) }
        return (.noError, [DNSRecord(name: question.name, ttl: ttl, data: .ptr(target))], [])
    }

    static func hex(_ address: [UInt8]) -> String {
        address.map { String(format: "%02x", $0) }.joined()
    }

    static func address(fromHex text: String) -> [UInt8]? {
        guard text.count == 8 else { return nil }
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2)
            guard let byte = UInt8(text[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }

    static func ipv4(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard let value = UInt8(part) else { return nil }
            bytes.append(value)
        }
        return bytes
    }
}

/// The registry's latest view, readable from any thread without awaiting (the DNS handlers run
/// on NIO event loops).
public final class RegistryViewBox: Sendable {
    private let view: Mutex<RegistryView>

    public init(_ view: RegistryView) {
        self.view = Mutex(view)
    }

    public var current: RegistryView { view.withLock { $0 } }

    func update(_ newView: RegistryView) { view.withLock { $0 = newView } }
}
