import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import FlotillaAgent

/// Real bridges, namespaces and nft tables (needs root). Every test uses its
/// own bridge name, CIDR and prefix, and removes what it made in a `defer`.
@Suite("Bridge networking as root", .enabled(if: BridgeTestSupport.isRoot, "needs root"))
struct BridgeIntegrationTests {
    @Test func refusesCIDROverlappingAHostRoute() throws {
        // A veth pair with an address gives the host a real route to overlap.
        let hex = BridgeTestSupport.randomHex(6)
        let link = "fltv\(hex)"
        let subnet = try BridgeTestSupport.freeCIDR(index: 10)  // 10.2xx.10.0/24
        let parts = subnet.split(separator: ".")
        try BridgeCommand.check(["ip", "link", "add", link, "type", "veth", "peer", "name", link + "p"])
        defer { _ = try? BridgeCommand.run(["ip", "link", "del", "dev", link]) }
        try BridgeCommand.check(["ip", "addr", "add", "\(parts[0]).\(parts[1]).\(parts[2]).1/24", "dev", link])
        try BridgeCommand.check(["ip", "link", "set", "dev", link, "up"])

        let stateDirectory = try BridgeTestSupport.makeTemporaryDirectory("overlap")
        defer { try? FileManager.default.removeItem(at: stateDirectory) }
        let network = try BridgeNetwork(configuration: BridgeNetworkConfiguration(
            stateDirectory: stateDirectory, bridgeName: "flt" + hex,
            cidr: "\(parts[0]).\(parts[1]).\(parts[2]).128/25", namePrefix: "fltt" + hex))
        defer { try? network.destroy() }
        do {
            try network.prepare()
            Issue.record("prepare must refuse an overlapping CIDR")
        } catch let error as BridgeError {
            guard case .cidrOverlapsHostRoute(_, let route, let device) = error else { throw error }
            #expect(route == subnet)
            #expect(device == link)
            #expect(error.description.contains("--bridge-cidr"))
        }
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/flt\(hex)"), "nothing created")

        // The host's own default-interface subnet is refused as well.
        let routes = try BridgeNetwork.hostRoutes()
        if let own = routes.first(where: { $0.table == nil && $0.dst != "default" && ($0.dst?.contains("/") ?? false) && $0.dev != link }),
           let dst = own.dst, let cidr = BridgeCIDR.parseRoute(dst),
           (8...28).contains(cidr.prefixLength), (try? BridgeCIDR.parse(cidr.description)) != nil {
            let other = try BridgeNetwork(configuration: BridgeNetworkConfiguration(
                stateDirectory: stateDirectory, bridgeName: "flu" + hex, cidr: cidr.description, namePrefix: "fltu" + hex))
            defer { try? other.destroy() }
            #expect(throws: BridgeError.self) { try other.prepare() }
        }
    }

    @Test func endToEndPortMappingAndDetach() throws {
        let bed = try BridgeTestBed(index: 20)
        defer { bed.cleanup() }
        let network = bed.network
        try bed.writeFile("index.html", "hello from the container\n")
        let hostPort = BridgeTestSupport.freeHostPort()

        let attachment = try network.attach(instanceID: "web.instance-1", portMappings: [(hostPort: hostPort, containerPort: 8080)])
        #expect(attachment.namespacePath == "/run/netns/\(attachment.namespaceName)")
        #expect(FileManager.default.fileExists(atPath: attachment.namespacePath))
        #expect(attachment.gateway == network.gateway.description)
        #expect(network.cidr.contains(BridgeIPv4Address(attachment.address)!))
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/\(attachment.hostVeth)/brport"))
        #expect(network.attachments()["web.instance-1"] == attachment)
        let again = try network.attach(instanceID: "web.instance-1", portMappings: [(hostPort: hostPort, containerPort: 8080)])
        #expect(again == attachment, "attach is idempotent for the same mappings")
        #expect(throws: BridgeError.self) {
            try network.attach(instanceID: "other", portMappings: [(hostPort: hostPort, containerPort: 80)])
        }

        try bed.startHTTPServer(namespace: attachment.namespaceName, port: 8080)
        let direct = "http://\(attachment.address):8080/"
        #expect(try BridgeTestSupport.waitUntil(timeout: 10) { try BridgeTestSupport.curl(direct, timeout: 1).0 == 0 })
        #expect(try BridgeTestSupport.curl(direct).1 == "hello from the container\n")
        // 127.0.0.1 → DNAT (output chain) + masquerade + route_localnet on the bridge.
        let local = try BridgeTestSupport.curl("http://127.0.0.1:\(hostPort)/")
        #expect(local.0 == 0)
        #expect(local.1 == "hello from the container\n")
        // The gateway from inside, and the container's own published port (hairpin).
        let ping = try BridgeCommand.run(["ip", "netns", "exec", attachment.namespaceName, "busybox", "ping", "-c", "1", "-W", "2", attachment.gateway])
        #expect(ping.status == 0, "\(ping.stdoutText)\(ping.stderrText)")
        let hairpin = try BridgeTestSupport.curl("http://\(attachment.gateway):\(hostPort)/", namespace: attachment.namespaceName)
        #expect(hairpin.1 == "hello from the container\n")
        let table = try bed.nftTable()
        try? Data(table.utf8).write(to: URL(fileURLWithPath: "/tmp/flotilla-bridge-ruleset.txt"))
        #expect(table.contains("\(hostPort) comment \"\(attachment.ruleTag)\" : \(attachment.address) . 8080"))

        try network.detach(instanceID: "web.instance-1")
        let after = try BridgeTestSupport.curl("http://127.0.0.1:\(hostPort)/", timeout: 2)
        #expect(after.0 != 0, "the host port no longer answers")
        #expect(!FileManager.default.fileExists(atPath: attachment.namespacePath))
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/\(attachment.hostVeth)"))
        let tableAfter = try bed.nftTable()
        #expect(!tableAfter.isEmpty)
        #expect(!tableAfter.contains(attachment.ruleTag) && !tableAfter.contains(attachment.address))
        #expect(network.attachments().isEmpty)
        try network.detach(instanceID: "web.instance-1")  // idempotent
        try network.detach(instanceID: "never-attached")
    }

    @Test func twoInstancesReachEachOther() throws {
        let bed = try BridgeTestBed(index: 30)
        defer { bed.cleanup() }
        try bed.writeFile("index.html", "peer\n")
        let portA = BridgeTestSupport.freeHostPort()
        let a = try bed.network.attach(instanceID: "a", portMappings: [(hostPort: portA, containerPort: 8080)])
        let b = try bed.network.attach(instanceID: "b", portMappings: [])
        #expect(a.address != b.address)
        try bed.startHTTPServer(namespace: a.namespaceName, port: 8080)
        #expect(try BridgeTestSupport.waitUntil(timeout: 10) {
            try BridgeTestSupport.curl("http://\(a.address):8080/", namespace: b.namespaceName, timeout: 1).0 == 0
        })
        #expect(try BridgeTestSupport.curl("http://\(a.address):8080/", namespace: b.namespaceName).1 == "peer\n")
        // b → a through a's published port on the gateway.
        #expect(try BridgeTestSupport.curl("http://\(b.gateway):\(portA)/", namespace: b.namespaceName).1 == "peer\n")
        let ping = try BridgeCommand.run(["ip", "netns", "exec", a.namespaceName, "busybox", "ping", "-c", "1", "-W", "2", b.address])
        #expect(ping.status == 0)
    }

    @Test func prepareIsIdempotentRestartKeepsStateAndReconcileRemoves() throws {
        let bed = try BridgeTestBed(index: 40)
        defer { bed.cleanup() }
        let network = bed.network
        let tableBefore = try bed.nftTable()
        try network.prepare()
        #expect(try bed.nftTable() == tableBefore, "second prepare changes nothing")
        let addresses = try BridgeCommand.check(["ip", "-4", "-o", "addr", "show", "dev", network.bridgeName]).stdoutText
        #expect(addresses.split(separator: "\n").count == 1)

        try bed.writeFile("index.html", "kept\n")
        let keptPort = BridgeTestSupport.freeHostPort()
        let gonePort = BridgeTestSupport.freeHostPort(avoiding: [keptPort])
        let kept = try network.attach(instanceID: "kept", portMappings: [(hostPort: keptPort, containerPort: 8080)])
        let gone = try network.attach(instanceID: "gone", portMappings: [(hostPort: gonePort, containerPort: 8080)])

        // "Agent restart": a new object on the same state directory, prepare again.
        let restarted = try BridgeNetwork(configuration: network.configuration)
        try restarted.prepare()
        #expect(restarted.attachments() == ["kept": kept, "gone": gone])
        try bed.startHTTPServer(namespace: kept.namespaceName, port: 8080)
        #expect(try BridgeTestSupport.waitUntil(timeout: 10) {
            try BridgeTestSupport.curl("http://127.0.0.1:\(keptPort)/", timeout: 1).1 == "kept\n"
        }, "mapping survives prepare")

        // A stray namespace with our prefix and a stray map entry are swept too.
        let stray = "\(network.namePrefix)-stray"
        try BridgeCommand.check(["ip", "netns", "add", stray])
        defer { _ = try? BridgeCommand.run(["ip", "netns", "del", stray]) }
        let strayPort = BridgeTestSupport.freeHostPort(avoiding: [keptPort, gonePort])
        try BridgeCommand.nft("add element ip \(network.tableName) tcp_ports { \(strayPort) comment \"\(stray)\" : \(kept.address) . 9 }\n")

        let removed = try restarted.reconcile(keeping: ["kept"])
        #expect(removed == ["gone"])
        #expect(!FileManager.default.fileExists(atPath: gone.namespacePath))
        #expect(!FileManager.default.fileExists(atPath: "/run/netns/\(stray)"))
        #expect(FileManager.default.fileExists(atPath: kept.namespacePath))
        #expect(restarted.attachments() == ["kept": kept])
        let elements = try #require(try restarted.portMapElements())
        #expect(elements.map(\.hostPort) == [keptPort])
        #expect(try BridgeTestSupport.curl("http://127.0.0.1:\(keptPort)/").1 == "kept\n")
    }

    @Test func failedAttachIsUndone() throws {
        let bed = try BridgeTestBed(index: 50)
        defer { bed.cleanup() }
        let network = bed.network
        // Occupy a host port in the kernel map behind the state file's back, so
        // the last step of attach (nft create element) fails.
        let port = BridgeTestSupport.freeHostPort()
        try BridgeCommand.nft("add element ip \(network.tableName) tcp_ports { \(port) comment \"foreign\" : \(network.gateway) . 9 }\n")
        #expect(throws: BridgeError.self) {
            try network.attach(instanceID: "victim", portMappings: [(hostPort: port, containerPort: 8080)])
        }
        let names = network.names(for: "victim")
        #expect(!FileManager.default.fileExists(atPath: "/run/netns/\(names.namespaceName)"))
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/\(names.hostVeth)"))
        #expect(network.attachments().isEmpty)
        // The address was freed: the next attach gets the first address.
        let next = try network.attach(instanceID: "next", portMappings: [])
        #expect(next.address == network.cidr.firstAssignable.description)
        // A host port with a listening socket is refused before anything is made.
        let listenPort = try bed.startHostHTTPServer(avoiding: [port])
        #expect(throws: BridgeError.self) {
            try network.attach(instanceID: "busy", portMappings: [(hostPort: listenPort, containerPort: 8080)])
        }
        #expect(!FileManager.default.fileExists(atPath: "/run/netns/\(network.names(for: "busy").namespaceName)"))
    }

    /// A UDP mapping forwards datagrams, beside a TCP mapping of the same host port; a client that
    /// sent before the mapping existed reaches the container once it does (its conntrack flow is
    /// forgotten), and after detach nothing is left in either map.
    @Test func udpPortMappingBesideTCP() throws {
        let bed = try BridgeTestBed(index: 80)
        defer { bed.cleanup() }
        try bed.writeFile("index.html", "tcp too\n")
        let port = BridgeTestSupport.freeHostPort()
        let sourcePort = BridgeTestSupport.freeHostPort(avoiding: [port])
        let conntrack = BridgeCommand.resolve("conntrack") != nil
        if conntrack {
            // Nothing listens yet: the kernel keeps an un-NATed flow for this client.
            #expect(try BridgeTestSupport.udpExchange(port: port, sourcePort: sourcePort, message: "early", timeout: 0.3) == nil)
        }
        let a = try bed.network.attach(instanceID: "dns", mappings: [
            BridgePortMapping(hostPort: port, containerPort: 5353, transport: .udp),
            BridgePortMapping(hostPort: port, containerPort: 8080, transport: .tcp),
        ])
        try bed.startInNamespace(a.namespaceName, ["python3", "-c", BridgeTestSupport.udpEchoServer, "5353"])
        try bed.startHTTPServer(namespace: a.namespaceName, port: 8080)
        var answer: String?
        #expect(try BridgeTestSupport.waitUntil(timeout: 10) {
            answer = try BridgeTestSupport.udpExchange(port: port, sourcePort: sourcePort, message: "ping")
            return answer != nil
        }, "no answer through the UDP mapping (conntrack tool present: \(conntrack))")
        #expect(answer == "echo:ping")
        #expect(try BridgeTestSupport.waitUntil(timeout: 5) { try BridgeTestSupport.curl("http://127.0.0.1:\(port)/", timeout: 1).1 == "tcp too\n" })
        let elements = try #require(try bed.network.portMapElements())
        #expect(Set(elements.map { "\($0.transport.rawValue)/\($0.hostPort)" }) == ["udp/\(port)", "tcp/\(port)"])

        // The same host port cannot be mapped twice for one transport, by anyone.
        #expect(throws: BridgeError.self) {
            try bed.network.attach(instanceID: "other", mappings: [BridgePortMapping(hostPort: port, containerPort: 53, transport: .udp)])
        }
        try bed.network.detach(instanceID: "dns")
        #expect(try bed.network.portMapElements() == [])
    }

    /// route_localnet on the bridge must not open the host's loopback services to
    /// a container that routes 127.0.0.1 to the gateway (needs CAP_NET_ADMIN in
    /// the container): the raw prerouting rule drops such packets.
    @Test func containerCannotReachHostLoopbackServices() throws {
        let bed = try BridgeTestBed(index: 70)
        defer { bed.cleanup() }
        try bed.writeFile("index.html", "host secret\n")
        let port = try bed.startHostHTTPServer()
        #expect(try BridgeTestSupport.waitUntil(timeout: 5) { try BridgeTestSupport.curl("http://127.0.0.1:\(port)/", timeout: 1).0 == 0 })
        let a = try bed.network.attach(instanceID: "attacker", portMappings: [])
        let ns = a.namespaceName
        try BridgeCommand.check(["ip", "netns", "exec", ns, "sh", "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet; echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet"])
        try BridgeCommand.check(["ip", "-n", ns, "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "100"])
        try BridgeCommand.check(["ip", "-n", ns, "rule", "add", "pref", "1000", "lookup", "local"])
        try BridgeCommand.check(["ip", "-n", ns, "rule", "del", "pref", "0"])
        try BridgeCommand.check(["ip", "-n", ns, "route", "add", "127.0.0.1/32", "via", a.gateway, "dev", "eth0",
                                 "src", a.address, "table", "100"])
        let attempt = try BridgeTestSupport.curl("http://127.0.0.1:\(port)/", namespace: ns, timeout: 2)
        #expect(attempt.0 != 0 && attempt.1.isEmpty, "host loopback service reached from the container: \(attempt)")
    }
}
