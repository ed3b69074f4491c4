public import FlotillaCore
import FlotillaScheduler
import FlotillaStore
import Foundation

/// Marathon's groups: a tree of apps by path, changed as a whole in one deployment whose steps
/// follow the apps' and groups' `dependencies`.
extension ControlPlane {
    /// A group as reads show it: its record (if it has one), and every app and subgroup below it.
    public struct GroupView: Sendable {
        public var id: GroupID
        public var dependencies: [String]
        public var version: String
        public var apps: [AppRecord]
        public var groups: [GroupView]
    }

    /// The group at `id` with everything below it; nil when there is no such group.
    public func group(_ id: GroupID) -> GroupView? {
        guard groupExists(id) else { return nil }
        return view(of: id)
    }

    private func view(of id: GroupID) -> GroupView {
        let direct = apps.values.filter { GroupID.parent(of: $0.id) == id }.sorted { $0.id < $1.id }
        let children = Set(childGroupIDs(of: id)).sorted()
        let record = groupRecords[id]
        let below = apps.values.filter { id.contains($0.id) }.map(\.version)
        let version = ([record?.version ?? ""] + below).max() ?? ""
        return GroupView(
            id: id, dependencies: record?.dependencies ?? [], version: version.isEmpty ? (lastVersionOrNow()) : version, apps: direct,
            groups: children.map { view(of: $0) })
    }

    /// Groups directly below `id`: those with records and those implied by app ids.
    private func childGroupIDs(of id: GroupID) -> [GroupID] {
        var children: Set<GroupID> = []
        for app in apps.keys where id.contains(app) && app.segments.count > id.segments.count + 1 {
            children.insert(GroupID(segments: Array(app.segments.prefix(id.segments.count + 1))))
        }
        for record in groupRecords.keys where record.parent == id { children.insert(record) }
        return Array(children)
    }

    func groupExists(_ id: GroupID) -> Bool {
        id == .root || groupRecords[id] != nil || apps.keys.contains { id.contains($0) }
    }

    private func lastVersionOrNow() -> String { Timestamp.format(Date()) }

    public func groupVersions(of id: GroupID) async throws -> [String] {
        guard groupExists(id) else { throw FlotillaError.notFound("Group '\(id)' does not exist") }
        let prefix = StateKeys.groupVersions(of: id)
        return try await store.list(prefix: prefix).entries.map { String($0.key.dropFirst(prefix.count)) }.sorted(by: >)
    }

    public func groupVersion(_ version: String, of id: GroupID) async throws -> GroupVersion {
        guard let entry = try await store.get(StateKeys.groupVersion(version, of: id)) else {
            throw FlotillaError.notFound("Group '\(id)' has no version \(version)")
        }
        return try StateCodec.decode(GroupVersion.self, from: entry.value)
    }

    // MARK: - Changes

    /// What a group change does, without doing it (`?dryRun=true`).
    public struct GroupPlan: Sendable {
        public var steps: [[Deployment.Action]]
    }

    /// `POST /v2/groups`: a new group (409 when a group or an app is there already).
    public func createGroup(_ body: [String: JSONValue], under base: GroupID, force: Bool) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        try requireLoaded()
        let update = try GroupUpdate.parse(body, base: base)
        if update.id == .root || groupExists(update.id) {
            throw FlotillaError.conflict(message: "Group \(update.id) is already created. Use PUT to change this group.", deploymentIDs: [])
        }
        if let app = try? AppID(update.id.path), apps[app] != nil {
            throw FlotillaError.conflict(message: "An app with the path \(update.id) already exists.", deploymentIDs: [])
        }
        guard update.scaleBy == nil, update.version == nil else {
            throw FlotillaError.invalid([FieldError("/", "a new group cannot be scaled or rolled back; create it with its apps")])
        }
        return try await applyGroupLocked(update, force: force, uri: "/v2/groups")
    }

    /// `PUT /v2/groups/{id}`: scale (`scaleBy`), roll back (`version`), or change the group's
    /// structure: levels the body names are replaced (apps and groups it leaves out go), levels
    /// it leaves out are kept. Creates the group when it is not there.
    public func updateGroup(_ body: [String: JSONValue], at base: GroupID, force: Bool, dryRun: Bool) async throws -> (ChangeResult?, GroupPlan?) {
        await lock.acquire()
        defer { lock.release() }
        try requireLoaded()
        var update = try GroupUpdate.parse(body, base: base)
        if let factor = update.scaleBy {
            guard groupExists(update.id) else { throw FlotillaError.notFound("Group '\(update.id)' does not exist") }
            var changes: [AppChange] = []
            for record in apps.values.filter({ update.id.contains($0.id) }).sorted(by: { $0.id < $1.id }) {
                var definition = record.definition
                definition.instances = Int((Double(definition.instances) * factor).rounded(.up))
                if definition.instances != record.definition.instances { changes.append(AppChange(current: record, definition: definition)) }
            }
            if dryRun { return (nil, GroupPlan(steps: [changes.map { .init(action: .scaleApplication, app: $0.definition.id) }].filter { !$0.isEmpty })) }
            guard !changes.isEmpty else { throw FlotillaError.invalid([FieldError("/scaleBy", "scaling by \(factor) changes no app's instances")]) }
            return (try await applyLocked(changes, force: force, clientIP: nil, uri: "/v2/groups\(update.id)", publishPosts: false), nil)
        }
        if let version = update.version {
            guard let entry = try await store.get(StateKeys.groupVersion(version, of: update.id)) else {
                throw FlotillaError.invalid([FieldError("/version", "Group \(update.id) not available in version \(version)")])
            }
            let snapshot = try StateCodec.decode(GroupVersion.self, from: entry.value)
            update = Self.fullUpdate(from: snapshot)
        }
        if dryRun { return (nil, GroupPlan(steps: try planGroup(update).steps)) }
        return (try await applyGroupLocked(update, force: force, uri: "/v2/groups\(update.id)"), nil)
    }

    /// `DELETE /v2/groups/{id}`: every app below it stops, in one deployment, and the group goes.
    public func deleteGroup(_ id: GroupID, force: Bool) async throws -> ChangeResult {
        await lock.acquire()
        defer { lock.release() }
        try requireLoaded()
        guard groupExists(id) else { throw FlotillaError.notFound("Group '\(id)' does not exist") }
        let removals = apps.values.filter { id.contains($0.id) }.sorted { $0.id < $1.id }
        let records = groupRecords.keys.filter { id.contains($0) && $0 != .root }
        let version = Timestamp.format(Date())
        var puts: [(String, any Encodable & Sendable)] = []
        var parentRecord: GroupRecord?
        if id != .root, let parent = id.parent {
            // The parent changed: its version moves.
            parentRecord = GroupRecord(id: parent, dependencies: groupRecords[parent]?.dependencies ?? [], version: version)
            puts.append((StateKeys.group(parent), parentRecord!))
        }
        guard !removals.isEmpty else {
            // An empty group: only its records go.
            try await commit(puts: puts, deletes: records.map { StateKeys.group($0) })
            for record in records { groupRecords[record] = nil }
            if let parentRecord { groupRecords[parentRecord.id] = parentRecord }
            return ChangeResult(version: version, deploymentID: "", app: nil)
        }
        let result = try await applyLocked(
            [], removals: removals, force: force, clientIP: nil, uri: "/v2/groups\(id)", extraPuts: puts,
            extraDeletes: records.map { StateKeys.group($0) }, publishPosts: false)
        for record in records { groupRecords[record] = nil }
        if let parentRecord { groupRecords[parentRecord.id] = parentRecord }
        publishGroupChange(id, version: result.version)
        return result
    }

    // MARK: - Planning

    struct GroupChangeSet {
        var changes: [AppChange] = []
        var removals: [AppRecord] = []
        var records: [GroupID: GroupRecord] = [:]
        var removedRecords: Set<GroupID> = []
        var layers: [[AppID]] = []
        var steps: [[Deployment.Action]] = []
        /// Every app below the group once the change is applied.
        var target: [AppID: AppDefinition] = [:]
    }

    /// Works out a structural change of a group: which apps start, change, stop, which group
    /// records are written or go, and in which order (Marathon's dependency layers).
    func planGroup(_ update: GroupUpdate) throws -> GroupChangeSet {
        var plan = GroupChangeSet()
        var target = apps.mapValues(\.definition)
        var targetRecords = groupRecords
        func apply(_ node: GroupUpdate) {
            if let given = node.apps {
                let listed = Set(given.map(\.id))
                for id in target.keys where GroupID.parent(of: id) == node.id && !listed.contains(id) { target[id] = nil }
                for app in given { target[app.id] = app }
            }
            if let groups = node.groups {
                let listed = Set(groups.map(\.id))
                // Subgroups the body leaves out go, with everything below them.
                let existing = Set(target.keys.compactMap { app -> GroupID? in
                    guard node.id.contains(app), app.segments.count > node.id.segments.count + 1 else { return nil }
                    return GroupID(segments: Array(app.segments.prefix(node.id.segments.count + 1)))
                }).union(targetRecords.keys.filter { $0.parent == node.id })
                for child in existing where !listed.contains(child) {
                    for id in target.keys where child.contains(id) { target[id] = nil }
                    for record in targetRecords.keys where child.contains(record) { targetRecords[record] = nil }
                }
                for group in groups { apply(group) }
            }
            let previous = targetRecords[node.id]
            targetRecords[node.id] = GroupRecord(id: node.id, dependencies: node.dependencies ?? previous?.dependencies ?? [], version: "")
        }
        apply(update)
        // A group and an app may not share a path.
        for id in target.keys {
            let asGroup = GroupID(segments: id.segments)
            if targetRecords[asGroup] != nil || target.keys.contains(where: { asGroup.contains($0) }) {
                throw FlotillaError.invalid([FieldError("/", "Groups and Applications may not have the same identifier: \(id)")])
            }
        }
        // Changes and removals.
        for (id, requested) in target.sorted(by: { $0.key < $1.key }) {
            if let current = apps[id] {
                // Compared as it would be stored: port-0 service ports keep the app's own.
                let definition = try withServicePorts(requested, previous: current.definition)
                if current.definition != definition { plan.changes.append(AppChange(current: current, definition: definition)) }
            } else {
                plan.changes.append(AppChange(current: nil, definition: requested))
            }
        }
        plan.removals = apps.values.filter { target[$0.id] == nil }.sorted { $0.id < $1.id }
        plan.removedRecords = Set(groupRecords.keys.filter { targetRecords[$0] == nil })
        for (id, record) in targetRecords where update.id.contains(id) { plan.records[id] = record }
        // Dependencies: an app waits for the apps it names (or the apps below a group it names),
        // and for what every group above it depends on.
        var graph: [AppID: Set<AppID>] = [:]
        func appsNamed(_ path: String) -> Set<AppID> {
            guard let group = try? GroupID(path) else { return [] }
            return Set(target.keys.filter { $0.path == path || group.contains($0) })
        }
        for (id, definition) in target {
            var needs: Set<AppID> = []
            for dependency in definition.dependencies { needs.formUnion(appsNamed(dependency)) }
            var ancestor: GroupID? = GroupID.parent(of: id)
            while let group = ancestor {
                for dependency in targetRecords[group]?.dependencies ?? [] {
                    // A group's dependency names a group; every app below it must wait for it.
                    if let named = try? GroupID(dependency), !named.contains(id) { needs.formUnion(target.keys.filter { named.contains($0) }) }
                }
                ancestor = group.parent
            }
            needs.remove(id)
            graph[id] = needs
        }
        let affected = Set(plan.changes.map(\.definition.id))
        guard let layers = DeploymentSteps.layers(of: affected, dependencies: graph) else {
            throw FlotillaError.invalid([FieldError("/dependencies", "Dependency graph has cyclic dependencies.")])
        }
        plan.layers = layers
        // The steps as the deployment will have them (for dry runs).
        if !plan.removals.isEmpty { plan.steps.append(plan.removals.map { .init(action: .stopApplication, app: $0.id) }) }
        let created = plan.changes.filter { $0.current == nil }.map(\.definition.id)
        if !created.isEmpty { plan.steps.append(created.map { .init(action: .startApplication, app: $0) }) }
        for layer in layers {
            plan.steps.append(layer.compactMap { id -> Deployment.Action? in
                guard let change = plan.changes.first(where: { $0.definition.id == id }) else { return nil }
                if let current = change.current {
                    return .init(action: change.definition.requiresRestart(comparedTo: current.definition) ? .restartApplication : .scaleApplication, app: id)
                }
                return change.definition.instances > 0 ? .init(action: .scaleApplication, app: id) : nil
            })
        }
        plan.steps.removeAll { $0.isEmpty }
        plan.target = target.filter { update.id.contains($0.key) }
        return plan
    }

    private func applyGroupLocked(_ update: GroupUpdate, force: Bool, uri: String) async throws -> ChangeResult {
        let plan = try planGroup(update)
        let version = nextVersion()
        var records = plan.records
        for id in records.keys { records[id]?.version = version }
        // Every group above changed too.
        var ancestor = update.id.parent
        while let group = ancestor {
            records[group] = GroupRecord(id: group, dependencies: groupRecords[group]?.dependencies ?? [], version: version)
            ancestor = group.parent
        }
        let snapshot = GroupVersion(
            id: update.id, version: version, groups: records.values.filter { update.id.contains($0.id) }.sorted { $0.id < $1.id },
            apps: plan.target.values.sorted { $0.id < $1.id })
        var puts: [(String, any Encodable & Sendable)] = records.values.map { (StateKeys.group($0.id), $0) }
        puts.append((StateKeys.groupVersion(version, of: update.id), snapshot))
        let deletes = plan.removedRecords.map { StateKeys.group($0) }
        let result: ChangeResult
        if plan.changes.isEmpty && plan.removals.isEmpty {
            // Only the group's own fields changed: no deployment.
            try await commit(puts: puts, deletes: deletes)
            result = ChangeResult(version: version, deploymentID: "", app: nil)
        } else {
            result = try await applyLocked(
                plan.changes, removals: plan.removals, layers: plan.layers, force: force, clientIP: nil, uri: uri, extraPuts: puts,
                extraDeletes: deletes, version: version, publishPosts: false)
        }
        for (id, record) in records { groupRecords[id] = record }
        for id in plan.removedRecords { groupRecords[id] = nil }
        publishGroupChange(update.id, version: version)
        return result
    }

    private func publishGroupChange(_ id: GroupID, version: String) {
        events.publish(.groupChangeSuccess(id, version: version))
    }

    /// A group version as an update that puts the whole subtree back as it was.
    static func fullUpdate(from snapshot: GroupVersion) -> GroupUpdate {
        func node(_ id: GroupID) -> GroupUpdate {
            var update = GroupUpdate(id: id)
            update.apps = snapshot.apps.filter { GroupID.parent(of: $0.id) == id }
            update.dependencies = snapshot.groups.first { $0.id == id }?.dependencies ?? []
            var children: Set<GroupID> = Set(snapshot.groups.map(\.id).filter { $0.parent == id })
            for app in snapshot.apps where id.contains(app.id) && app.id.segments.count > id.segments.count + 1 {
                children.insert(GroupID(segments: Array(app.id.segments.prefix(id.segments.count + 1))))
            }
            update.groups = children.sorted().map(node)
            return update
        }
        return node(snapshot.id)
    }
}
