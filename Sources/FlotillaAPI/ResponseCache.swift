import FlotillaCore
import Synchronization

/// Rendered bodies of read requests, valid while the control plane's generation stays the same:
/// a steady cluster answers `GET /v2/apps` without rendering it again. Bounded; any entry older
/// than the current generation is useless and goes first.
final class ResponseCache: Sendable {
    private struct Entry {
        var generation: UInt64
        var body: [UInt8]
    }

    private let entries = Mutex<[String: Entry]>([:])
    private let limit: Int

    init(limit: Int = 256) {
        self.limit = limit
    }

    func body(for key: String, generation: UInt64) -> [UInt8]? {
        entries.withLock { entries in
            guard let entry = entries[key], entry.generation == generation else { return nil }
            return entry.body
        }
    }

    func store(_ body: [UInt8], for key: String, generation: UInt64) {
        entries.withLock { entries in
            if entries.count >= limit {
                entries = entries.filter { $0.value.generation == generation }
                if entries.count >= limit { entries.removeAll() }
            }
            entries[key] = Entry(generation: generation, body: body)
        }
    }
}

/// Each app's rendered JSON by embed set, good while the app's stamp stays the same
/// (`ControlPlane.appListing`). Bounded: past 100,000 entries (apps × embed sets) it starts over.
final class AppFragments: Sendable {
    private struct Key: Hashable {
        var app: AppID
        var embed: MarathonJSON.Embed
    }

    private struct Entry {
        var stamp: UInt64
        var body: [UInt8]
    }

    private let entries = Mutex<[Key: Entry]>([:])

    func body(for app: AppID, embed: MarathonJSON.Embed, stamp: UInt64) -> [UInt8]? {
        entries.withLock { entries in
            guard let entry = entries[Key(app: app, embed: embed)], entry.stamp == stamp else { return nil }
            return entry.body
        }
    }

    func store(_ body: [UInt8], for app: AppID, embed: MarathonJSON.Embed, stamp: UInt64) {
        entries.withLock { entries in
            entries[Key(app: app, embed: embed)] = Entry(stamp: stamp, body: body)
            if entries.count > 100_000 { entries.removeAll() }
        }
    }
}
