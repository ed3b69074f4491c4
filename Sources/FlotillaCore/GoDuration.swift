import Foundation

/// Go's duration syntax, which Consul uses for `wait`, `TTL`, `Interval`, `Timeout` and
/// `DeregisterCriticalServiceAfter`: `10s`, `5m`, `1m30s`, `250ms`, `1h`; a bare number is seconds.
public enum GoDuration {
    public static func seconds(_ text: String) -> Double? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if trimmed.isEmpty { return nil }
        if let plain = Double(trimmed) { return plain >= 0 ? plain : nil }
        var total = 0.0
        var number = ""
        var unit = ""
        func flush() -> Bool {
            guard let value = Double(number) else { return false }
            let scale: Double
            switch unit {
            case "ns": scale = 1e-9
            case "us", "µs": scale = 1e-6
            case "ms": scale = 1e-3
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            default: return false
            }
            total += value * scale
            number = ""
            unit = ""
            return true
        }
        for character in trimmed {
            if character.isNumber || character == "." {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(character)
            } else {
                guard !number.isEmpty else { return nil }
                unit.append(character)
            }
        }
        guard flush(), total >= 0 else { return nil }
        return total
    }

    /// Seconds in the same syntax, shortest first: `2h`, `5m`, `30s`, `1.5s`, `250ms`.
    public static func format(_ seconds: Double) -> String {
        func whole(_ value: Double) -> Bool { value == value.rounded() && abs(value) < 1e15 }
        if seconds >= 3600, whole(seconds / 3600) { return "\(Int64(seconds / 3600))h" }
        if seconds >= 60, whole(seconds / 60) { return "\(Int64(seconds / 60))m" }
        if whole(seconds) { return "\(Int64(seconds))s" }
        if seconds < 1, whole(seconds * 1000) { return "\(Int64(seconds * 1000))ms" }
        return "\(seconds)s"
    }
}
