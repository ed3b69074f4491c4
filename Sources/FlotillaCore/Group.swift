import Foundation

/// A Marathon group's path: `/` (the root), `/shop`, `/shop/backend`. Groups also exist without a
/// record, implied by the ids of the apps below them; a record holds what a group has of its own
/// (its `dependencies`) and when it last changed.
public struct GroupID: Sendable, Hashable, Comparable, Codable, CustomStringConvertible {
    public let segments: [String]
    public static let root = GroupID(segments: [])

    public init(segments: [String]) { self.segments = segments }

    /// Parses an absolute or relative path against `base`; `/` is the root.
    public init(_ raw: String, relativeTo base: GroupID = .root) throws(FlotillaError) {
        let trimmed = raw.trimmingCharacters(in: .whitespaces)
        if trimmed == "/" || trimmed.isEmpty && base == .root {
            self = .root
            return
        }
        let absolute = trimmed.hasPrefix("/") ? trimmed : base.path + (base == .root ? "" : "/") + trimmed
        if absolute == "/" {
            self = .root
            return
        }
        segments = try AppID(absolute).segments
    }

    public init(from decoder: any Decoder) throws {
        self = try GroupID(try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(path)
    }

    public var path: String { "/" + segments.joined(separator: "/") }
    public var description: String { path }
    /// The form used in storage keys (`_root` for the root, as no segment has `_`).
    public var flatName: String { segments.isEmpty ? "_root" : segments.joined(separator: "_") }
    public var parent: GroupID? { segments.isEmpty ? nil : GroupID(segments: Array(segments.dropLast())) }

    /// Whether the app lies anywhere below this group.
    public func contains(_ app: AppID) -> Bool {
        app.segments.count > segments.count && Array(app.segments.prefix(segments.count)) == segments
    }

    /// Whether the group lies below (or is) this one.
    public func contains(_ group: GroupID) -> Bool {
        group.segments.count >= segments.count && Array(group.segments.prefix(segments.count)) == segments
    }

    /// The group an app sits in directly.
    public static func parent(of app: AppID) -> GroupID { GroupID(segments: Array(app.segments.dropLast())) }

    public static func < (lhs: GroupID, rhs: GroupID) -> Bool { lhs.path < rhs.path }
}

/// What a group holds of its own.
public struct GroupRecord: Sendable, Hashable, Codable {
    public var id: GroupID
    /// Absolute paths of apps or groups every app in this group waits for.
    public var dependencies: [String]
    public var version: String

    public init(id: GroupID, dependencies: [String], version: String) {
        self.id = id
        self.dependencies = dependencies
        self.version = version
    }
}

/// A group as it was at one version: its records and every app below it, for
/// `/v2/groups/{id}/versions/{version}` and rollbacks.
public struct GroupVersion: Sendable, Hashable, Codable {
    public var id: GroupID
    public var version: String
    public var groups: [GroupRecord]
    public var apps: [AppDefinition]

    public init(id: GroupID, version: String, groups: [GroupRecord], apps: [AppDefinition]) {
        self.id = id
        self.version = version
        self.groups = groups
        self.apps = apps
    }
}

/// The body of `POST`/`PUT /v2/groups`: a group, its apps and its subgroups, each level optional
/// (a level left out is kept as it is), with ids relative to the enclosing group.
public struct GroupUpdate: Sendable {
    public var id: GroupID
    /// The apps directly in this group; nil keeps the ones there.
    public var apps: [AppDefinition]?
    /// The subgroups; nil keeps the ones there.
    public var groups: [GroupUpdate]?
    public var dependencies: [String]?
    public var scaleBy: Double?
    public var version: String?

    /// The fields of a group body; anything else is refused.
    static let knownFields: Set<String> = ["id", "apps", "groups", "dependencies", "scaleBy", "version", "pods", "enforceRole"]

    /// Parses a group body whose ids resolve against `base` (the group the request names).
    /// - Parameter path: where in the document this group is, for error paths.
    public static func parse(_ object: [String: JSONValue], base: GroupID, path: String = "") throws(FlotillaError) -> GroupUpdate {
        let unknown = object.keys.filter { !knownFields.contains($0) }.sorted()
        if !unknown.isEmpty {
            throw .invalid(unknown.map { FieldError(path + "/\($0)", "unknown field of a group; check its spelling against the group reference") })
        }
        // The body's id resolves against the group the request names (a subgroup's against its parent).
        var id = base
        if let text = object["id"]?.stringValue {
            id = try resolved(at: path + "/id") { () throws(FlotillaError) in try GroupID(text, relativeTo: base) }
        }
        if let pods = object["pods"], pods != .null, pods != .array([]) {
            throw .invalid([FieldError(path + "/pods", "pods are not supported; define apps")])
        }
        var update = GroupUpdate(id: id)
        if let value = object["scaleBy"], value != .null {
            guard case .number(let factor) = value, factor >= 0, factor.isFinite else {
                throw .invalid([FieldError(path + "/scaleBy", "must be a number, zero or more")])
            }
            update.scaleBy = factor
        }
        if let value = object["version"], value != .null {
            guard let text = value.stringValue else { throw .invalid([FieldError(path + "/version", "must be a version timestamp")]) }
            update.version = text
        }
        if update.scaleBy != nil || update.version != nil {
            let others = object.keys.filter { !["scaleBy", "version"].contains($0) && object[$0] != .null }
            if !others.isEmpty || (update.scaleBy != nil && update.version != nil) {
                throw .invalid([
                    FieldError(path + (update.version != nil ? "/version" : "/scaleBy"), "not allowed in conjunction with other properties.")
                ])
            }
            return update
        }
        if let value = object["dependencies"], value != .null {
            guard case .array(let items) = value else { throw .invalid([FieldError(path + "/dependencies", "must be a list of paths")]) }
            var dependencies: [String] = []
            for (index, item) in items.enumerated() {
                guard let text = item.stringValue else { throw .invalid([FieldError(path + "/dependencies(\(index))", "must be a path")]) }
                dependencies.append(try resolved(at: path + "/dependencies(\(index))") { () throws(FlotillaError) in try GroupID(text, relativeTo: id).path })
            }
            update.dependencies = dependencies
        }
        if let value = object["apps"], value != .null {
            guard case .array(let items) = value else { throw .invalid([FieldError(path + "/apps", "must be a list of app definitions")]) }
            var apps: [AppDefinition] = []
            for (index, item) in items.enumerated() {
                let where_ = path + "/apps(\(index))"
                guard case .object(var app) = item else { throw .invalid([FieldError(where_, "must be an app definition")]) }
                guard let text = app["id"]?.stringValue else { throw .invalid([FieldError(where_ + "/id", "an app in a group needs an id")]) }
                let appID = try resolved(at: where_ + "/id") { () throws(FlotillaError) in
                    try AppID(text.hasPrefix("/") ? text : id.path + (id == .root ? "" : "/") + text)
                }
                guard GroupID.parent(of: appID) == id else {
                    throw .invalid([FieldError(where_ + "/id", "Identifier is not child of '\(id)'. Hint: use relative paths.")])
                }
                app["id"] = .string(appID.path)
                if case .array(let dependencies)? = app["dependencies"] {
                    // An app's dependencies are relative to the group it is in.
                    app["dependencies"] = .array(try dependencies.enumerated().map { index, dependency throws(FlotillaError) in
                        guard let text = dependency.stringValue else { return dependency }
                        return .string(try resolved(at: where_ + "/dependencies(\(index))") { () throws(FlotillaError) in try GroupID(text, relativeTo: id).path })
                    })
                }
                do {
                    apps.append(try AppDefinition.decode(app))
                } catch FlotillaError.invalid(let message, let details) {
                    throw .invalid(message: message, details: details.map { FieldError(where_ + $0.path, $0.errors.joined(separator: "; ")) })
                }
            }
            update.apps = apps
        }
        if let value = object["groups"], value != .null {
            guard case .array(let items) = value else { throw .invalid([FieldError(path + "/groups", "must be a list of groups")]) }
            var groups: [GroupUpdate] = []
            for (index, item) in items.enumerated() {
                let where_ = path + "/groups(\(index))"
                guard case .object(let group) = item else { throw .invalid([FieldError(where_, "must be a group")]) }
                guard let text = group["id"]?.stringValue else { throw .invalid([FieldError(where_ + "/id", "a subgroup needs an id")]) }
                let child = try resolved(at: where_ + "/id") { () throws(FlotillaError) in try GroupID(text, relativeTo: id) }
                guard child.parent == id else { throw .invalid([FieldError(where_ + "/id", "Group has to be child of group '\(id)'")]) }
                var body = group
                body["id"] = .string(child.path)
                let parsed = try parse(body, base: child, path: where_)
                if parsed.scaleBy != nil || parsed.version != nil {
                    throw .invalid([FieldError(where_, "scaleBy and version apply to the group the request names, not to subgroups")])
                }
                groups.append(parsed)
            }
            update.groups = groups
        }
        return update
    }

    public init(id: GroupID) {
        self.id = id
    }

    private static func resolved<T>(at path: String, _ body: () throws(FlotillaError) -> T) throws(FlotillaError) -> T {
        do {
            return try body()
        } catch FlotillaError.invalid(let message, let details) {
            throw .invalid(message: message, details: details.map { FieldError(path, $0.errors.joined(separator: "; ")) })
        }
    }
}
