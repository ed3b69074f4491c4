import Foundation

/// What an alert rule watches.
public enum AlertMetric: Sendable, Hashable {
    /// CPU cores used per instance, averaged over the app's instances (as an autoscaler reads it).
    case cpu
    /// Memory (the working set) of the app's largest instance: bytes, or with a threshold at most 1
    /// a fraction of the app's `mem`.
    case memory
    /// Requests per second through the proxies to the app.
    case requestsPerSecond
    /// The share (0…1) of the app's requests answered with a 5xx.
    case errorRate
    /// Instances of the app that ended on their own (failed, finished, lost, OOM-killed) within the window.
    case restarts
    /// A series on `/metrics`: its samples labelled with the app (all of them when it has no `app`
    /// label) added up; a counter (`…_total`) as its per-second rate over the window.
    case series(String)

    public init?(_ text: String) {
        switch text {
        case "cpu": self = .cpu
        case "memory": self = .memory
        case "requestsPerSecond": self = .requestsPerSecond
        case "errorRate": self = .errorRate
        case "restarts": self = .restarts
        default:
            guard Self.isMetricName(text) else { return nil }
            self = .series(text)
        }
    }

    public var name: String {
        switch self {
        case .cpu: "cpu"
        case .memory: "memory"
        case .requestsPerSecond: "requestsPerSecond"
        case .errorRate: "errorRate"
        case .restarts: "restarts"
        case .series(let name): name
        }
    }

    /// Prometheus' metric-name syntax: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    static func isMetricName(_ text: String) -> Bool {
        guard let first = text.unicodeScalars.first, text.unicodeScalars.count <= 200 else { return false }
        func letter(_ scalar: Unicode.Scalar) -> Bool { (scalar >= "a" && scalar <= "z") || (scalar >= "A" && scalar <= "Z") || scalar == "_" || scalar == ":" }
        return letter(first) && text.unicodeScalars.allSatisfy { letter($0) || ($0 >= "0" && $0 <= "9") }
    }
}

/// One alert rule of an app (`alerts` in its definition): a metric averaged over `window`, two
/// levels, and how long a level must hold before the alert enters it.
public struct AlertRule: Sendable, Hashable, Codable {
    public var name: String
    public var metric: AlertMetric
    /// Seconds the value is averaged over (`"30s"`, `"2m"` or a number of seconds).
    public var window: Double
    public var warning: Double?
    public var critical: Double?
    /// Seconds the value must stay at a level before the alert enters it (leaving is at once).
    public var forSeconds: Double

    public static let defaultWindow = 30.0
    /// A level is left only once the value falls this far (a share of the threshold) below it.
    public static let hysteresis = 0.1

    public init(name: String, metric: AlertMetric, window: Double = AlertRule.defaultWindow, warning: Double?, critical: Double?, forSeconds: Double = 0) {
        self.name = name
        self.metric = metric
        self.window = window
        self.warning = warning
        self.critical = critical
        self.forSeconds = forSeconds
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case name, metric, window, warning, critical, forSeconds }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        // Errors name the field from the definition's root (`/alerts/0/metric`).
        let base = try FieldNames.refuseUnknown(in: decoder, known: CodingKeys.allCases.map(\.rawValue), of: "an alert rule")
        name = try container.decode(String.self, forKey: .name)
        let metricName = try container.decode(String.self, forKey: .metric)
        guard let metric = AlertMetric(metricName) else {
            throw FlotillaError.invalid([FieldError(
                base + "/metric", "got \(metricName); expected cpu, memory, requestsPerSecond, errorRate, restarts or a metric name from /metrics")])
        }
        self.metric = metric
        window = try container.decodeDuration(forKey: .window, at: base + "/window") ?? AlertRule.defaultWindow
        warning = try container.decodeIfPresent(Double.self, forKey: .warning)
        critical = try container.decodeIfPresent(Double.self, forKey: .critical)
        forSeconds = try container.decodeIfPresent(Double.self, forKey: .forSeconds) ?? 0
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(name, forKey: .name)
        try container.encode(metric.name, forKey: .metric)
        try container.encode(GoDuration.format(window), forKey: .window)
        try container.encodeIfPresent(warning, forKey: .warning)
        try container.encodeIfPresent(critical, forKey: .critical)
        try container.encode(forSeconds, forKey: .forSeconds)
    }

    /// What is wrong with the rule, as field errors under `path`.
    public func problems(at path: String) -> [FieldError] {
        var problems: [FieldError] = []
        func check(_ ok: Bool, _ field: String, _ message: String) {
            if !ok { problems.append(FieldError(path + field, message)) }
        }
        check(
            !name.isEmpty && name.count <= 100 && name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || "-_.".unicodeScalars.contains($0) },
            "/name", "must be 1 to 100 letters, digits, '-', '_' or '.'")
        check(window >= 1 && window <= 3600, "/window", "must be from 1s to 1h")
        check(forSeconds >= 0 && forSeconds <= 86_400, "/forSeconds", "must be from 0 to 86400")
        check(warning != nil || critical != nil, "", "give warning, critical or both")
        for (field, value) in [("/warning", warning), ("/critical", critical)] {
            if let value { check(value.isFinite && value >= 0, field, "must be a number of at least 0") }
        }
        if let warning, let critical { check(critical >= warning, "/critical", "must be at least warning (\(warning))") }
        if metric == .errorRate {
            for (field, value) in [("/warning", warning), ("/critical", critical)] {
                if let value { check(value <= 1, field, "errorRate is a share from 0 to 1") }
            }
        }
        return problems
    }

    /// A threshold in the metric's own unit (a memory fraction becomes bytes of `mem` MiB).
    public func resolved(_ threshold: Double, memMiB: Double) -> Double {
        metric == .memory && threshold <= 1 ? threshold * memMiB * 1_048_576 : threshold
    }
}

public enum AlertLevel: String, Sendable, Hashable, Codable, Comparable {
    case ok, warning, critical

    var rank: Int {
        switch self {
        case .ok: 0
        case .warning: 1
        case .critical: 2
        }
    }

    public static func < (lhs: AlertLevel, rhs: AlertLevel) -> Bool { lhs.rank < rhs.rank }
}

/// A level change of one alert.
public struct AlertTransition: Sendable, Hashable {
    public var from: AlertLevel
    public var to: AlertLevel
    public var value: Double?
    /// The threshold crossed (the one entered, or for a drop the one left); nil for a drop to ok without data.
    public var threshold: Double?
}

/// One alert's state as it is evaluated: the samples of its window, its level and since when, and
/// a higher level it is waiting out `forSeconds` for. Pure: times are given, nothing is read.
public struct AlertTracker: Sendable {
    public private(set) var level: AlertLevel = .ok
    public private(set) var since: Double
    public private(set) var value: Double?
    /// Since when the value has held each level above the current one (entered after `forSeconds`).
    public private(set) var pending: [AlertLevel: Double] = [:]
    private var samples: [(time: Double, value: Double)] = []

    public init(now: Double) {
        since = now
    }

    /// The value over the window: the mean of the samples in it, or for a counter series its rate.
    public static func windowed(_ samples: [(time: Double, value: Double)], rate: Bool) -> Double? {
        guard let last = samples.last else { return nil }
        if rate {
            guard let first = samples.first, last.time > first.time else { return nil }
            return max(0, last.value - first.value) / (last.time - first.time)
        }
        return samples.reduce(0) { $0 + $1.value } / Double(samples.count)
    }

    /// Adds a sample (nil: no data — no instance, no request) and moves the level.
    /// `warning`/`critical` are in the metric's unit; `rate` makes the window a counter's rate;
    /// `count` takes the newest sample as it is (it already covers the window, as `restarts` does).
    public mutating func observe(
        _ sample: Double?, at now: Double, rule: AlertRule, warning: Double?, critical: Double?, rate: Bool = false, count: Bool = false
    ) -> AlertTransition? {
        if let sample { samples.append((now, sample)) } else { samples.removeAll() }
        // A rate keeps one sample from before the window as its start.
        while samples.count > (rate ? 2 : 1), now - samples[rate ? 1 : 0].time >= rule.window { samples.removeFirst() }
        value = count ? samples.last?.value : Self.windowed(samples, rate: rate)

        let previous = level
        let held = Self.level(of: value, warning: warning, critical: critical, current: level)
        if held <= level {
            pending = [:]
            if held < level { enter(held, at: now) }
        } else {
            // Each higher level held waits out forSeconds from when it was first reached.
            for candidate in [AlertLevel.warning, .critical] where candidate > level {
                if candidate <= held { pending[candidate] = pending[candidate] ?? now } else { pending[candidate] = nil }
            }
            if let ready = pending.filter({ now - $0.value >= rule.forSeconds }).keys.max() { enter(ready, at: now) }
        }
        guard level != previous else { return nil }
        let threshold: Double? = switch max(level, previous) {
        case .critical: critical
        case .warning: warning
        case .ok: nil
        }
        return AlertTransition(from: previous, to: level, value: value, threshold: threshold)
    }

    private mutating func enter(_ new: AlertLevel, at now: Double) {
        level = new
        since = now
        pending = pending.filter { $0.key > new }
    }

    /// The level a value is at: at or above a threshold enters it; a level already held is kept
    /// until the value falls `hysteresis` below its threshold. No data is ok.
    static func level(of value: Double?, warning: Double?, critical: Double?, current: AlertLevel) -> AlertLevel {
        guard let value else { return .ok }
        func holds(_ threshold: Double?, _ candidate: AlertLevel) -> Bool {
            guard let threshold else { return false }
            let margin = current >= candidate ? threshold * AlertRule.hysteresis : 0
            return value >= threshold - margin
        }
        if holds(critical, .critical) { return .critical }
        if holds(warning, .warning) { return .warning }
        return .ok
    }
}

/// One alert as people and tools read it (`GET /flotilla/v1/alerts`, `alert_state_changed_event`,
/// notifications). Thresholds are in the metric's unit (a memory fraction is given as bytes).
public struct AlertStatus: Sendable, Hashable, Codable {
    /// `app` (an app's rule), `node` (a node rule, on `node`) or `cluster`.
    public var scope: String
    public var app: String?
    public var node: String?
    public var alert: String
    public var metric: String
    public var state: AlertLevel
    /// The value over the window now; nil without data.
    public var value: Double?
    public var warning: Double?
    public var critical: Double?
    public var windowSeconds: Double
    public var forSeconds: Double
    /// When the alert entered its state (RFC 3339).
    public var since: String
    /// A higher level the value has reached and is waiting out `forSeconds` for.
    public var pending: AlertLevel?

    public init(
        scope: String = "app", app: String?, node: String? = nil, alert: String, metric: String, state: AlertLevel, value: Double?,
        warning: Double?, critical: Double?, windowSeconds: Double, forSeconds: Double, since: String, pending: AlertLevel?
    ) {
        self.scope = scope
        self.app = app
        self.node = node
        self.alert = alert
        self.metric = metric
        self.state = state
        self.value = value
        self.warning = warning
        self.critical = critical
        self.windowSeconds = windowSeconds
        self.forSeconds = forSeconds
        self.since = since
        self.pending = pending
    }

    /// What the alert is about: the app's id, `node/NAME`, or `cluster`.
    public var subject: String { app ?? node.map { "node/" + $0 } ?? "cluster" }

    /// The threshold of the state it is in (nil when ok).
    public var threshold: Double? {
        switch state {
        case .critical: critical
        case .warning: warning
        case .ok: nil
        }
    }
}

/// A node or cluster rule from the agent's rules file (`--alert-rules`): like an app's alert
/// rules, on the nodes' figures.
///
/// `metric` for `scope: node` (each node on its own, or only `node`): `cpu` (the share of its CPUs
/// in use), `memory` (the share of its memory in use: 1 − MemAvailable/MemTotal), `disk` (the
/// share of its data directory's file system in use), `load1` (load per CPU), or a `/metrics`
/// name (its series labelled with the node). For `scope: cluster`: the same shares over every
/// node together, `nodesDown` (nodes whose agents stopped renewing their records), or a `/metrics`
/// name (all its series on the evaluating agent).
public struct ClusterAlertRule: Sendable, Hashable, Codable {
    public enum Scope: String, Sendable, Hashable, Codable { case node, cluster }

    public var name: String
    public var scope: Scope
    public var metric: String
    /// With `scope: node`: only this node.
    public var node: String?
    public var window: Double
    public var warning: Double?
    public var critical: Double?
    public var forSeconds: Double

    public static let nodeMetrics: Set<String> = ["cpu", "memory", "disk", "load1"]

    enum CodingKeys: String, CodingKey, CaseIterable { case name, scope, metric, node, window, warning, critical, forSeconds }

    public init(from decoder: any Decoder) throws {
        let base = try FieldNames.refuseUnknown(in: decoder, known: CodingKeys.allCases.map(\.rawValue), of: "an alert rule")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decode(String.self, forKey: .name)
        let scopeName = try container.decodeIfPresent(String.self, forKey: .scope) ?? "node"
        guard let scope = Scope(rawValue: scopeName) else {
            throw FlotillaError.invalid([FieldError(base + "/scope", "got \(scopeName); expected node or cluster (app rules go in the app's definition)")])
        }
        self.scope = scope
        metric = try container.decode(String.self, forKey: .metric)
        let known = scope == .cluster ? Self.nodeMetrics.union(["nodesDown"]) : Self.nodeMetrics
        guard known.contains(metric) || (AlertMetric.isMetricName(metric) && metric != "nodesDown") else {
            throw FlotillaError.invalid([FieldError(
                base + "/metric", "got \(metric); expected \(known.sorted().joined(separator: ", ")) or a metric name from /metrics")])
        }
        node = try container.decodeIfPresent(String.self, forKey: .node)
        if node != nil && scope == .cluster { throw FlotillaError.invalid([FieldError(base + "/node", "a cluster rule covers every node; leave node out")]) }
        window = try container.decodeDuration(forKey: .window, at: base + "/window") ?? AlertRule.defaultWindow
        warning = try container.decodeIfPresent(Double.self, forKey: .warning)
        critical = try container.decodeIfPresent(Double.self, forKey: .critical)
        forSeconds = try container.decodeIfPresent(Double.self, forKey: .forSeconds) ?? 0
        var problems = rule.problems(at: base)
        if Self.nodeMetrics.contains(metric) && metric != "load1" {
            for (field, value) in [("/warning", warning), ("/critical", critical)] where (value ?? 0) > 1 {
                problems.append(FieldError(base + field, "\(metric) is a share from 0 to 1"))
            }
        }
        if !problems.isEmpty { throw FlotillaError.invalid(problems) }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(name, forKey: .name)
        try container.encode(scope, forKey: .scope)
        try container.encode(metric, forKey: .metric)
        try container.encodeIfPresent(node, forKey: .node)
        try container.encode(GoDuration.format(window), forKey: .window)
        try container.encodeIfPresent(warning, forKey: .warning)
        try container.encodeIfPresent(critical, forKey: .critical)
        try container.encode(forSeconds, forKey: .forSeconds)
    }

    /// The rule as the level tracker reads it (window, levels, forSeconds).
    public var rule: AlertRule {
        AlertRule(name: name, metric: AlertMetric(metric) ?? .series(metric), window: window, warning: warning, critical: critical, forSeconds: forSeconds)
    }

    /// The rules file: `{"rules": [...]}` (YAML or JSON); names unique per scope.
    public struct File: Sendable, Decodable {
        public var rules: [ClusterAlertRule]

        public static func validate(_ rules: [ClusterAlertRule]) throws {
            var seen: Set<String> = []
            for (index, rule) in rules.enumerated() where !seen.insert(rule.scope.rawValue + "/" + rule.name).inserted {
                throw FlotillaError.invalid([FieldError("/rules/\(index)/name", "another \(rule.scope.rawValue) rule is named \(rule.name)")])
            }
        }
    }
}

extension KeyedDecodingContainer {
    /// A duration given as Go's syntax (`"30s"`, `"2m"`) or a number of seconds; nil when absent.
    func decodeDuration(forKey key: Key, at path: String) throws -> Double? {
        if let text = try? decodeIfPresent(String.self, forKey: key) {
            guard let seconds = GoDuration.seconds(text) else {
                throw FlotillaError.invalid([FieldError(path, "got \(text); expected a duration such as 30s or 2m")])
            }
            return seconds
        }
        return try decodeIfPresent(Double.self, forKey: key)
    }
}
