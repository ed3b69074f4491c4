import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The transport of a published port.
enum BridgeTransport: String, Codable, Hashable, Sendable, CaseIterable {
    case tcp, udp

    /// The nft map of this transport's published ports.
    var mapName: String { "\(rawValue)_ports" }
}

/// One published port: host port → container port, of one transport.
struct BridgePortMapping: Codable, Hashable, Sendable {
    var hostPort: Int
    var containerPort: Int
    var transport: BridgeTransport

    init(hostPort: Int, containerPort: Int, transport: BridgeTransport = .tcp) {
        self.hostPort = hostPort
        self.containerPort = containerPort
        self.transport = transport
    }

    enum CodingKeys: String, CodingKey { case hostPort, containerPort, transport }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        hostPort = try container.decode(Int.self, forKey: .hostPort)
        containerPort = try container.decode(Int.self, forKey: .containerPort)
        // State files written before UDP mappings existed hold TCP ones only.
        transport = try container.decodeIfPresent(BridgeTransport.self, forKey: .transport) ?? .tcp
    }
}

/// One element of a port map as the kernel holds it.
struct BridgePortMapElement: Hashable, Sendable {
    var transport: BridgeTransport
    var hostPort: Int
    var tag: String?
}

/// What `BridgeNetwork.attach` set up for one instance.
struct BridgeAttachment: Codable, Hashable, Sendable {
    var instanceID: String
    var namespaceName: String
    /// `/run/netns/<name>`: the `path` of the OCI runtime config's network namespace.
    var namespacePath: String
    /// The container's address (on its `eth0`).
    var address: String
    var prefixLength: Int
    /// The bridge's address, the container's default route.
    var gateway: String
    /// Host end of the veth pair (enslaved to the bridge).
    var hostVeth: String
    /// Container end of the veth pair, inside the namespace.
    var containerVeth: String
    var mtu: Int
    var portMappings: [BridgePortMapping]
    /// Comment on this instance's nft map elements (equals `namespaceName`).
    var ruleTag: String
}

struct BridgeNetworkConfiguration: Sendable, Equatable {
    /// Linux interface name, at most 15 characters.
    var bridgeName: String
    /// IPv4 subnet of the bridge; the first address is the gateway on the bridge.
    var cidr: String
    /// Where allocations and attachments are persisted (survives agent restarts).
    var stateDirectory: URL
    /// Prefix of namespace names (`<prefix>-…`) and the nft table name (`ip <prefix>`).
    /// `[a-z][a-z0-9_]*`, at most 24 characters.
    var namePrefix: String
    /// MTU of the veth pairs; nil: that of the default route's interface, at most 1500.
    var mtu: Int?
    /// Also set `net.ipv4.conf.all.route_localnet=1`. Not needed for the
    /// 127.0.0.1 port mappings (the bridge's own flag is enough, see `prepare`),
    /// and it makes every interface accept packets for 127.0.0.0/8 (CVE-2020-8558).
    var routeLocalnetOnAllInterfaces: Bool

    init(
        stateDirectory: URL,
        bridgeName: String = BridgeNetwork.defaultBridgeName,
        cidr: String = BridgeNetwork.defaultCIDR,
        namePrefix: String = BridgeNetwork.defaultNamePrefix,
        mtu: Int? = nil,
        routeLocalnetOnAllInterfaces: Bool = false
    ) {
        self.stateDirectory = stateDirectory
        self.bridgeName = bridgeName
        self.cidr = cidr
        self.namePrefix = namePrefix
        self.mtu = mtu
        self.routeLocalnetOnAllInterfaces = routeLocalnetOnAllInterfaces
    }
}

/// Names derived (deterministically) from an instance ID.
struct BridgeInstanceNames: Hashable, Sendable {
    var namespaceName: String
    var hostVeth: String
    var ruleTag: String
}

/// Suggested /etc/resolv.conf for containers on the bridge.
struct BridgeResolvConfSuggestion: Sendable, Equatable {
    /// File content to bind-mount into containers, or nil if there is no usable nameserver.
    var content: String?
    /// Why the content differs from the host's, or why there is none.
    var note: String?
}

/// One entry of `ip -j -4 route show table all`.
struct BridgeRoute: Decodable, Sendable, Equatable {
    var dst: String?
    var dev: String?
    var type: String?
    var table: String?

    init(dst: String?, dev: String? = nil, type: String? = nil, table: String? = nil) {
        self.dst = dst
        self.dev = dev
        self.type = type
        self.table = table
    }
}

/// Persisted record of one attachment.
struct BridgeAttachmentRecord: Codable, Sendable {
    var attachment: BridgeAttachment
    /// False while `attach` is under way — or if the agent died in the middle:
    /// such records are not reported by `attachments()` and `reconcile` removes them.
    var complete: Bool
}

/// The state file `<stateDirectory>/bridge-<bridgeName>.json`.
struct BridgeNetworkState: Codable, Sendable {
    var version: Int
    var bridgeName: String
    var mtu: Int?
    var pool: BridgeAddressPool
    var attachments: [String: BridgeAttachmentRecord]
}

/// Docker-style `bridge` networking: a Linux bridge with a private subnet,
/// one network namespace + veth pair per instance, nftables DNAT for
/// published TCP and UDP ports (also from 127.0.0.1, like dockerd with
/// `userland-proxy: false`) and masquerading for outgoing traffic.
///
/// Every operation takes an exclusive flock on `<stateDirectory>/bridge-<name>.lock`,
/// so concurrent calls (threads or processes) are serialised; the class keeps no
/// mutable state in memory. All calls block (they run `ip` and `nft`).
final class BridgeNetwork: Sendable {
    static let defaultBridgeName = "flotilla0"
    static let defaultCIDR = "172.31.0.0/16"
    static let defaultNamePrefix = "flotilla"
    static let containerInterface = "eth0"
    static let namespaceDirectory = "/run/netns"

    let configuration: BridgeNetworkConfiguration
    let cidr: BridgeCIDR
    let tableName: String
    let stateFileURL: URL
    let lockFileURL: URL

    var bridgeName: String { configuration.bridgeName }
    var namePrefix: String { configuration.namePrefix }
    var gateway: BridgeIPv4Address { cidr.gateway }

    init(configuration: BridgeNetworkConfiguration) throws {
        try BridgeNetwork.validateInterfaceName(configuration.bridgeName, what: "bridge name")
        let prefix = configuration.namePrefix
        guard (1...24).contains(prefix.count), let first = prefix.first, first.isASCII, first.isLowercase,
              prefix.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "_") }) else {
            throw BridgeError.invalidConfiguration("name prefix '\(prefix)' must match [a-z][a-z0-9_]* and be at most 24 characters")
        }
        if let mtu = configuration.mtu, !(576...65_535).contains(mtu) {
            throw BridgeError.invalidConfiguration("MTU \(mtu) is outside 576...65535")
        }
        self.configuration = configuration
        self.cidr = try BridgeCIDR.parse(configuration.cidr)
        self.tableName = prefix
        self.stateFileURL = configuration.stateDirectory.appendingPathComponent("bridge-\(configuration.bridgeName).json")
        self.lockFileURL = configuration.stateDirectory.appendingPathComponent("bridge-\(configuration.bridgeName).lock")
    }

    convenience init(
        bridgeName: String = BridgeNetwork.defaultBridgeName,
        cidr: String = BridgeNetwork.defaultCIDR,
        stateDirectory: URL,
        namePrefix: String = BridgeNetwork.defaultNamePrefix
    ) throws {
        try self.init(configuration: BridgeNetworkConfiguration(
            stateDirectory: stateDirectory, bridgeName: bridgeName, cidr: cidr, namePrefix: namePrefix))
    }

    // MARK: - prepare

    /// Creates/repairs the bridge, sysctls and the nft table. Idempotent; safe
    /// after an agent crash (existing attachments and their port mappings stay).
    func prepare() throws {
        try withLock {
            var state = try loadState()
            let routes = try BridgeNetwork.hostRoutes()
            if let (route, _) = BridgeNetwork.overlappingRoute(for: cidr, in: routes, bridgeName: bridgeName) {
                throw BridgeError.cidrOverlapsHostRoute(cidr: cidr.description, route: route.dst ?? "?", device: route.dev)
            }
            try ensureBridge()

            // Containers reach other networks, and each other through published
            // ports, only if the host routes between interfaces.
            try BridgeCommand.writeSysctl(["net", "ipv4", "ip_forward"], "1")
            // route_localnet: a client on the host connects to 127.0.0.1:H; the
            // output chain DNATs the packet to container:port, but its source is
            // still 127.0.0.1 when the kernel re-routes it out of the bridge. The
            // kernel refuses to route loopback sources (and, for the reply that
            // comes back in on the bridge and is un-NATed to 127.0.0.1, loopback
            // destinations) on any device but lo unless route_localnet is set for
            // that device ("martian" packets). The postrouting masquerade then
            // rewrites the 127.0.0.1 source to the gateway so the container can
            // answer. The kernel ORs conf.<dev> with conf.all, so the bridge's own
            // flag suffices; conf.all is optional (routeLocalnetOnAllInterfaces).
            try BridgeCommand.writeSysctl(["net", "ipv4", "conf", bridgeName, "route_localnet"], "1")
            if configuration.routeLocalnetOnAllInterfaces {
                try BridgeCommand.writeSysctl(["net", "ipv4", "conf", "all", "route_localnet"], "1")
            }

            try BridgeCommand.nft(rulesetScript())
            state.mtu = configuration.mtu ?? BridgeNetwork.defaultRouteMTU(routes: routes)
            try restorePortMappings(state)
            try saveState(state)
        }
    }

    /// The nft transaction `prepare` runs: creates what is missing, then
    /// replaces the rules of our chains (atomically), keeping the port map.
    func rulesetScript() -> String {
        let t = "ip \(tableName)"
        let br = "\"\(bridgeName)\""
        let chains: [(String, String)] = [
            // Before conntrack: with route_localnet on the bridge, a container could
            // send packets for 127.0.0.0/8 to the gateway and reach host services
            // bound to loopback. Replies to localhost clients are not affected: they
            // arrive addressed to the gateway and are un-NATed after this hook.
            ("prerouting_raw", "type filter hook prerouting priority -300; policy accept;"),
            ("prerouting", "type nat hook prerouting priority -100; policy accept;"),
            ("output", "type nat hook output priority -100; policy accept;"),
            ("postrouting", "type nat hook postrouting priority 100; policy accept;"),
            ("forward", "type filter hook forward priority 0; policy accept;"),
        ]
        var lines = ["add table \(t)"]
        for transport in BridgeTransport.allCases {
            lines.append("add map \(t) \(transport.mapName) { type inet_service : ipv4_addr . inet_service; }")
        }
        for (name, spec) in chains { lines.append("add chain \(t) \(name) { \(spec) }") }
        for (name, _) in chains { lines.append("flush chain \(t) \(name)") }
        lines += [
            "add rule \(t) prerouting_raw iifname \(br) ip daddr 127.0.0.0/8 drop",
        ]
        for transport in BridgeTransport.allCases {
            let proto = transport.rawValue
            lines += [
                // Published ports, for packets from outside and from containers...
                "add rule \(t) prerouting fib daddr type local dnat to \(proto) dport map @\(transport.mapName)",
                // ...and for locally generated packets to any local address, 127.0.0.1 included.
                "add rule \(t) output fib daddr type local dnat to \(proto) dport map @\(transport.mapName)",
            ]
        }
        lines += [
            // Containers going out through other interfaces.
            "add rule \(t) postrouting ip saddr \(cidr) oifname != \(br) masquerade",
            // Host clients of 127.0.0.1:H: the container must answer the gateway, not 127.0.0.1.
            "add rule \(t) postrouting ip saddr 127.0.0.0/8 oifname \(br) masquerade",
            // Hairpin: a container reaching a published port (its own or a neighbour's).
            "add rule \(t) postrouting ip saddr \(cidr) oifname \(br) ct status dnat masquerade",
            "add rule \(t) forward iifname \(br) accept",
            "add rule \(t) forward oifname \(br) accept",
        ]
        return lines.joined(separator: "\n") + "\n"
    }

    // MARK: - attach / detach

    /// Gives the instance an address, a namespace with `eth0` and a default route
    /// via the gateway, and DNAT rules for its published ports. Undoes its work if
    /// a step fails. Attaching again with the same mappings returns the attachment.
    func attach(instanceID: String, portMappings: [(hostPort: Int, containerPort: Int)]) throws -> BridgeAttachment {
        try attach(instanceID: instanceID, mappings: portMappings.map { BridgePortMapping(hostPort: $0.hostPort, containerPort: $0.containerPort) })
    }

    /// `attach` with mappings of either transport; one host port may carry a TCP and a UDP mapping.
    func attach(instanceID: String, mappings: [BridgePortMapping]) throws -> BridgeAttachment {
        try BridgeNetwork.validate(instanceID: instanceID, mappings: mappings)
        return try withLock {
            var state = try loadState()
            guard FileManager.default.fileExists(atPath: "/sys/class/net/\(bridgeName)/bridge") else {
                throw BridgeError.notPrepared("bridge \(bridgeName) does not exist; call prepare() first")
            }
            if let existing = state.attachments[instanceID] {
                if existing.complete {
                    if existing.attachment.portMappings == mappings,
                       FileManager.default.fileExists(atPath: existing.attachment.namespacePath) {
                        return existing.attachment
                    }
                    throw BridgeError.alreadyAttached(instanceID: instanceID)
                }
                // Left over from an attach that died halfway: start over.
                try removeKernelObjects(names(of: existing.attachment))
                state.attachments[instanceID] = nil
                state.pool.release(owner: instanceID)
            }
            for mapping in mappings {
                if let other = state.attachments.values.first(where: { record in
                    record.attachment.portMappings.contains { $0.hostPort == mapping.hostPort && $0.transport == mapping.transport }
                }) {
                    throw BridgeError.hostPortInUse(hostPort: mapping.hostPort, owner: "instance '\(other.attachment.instanceID)' (\(mapping.transport.rawValue))")
                }
            }
            // The DNAT would take the port's packets from a socket on the host: refuse instead.
            let tcpListening = BridgeNetwork.listeningTCPPorts()
            if let busy = mappings.first(where: { $0.transport == .tcp && tcpListening.contains($0.hostPort) }) {
                throw BridgeError.hostPortInUse(hostPort: busy.hostPort, owner: "a listening socket on the host")
            }
            let udpBound = BridgeNetwork.boundUDPPorts()
            if let busy = mappings.first(where: { $0.transport == .udp && udpBound.contains($0.hostPort) }) {
                throw BridgeError.hostPortInUse(hostPort: busy.hostPort, owner: "a bound UDP socket on the host")
            }

            let poolBefore = state.pool
            let address = try state.pool.allocate(for: instanceID)
            let names = names(for: instanceID)
            let attachment = BridgeAttachment(
                instanceID: instanceID,
                namespaceName: names.namespaceName,
                namespacePath: BridgeNetwork.namespaceDirectory + "/" + names.namespaceName,
                address: address.description,
                prefixLength: cidr.prefixLength,
                gateway: gateway.description,
                hostVeth: names.hostVeth,
                containerVeth: BridgeNetwork.containerInterface,
                mtu: state.mtu ?? configuration.mtu ?? 1500,
                portMappings: mappings,
                ruleTag: names.ruleTag)
            // Persist first: if we die below, the record (complete: false) tells
            // reconcile/detach exactly what to remove.
            state.attachments[instanceID] = BridgeAttachmentRecord(attachment: attachment, complete: false)
            try saveState(state)
            do {
                try removeKernelObjects(names)  // leftovers under our deterministic names
                try createKernelObjects(attachment)
                state.attachments[instanceID]?.complete = true
                try saveState(state)
            } catch {
                try? removeKernelObjects(names)
                state.attachments[instanceID] = nil
                state.pool = poolBefore  // as if nothing happened (also the allocation cursor)
                try? saveState(state)
                throw error
            }
            return attachment
        }
    }

    /// Removes the instance's rules, veth and namespace and frees its address.
    /// Idempotent: nothing left is not an error.
    func detach(instanceID: String) throws {
        try withLock {
            var state = try loadState()
            let record = state.attachments[instanceID]
            try removeKernelObjects(record.map { names(of: $0.attachment) } ?? names(for: instanceID))
            if record != nil || state.pool.address(of: instanceID) != nil {
                state.attachments[instanceID] = nil
                state.pool.release(owner: instanceID)
                try saveState(state)
            }
        }
    }

    /// Complete attachments, from the state file (instance ID → attachment).
    func attachments() -> [String: BridgeAttachment] {
        guard let state = try? loadState() else { return [:] }
        return state.attachments.compactMapValues { $0.complete ? $0.attachment : nil }
    }

    /// After an agent restart: detaches every instance not in `keeping` (and
    /// half-made attachments), and removes namespaces and port-map entries with
    /// our prefix that no record owns. Returns the detached instance IDs.
    @discardableResult
    func reconcile(keeping: Set<String>) throws -> [String] {
        try withLock {
            var state = try loadState()
            var removed: [String] = []
            var firstError: (any Error)?
            for (id, record) in state.attachments.sorted(by: { $0.key < $1.key })
            where !record.complete || !keeping.contains(id) {
                do {
                    try removeKernelObjects(names(of: record.attachment))
                    state.attachments[id] = nil
                    state.pool.release(owner: id)
                    removed.append(id)
                } catch {
                    firstError = firstError ?? error
                }
            }
            let owned = Set(state.attachments.values.map(\.attachment.namespaceName))
            do {
                for namespace in namespacesWithPrefix() where !owned.contains(namespace) {
                    try removeNamespace(namespace)
                }
                if let elements = try portMapElements() {
                    let stray = elements.filter { element in
                        guard let tag = element.tag else { return false }
                        return tag.hasPrefix(namePrefix + "-") && !owned.contains(tag)
                    }
                    try deletePortMapElements(stray)
                }
            } catch {
                firstError = firstError ?? error
            }
            try saveState(state)
            if let firstError { throw firstError }
            return removed
        }
    }

    /// Removes everything: attachments, namespaces with our prefix, the nft
    /// table, the bridge and the state file. (Sysctls are left as they are.)
    func destroy() throws {
        try withLock {
            if let state = try? loadState() {
                for record in state.attachments.values { try removeKernelObjects(names(of: record.attachment)) }
            }
            for namespace in namespacesWithPrefix() { try removeNamespace(namespace) }
            let result = try BridgeCommand.run(["nft", "delete", "table", "ip", tableName])
            if !result.succeeded && !result.stderrText.contains("No such file or directory") {
                throw BridgeError.commandFailed(command: result.command, status: result.status, stderr: result.stderrText)
            }
            if FileManager.default.fileExists(atPath: "/sys/class/net/\(bridgeName)") {
                try BridgeCommand.check(["ip", "link", "del", "dev", bridgeName])
            }
            BridgeStateFile.remove(stateFileURL)
        }
    }

    // MARK: - names

    func names(for instanceID: String) -> BridgeInstanceNames {
        let hash = BridgeNetwork.hex(BridgeNetwork.fnv1a64("\(namePrefix)\u{0}\(bridgeName)\u{0}\(instanceID)"))
        let readable = String(String(instanceID.map { c -> Character in
            c.isASCII && (c.isLetter || c.isNumber || c == "." || c == "_" || c == "-") ? c : "_"
        }).prefix(40))
        let namespace = readable.isEmpty
            ? "\(namePrefix)-\(hash.prefix(12))"
            : "\(namePrefix)-\(readable)-\(hash.prefix(12))"
        // Interface names are limited to 15 characters: "veth" + 11 hex digits.
        return BridgeInstanceNames(namespaceName: namespace, hostVeth: "veth" + hash.prefix(11), ruleTag: namespace)
    }

    private func names(of attachment: BridgeAttachment) -> BridgeInstanceNames {
        BridgeInstanceNames(namespaceName: attachment.namespaceName, hostVeth: attachment.hostVeth, ruleTag: attachment.ruleTag)
    }

    static func fnv1a64(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        return hash
    }

    static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }

    // MARK: - kernel objects

    private func createKernelObjects(_ a: BridgeAttachment) throws {
        let ns = a.namespaceName
        let mtu = String(a.mtu)
        try BridgeCommand.check(["ip", "netns", "add", ns])
        // The peer is created directly inside the namespace, already named eth0.
        try BridgeCommand.check(["ip", "link", "add", "name", a.hostVeth, "mtu", mtu, "type", "veth",
                                 "peer", "name", a.containerVeth, "mtu", mtu, "netns", ns])
        try BridgeCommand.check(["ip", "link", "set", "dev", a.hostVeth, "master", bridgeName])
        // Hairpin: with br_netfilter, a container's packet to its own published port
        // is DNATed back out of the bridge port it came in on.
        try BridgeCommand.check(["ip", "link", "set", "dev", a.hostVeth, "type", "bridge_slave", "hairpin", "on"])
        try BridgeCommand.check(["ip", "link", "set", "dev", a.hostVeth, "up"])
        try BridgeCommand.check(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        try BridgeCommand.check(["ip", "-n", ns, "addr", "add", "\(a.address)/\(a.prefixLength)", "dev", a.containerVeth])
        try BridgeCommand.check(["ip", "-n", ns, "link", "set", "dev", a.containerVeth, "up"])
        try BridgeCommand.check(["ip", "-n", ns, "route", "add", "default", "via", a.gateway, "dev", a.containerVeth])
        if !a.portMappings.isEmpty {
            // `create` (not `add`): fails if a host port is already mapped. One transaction for both maps.
            try BridgeCommand.nft(elementScript(verb: "create", [a]))
            forgetUDPFlows(a.portMappings.filter { $0.transport == .udp }.map(\.hostPort))
        }
    }

    /// UDP has no connection to end: conntrack keeps steering a client's datagrams the way its
    /// first one went (nowhere, before the mapping existed; to the old container, after it is
    /// gone) until the entry idles out. Those entries are forgotten, as dockerd does. Best
    /// effort: it needs the `conntrack` tool (Debian `conntrack`); without it a client that sent
    /// before the mapping existed waits for the entry's timeout (30 s).
    private func forgetUDPFlows(_ ports: [Int]) {
        guard !ports.isEmpty, BridgeCommand.resolve("conntrack") != nil else { return }
        for port in ports {
            // Exit status 1 means no entry matched.
            _ = try? BridgeCommand.run(["conntrack", "-D", "-p", "udp", "--orig-port-dst", String(port)])
        }
    }

    /// `<verb> element` lines adding the attachments' mappings to their transports' maps.
    private func elementScript(verb: String, _ attachments: [BridgeAttachment]) -> String {
        var lines: [String] = []
        for transport in BridgeTransport.allCases {
            let elements = attachments.flatMap { a in
                a.portMappings.filter { $0.transport == transport }
                    .map { "\($0.hostPort) comment \"\(a.ruleTag)\" : \(a.address) . \($0.containerPort)" }
            }
            if !elements.isEmpty {
                lines.append("\(verb) element ip \(tableName) \(transport.mapName) { \(elements.joined(separator: ", ")) }")
            }
        }
        return lines.isEmpty ? "" : lines.joined(separator: "\n") + "\n"
    }

    /// Removes what exists of an instance's objects; absent objects are fine.
    private func removeKernelObjects(_ names: BridgeInstanceNames) throws {
        if let elements = try portMapElements() {
            let owned = elements.filter { $0.tag == names.ruleTag }
            try deletePortMapElements(owned)
            forgetUDPFlows(owned.filter { $0.transport == .udp }.map(\.hostPort))
        }
        let veth = "/sys/class/net/\(names.hostVeth)"
        if FileManager.default.fileExists(atPath: veth) {
            let result = try BridgeCommand.run(["ip", "link", "del", "dev", names.hostVeth])
            if !result.succeeded && FileManager.default.fileExists(atPath: veth) {
                throw BridgeError.commandFailed(command: result.command, status: result.status, stderr: result.stderrText)
            }
        }
        try removeNamespace(names.namespaceName)
    }

    private func removeNamespace(_ name: String) throws {
        let path = BridgeNetwork.namespaceDirectory + "/" + name
        guard FileManager.default.fileExists(atPath: path) else { return }
        let result = try BridgeCommand.run(["ip", "netns", "del", name])
        if !result.succeeded && FileManager.default.fileExists(atPath: path) {
            throw BridgeError.commandFailed(command: result.command, status: result.status, stderr: result.stderrText)
        }
    }

    private func namespacesWithPrefix() -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: BridgeNetwork.namespaceDirectory)) ?? []
        return entries.filter { $0.hasPrefix(namePrefix + "-") }.sorted()
    }

    /// Elements of the port maps (transport, host port, comment); nil if the table does not exist.
    func portMapElements() throws -> [BridgePortMapElement]? {
        var all: [BridgePortMapElement] = []
        for transport in BridgeTransport.allCases {
            guard let elements = try portMapElements(transport) else {
                // A table made before UDP mappings existed has no udp map until prepare() adds it.
                if transport == .tcp { return nil } else { continue }
            }
            all += elements
        }
        return all
    }

    private func portMapElements(_ transport: BridgeTransport) throws -> [BridgePortMapElement]? {
        let command = ["nft", "-j", "list", "map", "ip", tableName, transport.mapName]
        let result = try BridgeCommand.run(command)
        guard result.succeeded else {
            if result.stderrText.contains("No such file or directory") { return nil }
            throw BridgeError.commandFailed(command: command, status: result.status, stderr: result.stderrText)
        }
        guard let root = try? JSONSerialization.jsonObject(with: result.stdout) as? [String: Any],
              let items = root["nftables"] as? [Any] else {
            throw BridgeError.unexpectedOutput(command: command, reason: "not nft JSON")
        }
        func integer(_ value: Any?) -> Int? {
            if let value = value as? Int { return value }
            if let value = value as? NSNumber { return value.intValue }
            return nil
        }
        var elements: [BridgePortMapElement] = []
        for case let item as [String: Any] in items {
            guard let map = item["map"] as? [String: Any] else { continue }
            for case let pair as [Any] in (map["elem"] as? [Any]) ?? [] {
                guard let key = pair.first else { continue }
                if let port = integer(key) {
                    elements.append(BridgePortMapElement(transport: transport, hostPort: port, tag: nil))
                } else if let wrapper = key as? [String: Any], let element = wrapper["elem"] as? [String: Any],
                          let port = integer(element["val"]) {
                    elements.append(BridgePortMapElement(transport: transport, hostPort: port, tag: element["comment"] as? String))
                }
            }
        }
        return elements
    }

    private func deletePortMapElements(_ elements: [BridgePortMapElement]) throws {
        var lines: [String] = []
        for transport in BridgeTransport.allCases {
            let ports = elements.filter { $0.transport == transport }.map { String($0.hostPort) }
            if !ports.isEmpty {
                lines.append("delete element ip \(tableName) \(transport.mapName) { \(ports.joined(separator: ", ")) }")
            }
        }
        guard !lines.isEmpty else { return }
        try BridgeCommand.nft(lines.joined(separator: "\n") + "\n")
    }

    /// Re-adds the port map entries of live attachments (e.g. after someone flushed the ruleset).
    private func restorePortMappings(_ state: BridgeNetworkState) throws {
        let live = state.attachments.values.filter {
            $0.complete && !$0.attachment.portMappings.isEmpty
                && FileManager.default.fileExists(atPath: $0.attachment.namespacePath)
        }
        let script = elementScript(verb: "add", live.map(\.attachment))
        guard !script.isEmpty else { return }
        try BridgeCommand.nft(script)
    }

    private func ensureBridge() throws {
        let sysfs = "/sys/class/net/\(bridgeName)"
        if !FileManager.default.fileExists(atPath: sysfs) {
            let result = try BridgeCommand.run(["ip", "link", "add", "name", bridgeName, "type", "bridge"])
            if !result.succeeded && !FileManager.default.fileExists(atPath: sysfs) {
                throw BridgeError.commandFailed(command: result.command, status: result.status, stderr: result.stderrText)
            }
        }
        guard FileManager.default.fileExists(atPath: sysfs + "/bridge") else {
            throw BridgeError.invalidConfiguration("interface \(bridgeName) exists and is not a bridge; choose another bridge name")
        }
        struct AddressInfo: Decodable { var family: String?; var local: String?; var prefixlen: Int? }
        struct Interface: Decodable { var addr_info: [AddressInfo]? }
        let command = ["ip", "-j", "-4", "addr", "show", "dev", bridgeName]
        let output = try BridgeCommand.check(command).stdout
        let interfaces: [Interface]
        do { interfaces = try JSONDecoder().decode([Interface].self, from: output) } catch {
            throw BridgeError.unexpectedOutput(command: command, reason: "\(error)")
        }
        var hasGateway = false
        for info in interfaces.flatMap({ $0.addr_info ?? [] }) where info.family == nil || info.family == "inet" {
            if info.local == gateway.description && info.prefixlen == cidr.prefixLength {
                hasGateway = true
            } else {
                throw BridgeError.invalidConfiguration(
                    "bridge \(bridgeName) already has address \(info.local ?? "?")/\(info.prefixlen ?? 0), expected \(gateway)/\(cidr.prefixLength); remove it or choose another --bridge-cidr")
            }
        }
        if !hasGateway {
            try BridgeCommand.check(["ip", "addr", "add", "\(gateway)/\(cidr.prefixLength)", "brd", "+", "dev", bridgeName])
        }
        try BridgeCommand.check(["ip", "link", "set", "dev", bridgeName, "up"])
    }

    // MARK: - host inspection

    static func hostRoutes() throws -> [BridgeRoute] {
        let command = ["ip", "-j", "-4", "route", "show", "table", "all"]
        let output = try BridgeCommand.check(command).stdout
        do { return try JSONDecoder().decode([BridgeRoute].self, from: output) } catch {
            throw BridgeError.unexpectedOutput(command: command, reason: "\(error)")
        }
    }

    /// The first host route overlapping `cidr`, ignoring default routes, the
    /// local/broadcast routes of the `local` table and routes on our own bridge.
    static func overlappingRoute(for cidr: BridgeCIDR, in routes: [BridgeRoute], bridgeName: String) -> (BridgeRoute, BridgeCIDR)? {
        let ignoredTypes: Set<String> = ["local", "broadcast", "multicast", "anycast"]
        for route in routes {
            if route.table == "local" || ignoredTypes.contains(route.type ?? "") || route.dev == bridgeName { continue }
            guard let dst = route.dst, dst != "default", let network = BridgeCIDR.parseRoute(dst),
                  network.prefixLength > 0 else { continue }
            if network.overlaps(cidr) { return (route, network) }
        }
        return nil
    }

    /// MTU of the default route's interface, capped at 1500 (Docker's default).
    static func defaultRouteMTU(routes: [BridgeRoute]) -> Int {
        guard let device = routes.first(where: { $0.dst == "default" && ($0.table == nil || $0.table == "main") })?.dev,
              let data = FileManager.default.contents(atPath: "/sys/class/net/\(device)/mtu"),
              let mtu = Int(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)),
              mtu >= 576 else { return 1500 }
        return min(mtu, 1500)
    }

    /// TCP ports with a listening socket in this network namespace (/proc/net/tcp{,6}).
    static func listeningTCPPorts() -> Set<Int> {
        localPorts(in: ["/proc/net/tcp", "/proc/net/tcp6"], state: "0A")  // TCP_LISTEN
    }

    /// UDP ports with a bound, unconnected socket in this network namespace (/proc/net/udp{,6}).
    static func boundUDPPorts() -> Set<Int> {
        localPorts(in: ["/proc/net/udp", "/proc/net/udp6"], state: "07")  // TCP_CLOSE: how the kernel shows them
    }

    private static func localPorts(in files: [String], state: Substring) -> Set<Int> {
        var ports = Set<Int>()
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else { continue }
            for line in String(decoding: data, as: UTF8.self).split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ")
                guard fields.count > 3, fields[3] == state, let colon = fields[1].lastIndex(of: ":"),
                      let port = Int(fields[1][fields[1].index(after: colon)...], radix: 16) else { continue }
                ports.insert(port)
            }
        }
        return ports
    }

    // MARK: - resolv.conf

    /// Containers on the bridge cannot reach nameservers on the host's loopback
    /// (systemd-resolved's 127.0.0.53, dnsmasq on 127.0.0.1, …). Returns the
    /// host's content without loopback nameservers; if that leaves none, the
    /// upstream file's (systemd-resolved keeps the real servers in
    /// /run/systemd/resolve/resolv.conf); else no content and a note.
    static func resolvConfSuggestion(hostResolvConf: String, upstreamResolvConf: String? = nil) -> BridgeResolvConfSuggestion {
        func isLoopback(_ server: Substring) -> Bool {
            server.hasPrefix("127.") || server == "::1" || server == "0:0:0:0:0:0:0:1"
        }
        func nameservers(_ text: String) -> [Substring] {
            text.split(separator: "\n").compactMap { line in
                let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                return fields.count >= 2 && fields[0] == "nameserver" ? fields[1] : nil
            }
        }
        func withoutLoopback(_ text: String) -> String {
            text.split(separator: "\n", omittingEmptySubsequences: false).filter { line in
                let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                return !(fields.count >= 2 && fields[0] == "nameserver" && isLoopback(fields[1]))
            }.joined(separator: "\n")
        }
        let servers = nameservers(hostResolvConf)
        let loopback = servers.filter(isLoopback)
        if servers.isEmpty == false && loopback.isEmpty {
            return BridgeResolvConfSuggestion(content: hostResolvConf, note: nil)
        }
        if servers.count > loopback.count {
            return BridgeResolvConfSuggestion(
                content: withoutLoopback(hostResolvConf),
                note: "dropped loopback nameserver(s) \(loopback.joined(separator: ", ")), unreachable from containers")
        }
        let listed = loopback.isEmpty ? "no nameserver (the resolver then uses 127.0.0.1)" : "only loopback nameservers (\(loopback.joined(separator: ", ")))"
        if let upstreamResolvConf, nameservers(upstreamResolvConf).contains(where: { !isLoopback($0) }) {
            return BridgeResolvConfSuggestion(
                content: withoutLoopback(upstreamResolvConf),
                note: "host resolv.conf lists \(listed); using the upstream servers of systemd-resolved")
        }
        return BridgeResolvConfSuggestion(
            content: nil,
            note: "host resolv.conf lists \(listed), which containers on the bridge cannot reach; configure real nameservers for containers (or run a resolver listening on the bridge gateway)")
    }

    /// Reads /etc/resolv.conf and, if needed, /run/systemd/resolve/resolv.conf.
    static func resolvConfSuggestion() -> BridgeResolvConfSuggestion {
        func read(_ path: String) -> String? {
            FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
        }
        return resolvConfSuggestion(hostResolvConf: read("/etc/resolv.conf") ?? "",
                                    upstreamResolvConf: read("/run/systemd/resolve/resolv.conf"))
    }

    // MARK: - validation, state, lock

    static func validateInterfaceName(_ name: String, what: String) throws {
        guard (1...15).contains(name.utf8.count), name != ".", name != "..",
              name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" || $0 == ".") }) else {
            throw BridgeError.invalidConfiguration("\(what) '\(name)' must be 1-15 characters of [A-Za-z0-9_.-]")
        }
    }

    static func validate(instanceID: String, mappings: [BridgePortMapping]) throws {
        guard !instanceID.isEmpty, instanceID.utf8.count <= 1024, !instanceID.contains("\u{0}") else {
            throw BridgeError.invalidConfiguration("invalid instance ID '\(instanceID)'")
        }
        var seen = Set<String>()
        for mapping in mappings {
            guard (1...65_535).contains(mapping.hostPort), (1...65_535).contains(mapping.containerPort) else {
                throw BridgeError.invalidPortMapping("\(mapping.hostPort) → \(mapping.containerPort): ports must be 1...65535")
            }
            guard seen.insert("\(mapping.hostPort)/\(mapping.transport.rawValue)").inserted else {
                throw BridgeError.invalidPortMapping("host port \(mapping.hostPort)/\(mapping.transport.rawValue) is mapped twice")
            }
        }
    }

    private func loadState() throws -> BridgeNetworkState {
        let fresh = BridgeNetworkState(version: 1, bridgeName: bridgeName, mtu: nil, pool: BridgeAddressPool(cidr: cidr), attachments: [:])
        guard let data = try BridgeStateFile.readData(stateFileURL) else { return fresh }
        var state: BridgeNetworkState
        do { state = try JSONDecoder().decode(BridgeNetworkState.self, from: data) } catch {
            throw BridgeError.stateFile(path: stateFileURL.path, reason: "cannot decode: \(error)")
        }
        if state.pool.cidr != cidr {
            guard state.attachments.isEmpty else {
                throw BridgeError.invalidConfiguration(
                    "\(stateFileURL.path) holds \(state.attachments.count) attachment(s) in \(state.pool.cidr), not \(cidr); detach them before changing --bridge-cidr")
            }
            state.pool = BridgeAddressPool(cidr: cidr)
        }
        try state.pool.validate()
        return state
    }

    private func saveState(_ state: BridgeNetworkState) throws {
        try BridgeStateFile.writeAtomically(BridgeStateFile.encode(state), to: stateFileURL)
    }

    private func withLock<T>(_ body: () throws -> T) throws -> T {
        try FileManager.default.createDirectory(at: configuration.stateDirectory, withIntermediateDirectories: true)
        let fd = open(lockFileURL.path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw BridgeError.stateFile(path: lockFileURL.path, reason: String(cString: strerror(errno)))
        }
        defer { close(fd) }  // closing releases the lock
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else {
                throw BridgeError.stateFile(path: lockFileURL.path, reason: "flock: \(String(cString: strerror(errno)))")
            }
        }
        return try body()
    }
}
