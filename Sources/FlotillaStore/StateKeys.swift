public import FlotillaCore
public import Foundation

/// Where each kind of state lives in the key space. One place, so every backend and reader agrees.
public enum StateKeys {
    public static let apps = "apps/"
    public static let versions = "versions/"
    public static let instances = "instances/"
    public static let statuses = "status/"
    public static let deployments = "deployments/"
    public static let deploymentResults = "deployment-results/"
    public static let failures = "failures/"
    /// Live nodes: each record is held by its agent's lease in a cluster.
    public static let nodes = "nodes/"
    /// Every node that ever registered, without a lease: a node whose live record is gone is down.
    /// (Both prefixes start with "node", so one change wait covers them.)
    public static let nodeRecords = "node-records/"
    public static let groups = "groups/"
    public static let groupVersions = "group-versions/"
    /// Apps a running deployment removes, kept until it ends so cancelling it can bring them back.
    public static let removedApps = "removed-apps/"

    public static func app(_ id: AppID) -> String { apps + id.flatName }
    public static func versions(of id: AppID) -> String { versions + id.flatName + "/" }
    public static func version(_ version: String, of id: AppID) -> String { versions(of: id) + version }
    /// An instance's assignment lives under its node (`instances/<node>/<id>`): each agent lists
    /// and watches only its own (`instances(on:)`).
    public static func instance(_ spec: InstanceSpec) -> String { instances(on: spec.node) + spec.id }
    public static func instances(on node: String) -> String { instances + node + "/" }
    /// The instance id of an assignment key (the last component).
    public static func instanceID(ofKey key: String) -> String { String(key.split(separator: "/", omittingEmptySubsequences: false).last ?? "") }
    public static func status(_ id: String) -> String { statuses + id }
    public static func deployment(_ id: String) -> String { deployments + id }
    public static func deploymentResult(_ id: String) -> String { deploymentResults + id }
    public static func failure(_ id: AppID) -> String { failures + id.flatName }
    public static func node(_ name: String) -> String { nodes + name }
    public static func nodeRecord(_ name: String) -> String { nodeRecords + name }
    public static func group(_ id: GroupID) -> String { groups + id.flatName }
    public static func removedApps(of deployment: String) -> String { removedApps + deployment + "/" }
    public static func removedApp(_ id: AppID, by deployment: String) -> String { removedApps(of: deployment) + id.flatName }
    public static func groupVersions(of id: GroupID) -> String { groupVersions + id.flatName + "/" }
    public static func groupVersion(_ version: String, of id: GroupID) -> String { groupVersions(of: id) + version }
}

/// JSON in and out of the store, with one encoder configuration for every record.
public enum StateCodec {
    public static func encode(_ value: some Encodable) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try encoder.encode(value)
    }

    public static func decode<Value: Decodable>(_ type: Value.Type, from data: Data) throws -> Value {
        try JSONDecoder().decode(type, from: data)
    }

    /// Decodes every entry of a listing, skipping (and reporting) any that no longer decode, so one
    /// bad record never stops the agent from starting.
    public static func decodeAll<Value: Decodable>(
        _ type: Value.Type, from entries: [StoreEntry], onError: (String, any Error) -> Void = { _, _ in }
    ) -> [Value] {
        entries.compactMap { entry in
            do {
                return try decode(type, from: entry.value)
            } catch {
                onError(entry.key, error)
                return nil
            }
        }
    }
}
