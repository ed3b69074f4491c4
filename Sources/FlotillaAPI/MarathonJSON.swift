public import FlotillaControl
public import FlotillaCore
import FlotillaScheduler

/// Renders Flotilla's state in Marathon's JSON shapes. Only keys Marathon itself sends: clients such
/// as the `marathon` Python library build objects from every key and reject unknown ones.
public enum MarathonJSON {
    public struct Embed: Sendable, OptionSet, Hashable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        public static let tasks = Embed(rawValue: 1)
        public static let counts = Embed(rawValue: 2)
        public static let deployments = Embed(rawValue: 4)
        public static let lastTaskFailure = Embed(rawValue: 8)
        public static let taskStats = Embed(rawValue: 16)

        /// Parses `embed=apps.tasks` / `app.tasks` style values.
        public static func parse(_ values: [String]) -> Embed {
            var embed: Embed = []
            for value in values {
                switch value.split(separator: ".").last.map(String.init) ?? "" {
                case "tasks": embed.insert(.tasks)
                case "counts": embed.insert(.counts)
                case "deployments": embed.insert(.deployments)
                case "lastTaskFailure": embed.insert(.lastTaskFailure)
                case "taskStats": embed.insert(.taskStats)
                default: break
                }
            }
            return embed
        }
    }

    public static func definition(_ record: AppRecord) -> [String: JSONValue] {
        let app = record.definition
        var object: [String: JSONValue] = [
            "id": .string(app.id.path),
            "cmd": app.cmd.map(JSONValue.string) ?? .null,
            "args": app.args.map { .array($0.map(JSONValue.string)) } ?? .null,
            "user": app.user.map(JSONValue.string) ?? .null,
            "env": .object(app.env.mapValues(envJSON)),
            "instances": .number(Double(app.instances)),
            "cpus": .number(app.cpus),
            "mem": .number(app.mem),
            "disk": .number(app.disk),
            "gpus": .number(Double(app.gpus)),
            "executor": .string(""),
            "constraints": .array(app.constraints.map { constraint in
                .array([.string(constraint.field), .string(constraint.op.rawValue)] + (constraint.value.map { [.string($0)] } ?? []))
            }),
            "uris": .array(app.uris.map(JSONValue.string)),
            "fetch": .array(app.fetch.compactMap { try? JSONValue(encoding: $0) }),
            "storeUrls": .array([]),
            "backoffSeconds": .number(app.backoffSeconds),
            "backoffFactor": .number(app.backoffFactor),
            "maxLaunchDelaySeconds": .number(app.maxLaunchDelaySeconds),
            "container": .null,
            "healthChecks": .array(app.healthChecks.compactMap { try? JSONValue(encoding: $0) }),
            "readinessChecks": .array(app.readinessChecks.compactMap { try? JSONValue(encoding: $0) }),
            "dependencies": .array(app.dependencies.map(JSONValue.string)),
            "upgradeStrategy": upgradeStrategy(app.upgradeStrategy),
            "labels": .object(app.labels.mapValues(JSONValue.string)),
            "acceptedResourceRoles": app.acceptedResourceRoles.map { .array($0.map(JSONValue.string)) } ?? .null,
            "version": .string(record.version),
            "versionInfo": .object([
                "lastScalingAt": .string(record.versionInfo.lastScalingAt),
                "lastConfigChangeAt": .string(record.versionInfo.lastConfigChangeAt),
            ]),
            "killSelection": .string(app.killSelection.rawValue),
            "requirePorts": .bool(app.requirePorts),
            "ports": .array(app.portDefinitions.map { .number(Double($0.port)) }),
            "portDefinitions": .array(app.portDefinitions.map { definition in
                var port: [String: JSONValue] = [
                    "port": .number(Double(definition.port)), "protocol": .string(definition.protocol),
                    "labels": .object(definition.labels.mapValues(JSONValue.string)),
                ]
                if let name = definition.name { port["name"] = .string(name) }
                return .object(port)
            }),
            "secrets": .object([:]),
            "unreachableStrategy": (try? JSONValue(encoding: app.unreachableStrategy)) ?? .null,
            "networks": .array([.object(["mode": .string(app.network.rawValue)])]),
        ]
        if let container = app.container { object["container"] = try? JSONValue(encoding: container) }
        if let grace = app.taskKillGracePeriodSeconds { object["taskKillGracePeriodSeconds"] = .number(grace) }
        // Marathon 1.6+ fields, only when set: older clients (marathon-python among them) reject keys they do not know.
        if let limits = app.resourceLimits { object["resourceLimits"] = try? JSONValue(encoding: limits) }
        if let check = app.check { object["check"] = check }
        if let resources = app.executorResources { object["executorResources"] = resources }
        if !app.secrets.isEmpty { object["secrets"] = try? JSONValue(encoding: app.secrets) }
        if !app.alerts.isEmpty { object["alerts"] = try? JSONValue(encoding: app.alerts) }
        if let autoscale = app.autoscale { object["autoscale"] = try? JSONValue(encoding: autoscale) }
        // Flotilla's own fields appear only when set away from their defaults, so Marathon clients
        // that reject unknown keys keep working with apps that do not use them.
        if app.drainSeconds != AppDefinition.Defaults.drainSeconds { object["drainSeconds"] = .number(app.drainSeconds) }
        if app.restartOnSecretChange { object["restartOnSecretChange"] = true }
        return object
    }

    static func upgradeStrategy(_ strategy: UpgradeStrategy) -> JSONValue {
        var object: [String: JSONValue] = [
            "minimumHealthCapacity": .number(strategy.minimumHealthCapacity),
            "maximumOverCapacity": .number(strategy.maximumOverCapacity),
        ]
        let defaults = UpgradeStrategy()
        if strategy.type != defaults.type { object["type"] = .string(strategy.type.rawValue) }
        if strategy.progressDeadlineSeconds != defaults.progressDeadlineSeconds {
            object["progressDeadlineSeconds"] = .number(strategy.progressDeadlineSeconds)
        }
        if strategy.autoRollback != defaults.autoRollback { object["autoRollback"] = .bool(strategy.autoRollback) }
        if strategy.maxConsecutiveCrashes != defaults.maxConsecutiveCrashes {
            object["maxConsecutiveCrashes"] = .number(Double(strategy.maxConsecutiveCrashes))
        }
        if strategy.keepOldSeconds != defaults.keepOldSeconds { object["keepOldSeconds"] = .number(strategy.keepOldSeconds) }
        return .object(object)
    }

    static func envJSON(_ value: EnvValue) -> JSONValue {
        switch value {
        case .value(let text): return .string(text)
        case .secret(let name): return .object(["secret": .string(name)])
        }
    }

    public static func app(_ record: AppRecord, in snapshot: ControlSnapshot, embed: Embed) -> JSONValue {
        app(AppDetail(
            record: record, instances: snapshot.instances(of: record.id), deployments: snapshot.deployments(of: record.id),
            failure: snapshot.failures[record.id], stamp: snapshot.generation), embed: embed)
    }

    public static func app(_ detail: AppDetail, embed: Embed) -> JSONValue {
        let record = detail.record
        var object = definition(record)
        let live = detail.instances.filter { !$0.state.isTerminal }
        if embed.contains(.counts) {
            object["tasksStaged"] = .number(Double(live.filter { $0.state == .staging || $0.state == .starting }.count))
            object["tasksRunning"] = .number(Double(live.filter { $0.state == .running }.count))
            let checked = !record.definition.healthChecks.isEmpty
            object["tasksHealthy"] = .number(Double(checked ? live.filter { $0.status?.isHealthy == true }.count : 0))
            object["tasksUnhealthy"] = .number(Double(checked ? live.filter { $0.status?.isHealthy == false }.count : 0))
        }
        if embed.contains(.deployments) {
            object["deployments"] = .array(detail.deployments.map { .object(["id": .string($0.id)]) })
        }
        if embed.contains(.tasks) {
            object["tasks"] = .array(live.map { task($0) })
        }
        if embed.contains(.lastTaskFailure), let failure = detail.failure {
            object["lastTaskFailure"] = taskFailure(failure)
        }
        return .object(object)
    }

    public static func task(_ instance: Instance) -> JSONValue {
        let spec = instance.spec
        var object: [String: JSONValue] = [
            "id": .string(spec.id),
            "appId": .string(spec.appID.path),
            "host": .string(spec.host),
            "ports": .array(spec.ports.map { .number(Double($0)) }),
            "servicePorts": .array(spec.ports.enumerated().map { index, port in
                let appPorts = spec.definition.ports
                let requested = appPorts.indices.contains(index) ? appPorts[index].servicePort : 0
                return .number(Double(requested != 0 ? requested : port))
            }),
            "slaveId": .string(spec.node),
            "stagedAt": .string(spec.stagedAt),
            "startedAt": instance.status?.startedAt.map(JSONValue.string) ?? .null,
            "version": .string(spec.version),
            "state": .string(state(of: instance).rawValue),
            // A bridged container's own address (Marathon reports the task's IP there), else the node's.
            "ipAddresses": .array([.object(["ipAddress": .string(instance.status?.driverState["address"] ?? spec.host), "protocol": .string("IPv4")])]),
            "localVolumes": .array([]),
        ]
        if !spec.definition.healthChecks.isEmpty {
            object["healthCheckResults"] = .array((instance.status?.health ?? []).compactMap { result -> JSONValue? in
                // Marathon lists a check once it has a verdict.
                guard let alive = result.alive else { return nil }
                return .object([
                    "alive": .bool(alive), "consecutiveFailures": .number(Double(result.consecutiveFailures)),
                    "firstSuccess": result.firstSuccess.map(JSONValue.string) ?? .null,
                    "lastSuccess": result.lastSuccess.map(JSONValue.string) ?? .null,
                    "lastFailure": result.lastFailure.map(JSONValue.string) ?? .null,
                    "lastFailureCause": result.lastFailureCause.map(JSONValue.string) ?? .null,
                    "taskId": .string(spec.id), "instanceId": .string(spec.id),
                ])
            })
        }
        return .object(object)
    }

    /// An instance asked to stop shows as `TASK_KILLING` until it is gone, as in Marathon; one on
    /// a node that is down stays `TASK_UNREACHABLE` (nobody can stop it until its node is back).
    static func state(of instance: Instance) -> TaskState {
        if instance.spec.goal == .stop && !instance.state.isTerminal && instance.state != .unreachable { return .killing }
        return instance.state
    }

    public static func taskFailure(_ failure: TaskFailure) -> JSONValue {
        .object([
            "appId": .string(failure.appID.path), "taskId": .string(failure.taskID), "instanceId": .string(failure.taskID),
            "host": .string(failure.host), "slaveId": .string(failure.node ?? failure.host), "state": .string(failure.state.rawValue),
            "message": .string(failure.message), "timestamp": .string(failure.timestamp), "version": .string(failure.version),
        ])
    }

    public static func deployment(_ deployment: Deployment, in snapshot: ControlSnapshot? = nil) -> JSONValue {
        func action(_ action: Deployment.Action, readiness: Bool) -> JSONValue {
            var object: [String: JSONValue] = ["action": .string(action.action.rawValue), "app": .string(action.app.path)]
            if readiness { object["readinessCheckResults"] = .array(readinessResults(of: action.app, in: deployment, snapshot: snapshot)) }
            return .object(object)
        }
        return .object([
            "id": .string(deployment.id),
            "version": .string(deployment.version),
            "affectedApps": .array(deployment.affectedApps.map { .string($0.path) }),
            "affectedPods": .array([]),
            "steps": .array(deployment.steps.map { .object(["actions": .array($0.map { action($0, readiness: false) })]) }),
            "currentActions": .array(deployment.currentActions.map { action($0, readiness: true) }),
            "currentStep": .number(Double(deployment.currentStep)),
            "totalSteps": .number(Double(deployment.totalSteps)),
        ])
    }

    /// The readiness of the new instances a deployment brings, while they are checked.
    static func readinessResults(of app: AppID, in deployment: Deployment, snapshot: ControlSnapshot?) -> [JSONValue] {
        guard let snapshot else { return [] }
        return snapshot.instances(of: app).filter { deployment.tracks($0.spec) && !$0.state.isTerminal }.compactMap { instance in
            guard let result = instance.status?.readiness else { return nil }
            var object: [String: JSONValue] = [
                "name": .string(result.name), "taskId": .string(instance.id), "ready": .bool(result.ready),
            ]
            if let response = result.lastResponse {
                object["lastResponse"] = .object([
                    "status": .number(Double(response.status)), "contentType": .string(response.contentType), "body": .string(response.body),
                ])
            }
            return .object(object)
        }
    }

    /// What `GET /v2/groups` shows of a group, Marathon's way: `embed` picks what is included
    /// (by default subgroups and apps; any `embed` replaces that default), apps as plain
    /// definitions unless app embeds (`group.apps.tasks`, `.counts`, …) ask for more.
    public struct GroupEmbed: Sendable {
        var groups: Bool
        var apps: Bool
        var app: Embed

        public static func parse(_ values: [String]) -> GroupEmbed {
            guard !values.isEmpty else { return GroupEmbed(groups: true, apps: true, app: []) }
            var embed = GroupEmbed(groups: false, apps: false, app: [])
            for value in values {
                switch value {
                case "group.groups": embed.groups = true
                case "group.apps": embed.apps = true
                case "group.pods": break
                default:
                    if value.hasPrefix("group.apps.") {
                        let what = value.dropFirst("group.apps.".count)
                        embed.app.formUnion(Embed.parse([String(what)]))
                        if what == "tasks" { embed.app.insert(.deployments) }
                    }
                }
            }
            return embed
        }
    }

    public static func group(_ group: ControlPlane.GroupView, in snapshot: ControlSnapshot, embed: GroupEmbed) -> JSONValue {
        .object([
            "id": .string(group.id.path),
            "apps": .array(embed.apps ? group.apps.map { embed.app.isEmpty ? .object(definition($0)) : app($0, in: snapshot, embed: embed.app) } : []),
            "groups": .array(embed.groups ? group.groups.map { self.group($0, in: snapshot, embed: embed) } : []),
            "pods": .array([]),
            "dependencies": .array(group.dependencies.map(JSONValue.string)),
            "version": .string(group.version),
        ])
    }

    /// A group as it was at one of its versions.
    public static func group(version: GroupVersion) -> JSONValue {
        func node(_ id: GroupID) -> JSONValue {
            var children: Set<GroupID> = Set(version.groups.map(\.id).filter { $0.parent == id })
            for app in version.apps where id.contains(app.id) && app.id.segments.count > id.segments.count + 1 {
                children.insert(GroupID(segments: Array(app.id.segments.prefix(id.segments.count + 1))))
            }
            let apps = version.apps.filter { GroupID.parent(of: $0.id) == id }.map { definition in
                JSONValue.object(Self.definition(AppRecord(definition: definition, version: version.version,
                    versionInfo: VersionInfo(lastScalingAt: version.version, lastConfigChangeAt: version.version))))
            }
            return .object([
                "id": .string(id.path), "apps": .array(apps), "groups": .array(children.sorted().map(node)), "pods": .array([]),
                "dependencies": .array((version.groups.first { $0.id == id }?.dependencies ?? []).map(JSONValue.string)),
                "version": .string(version.version),
            ])
        }
        return node(version.id)
    }

    public static func queueItem(_ entry: QueueEntry, app record: AppRecord, in snapshot: ControlSnapshot, withOffers: Bool) -> JSONValue {
        var rejections: [JSONValue] = []
        if let placement = entry.placement {
            for reason in PlacementRejection.allCases {
                let count = placement.rejections[reason] ?? 0
                rejections.append(.object(["reason": .string(reason.rawValue), "declined": .number(Double(count)), "processed": .number(Double(max(count, snapshot.nodes.count)))]))
            }
        }
        var summary: [String: JSONValue] = [
            "processedOffersCount": .number(Double(snapshot.nodes.count)),
            "unusedOffersCount": .number(Double(entry.placement == nil ? 0 : snapshot.nodes.count)),
            "rejectSummaryLastOffers": .array(rejections),
            "rejectSummaryLaunchAttempt": .array(rejections),
        ]
        // Flotilla's own, for people: why it waits, in one sentence.
        if let explanation = entry.placement?.explanation {
            summary["reason"] = .string(explanation)
        } else if entry.delaySeconds > 0 {
            summary["reason"] = .string("crash backoff: next launch in \(Int(entry.delaySeconds.rounded(.up))) s")
        }
        var object: [String: JSONValue] = [
            "app": app(record, in: snapshot, embed: [.counts, .deployments]),
            "count": .number(Double(entry.count)),
            "delay": .object(["timeLeftSeconds": .number(entry.delaySeconds.rounded(.up)), "overdue": .bool(entry.delaySeconds <= 0)]),
            "since": .string(entry.since),
            "processedOffersSummary": .object(summary),
        ]
        if withOffers { object["lastUnusedOffers"] = .array([]) }
        return .object(object)
    }
}
