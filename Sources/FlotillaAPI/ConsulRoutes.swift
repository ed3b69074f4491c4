import FlotillaControl
import FlotillaCore
public import FlotillaRegistry
import Foundation
public import Hummingbird
import HTTPTypes
import NIOCore

/// Consul's HTTP API v1 over the registry and the KV store: catalog, health, agent, status and KV,
/// with Consul's field names, blocking queries (`index`, `wait`) and headers
/// (`X-Consul-Index`, `X-Consul-KnownLeader`, `X-Consul-LastContact`).
public struct ConsulRoutes: Sendable {
    let registry: Registry
    let kv: KeyValueStore
    let sessions: SessionStore
    let events = UserEvents()
    let serverAddress: String
    let version: String

    /// Who leads (nil: this agent alone, always).
    let cluster: ClusterView?

    public init(
        registry: Registry, kv: KeyValueStore, sessions: SessionStore, serverAddress: String, version: String, cluster: ClusterView? = nil
    ) {
        self.cluster = cluster
        self.registry = registry
        self.kv = kv
        self.sessions = sessions
        self.serverAddress = serverAddress
        self.version = version
    }

    static let defaultWait: Double = 300
    static let maximumWait: Double = 600

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/v1/catalog/services") { request, _ in await handle { try await catalogServices(request) } }
        router.get("/v1/catalog/service/**") { request, _ in await handle { try await catalogService(request) } }
        router.get("/v1/catalog/nodes") { request, _ in await handle { try await catalogNodes(request) } }
        router.get("/v1/catalog/node/**") { request, _ in await handle { try await catalogNode(request) } }
        router.get("/v1/catalog/datacenters") { _, _ in APIResponse.json(.array([.string(registry.datacenter)])) }
        router.get("/v1/health/service/**") { request, _ in await handle { try await healthService(request) } }
        router.get("/v1/health/checks/**") { request, _ in await handle { try await healthChecks(request) } }
        router.get("/v1/health/state/**") { request, _ in await handle { try await healthState(request) } }
        router.get("/v1/health/node/**") { request, _ in await handle { try await healthNode(request) } }
        router.get("/v1/agent/self") { _, _ in agentSelf() }
        router.get("/v1/agent/members") { _, _ in await members() }
        router.get("/v1/agent/services") { request, _ in await handle { try await agentServices(request) } }
        router.get("/v1/agent/checks") { request, _ in await handle { try await agentChecks(request) } }
        router.put("/v1/agent/service/register") { request, _ in await handle { try await register(request) } }
        router.put("/v1/agent/service/deregister/**") { request, _ in await handle { try await deregister(request) } }
        router.get("/v1/agent/service/**") { request, _ in await handle { try await agentService(request) } }
        router.put("/v1/agent/service/maintenance/**") { request, _ in await handle { try await maintenance(request, service: true) } }
        router.put("/v1/agent/maintenance") { request, _ in await handle { try await maintenance(request, service: false) } }
        router.put("/v1/agent/check/register") { request, _ in await handle { try await registerCheck(request) } }
        router.put("/v1/agent/check/deregister/**") { request, _ in await handle { try await deregisterCheck(request) } }
        router.put("/v1/catalog/register") { request, _ in await handle { try await catalogRegister(request) } }
        router.put("/v1/catalog/deregister") { request, _ in await handle { try await catalogDeregister(request) } }
        router.put("/v1/event/fire/**") { request, _ in await handle { try await fireEvent(request) } }
        router.get("/v1/event/list") { request, _ in await handle { try await listEvents(request) } }
        for action in ["pass", "warn", "fail", "update"] {
            router.put("/v1/agent/check/\(action)/**") { request, _ in await handle { try await updateCheck(request, action: action) } }
        }
        router.get("/v1/status/leader") { _, _ in APIResponse.json(.string(self.leaderServerAddress ?? "")) }
        router.get("/v1/status/peers") { _, _ in APIResponse.json(.array([.string("\(serverAddress)")])) }
        router.put("/v1/session/create") { request, _ in await handle { try await createSession(request) } }
        router.put("/v1/session/destroy/**") { request, _ in await handle { try await destroySession(request) } }
        router.put("/v1/session/renew/**") { request, _ in await handle { try await renewSession(request) } }
        router.get("/v1/session/info/**") { request, _ in await handle { try await listSessions(request, prefix: "/v1/session/info/") } }
        router.get("/v1/session/node/**") { request, _ in await handle { try await listSessions(request, prefix: "/v1/session/node/") } }
        router.get("/v1/session/list") { request, _ in await handle { try await listSessions(request, prefix: nil) } }
        router.put("/v1/txn") { request, _ in await handle { try await transaction(request) } }
        for method in [HTTPRequest.Method.get, .put, .delete] {
            // `/v1/kv/` itself (the whole store, with ?recurse or ?keys) and every key below it.
            router.on("/v1/kv", method: method) { request, _ in await handle { try await keyValue(request) } }
            router.on("/v1/kv/**", method: method) { request, _ in await handle { try await keyValue(request) } }
        }
    }

    /// Consul answers errors as plain text.
    private func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch let error as FlotillaError {
            let status: HTTPResponse.Status
            switch error {
            case .malformed, .badRequest: status = .badRequest
            case .invalid(let message, _): return text(message.contains("byte limit") ? .contentTooLarge : .badRequest, error.description)
            case .notFound: status = .notFound
            case .conflict: status = .conflict
            case .unavailable: status = .serviceUnavailable
            }
            return text(status, error.message)
        } catch let error as CatalogError {
            return text(.internalServerError, error.description)
        } catch let error as SessionError {
            return text(.internalServerError, error.description)
        } catch let error as KeyValueStore.LockError {
            return text(.internalServerError, error.description)
        } catch let error as any HTTPResponseError where error.status == .contentTooLarge {
            return text(.contentTooLarge, "Request body too large")
        } catch {
            return text(.internalServerError, "\(error)")
        }
    }

    private func text(_ status: HTTPResponse.Status, _ message: String) -> Response {
        Response(status: status, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(byteBuffer: ByteBuffer(string: message + "\n")))
    }

    // MARK: - Blocking queries

    struct QueryOptions {
        var index: UInt64?
        var wait: Duration
        var datacenter: String?
    }

    private func options(_ request: Request) throws(FlotillaError) -> QueryOptions {
        var index: UInt64?
        if let text = request.formValue("index") {
            guard let value = UInt64(text) else { throw .badRequest("Invalid index: '\(text)' is not a number") }
            index = value
        }
        var waitSeconds = Self.defaultWait
        if let text = request.formValue("wait") {
            guard let value = GoDuration.seconds(text) else { throw .badRequest("Invalid wait time: '\(text)'; use a duration such as 30s or 5m") }
            waitSeconds = min(value, Self.maximumWait)
        }
        // Consul adds up to wait/16 of jitter so many watchers do not return together.
        waitSeconds += Double.random(in: 0...(waitSeconds / 16))
        let datacenter = request.formValue("dc")
        if let datacenter, !datacenter.isEmpty, datacenter != registry.datacenter {
            throw .notFound("No path to datacenter '\(datacenter)'")
        }
        return QueryOptions(index: index, wait: .milliseconds(Int64(waitSeconds * 1000)), datacenter: datacenter)
    }

    private func blocking(_ request: Request, topic: RegistryTopic) async throws -> RegistryView {
        let options = try options(request)
        return await registry.view(waitingFor: topic, after: options.index, wait: options.wait)
    }

    private func json(_ value: JSONValue, index: UInt64) -> Response {
        APIResponse.json(value, headers: consulHeaders(index: index))
    }

    private func consulHeaders(index: UInt64) -> HTTPFields {
        [
            HTTPField.Name("X-Consul-Index")!: "\(index)", HTTPField.Name("X-Consul-KnownLeader")!: leaderServerAddress == nil ? "false" : "true",
            HTTPField.Name("X-Consul-LastContact")!: "0",
        ]
    }

    /// The leader as Consul names a server (`address:8300`); "" from `/v1/status/leader` while none
    /// is elected, as Consul answers.
    private var leaderServerAddress: String? {
        guard let cluster else { return serverAddress }
        guard let leader = cluster.leader else { return nil }
        let host = ClusterView.hostPort(of: leader.api)
        let bare = host.hasPrefix("[") ? String(host.prefix { $0 != "]" }) + "]" : String(host.prefix { $0 != ":" })
        return bare + ":8300"
    }

    /// The path after `prefix`, percent-decoded.
    private func tail(_ request: Request, after prefix: String) throws(FlotillaError) -> String {
        let path = request.uri.path
        guard path.hasPrefix(prefix) else { throw .notFound("no such resource") }
        let raw = String(path.dropFirst(prefix.count))
        guard let decoded = raw.removingPercentEncoding else { throw .badRequest("the path is not valid percent-encoding") }
        return decoded
    }

    private func requireName(_ request: Request, after prefix: String, what: String) throws(FlotillaError) -> String {
        let name = try tail(request, after: prefix).trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        guard !name.isEmpty else { throw .badRequest("Missing \(what) name") }
        return name
    }

    // MARK: - Catalog

    private func catalogServices(_ request: Request) async throws -> Response {
        let view = try await blocking(request, topic: .services)
        var services: [String: Set<String>] = [:]
        for entry in view.services { services[entry.name, default: []].formUnion(entry.tags) }
        let body = JSONValue.object(services.mapValues { .array($0.sorted().map(JSONValue.string)) })
        return json(body, index: view.index(of: .services))
    }

    private func catalogService(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/catalog/service/", what: "service")
        let view = try await blocking(request, topic: .service(name))
        let tags = request.formValues("tag")
        let entries = view.services(named: name).filter { entry in tags.allSatisfy(entry.tags.contains) }
        let nodes = Dictionary(view.nodes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let body = JSONValue.array(entries.map { entry in
            let node = nodes[entry.node] ?? CatalogNode(name: entry.node, address: entry.address, meta: [:])
            var object = nodeFields(node, datacenter: view.datacenter)
            object["NodeMeta"] = object.removeValue(forKey: "Meta")
            object["ServiceID"] = .string(entry.id)
            object["ServiceName"] = .string(entry.name)
            object["ServiceTags"] = .array(entry.tags.map(JSONValue.string))
            object["ServiceAddress"] = .string(entry.address)
            object["ServicePort"] = .number(Double(entry.port))
            object["ServiceMeta"] = .object(entry.meta.mapValues(JSONValue.string))
            object["ServiceKind"] = .string("")
            object["ServiceWeights"] = .object(["Passing": .number(1), "Warning": .number(1)])
            object["ServiceEnableTagOverride"] = .bool(false)
            object["ServiceTaggedAddresses"] = .object([:])
            object["CreateIndex"] = .number(Double(entry.createIndex))
            object["ModifyIndex"] = .number(Double(entry.modifyIndex))
            return .object(object)
        })
        return json(body, index: view.index(of: .service(name)))
    }

    private func catalogNodes(_ request: Request) async throws -> Response {
        let view = try await blocking(request, topic: .nodes)
        let body = JSONValue.array(view.nodes.map { node in
            var object = nodeFields(node, datacenter: view.datacenter)
            object["CreateIndex"] = .number(1)
            object["ModifyIndex"] = .number(Double(view.index(of: .node(node.name))))
            return .object(object)
        })
        return json(body, index: view.index(of: .nodes))
    }

    private func catalogNode(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/catalog/node/", what: "node")
        let view = try await blocking(request, topic: .node(name))
        guard let node = view.node(named: name) else { return json(.null, index: view.index(of: .node(name))) }
        var services: [String: JSONValue] = [:]
        for entry in view.services where entry.node == node.name { services[entry.id] = serviceFields(entry) }
        return json(.object(["Node": .object(nodeFields(node, datacenter: view.datacenter)), "Services": .object(services)]), index: view.index(of: .node(name)))
    }

    // MARK: - Health

    private func healthService(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/health/service/", what: "service")
        let view = try await blocking(request, topic: .service(name))
        let tags = request.formValues("tag")
        let passingOnly = try request.flag("passing")
        let nodes = Dictionary(view.nodes.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let entries = view.services(named: name).filter { entry in
            tags.allSatisfy(entry.tags.contains) && (!passingOnly || view.status(of: entry) == .passing)
        }
        let body = JSONValue.array(entries.map { entry in
            let node = nodes[entry.node] ?? CatalogNode(name: entry.node, address: entry.address, meta: [:])
            let checks = view.checks(ofNode: node) + entry.checks
            return .object([
                "Node": .object(nodeFields(node, datacenter: view.datacenter)),
                "Service": serviceFields(entry),
                "Checks": .array(checks.map(checkFields)),
            ])
        })
        return json(body, index: view.index(of: .service(name)))
    }

    private func healthChecks(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/health/checks/", what: "service")
        let view = try await blocking(request, topic: .service(name))
        let checks = view.services(named: name).flatMap(\.checks)
        return json(.array(checks.map(checkFields)), index: view.index(of: .service(name)))
    }

    private func healthState(_ request: Request) async throws -> Response {
        let state = try requireName(request, after: "/v1/health/state/", what: "state")
        guard ["any", "passing", "warning", "critical"].contains(state) else {
            throw FlotillaError.badRequest("Invalid state '\(state)': use any, passing, warning or critical")
        }
        let view = try await blocking(request, topic: .checks)
        let checks = view.allChecks
        let selected = checks.filter { state == "any" || $0.status.rawValue == state }
        return json(.array(selected.map(checkFields)), index: view.index(of: .checks))
    }

    private func healthNode(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/health/node/", what: "node")
        let view = try await blocking(request, topic: .node(name))
        guard let node = view.node(named: name) else { return json(.array([]), index: view.index(of: .node(name))) }
        let checks = view.checks(ofNode: node) + view.services.filter { $0.node == node.name }.flatMap(\.checks)
        return json(.array(checks.map(checkFields)), index: view.index(of: .node(name)))
    }

    // MARK: - Agent

    private func agentSelf() -> Response {
        APIResponse.json(
            .object([
                "Config": .object([
                    "Datacenter": .string(registry.datacenter), "NodeName": .string(registry.localNode),
                    "NodeID": .string(nodeID(registry.localNode)), "Server": .bool(true), "Version": .string(version),
                    "Revision": .string("flotilla"), "PrimaryDatacenter": .string(registry.datacenter),
                ]),
                "Member": member(),
                "Meta": .object([:]),
                "Stats": .object([:]),
            ]))
    }

    private func member(name: String? = nil, address: String? = nil, alive: Bool = true) -> JSONValue {
        .object([
            "Name": .string(name ?? registry.localNode), "Addr": .string(address ?? registry.localAddress), "Port": .number(8301),
            "Tags": .object(["dc": .string(registry.datacenter), "role": .string("consul"), "build": .string(version)]),
            // Serf's member status: 1 alive, 4 failed.
            "Status": .number(alive ? 1 : 4), "ProtocolMin": .number(1), "ProtocolMax": .number(5), "ProtocolCur": .number(2),
            "DelegateMin": .number(2), "DelegateMax": .number(5), "DelegateCur": .number(4),
        ])
    }

    /// The cluster's agents (this one always), alive or failed, as Consul's LAN members.
    private func members() async -> Response {
        let view = await registry.currentView()
        var list = [member()]
        for node in view.nodes where node.name != registry.localNode && node.isAgent {
            list.append(member(name: node.name, address: node.address, alive: node.alive))
        }
        return APIResponse.json(.array(list))
    }

    /// Not a blocking query in Consul (its docs say so): `index` and `wait` are ignored.
    private func agentServices(_ request: Request) async throws -> Response {
        let view = await registry.currentView()
        var services: [String: JSONValue] = [:]
        for entry in view.services where entry.node == registry.localNode {
            var object = serviceFields(entry).objectValue ?? [:]
            object["Datacenter"] = .string(view.datacenter)
            services[entry.id] = .object(object)
        }
        return json(.object(services), index: view.index(of: .services))
    }

    /// Not a blocking query in Consul either.
    private func agentChecks(_ request: Request) async throws -> Response {
        let view = await registry.currentView()
        var checks: [String: JSONValue] = [:]
        let nodeChecks = view.node(named: registry.localNode).map(view.checks(ofNode:)) ?? []
        for check in nodeChecks + view.services.filter({ $0.node == registry.localNode }).flatMap(\.checks) {
            checks[check.checkID] = checkFields(check)
        }
        return json(.object(checks), index: view.index(of: .checks))
    }

    private func register(_ request: Request) async throws -> Response {
        var request = request
        let buffer = try await request.collectBody(upTo: 1 << 20)
        let value = try JSONValue.parse(Data(buffer.readableBytesView))
        guard case .object(let raw) = value else { throw FlotillaError.badRequest("the body must be a JSON object") }
        let service = try ServiceRegistration.parse(raw, node: registry.localNode, address: registry.localAddress)
        // Consul turns `replace-existing-checks` on only for an empty value or "true".
        let replace = request.formValues("replace-existing-checks").first.map { $0.isEmpty || $0 == "true" } ?? false
        if !replace, let existing = await registry.externalServices().first(where: { $0.id == service.id }) {
            // Checks that survive the re-registration keep their state, and the service's checks
            // the body leaves out stay (as in Consul, unless replace-existing-checks).
            var merged = service
            merged.checks = service.checks.map { check in
                guard let old = existing.checks.first(where: { $0.id == check.id }) else { return check }
                var kept = check
                kept.status = old.status
                kept.output = old.output
                kept.updatedAt = old.updatedAt
                kept.criticalSince = old.criticalSince
                return kept
            }
            merged.checks += existing.checks.filter { old in !service.checks.contains { $0.id == old.id } }
            try await registry.register(merged)
        } else {
            try await registry.register(service)
        }
        return Response(status: .ok)
    }

    /// `GET /v1/agent/service/<id>`, with Consul's hash-based blocking: `?hash=` waits until the
    /// service's content hash differs (or `wait` passes).
    private func agentService(_ request: Request) async throws -> Response {
        let id = try requireName(request, after: "/v1/agent/service/", what: "service ID")
        let options = try options(request)
        let seenHash = request.formValue("hash")
        let deadline = ContinuousClock.now + options.wait
        var view = await registry.currentView()
        while true {
            guard let entry = view.services.first(where: { $0.id == id && $0.node == registry.localNode }) else {
                return text(.notFound, "unknown service ID: \(id)")
            }
            var object = serviceFields(entry).objectValue ?? [:]
            object["Datacenter"] = .string(view.datacenter)
            object["Kind"] = .string("")
            let hash = String(fnv1a(JSONValue.object(object).serialized()), radix: 16)
            let left = deadline - ContinuousClock.now
            if let seenHash, seenHash == hash, left > .zero {
                view = await registry.view(waitingFor: .node(registry.localNode), after: view.index(of: .node(registry.localNode)), wait: left)
                continue
            }
            object["ContentHash"] = .string(hash)
            return APIResponse.json(.object(object), headers: [HTTPField.Name("X-Consul-ContentHash")!: hash])
        }
    }

    private func maintenance(_ request: Request, service: Bool) async throws -> Response {
        let id = service ? try requireName(request, after: "/v1/agent/service/maintenance/", what: "service ID") : nil
        guard let text = request.formValue("enable") else { throw FlotillaError.badRequest("Missing value for enable") }
        let enabled: Bool
        switch text.lowercased() {
        case "1", "t", "true": enabled = true
        case "0", "f", "false": enabled = false
        default: throw FlotillaError.badRequest("Invalid value for enable: \"\(text)\"")
        }
        try await registry.setMaintenance(serviceID: id, enabled: enabled, reason: request.formValue("reason"))
        return Response(status: .ok)
    }

    private func registerCheck(_ request: Request) async throws -> Response {
        let (check, serviceID) = try ServiceRegistration.parseCheckRegistration(try await bodyObject(request))
        try await registry.registerCheck(check, serviceID: serviceID)
        return Response(status: .ok)
    }

    private func deregisterCheck(_ request: Request) async throws -> Response {
        let id = try requireName(request, after: "/v1/agent/check/deregister/", what: "check ID")
        try await registry.deregisterCheck(id)
        return Response(status: .ok)
    }

    /// `PUT /v1/catalog/register`: `{Node, Address, NodeMeta, Service, Check, Checks, SkipNodeUpdate}`.
    private func catalogRegister(_ request: Request) async throws -> Response {
        let body = try await bodyObject(request)
        let fields = Dictionary(body.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
        let known: Set<String> = [
            "datacenter", "id", "node", "address", "taggedaddresses", "tagged_addresses", "nodemeta", "service", "check", "checks",
            "skipnodeupdate",
        ]
        if let unknown = fields.keys.sorted().first(where: { !known.contains($0) }) {
            throw FlotillaError.badRequest("Request decode failed: json: unknown field \"\(unknown)\"")
        }
        if let datacenter = fields["datacenter"]?.stringValue, !datacenter.isEmpty, datacenter != registry.datacenter {
            throw FlotillaError.notFound("No path to datacenter '\(datacenter)'")
        }
        guard let node = fields["node"]?.stringValue, !node.isEmpty else { throw CatalogError("Must provide node") }
        let skipNodeUpdate = fields["skipnodeupdate"] == .bool(true)
        let address = fields["address"]?.stringValue ?? ""
        if address.isEmpty && !skipNodeUpdate && node != registry.localNode {
            throw CatalogError("Must provide address if SkipNodeUpdate is not set")
        }
        var meta: [String: String] = [:]
        if case .object(let object)? = fields["nodemeta"] { for (key, value) in object { meta[key] = value.stringValue ?? "" } }
        // py-consul sends node meta as `?node-meta=key:value`.
        for pair in request.formValues("node-meta") {
            let parts = pair.split(separator: ":", maxSplits: 1).map(String.init)
            if parts.count == 2 { meta[parts[0]] = parts[1] }
        }
        var service: ExternalService?
        if case .object(let object)? = fields["service"] {
            var definition = object
            let serviceFields = Dictionary(object.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
            if serviceFields["name"] == nil, let name = serviceFields["service"] { definition["Name"] = name }
            definition.removeValue(forKey: "Service")
            definition.removeValue(forKey: "service")
            service = try ServiceRegistration.parse(definition, node: node, address: address.isEmpty ? registry.localAddress : address)
        }
        var checkBodies: [[String: JSONValue]] = []
        if case .object(let object)? = fields["check"] { checkBodies.append(object) }
        if case .array(let items)? = fields["checks"] { checkBodies += items.compactMap(\.objectValue) }
        var checks: [(check: ExternalCheck, serviceID: String?)] = []
        for raw in checkBodies {
            let check = Dictionary(raw.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
            guard let name = check["name"]?.stringValue, !name.isEmpty else { throw CatalogError("Missing check name") }
            let id = check["checkid"]?.stringValue ?? check["id"]?.stringValue ?? name
            var status = CheckStatus.critical
            if let text = check["status"]?.stringValue, !text.isEmpty {
                guard let parsed = CheckStatus(rawValue: text) else { throw FlotillaError.badRequest("Bad check status") }
                status = parsed
            }
            let catalogCheck = ExternalCheck.reported(
                id: id, name: name, status: status, notes: check["notes"]?.stringValue ?? "", output: check["output"]?.stringValue ?? "")
            checks.append((catalogCheck, check["serviceid"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }))
        }
        try await registry.catalogRegister(
            node: ExternalNode(name: node, address: address, meta: meta), skipNodeUpdate: skipNodeUpdate, service: service, checks: checks)
        return APIResponse.json(.bool(true))
    }

    private func catalogDeregister(_ request: Request) async throws -> Response {
        let body = try await bodyObject(request)
        let fields = Dictionary(body.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
        guard let node = fields["node"]?.stringValue, !node.isEmpty else { throw CatalogError("Must provide node") }
        try await registry.catalogDeregister(
            node: node, serviceID: fields["serviceid"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 },
            checkID: fields["checkid"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 })
        return APIResponse.json(.bool(true))
    }

    // MARK: - Events

    private func fireEvent(_ request: Request) async throws -> Response {
        let name = try requireName(request, after: "/v1/event/fire/", what: "")
        let service = request.formValue("service") ?? ""
        let tag = request.formValue("tag") ?? ""
        let node = request.formValue("node") ?? ""
        if !tag.isEmpty && service.isEmpty { throw CatalogError("Cannot provide tag filter without service filter") }
        if !node.isEmpty, (try? NSRegularExpression(pattern: node)) == nil { throw CatalogError("Invalid node filter: '\(node)'") }
        var request = request
        let buffer = try await request.collectBody(upTo: 100 * 1024)
        let event = await events.fire(
            name: name, payload: buffer.readableBytes > 0 ? Data(buffer.readableBytesView) : nil, nodeFilter: node, serviceFilter: service,
            tagFilter: tag)
        var fields = eventFields(event).objectValue ?? [:]
        fields["LTime"] = .number(0)
        return APIResponse.json(.object(fields))
    }

    private func listEvents(_ request: Request) async throws -> Response {
        let options = try options(request)
        let name = request.formValue("name")
        await events.waitForChange(name: name, seen: options.index, wait: options.wait)
        let list = await events.list(name: name)
        return json(.array(list.map(eventFields)), index: await events.index(name: name))
    }

    private func eventFields(_ event: UserEvents.Event) -> JSONValue {
        .object([
            "ID": .string(event.id), "Name": .string(event.name), "Payload": event.payload.map { .string($0.base64EncodedString()) } ?? .null,
            "NodeFilter": .string(event.nodeFilter), "ServiceFilter": .string(event.serviceFilter), "TagFilter": .string(event.tagFilter),
            "Version": .number(1), "LTime": .unsigned(event.lamportTime),
        ])
    }

    private func bodyObject(_ request: Request) async throws -> [String: JSONValue] {
        var request = request
        let buffer = try await request.collectBody(upTo: 1 << 20)
        guard buffer.readableBytes > 0 else { return [:] }
        guard case .object(let object) = try JSONValue.parse(Data(buffer.readableBytesView)) else {
            throw FlotillaError.badRequest("Request decode failed: the body must be a JSON object")
        }
        return object
    }

    private func deregister(_ request: Request) async throws -> Response {
        let id = try requireName(request, after: "/v1/agent/service/deregister/", what: "service ID")
        try await registry.deregister(id)
        return Response(status: .ok)
    }

    private func updateCheck(_ request: Request, action: String) async throws -> Response {
        let id = try requireName(request, after: "/v1/agent/check/\(action)/", what: "check ID")
        let note = request.formValue("note") ?? ""
        switch action {
        case "pass": try await registry.updateCheck(id, status: .passing, output: note)
        case "warn": try await registry.updateCheck(id, status: .warning, output: note)
        case "fail": try await registry.updateCheck(id, status: .critical, output: note)
        default:
            var request = request
            let buffer = try await request.collectBody(upTo: 1 << 20)
            let value = try JSONValue.parse(Data(buffer.readableBytesView))
            guard case .object(let object) = value else { throw FlotillaError.badRequest("the body must be a JSON object") }
            let fields = Dictionary(object.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
            guard let statusText = fields["status"]?.stringValue, let status = CheckStatus(rawValue: statusText) else {
                throw FlotillaError.badRequest("Status must be passing, warning or critical")
            }
            try await registry.updateCheck(id, status: status, output: fields["output"]?.stringValue ?? "")
        }
        return Response(status: .ok)
    }

    // MARK: - KV

    private func keyValue(_ request: Request) async throws -> Response {
        let key = request.uri.path == "/v1/kv" ? "" : try tail(request, after: "/v1/kv/")
        try KeyValueStore.validate(key)
        let query = request.uri.queryParameters
        func number(_ name: String) throws(FlotillaError) -> UInt64? {
            guard let text = request.formValue(name) else { return nil }
            guard let value = UInt64(text) else { throw .badRequest("Invalid \(name): '\(text)' is not a number") }
            return value
        }
        switch request.method {
        case .get:
            let options = try options(request)
            let recurse = try request.flag("recurse")
            let keysOnly = query["keys"] != nil
            if key.isEmpty && !recurse && !keysOnly { throw FlotillaError.badRequest("Missing key name") }
            let read = try await kv.get(key, recurse: recurse || keysOnly, after: options.index, wait: options.wait)
            let headers = consulHeaders(index: read.index)
            if keysOnly {
                let separator = request.formValue("separator") ?? ""
                var keys: [String] = []
                for entry in read.entries {
                    var listed = entry.key
                    if !separator.isEmpty, let range = entry.key.dropFirst(key.count).range(of: separator) {
                        listed = String(entry.key[..<range.upperBound])
                    }
                    if keys.last != listed { keys.append(listed) }
                }
                if read.entries.isEmpty { return Response(status: .notFound, headers: headers) }
                return APIResponse.json(.array(Array(NSOrderedSet(array: keys)).compactMap { ($0 as? String).map(JSONValue.string) }), headers: headers)
            }
            guard !read.entries.isEmpty else { return Response(status: .notFound, headers: headers) }
            if query["raw"] != nil, let first = read.entries.first {
                var rawHeaders = headers
                rawHeaders[.contentType] = "application/octet-stream"
                return Response(status: .ok, headers: rawHeaders, body: ResponseBody(byteBuffer: ByteBuffer(bytes: first.value)))
            }
            let body = JSONValue.array(read.entries.map { entryFields($0, valueShown: true) })
            return APIResponse.json(body, headers: headers)
        case .put:
            guard !key.isEmpty else { throw FlotillaError.badRequest("Missing key name") }
            let acquire = request.formValue("acquire")
            let release = request.formValue("release")
            let cas = try number("cas")
            if [acquire != nil, release != nil, cas != nil].filter({ $0 }).count > 1 {
                throw FlotillaError.badRequest("Conflicting flags: use only one of cas, acquire and release")
            }
            var request = request
            let buffer = try await request.collectBody(upTo: KeyValueStore.maximumValueBytes + 1)
            if buffer.readableBytes > KeyValueStore.maximumValueBytes {
                return text(.contentTooLarge, "Value exceeds \(KeyValueStore.maximumValueBytes) byte limit")
            }
            let value = Data(buffer.readableBytesView)
            let flags = try number("flags") ?? 0
            let written: Bool
            if let acquire {
                written = try await kv.acquire(key, value: value, flags: flags, session: acquire)
            } else if let release {
                written = try await kv.release(key, value: value, flags: flags, session: release)
            } else {
                written = try await kv.put(key, value: value, flags: flags, cas: cas)
            }
            return APIResponse.json(.bool(written))
        default:
            let recurse = try request.flag("recurse")
            if key.isEmpty && !recurse { throw FlotillaError.badRequest("Missing key name") }
            let deleted = try await kv.delete(key, recurse: recurse, cas: try number("cas"))
            return APIResponse.json(.bool(deleted))
        }
    }

    // MARK: - Sessions

    private func createSession(_ request: Request) async throws -> Response {
        var request = request
        let buffer = try await request.collectBody(upTo: 1 << 20)
        var body: [String: JSONValue] = [:]
        if buffer.readableBytes > 0 {
            guard case .object(let object) = try JSONValue.parse(Data(buffer.readableBytesView)) else {
                throw FlotillaError.badRequest("Request decode failed: the body must be a JSON object")
            }
            body = object
        }
        let id = try await sessions.create(body)
        return APIResponse.json(.object(["ID": .string(id)]))
    }

    private func destroySession(_ request: Request) async throws -> Response {
        let id = try tail(request, after: "/v1/session/destroy/")
        guard !id.isEmpty else { throw FlotillaError.badRequest("Missing session") }
        try await sessions.destroy(id)
        return APIResponse.json(.bool(true))
    }

    private func renewSession(_ request: Request) async throws -> Response {
        let id = try tail(request, after: "/v1/session/renew/")
        guard !id.isEmpty else { throw FlotillaError.badRequest("Missing session") }
        guard let session = await sessions.renew(id) else { return text(.notFound, "Session id '\(id)' not found") }
        return APIResponse.json(.array([sessionFields(session)]))
    }

    /// `info/<id>`, `node/<node>` and `list`, each a blocking query over every session's changes.
    private func listSessions(_ request: Request, prefix: String?) async throws -> Response {
        let options = try options(request)
        let argument = try prefix.map { try tail(request, after: $0) }
        if let prefix, argument?.isEmpty != false {
            throw FlotillaError.badRequest(prefix.contains("node") ? "Missing node name" : "Missing session")
        }
        await sessions.waitForChange(after: options.index, wait: options.wait)
        let selected: [ConsulSession]
        switch prefix {
        case "/v1/session/info/"?: selected = await sessions.info(argument!)
        case "/v1/session/node/"?: selected = await sessions.sessions(onNode: argument!)
        default: selected = await sessions.list()
        }
        return json(.array(selected.map(sessionFields)), index: await sessions.currentIndex())
    }

    private func sessionFields(_ session: ConsulSession) -> JSONValue {
        .object([
            "ID": .string(session.id), "Name": .string(session.name), "Node": .string(session.node),
            "LockDelay": .unsigned(session.lockDelayNanoseconds), "Behavior": .string(session.behavior.rawValue), "TTL": .string(session.ttl),
            "NodeChecks": .array(session.nodeChecks.map(JSONValue.string)),
            "ServiceChecks": session.serviceChecks.isEmpty ? .null : .array(session.serviceChecks.map { .object(["ID": .string($0), "Namespace": .string("")]) }),
            "CreateIndex": .unsigned(session.createIndex), "ModifyIndex": .unsigned(session.createIndex),
        ])
    }

    // MARK: - Transactions

    private func transaction(_ request: Request) async throws -> Response {
        var request = request
        let buffer = try await request.collectBody(upTo: KeyValueStore.maximumValueBytes * 2)
        guard case .array(let items) = (try? JSONValue.parse(Data(buffer.readableBytesView))) ?? .null else {
            throw FlotillaError.badRequest("Failed to parse body: a transaction is a JSON array of operations")
        }
        if items.count > KeyValueStore.maximumTransactionOperations {
            return text(.contentTooLarge, "Transaction contains too many operations (\(items.count) > \(KeyValueStore.maximumTransactionOperations))")
        }
        var operations: [KeyValueStore.TransactionOperation] = []
        for item in items {
            let object = Dictionary((item.objectValue ?? [:]).map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
            guard case .object(let raw)? = object["kv"] else {
                if object["node"] != nil || object["service"] != nil || object["check"] != nil {
                    throw FlotillaError.badRequest("Failed to parse body: only KV operations are supported in transactions here (Node, Service and Check operations are not)")
                }
                throw FlotillaError.badRequest("Failed to parse body: no operation specified")
            }
            let fields = Dictionary(raw.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { first, _ in first })
            let verbText = fields["verb"]?.stringValue ?? ""
            guard let verb = KeyValueStore.TransactionOperation.Verb(rawValue: verbText) else {
                throw FlotillaError.badRequest("Failed to parse body: unknown KV verb \"\(verbText)\"")
            }
            var value = Data()
            if let encoded = fields["value"]?.stringValue {
                guard let decoded = Data(base64Encoded: encoded) else { throw FlotillaError.badRequest("Failed to parse body: Value is not base64") }
                value = decoded
            }
            if value.count > KeyValueStore.maximumValueBytes {
                return text(.contentTooLarge, "Value for key \"\(fields["key"]?.stringValue ?? "")\" is too large (\(value.count) > \(KeyValueStore.maximumValueBytes) bytes)")
            }
            func unsigned(_ name: String) throws(FlotillaError) -> UInt64 {
                guard let field = fields[name], field != .null else { return 0 }
                switch field {
                case .number(let number) where number >= 0 && number.rounded() == number: return UInt64(number)
                case .unsigned(let number): return number
                default: throw .badRequest("Failed to parse body: \(name) must be a whole number")
                }
            }
            let key = fields["key"]?.stringValue ?? ""
            try KeyValueStore.validate(key)
            operations.append(
                KeyValueStore.TransactionOperation(
                    verb: verb, key: key, value: value, flags: try unsigned("flags"), index: try unsigned("index"),
                    session: fields["session"]?.stringValue ?? ""))
        }
        switch try await kv.transaction(operations) {
        case .committed(let results):
            let body = JSONValue.object([
                "Results": .array(results.map { .object(["KV": entryFields($0.entry, valueShown: $0.valueShown)]) }), "Errors": .null,
            ])
            return APIResponse.json(body)
        case .failed(let errors):
            let body = JSONValue.object([
                "Results": .null,
                "Errors": .array(errors.map { .object(["OpIndex": .number(Double($0.operation)), "What": .string($0.what)]) }),
            ])
            return APIResponse.json(body, status: .conflict)
        }
    }

    // MARK: - Shapes

    private func entryFields(_ entry: KeyValueStore.Entry, valueShown: Bool) -> JSONValue {
        var object: [String: JSONValue] = [
            "LockIndex": .unsigned(entry.lockIndex), "Key": .string(entry.key), "Flags": .unsigned(entry.flags),
            "Value": !valueShown || entry.value.isEmpty ? .null : .string(entry.value.base64EncodedString()),
            "CreateIndex": .unsigned(entry.createIndex), "ModifyIndex": .unsigned(entry.modifyIndex),
        ]
        if let session = entry.session { object["Session"] = .string(session) }
        return .object(object)
    }

    private func nodeID(_ name: String) -> String {
        // A stable UUID-shaped id per node name.
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let hex = String(format: "%016llx%016llx", hash, hash.byteSwapped)
        let characters = Array(hex)
        return "\(String(characters[0..<8]))-\(String(characters[8..<12]))-\(String(characters[12..<16]))-\(String(characters[16..<20]))-\(String(characters[20..<32]))"
    }

    private func nodeFields(_ node: CatalogNode, datacenter: String) -> [String: JSONValue] {
        [
            "ID": .string(nodeID(node.name)), "Node": .string(node.name), "Address": .string(node.address), "Datacenter": .string(datacenter),
            "TaggedAddresses": .object(["lan": .string(node.address), "wan": .string(node.address)]),
            "Meta": .object(node.meta.mapValues(JSONValue.string)),
        ]
    }

    private func serviceFields(_ entry: CatalogService) -> JSONValue {
        .object([
            "ID": .string(entry.id), "Service": .string(entry.name), "Tags": .array(entry.tags.map(JSONValue.string)),
            "Address": .string(entry.address), "Port": .number(Double(entry.port)), "Meta": .object(entry.meta.mapValues(JSONValue.string)),
            "Weights": .object(["Passing": .number(1), "Warning": .number(1)]), "EnableTagOverride": .bool(false),
            "CreateIndex": .number(Double(entry.createIndex)), "ModifyIndex": .number(Double(entry.modifyIndex)),
        ])
    }

    private func checkFields(_ check: CatalogCheck) -> JSONValue {
        .object([
            "Node": .string(check.node), "CheckID": .string(check.checkID), "Name": .string(check.name), "Status": .string(check.status.rawValue),
            "Notes": .string(check.notes), "Output": .string(check.output), "ServiceID": .string(check.serviceID),
            "ServiceName": .string(check.serviceName), "ServiceTags": .array(check.serviceTags.map(JSONValue.string)), "Type": .string(check.type),
            "Definition": .object([:]), "CreateIndex": .number(Double(check.createIndex)), "ModifyIndex": .number(Double(check.modifyIndex)),
        ])
    }
}


/// A catalog or event request Consul answers with 500 and this text.
struct CatalogError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// FNV-1a, 64 bits: the content hash of hash-based blocking queries.
func fnv1a(_ bytes: [UInt8]) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
    return hash
}
