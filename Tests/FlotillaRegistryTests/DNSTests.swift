import FlotillaCore
@testable import FlotillaRegistry
import Foundation
import Testing

@Suite struct DNSTests {
    func query(_ name: String, type: UInt16 = 1, id: UInt16 = 0x1234, edns: UInt16? = nil) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns == nil ? 0 : 1]
        for label in name.split(separator: ".") {
            bytes.append(UInt8(label.utf8.count))
            bytes += Array(label.utf8)
        }
        bytes += [0, UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
        if let edns { bytes += [0, 0, 41, UInt8(edns >> 8), UInt8(edns & 0xFF), 0, 0, 0, 0, 0, 0] }
        return bytes
    }

    func resolver(services: [CatalogService]) -> DNSResolver {
        let view = RegistryView(
            nodes: [CatalogNode(name: "n1", address: "10.0.0.1", meta: [:])], services: services, datacenter: "dc1", localNode: "n1",
            topicIndexes: [:], floorIndex: 1)
        return DNSResolver(domain: "flotilla", ttl: 0, view: RegistryViewBox(view))
    }

    func service(_ name: String, address: String, port: Int, tags: [String] = [], status: CheckStatus = .passing) -> CatalogService {
        let check = CatalogCheck(
            node: "n1", checkID: "c-\(address)-\(port)", name: "c", status: status, notes: "", output: "", serviceID: "\(name)-\(port)",
            serviceName: name, serviceTags: tags, type: "", createIndex: 1, modifyIndex: 1)
        return CatalogService(
            id: "\(name)-\(address)-\(port)", name: name, tags: tags, address: address, port: port, meta: [:], node: "n1", checks: [check],
            createIndex: 1, modifyIndex: 1)
    }

    func header(_ reply: [UInt8]) -> (id: UInt16, flags: UInt16, answers: Int) {
        (UInt16(reply[0]) << 8 | UInt16(reply[1]), UInt16(reply[2]) << 8 | UInt16(reply[3]), Int(reply[6]) << 8 | Int(reply[7]))
    }

    @Test func answersPassingInstancesOnly() throws {
        let dns = resolver(services: [service("web", address: "10.0.0.2", port: 1), service("web", address: "10.0.0.3", port: 2, status: .critical)])
        let reply = try #require(dns.respond(to: query("web.service.flotilla"), udp: true))
        let head = header(reply)
        #expect(head.id == 0x1234)
        #expect(head.flags & 0x8000 != 0)
        #expect(head.flags & 0x000F == 0)
        #expect(head.answers == 1)
        #expect(reply.suffix(4) == [10, 0, 0, 2])
    }

    @Test func unknownNamesAndServicesWithNothingHealthyAreNXDOMAIN() throws {
        let dns = resolver(services: [service("web", address: "10.0.0.2", port: 1, status: .critical), service("warm", address: "10.0.0.3", port: 1, status: .warning)])
        let unknown = try #require(dns.respond(to: query("nope.service.flotilla"), udp: true))
        #expect(header(unknown).flags & 0x000F == 3)
        // As Consul: nothing to answer with is NXDOMAIN; warning instances are answered.
        let empty = try #require(dns.respond(to: query("web.service.flotilla"), udp: true))
        #expect(header(empty).flags & 0x000F == 3)
        #expect(header(empty).answers == 0)
        let warning = try #require(dns.respond(to: query("warm.service.flotilla"), udp: true))
        #expect(header(warning).answers == 1)
        let outside = try #require(dns.respond(to: query("example.com"), udp: true))
        #expect(header(outside).flags & 0x000F == 5)
    }

    @Test func reverseLookupsNameTheNodeOrTheService() throws {
        let dns = resolver(services: [service("web", address: "10.0.0.2", port: 8080)])
        let node = try #require(dns.respond(to: query("1.0.0.10.in-addr.arpa", type: 12), udp: true))
        #expect(header(node).answers == 1)
        #expect(String(decoding: node, as: UTF8.self).contains("node"))
        let service = try #require(dns.respond(to: query("2.0.0.10.in-addr.arpa", type: 12), udp: true))
        #expect(header(service).answers == 1)
        #expect(String(decoding: service, as: UTF8.self).contains("web"))
        #expect(header(try #require(dns.respond(to: query("9.9.9.9.in-addr.arpa", type: 12), udp: true))).flags & 0x000F == 3)
        #expect(header(try #require(dns.respond(to: query("x.in-addr.arpa", type: 12), udp: true))).flags & 0x000F == 3)
    }

    @Test func srvAndTagsAndNodes() throws {
        let dns = resolver(services: [service("web", address: "10.0.0.2", port: 8080, tags: ["v1"]), service("web", address: "10.0.0.3", port: 8081)])
        #expect(header(try #require(dns.respond(to: query("web.service.flotilla", type: 33), udp: true))).answers == 2)
        #expect(header(try #require(dns.respond(to: query("v1.web.service.flotilla"), udp: true))).answers == 1)
        #expect(header(try #require(dns.respond(to: query("_web._v1.service.flotilla", type: 33), udp: true))).answers == 1)
        #expect(header(try #require(dns.respond(to: query("_web._tcp.service.flotilla", type: 33), udp: true))).answers == 2)
        #expect(header(try #require(dns.respond(to: query("WEB.service.DC1.flotilla"), udp: true))).answers == 2)
        #expect(header(try #require(dns.respond(to: query("n1.node.flotilla"), udp: true))).answers == 1)
    }

    @Test func truncatesOverUDPButNotOverTCP() throws {
        let many = (1...100).map { service("big", address: "10.1.\($0 / 250).\($0 % 250)", port: $0) }
        let dns = resolver(services: many)
        let udp = try #require(dns.respond(to: query("big.service.flotilla"), udp: true))
        #expect(udp.count <= 512)
        #expect(header(udp).flags & 0x0200 != 0)
        let edns = try #require(dns.respond(to: query("big.service.flotilla", edns: 4096), udp: true))
        #expect(header(edns).answers == 100)
        let tcp = try #require(dns.respond(to: query("big.service.flotilla"), udp: false))
        #expect(header(tcp).answers == 100)
        #expect(header(tcp).flags & 0x0200 == 0)
    }

    @Test func malformedQueriesGetFORMERROrNothing() throws {
        let dns = resolver(services: [])
        #expect(dns.respond(to: [], udp: true) == nil)
        #expect(dns.respond(to: [1, 2, 3], udp: true) == nil)
        // A valid header whose question runs off the end.
        let broken: [UInt8] = [0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5, 65, 66]
        let reply = try #require(dns.respond(to: broken, udp: true))
        #expect(header(reply).id == 0xABCD)
        #expect(header(reply).flags & 0x000F == 1)
        // A compression pointer that points at itself.
        let loop: [UInt8] = [0, 1, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1]
        #expect(header(try #require(dns.respond(to: loop, udp: true))).flags & 0x000F == 1)
    }

    @Test func survivesRandomPackets() {
        let dns = resolver(services: [service("web", address: "10.0.0.2", port: 1)])
        var generator = SystemRandomNumberGenerator()
        let valid = query("web.service.flotilla")
        for round in 0..<20_000 {
            var packet: [UInt8]
            if round % 2 == 0 {
                packet = (0..<Int.random(in: 0...80, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            } else {
                packet = valid
                for _ in 0..<Int.random(in: 1...4, using: &generator) {
                    packet[Int.random(in: 0..<packet.count, using: &generator)] = UInt8.random(in: 0...255, using: &generator)
                }
                packet = Array(packet.prefix(Int.random(in: 0...packet.count, using: &generator)))
            }
            if let reply = dns.respond(to: packet, udp: true) {
                #expect(reply.count >= 12 && reply.count <= 512)
            }
        }
    }
}
