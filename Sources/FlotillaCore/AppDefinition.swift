import Foundation

/// A Marathon-style app definition: what to run, how many, with what resources and rules.
/// Field names, defaults and JSON shape are Marathon's, so definitions move between the two unchanged.
public struct AppDefinition: Sendable, Hashable, Codable {
    public var id: AppID
    public var cmd: String?
    public var args: [String]?
    public var env: [String: EnvValue]
    public var instances: Int
    public var cpus: Double
    public var mem: Double
    public var disk: Double
    public var gpus: Int
    public var portDefinitions: [PortDefinition]
    public var requirePorts: Bool
    public var labels: [String: String]
    public var constraints: [Constraint]
    public var healthChecks: [HealthCheck]
    public var readinessChecks: [ReadinessCheck]
    public var backoffSeconds: Double
    public var backoffFactor: Double
    public var maxLaunchDelaySeconds: Double
    public var taskKillGracePeriodSeconds: Double?
    /// Flotilla's: how long an instance chosen to stop is out of discovery and routing before SIGTERM.
    public var drainSeconds: Double
    /// Flotilla's: restart the app (a rolling restart, as `POST …/restart`) when a secret it uses
    /// gets a new version or loses its current one.
    public var restartOnSecretChange = false
    public var upgradeStrategy: UpgradeStrategy
    public var killSelection: KillSelection
    public var user: String?
    public var dependencies: [String]
    /// Artifacts to download into the sandbox (`fetch`, or the older `uris`): kept and returned;
    /// downloading them comes with the container work.
    public var fetch: [FetchURI]
    public var acceptedResourceRoles: [String]?
    /// How far an instance may use more than `cpus` and `mem`.
    public var resourceLimits: ResourceLimits?
    public var unreachableStrategy: UnreachableStrategy
    /// Marathon 1.6+ fields kept and returned as sent; see docs/api.md for what each does here.
    public var check: JSONValue?
    public var executorResources: JSONValue?
    /// Marathon's `secrets`: a name for each secret the app uses, and where its value comes from.
    /// `env` values (`{"secret": "db"}`) and secret volumes refer to the names.
    public var secrets: [String: SecretSource] = [:]
    /// Alert rules on the app's figures (`GET /flotilla/v1/alerts`).
    public var alerts: [AlertRule] = []
    /// Instances follow a figure between bounds; nil: `instances` is left to the user.
    public var autoscale: AutoscalePolicy?
    /// An OCI image to run (Marathon's `container`); nil for a command run as a plain process.
    public var container: ContainerSpec?
    /// `host`, or `container/bridge` for a container in its own network namespace.
    public var network: NetworkMode

    /// The artifacts' URIs (Marathon's `uris`).
    public var uris: [String] { fetch.map(\.uri) }

    public init(id: AppID, cmd: String? = nil, args: [String]? = nil, instances: Int = 1) {
        self.id = id
        self.cmd = cmd
        self.args = args
        self.env = [:]
        self.instances = instances
        self.cpus = Defaults.cpus
        self.mem = Defaults.mem
        self.disk = 0
        self.gpus = 0
        self.portDefinitions = []
        self.requirePorts = false
        self.labels = [:]
        self.constraints = []
        self.healthChecks = []
        self.readinessChecks = []
        self.backoffSeconds = Defaults.backoffSeconds
        self.backoffFactor = Defaults.backoffFactor
        self.maxLaunchDelaySeconds = Defaults.maxLaunchDelaySeconds
        self.taskKillGracePeriodSeconds = nil
        self.drainSeconds = Defaults.drainSeconds
        self.upgradeStrategy = UpgradeStrategy()
        self.killSelection = .youngestFirst
        self.user = nil
        self.dependencies = []
        self.fetch = []
        self.acceptedResourceRoles = nil
        self.resourceLimits = nil
        self.unreachableStrategy = .default
        self.container = nil
        self.network = .host
    }

    /// The app's ports, whatever the networking: `portDefinitions` on the host network, the
    /// container's `portMappings` on a bridge. Index i is `PORT<i>` and a health check's `portIndex`.
    public var ports: [AppPort] {
        if network == .bridge, let container {
            return container.portMappings.map {
                AppPort(hostPort: $0.hostPort, containerPort: $0.containerPort, servicePort: $0.servicePort, protocol: $0.protocol, name: $0.name, labels: $0.labels)
            }
        }
        return portDefinitions.map {
            AppPort(hostPort: requirePorts ? $0.port : 0, containerPort: nil, servicePort: $0.port, protocol: $0.protocol, name: $0.name, labels: $0.labels)
        }
    }

    /// Sets the service port of `ports[index]` (in `portDefinitions` or in the port mappings).
    public mutating func setServicePort(_ port: Int, at index: Int) {
        if network == .bridge, container != nil {
            container?.portMappings[index].servicePort = port
        } else {
            portDefinitions[index].port = port
        }
    }

    /// Which driver runs the app's instances.
    public var driver: String { container?.image == nil ? "exec" : "oci" }

    public enum Defaults {
        public static let cpus = 1.0
        public static let mem = 128.0
        public static let backoffSeconds = 1.0
        public static let backoffFactor = 1.15
        public static let maxLaunchDelaySeconds = 300.0
        /// Marathon leaves the grace period to Mesos, whose default is 3 seconds.
        public static let taskKillGracePeriodSeconds = 3.0
        public static let drainSeconds = 2.0
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case id, cmd, args, env, instances, cpus, mem, disk, gpus, portDefinitions, ports, requirePorts, labels
        case constraints, healthChecks, readinessChecks, backoffSeconds, backoffFactor, maxLaunchDelaySeconds
        case taskKillGracePeriodSeconds, drainSeconds, restartOnSecretChange, upgradeStrategy, killSelection, user, dependencies, uris, fetch
        case acceptedResourceRoles, container, resourceLimits, unreachableStrategy, check, executorResources, secrets, alerts, autoscale
        case tty, networks, role, ipAddress, residency, executor
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(AppID.self, forKey: .id)
        self.container = try container.decodeIfPresent(ContainerSpec.self, forKey: .container)
        let legacyNetwork = container.contains(.container) && self.container != nil
            ? try ContainerSpec.legacyNetwork(from: try container.superDecoder(forKey: .container)) : nil
        let networkModes = try (container.decodeIfPresent([JSONValue].self, forKey: .networks) ?? []).enumerated().map { index, network in
            let mode = network["mode"]?.stringValue ?? "host"
            switch mode {
            case "host": return NetworkMode.host
            case "container/bridge": return NetworkMode.bridge
            default:
                throw FlotillaError.invalid([
                    FieldError("/networks(\(index))/mode", "'\(mode)' networking is not available; use host or container/bridge")
                ])
            }
        }
        if networkModes.count > 1 {
            throw FlotillaError.invalid([FieldError("/networks", "an app joins one network here: host or container/bridge")])
        }
        if let legacyNetwork, let mode = networkModes.first, legacyNetwork != mode {
            throw FlotillaError.invalid([
                FieldError("/container/docker/network", "contradicts networks; give the network once (networks, Marathon 1.5+)")
            ])
        }
        network = networkModes.first ?? legacyNetwork ?? .host
        if network == .bridge && self.container?.image == nil {
            throw FlotillaError.invalid([FieldError("/networks", "container/bridge networking needs a container (an image); command apps use host networking")])
        }
        cmd = try container.decodeIfPresent(String.self, forKey: .cmd)
        args = try container.decodeIfPresent([String].self, forKey: .args)
        env = try container.decodeIfPresent([String: EnvValue].self, forKey: .env) ?? [:]
        instances = try container.decodeIfPresent(Int.self, forKey: .instances) ?? 1
        cpus = try container.decodeIfPresent(Double.self, forKey: .cpus) ?? Defaults.cpus
        mem = try container.decodeIfPresent(Double.self, forKey: .mem) ?? Defaults.mem
        disk = try container.decodeIfPresent(Double.self, forKey: .disk) ?? 0
        gpus = try container.decodeIfPresent(Int.self, forKey: .gpus) ?? 0
        if network == .bridge {
            // Marathon: a bridged app's ports are its portMappings.
            // (The older `ports` is dropped there, as Marathon's normalisation drops it.)
            let definitions = try container.decodeIfPresent([PortDefinition].self, forKey: .portDefinitions) ?? []
            if !definitions.isEmpty {
                throw FlotillaError.invalid([
                    FieldError("/portDefinitions", "with container/bridge networking the ports are container.portMappings; leave portDefinitions out")
                ])
            }
            portDefinitions = []
        } else if let definitions = try container.decodeIfPresent([PortDefinition].self, forKey: .portDefinitions) {
            portDefinitions = definitions
        } else if let ports = try container.decodeIfPresent([Int].self, forKey: .ports) {
            // The legacy `ports` array: each number becomes a port definition.
            portDefinitions = ports.map { PortDefinition(port: $0) }
        } else {
            // Marathon gives an app that names no ports one port (so $PORT0 is always set);
            // `"portDefinitions": []` asks for none.
            portDefinitions = [PortDefinition(port: 0, name: "default")]
        }
        requirePorts = try container.decodeIfPresent(Bool.self, forKey: .requirePorts) ?? false
        labels = try container.decodeIfPresent([String: String].self, forKey: .labels) ?? [:]
        constraints = try container.decodeIfPresent([Constraint].self, forKey: .constraints) ?? []
        healthChecks = try container.decodeIfPresent([HealthCheck].self, forKey: .healthChecks) ?? []
        readinessChecks = try container.decodeIfPresent([ReadinessCheck].self, forKey: .readinessChecks) ?? []
        backoffSeconds = try container.decodeIfPresent(Double.self, forKey: .backoffSeconds) ?? Defaults.backoffSeconds
        backoffFactor = try container.decodeIfPresent(Double.self, forKey: .backoffFactor) ?? Defaults.backoffFactor
        maxLaunchDelaySeconds =
            try container.decodeIfPresent(Double.self, forKey: .maxLaunchDelaySeconds) ?? Defaults.maxLaunchDelaySeconds
        taskKillGracePeriodSeconds = try container.decodeIfPresent(Double.self, forKey: .taskKillGracePeriodSeconds)
        drainSeconds = try container.decodeIfPresent(Double.self, forKey: .drainSeconds) ?? Defaults.drainSeconds
        restartOnSecretChange = try container.decodeIfPresent(Bool.self, forKey: .restartOnSecretChange) ?? false
        upgradeStrategy = try container.decodeIfPresent(UpgradeStrategy.self, forKey: .upgradeStrategy) ?? UpgradeStrategy()
        killSelection = try container.decodeIfPresent(KillSelection.self, forKey: .killSelection) ?? .youngestFirst
        user = try container.decodeIfPresent(String.self, forKey: .user)
        dependencies = try container.decodeIfPresent([String].self, forKey: .dependencies) ?? []
        let uris = try container.decodeIfPresent([String].self, forKey: .uris) ?? []
        let fetched = try container.decodeIfPresent([FetchURI].self, forKey: .fetch) ?? []
        if !uris.isEmpty && !fetched.isEmpty {
            throw FlotillaError.invalid([FieldError("/uris", "give the artifacts in 'fetch' or in 'uris', not both")])
        }
        fetch = fetched.isEmpty ? uris.map { FetchURI(uri: $0) } : fetched
        acceptedResourceRoles = try container.decodeIfPresent([String].self, forKey: .acceptedResourceRoles)
        resourceLimits = try container.decodeIfPresent(ResourceLimits.self, forKey: .resourceLimits)
        unreachableStrategy = try container.decodeIfPresent(UnreachableStrategy.self, forKey: .unreachableStrategy) ?? .default
        check = try container.decodeIfPresent(JSONValue.self, forKey: .check).flatMap { $0 == .null ? nil : $0 }
        executorResources = try container.decodeIfPresent(JSONValue.self, forKey: .executorResources).flatMap { $0 == .null ? nil : $0 }
        secrets = try container.decodeIfPresent([String: SecretSource].self, forKey: .secrets) ?? [:]
        alerts = try container.decodeIfPresent([AlertRule].self, forKey: .alerts) ?? []
        autoscale = try container.decodeIfPresent(AutoscalePolicy.self, forKey: .autoscale)

        // Fields whose other values need what this agent does not have: refused, saying so.
        if try container.decodeIfPresent(Bool.self, forKey: .tty) == true {
            throw FlotillaError.invalid([FieldError("/tty", "instances run without a terminal here; leave 'tty' out or false")])
        }
        if let role = try container.decodeIfPresent(String.self, forKey: .role), role != "*" {
            throw FlotillaError.invalid([FieldError("/role", "got \(role), expected one of: [*]; Flotilla has no resource roles")])
        }
        if let roles = acceptedResourceRoles, roles.contains(where: { $0 != "*" }) {
            throw FlotillaError.invalid([FieldError("/acceptedResourceRoles", "acceptedResourceRoles can only contain * (Flotilla has no resource roles)")])
        }
        if let address = try container.decodeIfPresent(JSONValue.self, forKey: .ipAddress), address != .null {
            throw FlotillaError.invalid([FieldError("/ipAddress", "ipAddress (Marathon 1.4 IP-per-task) is not available; use networks: [{\"mode\": \"container/bridge\"}] with portMappings")])
        }
        if let residency = try container.decodeIfPresent(JSONValue.self, forKey: .residency), residency != .null {
            throw FlotillaError.invalid([FieldError("/residency", "resident apps (persistent volumes) are not supported")])
        }
        if let executor = try container.decodeIfPresent(String.self, forKey: .executor), !["", "//cmd"].contains(executor) {
            throw FlotillaError.invalid([FieldError("/executor", "custom executors are not supported; leave 'executor' out")])
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(id, forKey: .id)
        try container.encode(cmd, forKey: .cmd)
        try container.encode(args, forKey: .args)
        try container.encode(env, forKey: .env)
        try container.encode(instances, forKey: .instances)
        try container.encode(cpus, forKey: .cpus)
        try container.encode(mem, forKey: .mem)
        try container.encode(disk, forKey: .disk)
        try container.encode(gpus, forKey: .gpus)
        try container.encode(portDefinitions, forKey: .portDefinitions)
        try container.encode(requirePorts, forKey: .requirePorts)
        try container.encode(labels, forKey: .labels)
        try container.encode(constraints, forKey: .constraints)
        try container.encode(healthChecks, forKey: .healthChecks)
        try container.encode(readinessChecks, forKey: .readinessChecks)
        try container.encode(backoffSeconds, forKey: .backoffSeconds)
        try container.encode(backoffFactor, forKey: .backoffFactor)
        try container.encode(maxLaunchDelaySeconds, forKey: .maxLaunchDelaySeconds)
        try container.encodeIfPresent(taskKillGracePeriodSeconds, forKey: .taskKillGracePeriodSeconds)
        try container.encode(drainSeconds, forKey: .drainSeconds)
        if restartOnSecretChange { try container.encode(true, forKey: .restartOnSecretChange) }
        try container.encode(upgradeStrategy, forKey: .upgradeStrategy)
        try container.encode(killSelection, forKey: .killSelection)
        try container.encode(user, forKey: .user)
        try container.encode(dependencies, forKey: .dependencies)
        try container.encode(fetch, forKey: .fetch)
        try container.encode(acceptedResourceRoles, forKey: .acceptedResourceRoles)
        try container.encodeIfPresent(resourceLimits, forKey: .resourceLimits)
        if unreachableStrategy != .default { try container.encode(unreachableStrategy, forKey: .unreachableStrategy) }
        try container.encodeIfPresent(check, forKey: .check)
        try container.encodeIfPresent(executorResources, forKey: .executorResources)
        if !secrets.isEmpty { try container.encode(secrets, forKey: .secrets) }
        if !alerts.isEmpty { try container.encode(alerts, forKey: .alerts) }
        try container.encodeIfPresent(autoscale, forKey: .autoscale)
        try container.encodeIfPresent(self.container, forKey: .container)
        try container.encode([["mode": network.rawValue]], forKey: .networks)
    }

    /// The grace period between SIGTERM and SIGKILL when an instance is stopped.
    public var killGracePeriod: Double { taskKillGracePeriodSeconds ?? Defaults.taskKillGracePeriodSeconds }

    /// Whether two definitions differ in anything that requires restarting instances (anything but
    /// `instances`): Marathon's distinction between a scaling change and a config change.
    /// `alerts` and `autoscale` concern the agent, not the instances: changing them restarts nothing.
    public func requiresRestart(comparedTo other: AppDefinition) -> Bool {
        var scaled = other
        scaled.instances = instances
        scaled.alerts = alerts
        scaled.autoscale = autoscale
        return scaled != self
    }
}

extension AppDefinition {
    /// The fields a client may send; anything else is an unknown field (Marathon rejects those too).
    public static let knownFields: Set<String> = Set(CodingKeys.allCases.map(\.rawValue)).union([
        // Read-only fields clients echo back from a GET; accepted and ignored.
        "version", "versionInfo", "tasksStaged", "tasksRunning", "tasksHealthy", "tasksUnhealthy", "deployments",
        "tasks", "lastTaskFailure", "taskStats", "tasksStats", "readinessCheckResults", "storeUrls", "counts",
    ])

    /// Decodes a definition from a JSON object, turning decoder failures into Marathon-style field errors
    /// and checking every rule in `validate()`.
    public static func decode(_ object: [String: JSONValue]) throws(FlotillaError) -> AppDefinition {
        let unknown = object.keys.filter { !knownFields.contains($0) }.sorted()
        if !unknown.isEmpty {
            throw .invalid(unknown.map { FieldError("/\($0)", "unknown field; check its spelling against the app definition reference") })
        }
        let definition: AppDefinition
        do {
            let data = try JSONEncoder().encode(JSONValue.object(object))
            definition = try JSONDecoder().decode(AppDefinition.self, from: data)
        } catch let error as FlotillaError {
            throw error
        } catch let error as DecodingError {
            throw .invalid([FieldError(error.marathonPath, error.plainDescription)])
        } catch {
            throw .invalid([FieldError("/", "\(error)")])
        }
        var problems = definition.validate()
        // Dependencies are paths relative to the app's group, as Marathon resolves them.
        var resolved = definition
        resolved.dependencies = []
        for (index, dependency) in definition.dependencies.enumerated() {
            do {
                resolved.dependencies.append(try GroupID(dependency, relativeTo: GroupID.parent(of: definition.id)).path)
            } catch {
                problems.append(FieldError("/dependencies(\(index))", "'\(dependency)' is not a path"))
            }
        }
        if !problems.isEmpty { throw .invalid(problems) }
        return resolved
    }

    /// Every semantic rule a definition must satisfy; empty when it is valid.
    public func validate() -> [FieldError] {
        var problems: [FieldError] = []
        func check(_ condition: Bool, _ path: String, _ message: String) {
            if !condition { problems.append(FieldError(path, message)) }
        }
        let hasCommand = !(cmd ?? "").trimmingCharacters(in: .whitespaces).isEmpty
        let hasArgs = !(args ?? []).isEmpty
        check(hasCommand || hasArgs || container != nil, "/", "an app must have 'cmd' or 'args' (or a container image)")
        check(!(hasCommand && hasArgs), "/", "an app may have 'cmd' or 'args', not both")
        check(instances >= 0, "/instances", "must be zero or more, got \(instances)")
        check(cpus >= 0.001 && cpus.isFinite, "/cpus", "must be at least 0.001, got \(cpus)")
        if let last = id.segments.last {
            check(!["restart", "tasks", "versions"].contains(last), "/id",
                  "must not end with any of the following reserved keywords: restart, tasks, versions")
        }
        if let cmd {
            check(cmd.trimmingCharacters(in: .whitespaces).isEmpty || cmd.count > 1, "/cmd", "must be longer than one character")
        }
        var alertNames: Set<String> = []
        for (index, rule) in alerts.enumerated() {
            problems += rule.problems(at: "/alerts/\(index)")
            check(alertNames.insert(rule.name).inserted, "/alerts/\(index)/name", "another alert of the app is named \(rule.name)")
        }
        check(alerts.count <= 50, "/alerts", "at most 50 alert rules per app")
        if let autoscale { problems += autoscale.problems(at: "/autoscale") }
        for (name, secret) in secrets.sorted(by: { $0.key < $1.key }) {
            check(!name.isEmpty && !name.contains("/"), "/secrets/\(name)", "a secret's name must be non-empty and without '/'")
            check(secret.path != nil, "/secrets/\(name)/source", "must be a secret path such as shop/db or shop/db@password")
        }
        for (name, value) in env.sorted(by: { $0.key < $1.key }) {
            if case .secret(let secret) = value, secrets[secret] == nil {
                problems.append(FieldError("/env/\(name)", "references the secret '\(secret)', which 'secrets' does not declare"))
            }
        }
        for (index, volume) in (container?.volumes ?? []).enumerated() {
            if let secret = volume.secret, secrets[secret] == nil {
                problems.append(FieldError("/container/volumes(\(index))/secret", "references the secret '\(secret)', which 'secrets' does not declare"))
            }
        }
        if labels["MARATHON_SINGLE_INSTANCE_APP"]?.lowercased() == "true" {
            check(instances <= 1, "/instances", "Single instance app may only have one instance")
            check(upgradeStrategy.minimumHealthCapacity == 0 && upgradeStrategy.maximumOverCapacity == 0, "/upgradeStrategy",
                  "Single instance app may only have an upgrade strategy of minimumHealthCapacity 0 and maximumOverCapacity 0")
        }
        check(mem >= 0 && mem.isFinite, "/mem", "must be zero or more (MiB)")
        check(disk >= 0 && disk.isFinite, "/disk", "must be zero or more (MiB)")
        check(gpus == 0, "/gpus", "this agent has no GPUs to give")
        check(backoffSeconds >= 0, "/backoffSeconds", "must be zero or more")
        check(backoffFactor >= 1.0, "/backoffFactor", "must be 1.0 or more")
        check(maxLaunchDelaySeconds >= 0, "/maxLaunchDelaySeconds", "must be zero or more")
        if let grace = taskKillGracePeriodSeconds {
            check(grace >= 0 && grace <= 3600, "/taskKillGracePeriodSeconds", "must be between 0 and 3600")
        }
        check(
            (0...1).contains(upgradeStrategy.minimumHealthCapacity), "/upgradeStrategy/minimumHealthCapacity",
            "must be between 0.0 and 1.0")
        check(
            (0...1).contains(upgradeStrategy.maximumOverCapacity), "/upgradeStrategy/maximumOverCapacity",
            "must be between 0.0 and 1.0")
        check(
            !(upgradeStrategy.minimumHealthCapacity == 1 && upgradeStrategy.maximumOverCapacity == 0 && instances > 0),
            "/upgradeStrategy", "minimumHealthCapacity 1 with maximumOverCapacity 0 leaves no room to replace an instance")
        check(drainSeconds >= 0 && drainSeconds <= 3600, "/drainSeconds", "must be between 0 and 3600")
        check(
            upgradeStrategy.progressDeadlineSeconds > 0, "/upgradeStrategy/progressDeadlineSeconds", "must be more than zero")
        check(upgradeStrategy.maxConsecutiveCrashes >= 1, "/upgradeStrategy/maxConsecutiveCrashes", "must be 1 or more")
        check(upgradeStrategy.keepOldSeconds >= 0, "/upgradeStrategy/keepOldSeconds", "must be zero or more")
        if let user, !user.isEmpty {
            check(
                user.utf8.count <= 32 && user.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || "._-$".unicodeScalars.contains($0) },
                "/user", "'\(user)' is not a user name")
        }
        for (name, _) in env {
            check(!name.isEmpty && !name.contains("=") && !name.contains("\0"), "/env/\(name)", "not a valid variable name")
        }
        var seenPorts: Set<Int> = []
        var seenNames: Set<String> = []
        for (index, definition) in portDefinitions.enumerated() {
            let path = "/portDefinitions(\(index))"
            check((0...65535).contains(definition.port), path + "/port", "must be between 0 and 65535")
            if definition.port != 0 {
                check(seenPorts.insert(definition.port).inserted, path + "/port", "port \(definition.port) is listed twice")
            }
            check(["tcp", "udp", "udp,tcp", "tcp,udp"].contains(definition.protocol), path + "/protocol", "must be tcp, udp or udp,tcp")
            if let name = definition.name {
                check(seenNames.insert(name).inserted, path + "/name", "port name '\(name)' is used twice")
            }
        }
        for (index, constraint) in constraints.enumerated() {
            if let problem = constraint.problem {
                problems.append(FieldError("/constraints(\(index))", problem))
            }
        }
        if let container { problems += container.problems(network: network) }
        if network == .bridge && requirePorts {
            problems.append(FieldError("/requirePorts", "requirePorts is for host networking; with container/bridge give hostPort in portMappings"))
        }
        for (index, check) in healthChecks.enumerated() {
            for problem in check.problems(portCount: ports.count) {
                problems.append(FieldError("/healthChecks(\(index))" + problem.path, problem.errors.joined(separator: "; ")))
            }
        }
        check(readinessChecks.count <= 1, "/readinessChecks", "an app may have at most one readiness check")
        if case .amount(let limit)? = resourceLimits?.cpus {
            check(limit >= cpus, "/resourceLimits/cpus", "must be at least cpus (\(cpus)), or \"unlimited\"")
        }
        if case .amount(let limit)? = resourceLimits?.mem {
            check(limit >= mem, "/resourceLimits/mem", "must be at least mem (\(mem)), or \"unlimited\"")
        }
        if case .after(let inactive, let expunge) = unreachableStrategy {
            check(inactive >= 0 && expunge >= 0, "/unreachableStrategy", "the seconds must be zero or more")
            check(inactive <= expunge, "/unreachableStrategy/inactiveAfterSeconds",
                  "inactiveAfterSeconds (\(Int(inactive))) must be less or equal to expungeAfterSeconds, which is \(Int(expunge))")
        }
        for (index, artifact) in fetch.enumerated() {
            check(!artifact.uri.isEmpty, "/fetch(\(index))/uri", "must not be empty")
            for (field, path) in [("outputFile", artifact.outputFile), ("destPath", artifact.destPath)] {
                guard let path else { continue }
                check(!path.hasPrefix("/") && !path.split(separator: "/").contains(".."), "/fetch(\(index))/\(field)",
                      "must be a path inside the sandbox (relative, without '..')")
            }
        }
        for (index, readiness) in readinessChecks.enumerated() {
            for problem in readiness.problems(portNames: ports.map(\.name)) {
                problems.append(FieldError("/readinessChecks(\(index))" + problem.path, problem.errors.joined(separator: "; ")))
            }
        }
        return problems
    }
}

/// Where one of an app's secrets comes from: `{"source": "shop/db@password"}` is the key
/// `password` of the secret at `shop/db` (Vault's `secret/data/shop/db`); without `@key`, a secret
/// with one key gives that key's value, one with several its JSON object.
public struct SecretSource: Sendable, Hashable, Codable {
    public var source: String

    public init(source: String) {
        self.source = source
    }

    /// The secret's path and key, or nil when `source` is not a usable path.
    public var path: (path: String, key: String?)? {
        let parts = source.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts[0]).trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        guard !path.isEmpty, !path.split(separator: "/", omittingEmptySubsequences: false).contains(where: { $0.isEmpty || $0 == "." || $0 == ".." })
        else { return nil }
        if parts.count == 2 {
            guard !parts[1].isEmpty else { return nil }
            return (path, String(parts[1]))
        }
        return (path, nil)
    }

    /// Every secret name the app uses: in env and in volumes.
    public static func names(usedBy definition: AppDefinition) -> Set<String> {
        var names = Set(definition.env.values.compactMap { value -> String? in
            if case .secret(let name) = value { name } else { nil }
        })
        for volume in definition.container?.volumes ?? [] { if let secret = volume.secret { names.insert(secret) } }
        return names
    }
}

/// An environment variable's value: a literal, or a reference to a named secret.
public enum EnvValue: Sendable, Hashable, Codable {
    case value(String)
    case secret(String)

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let text = try? container.decode(String.self) {
            self = .value(text)
        } else if let reference = try? container.decode([String: String].self), let name = reference["secret"] {
            self = .secret(name)
        } else {
            throw DecodingError.typeMismatch(
                String.self,
                .init(codingPath: decoder.codingPath, debugDescription: "an env value is a string or {\"secret\": \"name\"}"))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .value(let text): try container.encode(text)
        case .secret(let name): try container.encode(["secret": name])
        }
    }
}

public struct PortDefinition: Sendable, Hashable, Codable {
    /// The host port; 0 asks for any free port from the node's range.
    public var port: Int
    public var `protocol`: String
    public var name: String?
    public var labels: [String: String]

    public init(port: Int, protocol: String = "tcp", name: String? = nil, labels: [String: String] = [:]) {
        self.port = port
        self.protocol = `protocol`
        self.name = name
        self.labels = labels
    }

    enum CodingKeys: String, CodingKey { case port, `protocol`, name, labels }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        port = try container.decodeIfPresent(Int.self, forKey: .port) ?? 0
        `protocol` = try container.decodeIfPresent(String.self, forKey: .protocol) ?? "tcp"
        name = try container.decodeIfPresent(String.self, forKey: .name)
        labels = try container.decodeIfPresent([String: String].self, forKey: .labels) ?? [:]
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(port, forKey: .port)
        try container.encode(`protocol`, forKey: .protocol)
        try container.encodeIfPresent(name, forKey: .name)
        try container.encode(labels, forKey: .labels)
    }
}

public struct UpgradeStrategy: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
        case rolling
        case blueGreen = "blue-green"

        public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
    }

    public var minimumHealthCapacity: Double
    public var maximumOverCapacity: Double
    /// Flotilla's: `rolling` (Marathon's behaviour) or `blue-green`.
    public var type: Kind
    /// Flotilla's: a deployment whose new instances are not all ready by then fails.
    public var progressDeadlineSeconds: Double
    /// Flotilla's: a failed deployment restores the previous version by itself.
    public var autoRollback: Bool
    /// Flotilla's: this many crashes in a row of new instances fail the deployment.
    public var maxConsecutiveCrashes: Int
    /// Flotilla's, for blue-green: how long the old set stays warm after the switch.
    public var keepOldSeconds: Double

    public static let defaultProgressDeadlineSeconds = 300.0
    public static let defaultMaxConsecutiveCrashes = 3
    public static let defaultKeepOldSeconds = 60.0

    public init(
        minimumHealthCapacity: Double = 1, maximumOverCapacity: Double = 1, type: Kind = .rolling,
        progressDeadlineSeconds: Double = UpgradeStrategy.defaultProgressDeadlineSeconds, autoRollback: Bool = true,
        maxConsecutiveCrashes: Int = UpgradeStrategy.defaultMaxConsecutiveCrashes, keepOldSeconds: Double = UpgradeStrategy.defaultKeepOldSeconds
    ) {
        self.minimumHealthCapacity = minimumHealthCapacity
        self.maximumOverCapacity = maximumOverCapacity
        self.type = type
        self.progressDeadlineSeconds = progressDeadlineSeconds
        self.autoRollback = autoRollback
        self.maxConsecutiveCrashes = maxConsecutiveCrashes
        self.keepOldSeconds = keepOldSeconds
    }

    enum CodingKeys: String, CodingKey {
        case minimumHealthCapacity, maximumOverCapacity, type, progressDeadlineSeconds, autoRollback, maxConsecutiveCrashes, keepOldSeconds
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        minimumHealthCapacity = try container.decodeIfPresent(Double.self, forKey: .minimumHealthCapacity) ?? 1
        maximumOverCapacity = try container.decodeIfPresent(Double.self, forKey: .maximumOverCapacity) ?? 1
        type = try container.decodeIfPresent(Kind.self, forKey: .type) ?? .rolling
        progressDeadlineSeconds =
            try container.decodeIfPresent(Double.self, forKey: .progressDeadlineSeconds) ?? Self.defaultProgressDeadlineSeconds
        autoRollback = try container.decodeIfPresent(Bool.self, forKey: .autoRollback) ?? true
        maxConsecutiveCrashes = try container.decodeIfPresent(Int.self, forKey: .maxConsecutiveCrashes) ?? Self.defaultMaxConsecutiveCrashes
        keepOldSeconds = try container.decodeIfPresent(Double.self, forKey: .keepOldSeconds) ?? Self.defaultKeepOldSeconds
    }
}

public enum KillSelection: String, Sendable, Hashable, Codable, CaseInsensitiveEnum {
    case youngestFirst = "YOUNGEST_FIRST"
    case oldestFirst = "OLDEST_FIRST"

    public init(from decoder: any Decoder) throws { self = try Self.decodeIgnoringCase(from: decoder) }
}

/// Marathon reads enum values in any case (`Youngest_First`, `http`).
public protocol CaseInsensitiveEnum: RawRepresentable, CaseIterable where RawValue == String {}

extension CaseInsensitiveEnum {
    static func decodeIgnoringCase(from decoder: any Decoder) throws -> Self {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let value = allCases.first(where: { $0.rawValue.lowercased() == text.lowercased() }) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "'\(text)' is not one of \(allCases.map(\.rawValue).joined(separator: ", "))"))
        }
        return value
    }
}
