import NIOConcurrencyHelpers
import Synchronization
import Foundation

/// What the proxy learns on its own about upstreams: connections in flight (for least-connections)
/// and consecutive connection failures. A target that fails `ejectAfter` times in a row is left
/// out for `coolDown`, then tried again; one success clears its record.
final class UpstreamHealth: Sendable {
    private struct Record {
        var failures = 0
        var ejectedUntil: ContinuousClock.Instant?
        var inFlight = 0
    }

    private let records = Mutex<[String: Record]>([:])
    let ejectAfter: Int
    let coolDown: Duration

    init(ejectAfter: Int = 3, coolDown: Duration = .seconds(10)) {
        self.ejectAfter = ejectAfter
        self.coolDown = coolDown
    }

    func isEjected(_ key: String, now: ContinuousClock.Instant = .now) -> Bool {
        records.withLock { records in
            guard let until = records[key]?.ejectedUntil else { return false }
            if until <= now {
                records[key]?.ejectedUntil = nil
                return false
            }
            return true
        }
    }

    func connectFailed(_ key: String) {
        records.withLock { records in
            var record = records[key] ?? Record()
            record.failures += 1
            if record.failures >= ejectAfter {
                record.ejectedUntil = .now + coolDown
                record.failures = 0
            }
            records[key] = record
        }
    }

    func succeeded(_ key: String) {
        records.withLock { records in
            if records[key]?.failures != 0 || records[key]?.ejectedUntil != nil {
                records[key]?.failures = 0
                records[key]?.ejectedUntil = nil
            }
        }
    }

    func started(_ key: String) { records.withLock { $0[key, default: Record()].inFlight += 1 } }
    func finished(_ key: String) { records.withLock { $0[key, default: Record()].inFlight = max(0, ($0[key]?.inFlight ?? 1) - 1) } }
    func inFlight(_ key: String) -> Int { records.withLock { $0[key]?.inFlight ?? 0 } }
}
