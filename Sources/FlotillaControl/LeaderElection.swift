public import FlotillaStore
import Foundation
public import Logging
public import ServiceLifecycle

/// Who schedules: the candidate whose record holds the `leader` key. The key is written only if
/// absent and under a lease the leader keeps alive, so it disappears when the leader dies, stops,
/// or loses etcd for longer than the lease's TTL, and another candidate takes it. Flotilla runs no
/// consensus of its own: etcd's transactions decide.
public struct LeaderRecord: Codable, Sendable, Hashable {
    /// The node name of the leading agent.
    public var name: String
    /// Where its API answers (`http://host:port`), for forwarded writes.
    public var api: String
    /// When it took the lead (RFC 3339).
    public var since: String

    /// `since` nil: now.
    public init(name: String, api: String, since: String? = nil) {
        self.name = name
        self.api = api
        self.since = since ?? ISO8601DateFormatter().string(from: Date())
    }
}

public actor LeaderElection: Service {
    public enum Role: Sendable, Equatable {
        /// Leading: commits carry `guardCondition`, which fails once the lead is lost.
        case leader(guardCondition: StorePrecondition)
        case follower(leader: LeaderRecord?)
    }

    public static let key = "leader"

    private let store: any StateStore
    private let me: LeaderRecord
    private let ttl: Int64
    private let logger: Logger
    private let onChange: @Sendable (Role) async -> Void
    /// False: this agent only watches who leads (it is not started with `--server`).
    private let campaigns: Bool
    public private(set) var role: Role = .follower(leader: nil)
    private var lease: StoreLease.ID?

    /// - Parameters:
    ///   - ttl: seconds the lead outlives its holder's last keep-alive (the failover time).
    ///   - onChange: told of every change of role, in order, before the election goes on.
    public init(
        store: any StateStore, candidate: LeaderRecord, campaigns: Bool = true, ttl: Int64 = 5, logger: Logger,
        onChange: @escaping @Sendable (Role) async -> Void
    ) {
        self.campaigns = campaigns
        self.store = store
        self.me = candidate
        self.ttl = ttl
        self.logger = logger
        self.onChange = onChange
    }

    /// The leader as last seen (this candidate when it leads).
    public var leader: LeaderRecord? {
        switch role {
        case .leader: return me
        case .follower(let leader): return leader
        }
    }

    public var isLeader: Bool {
        if case .leader = role { return true }
        return false
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown { await self.campaign() }
        await resign()
    }

    private func campaign() async {
        while !Task.isCancelled {
            do {
                if let entry = try await store.get(Self.key) {
                    let holder = try? StateCodec.decode(LeaderRecord.self, from: entry.value)
                    if let holder, holder.name == me.name, lease == nil, campaigns {
                        // Our own record from before a restart (kill -9 leaves it until its lease
                        // ends): take it back now rather than wait out the TTL.
                        logger.notice("the leader key still names this node from an earlier run: taking it back")
                        try? await store.commit(StoreTransaction(preconditions: [.modifyIndex(Self.key, equals: entry.modifyIndex)], mutations: [.delete(Self.key)]))
                        continue
                    }
                    await become(.follower(leader: holder))
                    _ = try await store.waitForChange(prefix: Self.key, after: entry.modifyIndex, timeout: .seconds(5))
                    continue
                }
                guard campaigns else {
                    await become(.follower(leader: nil))
                    _ = try await store.waitForChange(prefix: Self.key, after: try await store.currentIndex(), timeout: .seconds(5))
                    continue
                }
                let granted = try await store.grantLease(ttl: ttl)
                let record = LeaderRecord(name: me.name, api: me.api)
                let index: UInt64
                do {
                    index = try await store.commit(
                        StoreTransaction(
                            preconditions: [.absent(Self.key)], mutations: [.put(Self.key, try StateCodec.encode(record), lease: granted.id)]))
                } catch StoreError.preconditionFailed {
                    try? await store.revokeLease(granted.id)
                    continue
                }
                lease = granted.id
                logger.notice("this node leads the cluster (lease \(granted.id), \(ttl) s)")
                await become(.leader(guardCondition: .modifyIndex(Self.key, equals: index)))
                await holdLead(granted)
                // Stopping: `resign` revokes the lease, so the others need not wait out its TTL.
                if Task.isCancelled { return }
                lease = nil
                logger.warning("this node lost the lead")
                await become(.follower(leader: nil))
            } catch is CancellationError {
                return
            } catch {
                logger.warning("leader election: \(error); trying again")
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    /// Keeps the lease alive; returns when it is lost, or when the store has not confirmed it for a
    /// whole TTL (another candidate may lead by then: a leader that cannot tell stops leading).
    private func holdLead(_ granted: StoreLease) async {
        let clock = ContinuousClock()
        var confirmed = clock.now
        let interval = Duration.milliseconds(max(granted.ttl, 1) * 1000 / 3)
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            if Task.isCancelled { return }
            do {
                try await store.keepAlive(granted.id)
                confirmed = clock.now
            } catch StoreError.leaseNotFound {
                return
            } catch {
                if clock.now - confirmed >= .seconds(granted.ttl) {
                    logger.warning("the store has not confirmed the lead for \(granted.ttl) s (\(error)): stepping down")
                    return
                }
            }
        }
    }

    /// Gives up the lead at once (shutdown), so another candidate needs not wait for the TTL.
    private func resign() async {
        guard let lease else { return }
        self.lease = nil
        try? await store.revokeLease(lease)
        await become(.follower(leader: nil))
        logger.info("gave up the lead")
    }

    /// Told by the control plane when a commit found the lead gone (its guard failed).
    public func lost() async {
        guard let lease else { return }
        self.lease = nil
        try? await store.revokeLease(lease)
    }

    private func become(_ new: Role) async {
        guard new != role else { return }
        role = new
        await onChange(new)
    }
}
