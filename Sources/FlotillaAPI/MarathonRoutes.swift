public import FlotillaControl
public import FlotillaCore
import Foundation
public import Hummingbird
import NIOCore

/// Marathon's REST API v2 over the control plane.
public struct MarathonRoutes: Sendable {
    public static let maximumBodyBytes = 1 << 20
    /// How often a quiet `/v2/events` stream gets a comment line.
    static let eventStreamHeartbeat: Duration = .seconds(5)

    let control: ControlPlane
    let events: EventBus
    let subscriptions: EventSubscriptions?
    let info: ServerInfo
    let cache = ResponseCache()
    let fragments = AppFragments()
    let streamHub: EventStreamHub
    let startedAt = Date()

    public struct ServerInfo: Sendable {
        public var version: String
        public var leader: String
        public var nodeName: String
        public var httpPort: Int
        /// Where port-0 service ports come from (`local_port_min`/`local_port_max` in `/v2/info`).
        public var servicePortRange: ClosedRange<Int>
        public init(version: String, leader: String, nodeName: String, httpPort: Int, servicePortRange: ClosedRange<Int> = 10_000...20_000) {
            self.servicePortRange = servicePortRange
            self.version = version
            self.leader = leader
            self.nodeName = nodeName
            self.httpPort = httpPort
        }
    }

    /// Who leads (nil: this agent alone, always).
    let cluster: ClusterView?
    /// In a cluster, how a follower streams `/v2/events` from the leader (whose actions they are).
    let relay: NodeRelay?

    public init(
        control: ControlPlane, events: EventBus, info: ServerInfo, subscriptions: EventSubscriptions? = nil, cluster: ClusterView? = nil,
        relay: NodeRelay? = nil
    ) {
        self.cluster = cluster
        self.relay = relay
        self.control = control
        self.events = events
        self.streamHub = EventStreamHub(events: events)
        self.subscriptions = subscriptions
        self.info = info
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/ping") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(byteBuffer: ByteBuffer(string: "pong\n")))
        }
        router.get("/v2/info") { _, _ in self.infoResponse() }
        router.get("/v2/metrics") { _, _ in await self.metricsResponse() }
        router.get("/v2/leader") { _, _ in
            guard let leader = self.leaderAddress else {
                return APIResponse.json(.object(["message": .string("There is no leader")]), status: .notFound)
            }
            return APIResponse.json(.object(["leader": .string(leader)]))
        }
        // One node is its own leader: abdicating elects it again at once, as a lone Marathon does.
        router.delete("/v2/leader") { _, _ in APIResponse.json(.object(["message": .string("Leadership abdicated")])) }
        router.get("/v2/apps") { request, _ in await self.handle { try await self.listApps(request) } }
        router.post("/v2/apps") { request, _ in await self.handle { try await self.createApp(request) } }
        router.put("/v2/apps") { request, _ in await self.handle { try await self.updateApps(request, partial: false) } }
        router.patch("/v2/apps") { request, _ in await self.handle { try await self.updateApps(request, partial: true) } }
        for method in [HTTPRequest.Method.get, .put, .patch, .delete, .post] {
            router.on("/v2/apps/**", method: method) { request, _ in await self.handle { try await self.appResource(request) } }
        }
        for method in [HTTPRequest.Method.get, .put, .post, .delete] {
            router.on("/v2/groups", method: method) { request, _ in await self.handle { try await self.groupResource(request) } }
            router.on("/v2/groups/**", method: method) { request, _ in await self.handle { try await self.groupResource(request) } }
        }
        router.get("/v2/tasks") { request, _ in await self.handle { try await self.listTasks(request) } }
        router.post("/v2/tasks/delete") { request, _ in await self.handle { try await self.deleteTasks(request) } }
        router.get("/v2/queue") { request, _ in await self.handle { try await self.queue(request) } }
        router.delete("/v2/queue/**") { request, _ in await self.handle { try await self.resetDelay(request) } }
        router.get("/v2/deployments") { _, _ in await self.handle { try await self.listDeployments() } }
        router.delete("/v2/deployments/:id") { request, context in
            await self.handle { try await self.deleteDeployment(request, id: context.parameters.get("id") ?? "") }
        }
        router.get("/v2/events") { request, context in
            // The leader's actions make the events: a follower streams them from the leader.
            if let cluster, let relay, !cluster.isLeader, !NodeRelay.isRelayed(request) {
                guard let leader = cluster.leader else {
                    return APIResponse.json(
                        .object(["message": .string("no leader is elected yet (the cluster's servers are campaigning): retry in a few seconds")]),
                        status: .serviceUnavailable)
                }
                return await relay.get(request, to: leader.api, by: info.nodeName, what: "the event stream (on the leader \(leader.name))")
            }
            return self.eventStream(request, remoteAddress: context.remoteAddressText)
        }
        router.get("/v2/eventSubscriptions") { _, _ in
            await self.handle { APIResponse.json(.object(["callbackUrls": .array(await (try self.subscriptionsOrFail()).list().map(JSONValue.string))])) }
        }
        router.post("/v2/eventSubscriptions") { request, context in
            await self.handle { try await self.changeSubscription(request, subscribe: true, clientIP: context.remoteAddressText) }
        }
        router.delete("/v2/eventSubscriptions") { request, context in
            await self.handle { try await self.changeSubscription(request, subscribe: false, clientIP: context.remoteAddressText) }
        }
    }

    private func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch {
            return APIResponse.marathonError(error)
        }
    }

    // MARK: - Apps

    private func listApps(_ request: Request) async throws -> Response {
        let key = request.uri.description
        let generation = await control.currentGeneration()
        if let body = cache.body(for: key, generation: generation) {
            return APIResponse.json(bytes: body)
        }
        let embed = MarathonJSON.Embed.parse(request.queryValues("embed")).union([.counts, .deployments])
        let idFilter = request.uri.queryParameters["id"].map { String($0).lowercased() }
        let cmdFilter = request.uri.queryParameters["cmd"].map(String.init)
        let labelSelector = try request.uri.queryParameters["label"].map { try LabelSelector(String($0)) }
        // Each app's JSON is kept (by its embed set) until that app changes: a change re-renders
        // the apps it touched, and the rest is copied.
        let listing = await control.appListing()
        var chosen: [(AppRecord, UInt64)] = []
        for (record, stamp) in zip(listing.apps, listing.stamps) {
            if let idFilter, !record.id.path.contains(idFilter) { continue }
            if let cmdFilter, !(record.definition.cmd ?? "").contains(cmdFilter) { continue }
            if let labelSelector, !labelSelector.matches(record.definition.labels) { continue }
            chosen.append((record, stamp))
        }
        var bodies = chosen.map { fragments.body(for: $0.0.id, embed: embed, stamp: $0.1) }
        let missing = Set(zip(chosen, bodies).compactMap { $1 == nil ? $0.0.id : nil })
        if !missing.isEmpty {
            let details = await control.appDetails(missing)
            for (index, (record, _)) in chosen.enumerated() where bodies[index] == nil {
                // An app deleted in between keeps the JSON it had when listed.
                guard let detail = details[record.id] else {
                    bodies[index] = MarathonJSON.app(
                        AppDetail(record: record, instances: [], deployments: [], failure: nil, stamp: 0), embed: embed).serialized()
                    continue
                }
                let body = MarathonJSON.app(detail, embed: embed).serialized()
                fragments.store(body, for: record.id, embed: embed, stamp: detail.stamp)
                bodies[index] = body
            }
        }
        var body: [UInt8] = []
        body.reserveCapacity(bodies.reduce(16) { $0 + ($1?.count ?? 0) + 1 })
        body.append(contentsOf: #"{"apps":["#.utf8)
        for (index, fragment) in bodies.enumerated() {
            if index > 0 { body.append(UInt8(ascii: ",")) }
            body.append(contentsOf: fragment!)
        }
        body.append(contentsOf: "]}".utf8)
        cache.store(body, for: key, generation: generation)
        return APIResponse.json(bytes: body)
    }

    private func createApp(_ request: Request) async throws -> Response {
        let object = try await jsonObject(request)
        let definition = try AppDefinition.decode(object)
        let result = try await control.create(definition)
        let snapshot = await control.snapshot()
        guard let record = snapshot.apps[definition.id] ?? result.app else { throw FlotillaError.notFound("App '\(definition.id)' does not exist") }
        return APIResponse.json(
            MarathonJSON.app(record, in: snapshot, embed: [.counts, .deployments, .tasks]), status: .created,
            headers: [.location: "/v2/apps\(definition.id.path)", .marathonDeploymentID: result.deploymentID])
    }

    /// `PUT`/`PATCH /v2/apps`: several apps changed at once (marathon-python's `update_apps`), all in
    /// one deployment-free check first: every definition is validated before any is applied.
    private func updateApps(_ request: Request, partial: Bool) async throws -> Response {
        let items = try await jsonArray(request)
        var changes: [(AppID, [String: JSONValue])] = []
        for (index, item) in items.enumerated() {
            guard case .object(let object) = item else {
                throw FlotillaError.invalid([FieldError("/\(index)", "each entry must be an app definition object")])
            }
            guard let text = object["id"]?.stringValue, let id = try? AppID(text) else {
                throw FlotillaError.invalid([FieldError("/\(index)/id", "each app needs a valid 'id'")])
            }
            changes.append((id, object))
        }
        // PUT /v2/apps is a partial update unless `partialUpdate=false`, as on one app.
        let merge = partial || request.uri.queryParameters["partialUpdate"].map { $0.lowercased() != "false" } ?? true
        let result = try await control.updateMany(changes, partial: merge, force: try request.flag("force"))
        return changeResponse(result)
    }

    /// Everything under `/v2/apps/`: the app itself, its tasks, versions and restart. Parsed by hand
    /// because an app id has any number of segments and clients send `/v2/apps//shop/cart`.
    private func appResource(_ request: Request) async throws -> Response {
        var segments = request.uri.path.split(separator: "/").map(String.init)
        guard segments.count >= 3 else { throw FlotillaError.notFound("no such resource") }
        segments.removeFirst(2)  // "v2", "apps"
        enum Target { case app, tasks, task(String), versions, version(String), restart }
        var target = Target.app
        if segments.count >= 2, segments[segments.count - 2] == "tasks" {
            target = .task(segments.removeLast())
            segments.removeLast()
        } else if segments.count >= 2, segments[segments.count - 2] == "versions" {
            target = .version(segments.removeLast())
            segments.removeLast()
        } else if segments.last == "tasks" {
            target = .tasks
            segments.removeLast()
        } else if segments.last == "versions" {
            target = .versions
            segments.removeLast()
        } else if segments.last == "restart" {
            target = .restart
            segments.removeLast()
        }
        let id: AppID
        do {
            id = try AppID(segments.joined(separator: "/"))
        } catch {
            throw FlotillaError.notFound("App '/\(segments.joined(separator: "/"))' does not exist")
        }
        let method = request.method
        switch (target, method) {
        case (.app, .get):
            let snapshot = await control.snapshot()
            guard let record = snapshot.apps[id] else { throw FlotillaError.notFound("App '\(id)' does not exist") }
            let embed = MarathonJSON.Embed.parse(request.queryValues("embed")).union([.counts, .deployments, .tasks, .lastTaskFailure])
            return APIResponse.json(.object(["app": MarathonJSON.app(record, in: snapshot, embed: embed)]))
        case (.app, .put), (.app, .patch):
            let object = try await jsonObject(request)
            // PUT is a partial update unless `partialUpdate=false`; PATCH always is.
            let partial = method == .patch || request.uri.queryParameters["partialUpdate"].map { $0.lowercased() != "false" } ?? true
            let result = try await control.update(id, fields: object, partial: partial, force: try request.flag("force"))
            return changeResponse(result)
        case (.app, .delete):
            return changeResponse(try await control.delete(id, force: try request.flag("force")))
        case (.restart, .post):
            return changeResponse(try await control.restart(id, force: try request.flag("force")))
        case (.tasks, .get):
            let snapshot = await control.snapshot()
            guard snapshot.apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
            let tasks = snapshot.instances(of: id).filter { !$0.state.isTerminal }.map(MarathonJSON.task)
            return APIResponse.json(.object(["tasks": .array(tasks)]))
        case (.tasks, .delete):
            let snapshot = await control.snapshot()
            guard snapshot.apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
            var ids = snapshot.instances(of: id).filter { $0.spec.goal == .run }.map(\.id)
            if let host = request.uri.queryParameters["host"] { ids = ids.filter { snapshot.instances[$0]?.spec.host == String(host) } }
            let (killed, change) = try await control.kill(instanceIDs: ids, scale: try request.flag("scale"), force: try request.flag("force"))
            if let change { return changeResponse(change) }
            return APIResponse.json(.object(["tasks": .array(killed.map(MarathonJSON.task))]))
        case (.task(let taskID), .delete):
            let snapshot = await control.snapshot()
            guard snapshot.apps[id] != nil else { throw FlotillaError.notFound("App '\(id)' does not exist") }
            guard let instance = snapshot.instances[taskID], instance.spec.appID == id else {
                throw FlotillaError.notFound("Task '\(taskID)' does not exist")
            }
            let (killed, change) = try await control.kill(instanceIDs: [taskID], scale: try request.flag("scale"), force: try request.flag("force"))
            if let change { return changeResponse(change) }
            return APIResponse.json(.object(["task": killed.first.map(MarathonJSON.task) ?? MarathonJSON.task(instance)]))
        case (.versions, .get):
            let versions = try await control.versions(of: id)
            return APIResponse.json(.object(["versions": .array(versions.map(JSONValue.string))]))
        case (.version(let version), .get):
            let record = try await control.version(version, of: id)
            return APIResponse.json(.object(MarathonJSON.definition(record)))
        default:
            return APIResponse.json(.object(["message": .string("\(method) is not allowed on \(request.uri.path)")]), status: .methodNotAllowed)
        }
    }

    private func changeResponse(_ result: ChangeResult) -> Response {
        APIResponse.json(
            .object(["version": .string(result.version), "deploymentId": .string(result.deploymentID)]),
            headers: [.marathonDeploymentID: result.deploymentID])
    }

    // MARK: - Groups

    /// Everything under `/v2/groups`: the tree, one group, its versions; create, change, delete.
    private func groupResource(_ request: Request) async throws -> Response {
        var segments = request.uri.path.split(separator: "/").map(String.init)
        segments.removeFirst(2)  // "v2", "groups"
        enum Target { case group, versions, version(String) }
        var target = Target.group
        if segments.count >= 2, segments[segments.count - 2] == "versions" {
            target = .version(segments.removeLast())
            segments.removeLast()
        } else if segments.last == "versions" {
            target = .versions
            segments.removeLast()
        }
        let id: GroupID
        do {
            id = try GroupID("/" + segments.joined(separator: "/"))
        } catch {
            throw FlotillaError.notFound("Group '/\(segments.joined(separator: "/"))' does not exist")
        }
        let force = try request.flag("force")
        switch (target, request.method) {
        case (.group, .get):
            guard let group = await control.group(id) else { throw FlotillaError.notFound("Group '\(id)' does not exist") }
            let snapshot = await control.snapshot()
            return APIResponse.json(MarathonJSON.group(group, in: snapshot, embed: .parse(request.queryValues("embed"))))
        case (.group, .post):
            let body = try await jsonObject(request)
            let result = try await control.createGroup(body, under: id, force: force)
            var response = changeResponse(result)
            response.status = .created
            if let created = try? GroupUpdate.parse(body, base: id).id { response.headers[.location] = created.path }
            return response
        case (.group, .put):
            let (result, plan) = try await control.updateGroup(try await jsonObject(request), at: id, force: force, dryRun: try request.flag("dryRun"))
            if let plan {
                return APIResponse.json(.object(["steps": .array(plan.steps.map { step in
                    .object(["actions": .array(step.map { .object(["action": .string($0.action.rawValue), "app": .string($0.app.path)]) })])
                })]))
            }
            return changeResponse(result!)
        case (.group, .delete):
            return changeResponse(try await control.deleteGroup(id, force: force))
        case (.versions, .get):
            return APIResponse.json(.array(try await control.groupVersions(of: id).map(JSONValue.string)))
        case (.version(let version), .get):
            let snapshot = try await control.groupVersion(version, of: id)
            return APIResponse.json(MarathonJSON.group(version: snapshot))
        case (.version(let version), .put):
            // marathon-python's rollback_group: PUT /v2/groups/{id}/versions/{version} with no body.
            let (result, _) = try await control.updateGroup(["version": .string(version)], at: id, force: force, dryRun: false)
            return changeResponse(result!)
        default:
            return APIResponse.json(.object(["message": .string("\(request.method) is not allowed on \(request.uri.path)")]), status: .methodNotAllowed)
        }
    }

    // MARK: - Tasks, queue, deployments

    private func listTasks(_ request: Request) async throws -> Response {
        let snapshot = await control.snapshot()
        let states = Set(request.queryValues("status").map { $0.lowercased() })
        let tasks = snapshot.instances.values
            .filter { !$0.state.isTerminal }
            .filter { states.isEmpty || states.contains(MarathonJSON.state(of: $0).rawValue.dropFirst(5).lowercased()) }
            .sorted { ($0.spec.appID, $0.spec.stagedAt) < ($1.spec.appID, $1.spec.stagedAt) }
            .map(MarathonJSON.task)
        return APIResponse.json(.object(["tasks": .array(tasks)]))
    }

    private func deleteTasks(_ request: Request) async throws -> Response {
        let object = try await jsonObject(request)
        guard case .array(let values)? = object["ids"] else {
            throw FlotillaError.invalid([FieldError("/ids", "a list of task ids is required")])
        }
        let ids = values.compactMap(\.stringValue)
        guard ids.count == values.count else { throw FlotillaError.invalid([FieldError("/ids", "every id must be a string")]) }
        let snapshot = await control.snapshot()
        let unknown = ids.filter { snapshot.instances[$0] == nil }
        if !unknown.isEmpty { throw FlotillaError.notFound("Task(s) \(unknown.joined(separator: ", ")) do not exist") }
        let (killed, change) = try await control.kill(instanceIDs: ids, scale: try request.flag("scale"), force: try request.flag("force"))
        if let change { return changeResponse(change) }
        return APIResponse.json(.object(["tasks": .array(killed.map(MarathonJSON.task))]))
    }

    private func queue(_ request: Request) async throws -> Response {
        let snapshot = await control.snapshot()
        let withOffers = request.queryValues("embed").contains("lastUnusedOffers")
        let items = snapshot.queue.values.sorted { $0.app < $1.app }.compactMap { entry -> JSONValue? in
            guard let record = snapshot.apps[entry.app] else { return nil }
            return MarathonJSON.queueItem(entry, app: record, in: snapshot, withOffers: withOffers)
        }
        return APIResponse.json(.object(["queue": .array(items)]))
    }

    private func resetDelay(_ request: Request) async throws -> Response {
        var segments = request.uri.path.split(separator: "/").map(String.init).dropFirst(2)
        guard segments.last == "delay" else { throw FlotillaError.notFound("no such resource") }
        segments.removeLast()
        guard let id = try? AppID(segments.joined(separator: "/")) else { throw FlotillaError.notFound("no such app") }
        try await control.resetDelay(id)
        return Response(status: .noContent)
    }

    private func listDeployments() async throws -> Response {
        let snapshot = await control.snapshot()
        let deployments = snapshot.deployments.values.sorted { $0.version < $1.version }.map { MarathonJSON.deployment($0, in: snapshot) }
        return APIResponse.json(.array(deployments))
    }

    private func deleteDeployment(_ request: Request, id: String) async throws -> Response {
        let force = try request.flag("force")
        if let result = try await control.cancelDeployment(id, force: force) {
            return changeResponse(result)
        }
        return Response(status: .accepted)
    }

    // MARK: - Metrics

    /// Marathon 1.8+'s JSON metrics (`/metrics` there; `/metrics` here is Prometheus' text, so
    /// Marathon's JSON shape lives at `/v2/metrics`): gauges of what the control plane holds.
    private func metricsResponse() async -> Response {
        let snapshot = await control.snapshot()
        let live = snapshot.instances.values.filter { !$0.state.isTerminal }
        func gauge(_ value: Int) -> JSONValue { .object(["value": .number(Double(value))]) }
        let gauges: [String: JSONValue] = [
            "marathon.apps.active.gauge": gauge(snapshot.apps.count),
            "marathon.deployments.active.gauge": gauge(snapshot.deployments.count),
            "marathon.instances.running.gauge": gauge(live.filter { $0.state == .running }.count),
            "marathon.instances.staged.gauge": gauge(live.filter { $0.state == .staging || $0.state == .starting }.count),
            "marathon.instances.launch-overdue.gauge": gauge(snapshot.queue.values.reduce(0) { $0 + $1.count }),
            "marathon.uptime.gauge": .object(["value": .number((Date().timeIntervalSince(startedAt) * 1000).rounded())]),
        ]
        return APIResponse.json(
            .object([
                "version": .string("4.0.0"), "gauges": .object(gauges), "counters": .object([:]), "histograms": .object([:]),
                "meters": .object([:]), "timers": .object([:]),
            ]))
    }

    // MARK: - Event subscriptions

    private func subscriptionsOrFail() throws -> EventSubscriptions {
        guard let subscriptions else { throw FlotillaError.badRequest("http event callback system is not running on this agent") }
        return subscriptions
    }

    /// `POST`/`DELETE /v2/eventSubscriptions?callbackUrl=`: answers with the subscribe or
    /// unsubscribe event, which also goes out on the bus.
    private func changeSubscription(_ request: Request, subscribe: Bool, clientIP: String) async throws -> Response {
        let subscriptions = try subscriptionsOrFail()
        guard let url = request.formValue("callbackUrl"), !url.isEmpty else {
            throw FlotillaError.invalid([FieldError("/callbackUrl", "the callbackUrl query parameter is required")])
        }
        if subscribe { try await subscriptions.subscribe(url) } else { try await subscriptions.unsubscribe(url) }
        let change = ControlEvent.subscriptionChanged(callbackURL: url, clientIP: clientIP, subscribed: subscribe)
        events.publish(change)
        return APIResponse.json(.object(MarathonEvent(PublishedEvent(change)).fields))
    }

    // MARK: - Info and events

    private var leaderAddress: String? {
        guard let cluster else { return info.leader }
        return cluster.leaderAddress
    }

    private func infoResponse() -> Response {
        APIResponse.json(
            .object([
                "name": .string("flotilla"),
                "version": .string(info.version),
                "buildref": .string(info.version),
                "elected": .bool(cluster?.isLeader ?? true),
                "leader": leaderAddress.map(JSONValue.string) ?? .null,
                "frameworkId": .string(info.nodeName),
                "marathon_config": .object([
                    "hostname": .string(info.nodeName), "ha": .bool(false), "framework_name": .string("flotilla"),
                    "checkpoint": .bool(true), "master": .string("flotilla"), "mesos_role": .null, "mesos_user": .null,
                    "local_port_min": .number(Double(info.servicePortRange.lowerBound)),
                    "local_port_max": .number(Double(info.servicePortRange.upperBound)),
                    "executor": .string("//cmd"), "failover_timeout": .number(604_800), "features": .array([]),
                    "task_launch_timeout": .number(300_000), "task_reservation_timeout": .number(20_000),
                    "env_vars_prefix": .null, "webui_url": .null, "leader_proxy_connection_timeout_ms": .number(5000),
                    "leader_proxy_read_timeout_ms": .number(10_000), "mesos_leader_ui_url": .null,
                ]),
                "http_config": .object(["http_port": .number(Double(info.httpPort)), "https_port": .number(0)]),
                "zookeeper_config": .object([:]),
                "event_subscriber": subscriptions == nil ? .null : .object(["type": .string("http_callback"), "http_endpoints": .null]),
            ]))
    }

    /// `/v2/events`: server-sent events, one `data:` line per event, flushed as it happens.
    private func eventStream(_ request: Request, remoteAddress: String) -> Response {
        let wanted = Set(request.queryValues("event_type"))
        // Rendered once for every stream (the hub's), filtered here.
        let subscription = streamHub.subscribe()
        let (stream, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        events.publish(.eventStreamAttached(remoteAddress: remoteAddress))
        let task = Task {
            // `attached` arrives through the subscription (it went out on the bus), so it comes first.
            for await frame in subscription where wanted.isEmpty || wanted.contains(frame.type) { continuation.yield(frame.bytes) }
            continuation.finish()
        }
        // A comment line every few seconds: keeps proxies from closing a quiet stream, and finds
        // clients that went away (the write fails), so their detach is reported.
        let heartbeat = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: Self.eventStreamHeartbeat)
                if Task.isCancelled { return }
                continuation.yield(ByteBuffer(string: ":\n"))
            }
        }
        let events = events
        continuation.onTermination = { _ in
            task.cancel()
            heartbeat.cancel()
            events.publish(.eventStreamDetached(remoteAddress: remoteAddress))
        }
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: ResponseBody(asyncSequence: stream))
    }

    // MARK: - Bodies

    private func jsonArray(_ request: Request) async throws -> [JSONValue] {
        var request = request
        let buffer = try await request.collectBody(upTo: Self.maximumBodyBytes)
        guard buffer.readableBytes > 0 else { throw FlotillaError.malformed("the request needs a JSON body") }
        guard case .array(let items) = try JSONValue.parse(Data(buffer.readableBytesView)) else {
            throw FlotillaError.malformed("the body must be a JSON array of app definitions")
        }
        return items
    }

    private func jsonObject(_ request: Request) async throws -> [String: JSONValue] {
        var request = request
        let buffer = try await request.collectBody(upTo: Self.maximumBodyBytes)
        guard buffer.readableBytes > 0 else { throw FlotillaError.malformed("the request needs a JSON body") }
        let value = try JSONValue.parse(Data(buffer.readableBytesView))
        guard case .object(let object) = value else { throw FlotillaError.malformed("the body must be a JSON object") }
        return object
    }
}

/// Marathon's `label=` selector: `key`, `key==value`, `key!=value`, comma-separated, all must hold.
struct LabelSelector {
    enum Term {
        case exists(String)
        case equals(String, String)
        case notEquals(String, String)
    }

    var terms: [Term]

    init(_ text: String) throws(FlotillaError) {
        terms = []
        for part in text.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !part.isEmpty {
            if let range = part.range(of: "!=") {
                terms.append(.notEquals(String(part[..<range.lowerBound]), String(part[range.upperBound...])))
            } else if let range = part.range(of: "==") {
                terms.append(.equals(String(part[..<range.lowerBound]), String(part[range.upperBound...])))
            } else if part.contains("=") {
                throw .badRequest("label selector '\(part)': use key==value, key!=value or key")
            } else {
                terms.append(.exists(part))
            }
        }
    }

    func matches(_ labels: [String: String]) -> Bool {
        terms.allSatisfy { term in
            switch term {
            case .exists(let key): return labels[key] != nil
            case .equals(let key, let value): return labels[key] == value
            case .notEquals(let key, let value): return labels[key] != value
            }
        }
    }
}
