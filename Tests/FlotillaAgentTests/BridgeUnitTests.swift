import Foundation
import Testing
@testable import FlotillaAgent

@Suite("Bridge CIDR, pool, naming, resolv.conf, command runner")
struct BridgeUnitTests {
    @Test func cidrParsing() throws {
        let cidr = try BridgeCIDR.parse("172.31.0.0/16")
        #expect(cidr.network.description == "172.31.0.0")
        #expect(cidr.prefixLength == 16)
        #expect(cidr.gateway.description == "172.31.0.1")
        #expect(cidr.broadcast.description == "172.31.255.255")
        #expect(cidr.firstAssignable.description == "172.31.0.2")
        #expect(cidr.lastAssignable.description == "172.31.255.254")
        #expect(cidr.assignableCount == 65_533)
        #expect(try BridgeCIDR.parse("10.0.0.0/8").assignableCount == (1 << 24) - 3)
        #expect(try BridgeCIDR.parse("10.1.2.16/28").assignableCount == 13)

        for bad in ["", "10.0.0.0", "10.0.0.0/", "10.0.0/16", "10.0.0.0.0/16", "256.0.0.0/16", "10.0.0.0/16x",
                    "010.0.0.0/16", "10.0.0.0/-1", "10.0.0.0/33", "a.b.c.d/16", "10.0.0.0/7", "10.0.0.0/29",
                    "10.0.0.0/32", "10.0.0.1/24", "127.0.0.0/16", "224.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8"] {
            #expect(throws: BridgeError.self, "\(bad) must be rejected") { try BridgeCIDR.parse(bad) }
        }
        do {
            _ = try BridgeCIDR.parse("10.0.0.1/24")
        } catch {
            #expect("\(error)".contains("did you mean 10.0.0.0/24"))
        }
        let a = try BridgeCIDR.parse("10.200.0.0/16")
        #expect(a.overlaps(try BridgeCIDR.parse("10.200.5.0/24")))
        #expect(try BridgeCIDR.parse("10.200.5.0/24").overlaps(a))
        #expect(!a.overlaps(try BridgeCIDR.parse("10.201.0.0/16")))
        #expect(BridgeCIDR.parseRoute("192.0.2.7") == BridgeCIDR(network: BridgeIPv4Address("192.0.2.7")!, prefixLength: 32))
        #expect(BridgeCIDR.parseRoute("10.0.0.5/8")?.description == "10.0.0.0/8")
    }

    @Test func poolAllocationSkipsNetworkGatewayBroadcastAndReusesFreed() throws {
        var pool = BridgeAddressPool(cidr: try BridgeCIDR.parse("10.250.9.16/28"))
        #expect(pool.capacity == 13)
        var handed: [String] = []
        for index in 0..<13 { handed.append(try pool.allocate(for: "i\(index)").description) }
        #expect(handed.first == "10.250.9.18")
        #expect(handed.last == "10.250.9.30")
        #expect(!handed.contains("10.250.9.16") && !handed.contains("10.250.9.17") && !handed.contains("10.250.9.31"))
        #expect(Set(handed).count == 13)
        #expect(try pool.allocate(for: "i3").description == handed[3], "same owner, same address")
        #expect(throws: BridgeError.self) { try pool.allocate(for: "extra") }
        #expect(pool.release(owner: "i5")?.description == handed[5])
        #expect(try pool.allocate(for: "extra").description == handed[5], "a freed address is reused")

        // Round robin: a freed address is not the very next one handed out.
        var fresh = BridgeAddressPool(cidr: try BridgeCIDR.parse("10.250.9.0/24"))
        let first = try fresh.allocate(for: "a")
        _ = try fresh.allocate(for: "b")
        fresh.release(owner: "a")
        #expect(try fresh.allocate(for: "c") != first)
    }

    @Test func poolPersistenceSurvivesRestart() throws {
        let directory = try BridgeTestSupport.makeTemporaryDirectory("pool")
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("pool.json")
        let cidr = try BridgeCIDR.parse("10.251.3.0/24")

        var pool = try BridgeAddressPool.load(from: file, cidr: cidr)
        #expect(pool.allocations.isEmpty, "missing file = empty pool")
        let a = try pool.allocate(for: "a")
        let b = try pool.allocate(for: "b")
        try pool.save(to: file)

        var reloaded = try BridgeAddressPool.load(from: file, cidr: cidr)  // "agent restart"
        #expect(reloaded == pool)
        #expect(reloaded.address(of: "a") == a && reloaded.address(of: "b") == b)
        let c = try reloaded.allocate(for: "c")
        #expect(c != a && c != b)
        reloaded.release(owner: "a")
        try reloaded.save(to: file)
        let again = try BridgeAddressPool.load(from: file, cidr: cidr)
        #expect(again.address(of: "a") == nil && again.address(of: "c") == c)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        #expect(leftovers == ["pool.json"], "atomic write leaves no temporary files")

        // Another CIDR with allocations left is refused; a corrupt file is an error.
        #expect(throws: BridgeError.self) { try BridgeAddressPool.load(from: file, cidr: try BridgeCIDR.parse("10.251.4.0/24")) }
        try Data("{nope".utf8).write(to: file)
        #expect(throws: BridgeError.self) { try BridgeAddressPool.load(from: file, cidr: cidr) }
    }

    @Test func overlapDetectionIgnoresDefaultLocalAndOwnBridge() throws {
        let cidr = try BridgeCIDR.parse("10.252.0.0/16")
        let harmless = [
            BridgeRoute(dst: "default", dev: "eth0"),
            BridgeRoute(dst: "10.252.0.1", dev: "lo", type: "local", table: "local"),
            BridgeRoute(dst: "10.252.0.0/16", dev: "br-own"),
            BridgeRoute(dst: "192.0.2.0/24", dev: "eth0"),
        ]
        #expect(BridgeNetwork.overlappingRoute(for: cidr, in: harmless, bridgeName: "br-own") == nil)
        let wide = harmless + [BridgeRoute(dst: "10.0.0.0/8", dev: "tun0")]
        #expect(BridgeNetwork.overlappingRoute(for: cidr, in: wide, bridgeName: "br-own")?.0.dev == "tun0")
        let narrow = [BridgeRoute(dst: "10.252.7.0/24", dev: "eth1")]
        #expect(BridgeNetwork.overlappingRoute(for: cidr, in: narrow, bridgeName: "br-own") != nil)
        let host = [BridgeRoute(dst: "10.252.9.9", dev: "wg0")]
        #expect(BridgeNetwork.overlappingRoute(for: cidr, in: host, bridgeName: "br-own") != nil)
    }

    @Test func namesAreShortDeterministicAndPrefixed() throws {
        let directory = URL(fileURLWithPath: "/tmp/unused-\(BridgeTestSupport.randomHex(6))")
        let one = try BridgeNetwork(bridgeName: "fltnames0", cidr: "10.253.0.0/24", stateDirectory: directory, namePrefix: "alpha")
        let two = try BridgeNetwork(bridgeName: "fltnames0", cidr: "10.253.0.0/24", stateDirectory: directory, namePrefix: "beta")
        let id = "my-group_my-app.instance-0a1b2c3d-4e5f-6789-abcd-ef0123456789._app.1/with weird chars"
        let a = one.names(for: id)
        #expect(a == one.names(for: id))
        #expect(a.hostVeth.utf8.count <= 15 && a.hostVeth.hasPrefix("veth"))
        #expect(a.namespaceName.hasPrefix("alpha-my-group_my-app.instance-"))
        #expect(!a.namespaceName.contains("/") && !a.namespaceName.contains(" "))
        #expect(a.namespaceName.utf8.count <= 80 && a.ruleTag == a.namespaceName)
        let b = two.names(for: id)
        #expect(b.hostVeth != a.hostVeth && b.namespaceName.hasPrefix("beta-"))
        #expect(one.names(for: id + "x").hostVeth != a.hostVeth)
        #expect(throws: BridgeError.self) { try BridgeNetwork(bridgeName: "a-name-that-is-too-long", stateDirectory: directory) }
        #expect(throws: BridgeError.self) { try BridgeNetwork(stateDirectory: directory, namePrefix: "Bad-Prefix") }
        #expect(throws: BridgeError.self) {
            try BridgeNetwork.validate(instanceID: "x", mappings: [.init(hostPort: 80, containerPort: 80), .init(hostPort: 80, containerPort: 81)])
        }
        #expect(throws: BridgeError.self) { try BridgeNetwork.validate(instanceID: "x", mappings: [.init(hostPort: 0, containerPort: 80)]) }
    }

    @Test func resolvConfSuggestion() {
        let normal = "search example.org\nnameserver 10.0.0.2\n"
        #expect(BridgeNetwork.resolvConfSuggestion(hostResolvConf: normal) == .init(content: normal, note: nil))

        let mixed = "nameserver 127.0.0.53\nnameserver 9.9.9.9\noptions edns0\n"
        let m = BridgeNetwork.resolvConfSuggestion(hostResolvConf: mixed)
        #expect(m.content == "nameserver 9.9.9.9\noptions edns0\n")
        #expect(m.note?.contains("127.0.0.53") == true)

        let resolved = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n"
        let upstream = "nameserver 192.168.1.1\nnameserver ::1\nsearch lan\n"
        let r = BridgeNetwork.resolvConfSuggestion(hostResolvConf: resolved, upstreamResolvConf: upstream)
        #expect(r.content == "nameserver 192.168.1.1\nsearch lan\n")

        let none = BridgeNetwork.resolvConfSuggestion(hostResolvConf: resolved)
        #expect(none.content == nil)
        #expect(none.note?.contains("only loopback nameservers (127.0.0.53)") == true)
        #expect(BridgeNetwork.resolvConfSuggestion(hostResolvConf: "").content == nil)
    }

    @Test func commandRunnerCapturesOutputStdinErrorsAndTimeouts() throws {
        let cat = try BridgeCommand.check(["cat"], input: Data("hello\nworld\n".utf8))
        #expect(cat.stdoutText == "hello\nworld\n")
        let big = Data(repeating: 0x61, count: 200_000)
        #expect(try BridgeCommand.check(["cat"], input: big).stdout == big)
        let argument = "it's \"quoted\"; $(no shell)"
        #expect(try BridgeCommand.check(["echo", argument]).stdoutText == argument + "\n")

        do {
            try BridgeCommand.check(["ip", "link", "show", "dev", "flt-none-xyz"])
            Issue.record("expected a failure")
        } catch let error as BridgeError {
            guard case .commandFailed(let command, let status, let stderr) = error else { throw error }
            #expect(command == ["ip", "link", "show", "dev", "flt-none-xyz"])
            #expect(status != 0)
            #expect(stderr.contains("does not exist"))
            #expect(error.description.contains("`ip link show dev flt-none-xyz` failed"))
        }
        #expect(throws: BridgeError.self) { try BridgeCommand.run(["no-such-command-flt"]) }
        let start = Date()
        #expect(throws: BridgeError.self) { try BridgeCommand.run(["sleep", "10"], timeout: 0.5) }
        #expect(Date().timeIntervalSince(start) < 5)
        #expect(try BridgeCommand.run(["sh", "-c", "exit 3"]).status == 3)
    }
}
