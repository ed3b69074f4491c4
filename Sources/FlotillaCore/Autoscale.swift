import Foundation

/// An app's `autoscale`: keep a per-instance figure near `target` by changing `instances` between
/// `min` and `max`, as Kubernetes' HorizontalPodAutoscaler does: the wanted count is
/// `ceil(instances × value / target)`, left alone within 10 % of the target; scaling up waits
/// `scaleUpCooldownSeconds` after the last change, scaling down takes the highest count wanted
/// over the last `scaleDownCooldownSeconds` (the stabilisation window), so load must stay low
/// that long before instances go.
public struct AutoscalePolicy: Sendable, Hashable, Codable {
    /// `cpu` (cores per instance), `memory` (working-set bytes per instance; a target of at most 1
    /// is a fraction of `mem`), `requestsPerSecond` (per instance) or a `/metrics` series (its
    /// app's sum, or rate for a counter, per instance).
    public var metric: AlertMetric
    public var target: Double
    public var min: Int
    public var max: Int
    public var scaleUpCooldownSeconds: Double
    public var scaleDownCooldownSeconds: Double

    public static let tolerance = 0.1
    public static let defaultScaleUpCooldown = 30.0
    public static let defaultScaleDownCooldown = 300.0
    /// The window the figure is averaged over (a rate's span for counters).
    public static let window = 15.0

    public init(
        metric: AlertMetric, target: Double, min: Int, max: Int, scaleUpCooldownSeconds: Double = AutoscalePolicy.defaultScaleUpCooldown,
        scaleDownCooldownSeconds: Double = AutoscalePolicy.defaultScaleDownCooldown
    ) {
        self.metric = metric
        self.target = target
        self.min = min
        self.max = max
        self.scaleUpCooldownSeconds = scaleUpCooldownSeconds
        self.scaleDownCooldownSeconds = scaleDownCooldownSeconds
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case metric, target, min, max, scaleUpCooldownSeconds, scaleDownCooldownSeconds }

    public init(from decoder: any Decoder) throws {
        let base = try FieldNames.refuseUnknown(in: decoder, known: CodingKeys.allCases.map(\.rawValue), of: "autoscale")
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let name = try container.decode(String.self, forKey: .metric)
        guard let metric = AlertMetric(name), ![.errorRate, .restarts].contains(metric) else {
            throw FlotillaError.invalid([FieldError(
                base + "/metric", "got \(name); expected cpu, memory, requestsPerSecond or a metric name from /metrics")])
        }
        self.metric = metric
        target = try container.decode(Double.self, forKey: .target)
        min = try container.decodeIfPresent(Int.self, forKey: .min) ?? 1
        max = try container.decode(Int.self, forKey: .max)
        scaleUpCooldownSeconds = try container.decodeIfPresent(Double.self, forKey: .scaleUpCooldownSeconds) ?? Self.defaultScaleUpCooldown
        scaleDownCooldownSeconds = try container.decodeIfPresent(Double.self, forKey: .scaleDownCooldownSeconds) ?? Self.defaultScaleDownCooldown
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(metric.name, forKey: .metric)
        try container.encode(target, forKey: .target)
        try container.encode(min, forKey: .min)
        try container.encode(max, forKey: .max)
        try container.encode(scaleUpCooldownSeconds, forKey: .scaleUpCooldownSeconds)
        try container.encode(scaleDownCooldownSeconds, forKey: .scaleDownCooldownSeconds)
    }

    public func problems(at path: String) -> [FieldError] {
        var problems: [FieldError] = []
        func check(_ ok: Bool, _ field: String, _ message: String) {
            if !ok { problems.append(FieldError(path + field, message)) }
        }
        check(target.isFinite && target > 0, "/target", "must be more than 0")
        check(min >= 1, "/min", "must be at least 1")
        check(max >= min, "/max", "must be at least min (\(min))")
        check(max <= 10_000, "/max", "must be at most 10000")
        check(scaleUpCooldownSeconds >= 0 && scaleUpCooldownSeconds <= 86_400, "/scaleUpCooldownSeconds", "must be from 0 to 86400")
        check(scaleDownCooldownSeconds >= 0 && scaleDownCooldownSeconds <= 86_400, "/scaleDownCooldownSeconds", "must be from 0 to 86400")
        return problems
    }

    /// The target in the metric's unit (a memory fraction becomes bytes of `mem` MiB).
    public func resolvedTarget(memMiB: Double) -> Double {
        metric == .memory && target <= 1 ? target * memMiB * 1_048_576 : target
    }
}

/// One app's autoscaling memory: when it last changed the count and what it wanted lately.
/// Pure: times and figures are given.
public struct AutoscaleState: Sendable {
    public private(set) var lastChange: Double?
    private var wanted: [(time: Double, count: Int)] = []
    private let firstSeen: Double

    public init(now: Double) {
        firstSeen = now
    }

    /// A decision: the count to go to, and why.
    public struct Decision: Sendable, Hashable {
        public var from: Int
        public var to: Int
        public var reason: String
    }

    /// What to do now with `current` instances whose figure per instance is `value` (nil: not
    /// measured). `target` is in the metric's unit. Nil: leave it.
    public mutating func decide(current: Int, value: Double?, target: Double, policy: AutoscalePolicy, now: Double) -> Decision? {
        // Out of bounds (a user's change, a new policy): back inside at once.
        if current < policy.min {
            return change(from: current, to: policy.min, reason: "below min \(policy.min)", now: now)
        }
        if current > policy.max {
            return change(from: current, to: policy.max, reason: "above max \(policy.max)", now: now)
        }
        guard let value, target > 0 else { return nil }
        let ratio = value / target
        var desired = abs(ratio - 1) <= AutoscalePolicy.tolerance ? current : Int((Double(current) * ratio).rounded(.up))
        desired = Swift.min(policy.max, Swift.max(policy.min, desired))
        wanted.append((now, desired))
        wanted.removeAll { now - $0.time > policy.scaleDownCooldownSeconds }
        let figures = "\(policy.metric.name) \(Self.number(value)) per instance, target \(Self.number(target))"
        if desired > current {
            guard lastChange.map({ now - $0 >= policy.scaleUpCooldownSeconds }) ?? true else { return nil }
            return change(from: current, to: desired, reason: figures, now: now)
        }
        if desired < current {
            // Only after a whole stabilisation window of wanting fewer, and then the most wanted in it.
            let since = Swift.max(firstSeen, lastChange ?? firstSeen)
            guard now - since >= policy.scaleDownCooldownSeconds else { return nil }
            let stable = wanted.map(\.count).max() ?? current
            guard stable < current else { return nil }
            return change(from: current, to: stable, reason: figures + "; lower for \(Self.number(policy.scaleDownCooldownSeconds)) s", now: now)
        }
        return nil
    }

    private mutating func change(from: Int, to: Int, reason: String, now: Double) -> Decision {
        lastChange = now
        wanted = [(now, to)]
        return Decision(from: from, to: to, reason: reason)
    }

    static func number(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(format: "%.3g", value)
    }
}
