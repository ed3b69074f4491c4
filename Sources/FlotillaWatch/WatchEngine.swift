public import FlotillaCore
import Foundation
public import Logging
public import ServiceLifecycle

/// What one round of alert evaluation and autoscaling reads.
public struct AlertInputs: Sendable {
    public struct App: Sendable {
        public var id: String
        public var memMiB: Double
        public var rules: [AlertRule]
        public var instances: [InstanceUsageReport]
        public var requests: RequestFigures?
        /// The app's `instances` now, its `autoscale`, and whether a deployment holds it.
        public var instancesWanted: Int
        public var autoscale: AutoscalePolicy?
        public var deploying: Bool

        public init(
            id: String, memMiB: Double, rules: [AlertRule], instances: [InstanceUsageReport], requests: RequestFigures?,
            instancesWanted: Int = 0, autoscale: AutoscalePolicy? = nil, deploying: Bool = false
        ) {
            self.id = id
            self.memMiB = memMiB
            self.rules = rules
            self.instances = instances
            self.requests = requests
            self.instancesWanted = instancesWanted
            self.autoscale = autoscale
            self.deploying = deploying
        }
    }

    public var apps: [App]
    /// The `/metrics` series the rules name (`seriesNames`), added up (see `MetricSums`).
    public var series: MetricSums
    /// Every node that answered, and how many are down (for node and cluster rules).
    public var nodes: [NodeUsageReport]
    public var nodesDown: Int

    public init(apps: [App], series: MetricSums, nodes: [NodeUsageReport] = [], nodesDown: Int = 0) {
        self.apps = apps
        self.series = series
        self.nodes = nodes
        self.nodesDown = nodesDown
    }

    /// The `/metrics` names that these metrics (of rules and autoscale policies) read.
    public static func seriesNames(_ metrics: [AlertMetric]) -> Set<String> {
        Set(metrics.compactMap { if case .series(let name) = $0 { name } else { nil } })
    }
}

/// Watches every app's figures once per interval:
/// - alert rules: each rule's value over its window, its level with hysteresis and `forSeconds`
///   (`AlertTracker`), an `alert_state_changed_event` and a notification for each change;
/// - autoscaling: each `autoscale` policy's figure per instance, and a change of `instances`
///   (`AutoscaleState`) made as a normal deployment, with an `autoscale_event` saying why.
/// In a cluster only the leader watches (`inputs` answers nil elsewhere), with every node's figures.
public actor WatchEngine: Service {
    /// This round's figures; nil on a node that does not evaluate (a follower).
    public typealias Inputs = @Sendable () async -> AlertInputs?

    /// An alert: what it is about (an app, a node, the cluster) and its rule's name.
    struct Key: Hashable {
        var scope: String
        var app: String?
        var node: String?
        var alert: String
    }

    struct Tracked {
        var rule: AlertRule
        var tracker: AlertTracker
        var warning: Double?
        var critical: Double?
        var since: Date
    }

    /// Changes an app's `instances` through a deployment; answers its id.
    public typealias Scale = @Sendable (_ app: String, _ instances: Int) async throws -> String

    struct Scaling {
        var policy: AutoscalePolicy
        var state: AutoscaleState
        /// Per-instance samples (a counter series: the app's raw sums).
        var samples: [(time: Double, value: Double)] = []
    }

    private let interval: Duration
    private let inputs: Inputs
    private let scale: Scale?
    private let clusterRules: [ClusterAlertRule]
    private var scaling: [String: Scaling] = [:]
    /// Level changes of this round, for the notifier.
    private var changes: [(AlertStatus, AlertLevel)] = []
    private let events: EventBus
    private let notifier: AlertNotifier?
    private let logger: Logger
    private var tracked: [Key: Tracked] = [:]
    /// When instances of each app ended on their own (for `restarts`), newest last.
    private var failures: [String: [Double]] = [:]
    private let started = ContinuousClock.now

    public init(
        interval: Duration, inputs: @escaping Inputs, scale: Scale?, clusterRules: [ClusterAlertRule] = [], events: EventBus, notifier: AlertNotifier?,
        logger: Logger
    ) {
        self.clusterRules = clusterRules
        self.interval = interval
        self.inputs = inputs
        self.scale = scale
        self.events = events
        self.notifier = notifier
        self.logger = logger
    }

    public func run() async throws {
        let stream = events.subscribe()
        await withDiscardingTaskGroup { group in
            group.addTask {
                for await published in stream {
                    if case .statusUpdate(let spec, let status) = published.event, status.state.countsAsFailure || status.oomKilled {
                        await self.instanceEnded(app: spec.appID.path)
                    }
                }
            }
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                await evaluate()
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: self.interval) }
            }
            group.cancelAll()
        }
    }

    private var now: Double {
        let elapsed = ContinuousClock.now - started
        let (seconds, attoseconds) = elapsed.components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    func instanceEnded(app: String) {
        failures[app, default: []].append(now)
        if failures[app]!.count > 10_000 { failures[app]!.removeFirst(failures[app]!.count - 10_000) }
    }

    /// One round. Public for tests.
    public func evaluate() async {
        guard let inputs = await inputs() else {
            // Not this node's job (a follower): forget, so a new leader starts clean.
            tracked = [:]
            scaling = [:]
            return
        }
        await autoscale(inputs, at: now)
        let time = now
        let wallClock = Date()
        var seen: Set<Key> = []
        func observe(_ key: Key, _ rule: AlertRule, value: Double?, warning: Double?, critical: Double?) {
            seen.insert(key)
            let previous = tracked[key]
            var entry = previous.flatMap { $0.rule == rule ? $0 : nil }
                ?? Tracked(rule: rule, tracker: AlertTracker(now: time), warning: warning, critical: critical, since: wallClock)
            let isCounter = if case .series(let name) = rule.metric { name.hasSuffix("_total") } else { false }
            let transition = entry.tracker.observe(
                value, at: time, rule: rule, warning: entry.warning, critical: entry.critical, rate: isCounter, count: rule.metric == .restarts)
            if transition != nil { entry.since = wallClock }
            tracked[key] = entry
            // A rule that changed while its alert was up: the old one ends.
            if let previous, previous.rule != rule, previous.tracker.level != .ok {
                announce(status(key, previous, state: .ok), previous: previous.tracker.level)
            }
            if let transition { announce(status(key, entry), previous: transition.from) }
        }
        for app in inputs.apps {
            for rule in app.rules {
                observe(
                    Key(scope: "app", app: app.id, alert: rule.name), rule, value: value(of: rule, app: app, series: inputs.series, now: time),
                    warning: rule.warning.map { rule.resolved($0, memMiB: app.memMiB) }, critical: rule.critical.map { rule.resolved($0, memMiB: app.memMiB) })
            }
        }
        for rule in clusterRules {
            switch rule.scope {
            case .node:
                for node in inputs.nodes where rule.node == nil || rule.node == node.node {
                    observe(
                        Key(scope: "node", node: node.node, alert: rule.name), rule.rule,
                        value: Self.nodeValue(rule.metric, of: [node], series: inputs.series.value(rule.metric, node: node.node)),
                        warning: rule.warning, critical: rule.critical)
                }
            case .cluster:
                let value = rule.metric == "nodesDown"
                    ? Double(inputs.nodesDown) : Self.nodeValue(rule.metric, of: inputs.nodes, series: inputs.series.total(rule.metric))
                observe(Key(scope: "cluster", alert: rule.name), rule.rule, value: value, warning: rule.warning, critical: rule.critical)
            }
        }
        for (key, entry) in tracked where !seen.contains(key) {
            tracked[key] = nil
            if entry.tracker.level != .ok { announce(status(key, entry, state: .ok), previous: entry.tracker.level) }
        }
        failures = failures.filter { inputs.apps.map(\.id).contains($0.key) }
        if let notifier {
            let changed = changes
            changes = []
            for (status, previous) in changed { await notifier.changed(status, previous: previous, at: wallClock) }
            let active = statuses(app: nil).filter { $0.state != .ok }
            await notifier.round(active: active, at: wallClock)
        }
    }

    /// A node rule's value over `nodes` (one, or all for a cluster rule); a `/metrics` name's is `series`.
    static func nodeValue(_ metric: String, of nodes: [NodeUsageReport], series: Double?) -> Double? {
        guard !nodes.isEmpty else { return nil }
        func share(_ used: Double, _ total: Double) -> Double? { total > 0 ? used / total : nil }
        switch metric {
        case "cpu":
            let measured = nodes.filter { $0.cpuCoresUsed != nil }
            return share(measured.reduce(0) { $0 + ($1.cpuCoresUsed ?? 0) }, Double(measured.reduce(0) { $0 + $1.cpus }))
        case "memory":
            let total = nodes.reduce(0.0) { $0 + Double($1.memoryTotalBytes) }
            return share(total - nodes.reduce(0.0) { $0 + Double($1.memoryAvailableBytes) }, total)
        case "disk":
            let total = nodes.reduce(0.0) { $0 + Double($1.diskTotalBytes) }
            return share(total - nodes.reduce(0.0) { $0 + Double($1.diskFreeBytes) }, total)
        case "load1":
            return share(nodes.reduce(0) { $0 + $1.load1 }, Double(nodes.reduce(0) { $0 + $1.cpus }))
        default:
            return series
        }
    }

    private func announce(_ status: AlertStatus, previous: AlertLevel) {
        let line = "alert \(status.alert) of \(status.subject): \(previous.rawValue) → \(status.state.rawValue) (\(status.metric) = \(status.value.map { String($0) } ?? "no data"))"
        switch status.state {
        case .critical: logger.error("\(line)")
        case .warning: logger.warning("\(line)")
        case .ok: logger.notice("\(line)")
        }
        events.publish(.alertChanged(status, previous: previous))
        // Handed over in order at the end of the round: a Task each could reach the notifier out of order.
        if notifier != nil { changes.append((status, previous)) }
    }

    /// Every alert's status now, sorted by app and name; of one app with `app`.
    public func statuses(app: String?) -> [AlertStatus] {
        tracked.filter { app == nil || $0.key.app == app }.map { status($0.key, $0.value) }
            .sorted { ($0.scope, $0.subject, $0.alert) < ($1.scope, $1.subject, $1.alert) }
    }

    private func status(_ key: Key, _ entry: Tracked, state: AlertLevel? = nil) -> AlertStatus {
        AlertStatus(
            scope: key.scope, app: key.app, node: key.node, alert: key.alert, metric: entry.rule.metric.name, state: state ?? entry.tracker.level, value: entry.tracker.value,
            warning: entry.warning, critical: entry.critical, windowSeconds: entry.rule.window, forSeconds: entry.rule.forSeconds,
            since: Timestamp.format(entry.since), pending: state == nil ? entry.tracker.pending.keys.max() : nil)
    }

    // MARK: - Autoscaling

    private func autoscale(_ inputs: AlertInputs, at time: Double) async {
        var seen: Set<String> = []
        for app in inputs.apps {
            guard let policy = app.autoscale else { continue }
            seen.insert(app.id)
            var entry = scaling[app.id].flatMap { $0.policy == policy ? $0 : nil } ?? Scaling(policy: policy, state: AutoscaleState(now: time))
            let isCounter = if case .series(let name) = policy.metric { name.hasSuffix("_total") } else { false }
            let current = app.instancesWanted
            if let sample = perInstance(policy.metric, app: app, series: inputs.series, raw: isCounter) {
                entry.samples.append((time, sample))
            }
            while entry.samples.count > (isCounter ? 2 : 1), time - entry.samples[isCounter ? 1 : 0].time >= AutoscalePolicy.window {
                entry.samples.removeFirst()
            }
            var value = AlertTracker.windowed(entry.samples, rate: isCounter)
            if isCounter { value = value.map { $0 / Double(max(1, current)) } }
            // A deployment holds the app (a user's, or the last scaling): decide once it is done.
            guard !app.deploying else {
                scaling[app.id] = entry
                continue
            }
            let target = policy.resolvedTarget(memMiB: app.memMiB)
            let decision = entry.state.decide(current: current, value: value, target: target, policy: policy, now: time)
            scaling[app.id] = entry
            guard let decision, let scale else { continue }
            do {
                let deployment = try await scale(app.id, decision.to)
                logger.notice("autoscaling \(app.id): \(decision.from) → \(decision.to) instances (\(decision.reason)), deployment \(deployment)")
                events.publish(.autoscaled(
                    app: app.id, from: decision.from, to: decision.to, reason: decision.reason, metric: policy.metric.name, value: value,
                    target: target, deploymentID: deployment))
            } catch {
                logger.warning("autoscaling \(app.id) to \(decision.to) instances failed: \(error)")
            }
        }
        scaling = scaling.filter { seen.contains($0.key) }
    }

    /// A policy's sample this round: its figure per instance (a counter: the app's raw sum).
    private func perInstance(_ metric: AlertMetric, app: AlertInputs.App, series: MetricSums, raw: Bool) -> Double? {
        let count = Double(max(1, app.instancesWanted))
        switch metric {
        case .cpu:
            let cores = app.instances.compactMap(\.cpuCores)
            return cores.isEmpty ? nil : cores.reduce(0, +) / Double(cores.count)
        case .memory:
            let bytes = app.instances.compactMap(\.memoryBytes)
            return bytes.isEmpty ? nil : Double(bytes.reduce(0, +)) / Double(bytes.count)
        case .requestsPerSecond:
            return app.requests.map { $0.requestsPerSecond / count }
        case .series(let name):
            return series.value(name, app: app.id).map { raw ? $0 : $0 / count }
        case .errorRate, .restarts:
            return nil  // refused in a policy
        }
    }

    /// A rule's sample this round; nil when there is nothing to measure.
    private func value(of rule: AlertRule, app: AlertInputs.App, series: MetricSums, now: Double) -> Double? {
        switch rule.metric {
        case .cpu:
            let cores = app.instances.compactMap(\.cpuCores)
            return cores.isEmpty ? nil : cores.reduce(0, +) / Double(cores.count)
        case .memory:
            return app.instances.compactMap(\.memoryBytes).max().map { Double($0) }
        case .requestsPerSecond:
            return app.requests?.requestsPerSecond
        case .errorRate:
            return app.requests?.errorRate
        case .restarts:
            return Double(failures[app.id]?.filter { now - $0 <= rule.window }.count ?? 0)
        case .series(let name):
            return series.value(name, app: app.id)
        }
    }
}

/// Sums of `/metrics` series by name: those labelled `app` by app, and all of a name together.
public struct MetricSums: Sendable {
    var byApp: [String: [String: Double]] = [:]
    var byNode: [String: [String: Double]] = [:]
    var totals: [String: Double] = [:]
    var labelled: Set<String> = []

    public init() {}

    /// The series of an app when the metric is labelled by app, else the metric's total.
    public func value(_ name: String, app: String) -> Double? {
        if labelled.contains(name) { return byApp[name]?[app] }
        return totals[name]
    }

    /// The series labelled with a node, added up.
    public func value(_ name: String, node: String) -> Double? { byNode[name]?[node] }

    /// Every series of a name, added up.
    public func total(_ name: String) -> Double? { totals[name] }

    /// Reads Prometheus' text format, keeping only the `names` asked for. Lines it cannot read are skipped.
    public static func parse(_ text: String, names: Set<String>) -> MetricSums {
        var sums = MetricSums()
        guard !names.isEmpty else { return sums }
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let nameEnd = line.firstIndex { $0 == "{" || $0 == " " } ?? line.endIndex
            let name = String(line[..<nameEnd])
            guard names.contains(name), let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            sums.totals[name, default: 0] += value
            guard line[nameEnd] == "{" else { continue }
            if let app = label("app", in: line[nameEnd..<space]) {
                sums.labelled.insert(name)
                sums.byApp[name, default: [:]][app, default: 0] += value
            }
            if let node = label("node", in: line[nameEnd..<space]) { sums.byNode[name, default: [:]][node, default: 0] += value }
        }
        return sums
    }

    /// A label's value in `{a="x",b="y"}`, escapes undone.
    static func label(_ wanted: String, in labels: Substring) -> String? {
        var rest = labels.dropFirst()
        while let equals = rest.firstIndex(of: "=") {
            let key = rest[..<equals].trimmingCharacters(in: CharacterSet(charactersIn: ", "))
            var index = rest.index(after: equals)
            guard index < rest.endIndex, rest[index] == "\"" else { return nil }
            index = rest.index(after: index)
            var value = ""
            var escaped = false
            while index < rest.endIndex {
                let character = rest[index]
                if escaped {
                    value.append(character == "n" ? "\n" : character)
                    escaped = false
                } else if character == "\\" {
                    escaped = true
                } else if character == "\"" {
                    break
                } else {
                    value.append(character)
                }
                index = rest.index(after: index)
            }
            if key == wanted { return value }
            guard index < rest.endIndex else { return nil }
            rest = rest[rest.index(after: index)...]
        }
        return nil
    }
}
