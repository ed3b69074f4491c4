public import Foundation
public import FlotillaCore

/// Marathon's launch backoff: after each failure the next launch of the app waits
/// `backoffSeconds × backoffFactor^(failures-1)`, at most `maxLaunchDelaySeconds`.
public struct Backoff: Sendable, Hashable {
    public private(set) var consecutiveFailures: Int = 0
    /// When the app may launch again.
    public private(set) var notBefore: Date?

    public init() {}

    public static func delay(afterFailures failures: Int, for definition: AppDefinition) -> Double {
        guard failures > 0 else { return 0 }
        let raw = definition.backoffSeconds * pow(definition.backoffFactor, Double(failures - 1))
        return min(raw.isFinite ? raw : .greatestFiniteMagnitude, definition.maxLaunchDelaySeconds)
    }

    public mutating func recordFailure(of definition: AppDefinition, at now: Date) {
        consecutiveFailures += 1
        notBefore = now.addingTimeInterval(Self.delay(afterFailures: consecutiveFailures, for: definition))
    }

    public mutating func reset() {
        consecutiveFailures = 0
        notBefore = nil
    }

    public func secondsLeft(at now: Date) -> Double {
        guard let notBefore else { return 0 }
        return max(0, notBefore.timeIntervalSince(now))
    }
}
