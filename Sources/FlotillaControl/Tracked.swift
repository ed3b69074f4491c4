public import FlotillaCore

/// A dictionary that remembers which apps its changes touched, so readers can re-render only
/// those (`/v2/apps` with a thousand apps changes one app at a time). Every write through it
/// records the app of the value it removes and of the value it puts (by `AppID.flatName`, which
/// an instance id starts with); replacing the whole dictionary touches every app.
///
/// A value type like the dictionary it wraps: a copy (`var next = specs`) carries the touches
/// made to it back when it is assigned.
struct Tracked<Key: Hashable & Sendable, Value: Sendable>: Sendable, Sequence {
    private(set) var dictionary: [Key: Value]
    private let appsOf: @Sendable (Key, Value) -> [String]
    /// Flat app names touched since the last `drain()`.
    private(set) var touched: Set<String> = []
    /// Every app is touched (a wholesale replacement).
    private(set) var touchedAll = false
    /// The keys of each app's values (by flat name), kept as the values change: a pass that plans
    /// one app reads its instances without looking at the others'.
    private(set) var members: [String: Set<Key>] = [:]

    init(_ dictionary: [Key: Value] = [:], appsOf: @escaping @Sendable (Key, Value) -> [String]) {
        self.dictionary = dictionary
        self.appsOf = appsOf
        touchedAll = true
        rebuildMembers()
    }

    subscript(key: Key) -> Value? {
        get { dictionary[key] }
        set {
            if let old = dictionary[key] { leave(key, old) }
            if let newValue { join(key, newValue) }
            dictionary[key] = newValue
        }
    }

    /// Replaces everything (a reload): every app is touched.
    mutating func replaceAll(with dictionary: [Key: Value]) {
        self.dictionary = dictionary
        touchedAll = true
        rebuildMembers()
    }

    /// Several changes at once (nil removes): what a committed pass applies.
    mutating func apply(_ changes: [Key: Value?]) {
        for (key, value) in changes { self[key] = value }
    }

    @discardableResult
    mutating func removeValue(forKey key: Key) -> Value? {
        guard let old = dictionary.removeValue(forKey: key) else { return nil }
        leave(key, old)
        return old
    }

    /// The values of one app (by flat name).
    func values(ofApp flatName: String) -> [Value] {
        (members[flatName] ?? []).compactMap { dictionary[$0] }
    }

    private mutating func join(_ key: Key, _ value: Value) {
        for app in appsOf(key, value) {
            touched.insert(app)
            members[app, default: []].insert(key)
        }
    }

    private mutating func leave(_ key: Key, _ value: Value) {
        for app in appsOf(key, value) {
            touched.insert(app)
            members[app]?.remove(key)
            if members[app]?.isEmpty == true { members[app] = nil }
        }
    }

    private mutating func rebuildMembers() {
        members = [:]
        for (key, value) in dictionary {
            for app in appsOf(key, value) { members[app, default: []].insert(key) }
        }
    }

    /// The touches so far, forgotten here.
    mutating func drain() -> (all: Bool, apps: Set<String>) {
        defer {
            touched = []
            touchedAll = false
        }
        return (touchedAll, touched)
    }

    var values: Dictionary<Key, Value>.Values { dictionary.values }
    var keys: Dictionary<Key, Value>.Keys { dictionary.keys }
    var count: Int { dictionary.count }
    var isEmpty: Bool { dictionary.isEmpty }
    func makeIterator() -> Dictionary<Key, Value>.Iterator { dictionary.makeIterator() }
    func mapValues<T>(_ transform: (Value) throws -> T) rethrows -> [Key: T] { try dictionary.mapValues(transform) }
    func filter(_ isIncluded: ((key: Key, value: Value)) throws -> Bool) rethrows -> [Key: Value] { try dictionary.filter(isIncluded) }
}

extension Tracked where Key == String, Value == InstanceSpec {
    static func specs(_ dictionary: [String: InstanceSpec] = [:]) -> Self { Self(dictionary) { _, spec in [spec.appID.flatName] } }
}

extension Tracked where Key == String, Value == InstanceStatus {
    /// A status names its instance, whose id starts with its app's flat name.
    static func statuses(_ dictionary: [String: InstanceStatus] = [:]) -> Self { Self(dictionary) { id, _ in [InstanceSpec.appFlatName(ofInstanceID: id).map(String.init) ?? id] } }
}

extension Tracked where Key == AppID {
    static func byApp(_ dictionary: [AppID: Value] = [:]) -> Self { Self(dictionary) { id, _ in [id.flatName] } }
}

extension Tracked where Key == String, Value == Deployment {
    static func deployments(_ dictionary: [String: Deployment] = [:]) -> Self { Self(dictionary) { _, deployment in deployment.affectedApps.map(\.flatName) } }
}
