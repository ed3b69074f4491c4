public import FlotillaCore
import Foundation
public import FlotillaScheduler

/// A consistent read of the control plane's state for the API: taken at once, read at leisure.
public struct ControlSnapshot: Sendable {
    public var apps: [AppID: AppRecord]
    public var instances: [String: Instance]
    public var deployments: [String: Deployment]
    public var failures: [AppID: TaskFailure]
    public var queue: [AppID: QueueEntry]
    /// Nodes that are up: their agents renew their records.
    public var nodes: [String: NodeInfo]
    /// Nodes that registered once and are down now (in a cluster).
    public var downNodes: [String: NodeInfo] = [:]
    public var index: UInt64
    /// Bumped by every change to what the snapshot shows.
    public var generation: UInt64

    public func instances(of app: AppID) -> [Instance] {
        instances.values.filter { $0.spec.appID == app }.sorted { $0.spec.stagedAt < $1.spec.stagedAt }
    }

    public func deployments(of app: AppID) -> [Deployment] {
        deployments.values.filter { $0.affectedApps.contains(app) }.sorted { $0.version < $1.version }
    }
}

/// The apps, sorted by id, each with the stamp of its JSON (see `ControlPlane.appListing`).
public struct AppListing: Sendable {
    public var apps: [AppRecord]
    public var stamps: [UInt64]
    public var generation: UInt64
}

/// What one app's JSON is made of: its record, instances (oldest first), deployments and last
/// failure, with the stamp they were read at.
public struct AppDetail: Sendable {
    public var record: AppRecord
    public var instances: [Instance]
    public var deployments: [Deployment]
    public var failure: TaskFailure?
    public var stamp: UInt64

    public init(record: AppRecord, instances: [Instance], deployments: [Deployment], failure: TaskFailure?, stamp: UInt64) {
        self.record = record
        self.instances = instances
        self.deployments = deployments
        self.failure = failure
        self.stamp = stamp
    }
}

/// An app with instances waiting to launch: not placeable yet, or held back by crash backoff.
public struct QueueEntry: Sendable {
    public var app: AppID
    public var count: Int
    public var since: String
    public var delaySeconds: Double
    public var placement: PlacementResult?
}

/// The answer to a change: Marathon's `{"version", "deploymentId"}`.
public struct ChangeResult: Sendable {
    public var version: String
    public var deploymentID: String
    public var app: AppRecord?
}
