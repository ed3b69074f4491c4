public import FlotillaCore
import Foundation
public import Logging
public import ServiceLifecycle

/// What one round of alert evaluation reads.
public struct AlertInputs: Sendable {
    public struct App: Sendable {
        public var id: String
        public var memMiB: Double
        public var rules: [AlertRule]
        public var instances: [InstanceUsageReport]
        public var requests: RequestFigures?

        public init(id: String, memMiB: Double, rules: [AlertRule], instances: [InstanceUsageReport], requests: RequestFigures?) {
            self.id = id
            self.memMiB = memMiB
            self.rules = rules
            self.instances = instances
            self.requests = requests
        }
    }

    public var apps: [App]
    /// The `/metrics` series the rules name (`seriesNames`), added up (see `MetricSums`).
    public var series: MetricSums

    public init(apps: [App], series: MetricSums) {
        self.apps = apps
        self.series = series
    }

    /// The `/metrics` names that rules of these definitions read.
    public static func seriesNames(_ rules: [AlertRule]) -> Set<String> {
        Set(rules.compactMap { if case .series(let name) = $0.metric { name } else { nil } })
    }
}

/// Evaluates every app's alert rules once per interval: each rule's value over its window, its
/// level with hysteresis and `forSeconds` (`AlertTracker`), an `alert_state_changed_event` and a
/// notification for each change. In a cluster only the leader evaluates (`inputs` answers nil
/// elsewhere), with figures from every node.
public actor AlertEngine: Service {
    /// This round's figures; nil on a node that does not evaluate (a follower).
    public typealias Inputs = @Sendable () async -> AlertInputs?

    struct Key: Hashable {
        var app: String
        var alert: String
    }

    struct Tracked {
        var rule: AlertRule
        var tracker: AlertTracker
        var warning: Double?
        var critical: Double?
        var since: Date
    }

    private let interval: Duration
    private let inputs: Inputs
    private let events: EventBus
    private let notifier: AlertNotifier?
    private let logger: Logger
    private var tracked: [Key: Tracked] = [:]
    /// When instances of each app ended on their own (for `restarts`), newest last.
    private var failures: [String: [Double]] = [:]
    private let started = ContinuousClock.now

    public init(interval: Duration, inputs: @escaping Inputs, events: EventBus, notifier: AlertNotifier?, logger: Logger) {
        self.interval = interval
        self.inputs = inputs
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
            return
        }
        let time = now
        let wallClock = Date()
        var seen: Set<Key> = []
        for app in inputs.apps {
            for rule in app.rules {
                let key = Key(app: app.id, alert: rule.name)
                seen.insert(key)
                var entry = tracked[key].flatMap { $0.rule == rule ? $0 : nil }
                    ?? Tracked(
                        rule: rule, tracker: AlertTracker(now: time), warning: rule.warning.map { rule.resolved($0, memMiB: app.memMiB) },
                        critical: rule.critical.map { rule.resolved($0, memMiB: app.memMiB) }, since: wallClock)
                let previous = tracked[key]
                let value = self.value(of: rule, app: app, series: inputs.series, now: time)
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
        }
        for (key, entry) in tracked where !seen.contains(key) {
            tracked[key] = nil
            if entry.tracker.level != .ok { announce(status(key, entry, state: .ok), previous: entry.tracker.level) }
        }
        failures = failures.filter { inputs.apps.map(\.id).contains($0.key) }
        if let notifier {
            let active = statuses(app: nil).filter { $0.state != .ok }
            await notifier.round(active: active, at: wallClock)
        }
    }

    private func announce(_ status: AlertStatus, previous: AlertLevel) {
        let line = "alert \(status.alert) of \(status.app): \(previous.rawValue) → \(status.state.rawValue) (\(status.metric) = \(status.value.map { String($0) } ?? "no data"))"
        switch status.state {
        case .critical: logger.error("\(line)")
        case .warning: logger.warning("\(line)")
        case .ok: logger.notice("\(line)")
        }
        events.publish(.alertChanged(status, previous: previous))
        if let notifier { Task { await notifier.changed(status, previous: previous) } }
    }

    /// Every alert's status now, sorted by app and name; of one app with `app`.
    public func statuses(app: String?) -> [AlertStatus] {
        tracked.filter { app == nil || $0.key.app == app }.map { status($0.key, $0.value) }.sorted { ($0.app, $0.alert) < ($1.app, $1.alert) }
    }

    private func status(_ key: Key, _ entry: Tracked, state: AlertLevel? = nil) -> AlertStatus {
        AlertStatus(
            app: key.app, alert: key.alert, metric: entry.rule.metric.name, state: state ?? entry.tracker.level, value: entry.tracker.value,
            warning: entry.warning, critical: entry.critical, windowSeconds: entry.rule.window, forSeconds: entry.rule.forSeconds,
            since: Timestamp.format(entry.since), pending: state == nil ? entry.tracker.pending.keys.max() : nil)
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
    var totals: [String: Double] = [:]
    var labelled: Set<String> = []

    public init() {}

    /// The series of an app when the metric is labelled by app, else the metric's total.
    public func value(_ name: String, app: String) -> Double? {
        if labelled.contains(name) { return byApp[name]?[app] }
        return totals[name]
    }

    /// Reads Prometheus' text format, keeping only the `names` asked for. Lines it cannot read are skipped.
    public static func parse(_ text: String, names: Set<String>) -> MetricSums {
        var sums = MetricSums()
        guard !names.isEmpty else { return sums }
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let nameEnd = line.firstIndex { $0 == "{" || $0 == " " } ?? line.endIndex
            let name = String(line[..<nameEnd])
            guard names.contains(name), let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            sums.totals[name, default: 0] += value
            if line[nameEnd] == "{", let app = label("app", in: line[nameEnd..<space]) {
                sums.labelled.insert(name)
                sums.byApp[name, default: [:]][app, default: 0] += value
            }
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
