import FlotillaControl
import FlotillaCore
import FlotillaRegistry
import FlotillaStore
import Foundation
import Prometheus
import ServiceLifecycle
import Synchronization

/// The store as the rest of the agent sees it, timed: every commit's latency (and its failures),
/// and how long this agent's own commits take to come back on its watches (the watch lag).
final class MeasuredStateStore: StateStore {
    private let base: any StateStore
    private let commits: DurationHistogram
    private let preconditionFailures: Counter
    private let errors: Counter
    private let watchLag: DurationHistogram
    /// When each of this agent's recent commits returned, by index (for the watch lag).
    private let committed = Mutex<[UInt64: ContinuousClock.Instant]>([:])

    static let buckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
        .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
    ]

    init(_ base: any StateStore, registry: PrometheusCollectorRegistry) {
        self.base = base
        commits = registry.makeDurationHistogram(
            name: "flotilla_store_commit_seconds", labels: [], buckets: Self.buckets,
            help: "How long the state store takes to make a transaction durable (etcd: its quorum)")
        preconditionFailures = registry.makeCounter(
            name: "flotilla_store_commit_failures_total", labels: [("reason", "precondition")], help: "Transactions the store refused")
        errors = registry.makeCounter(name: "flotilla_store_commit_failures_total", labels: [("reason", "error")], help: "Transactions the store refused")
        watchLag = registry.makeDurationHistogram(
            name: "flotilla_store_watch_lag_seconds", labels: [], buckets: Self.buckets,
            help: "From one of this agent's commits returning to its arrival on the agent's own watches")
    }

    func get(_ key: String) async throws -> StoreEntry? { try await base.get(key) }
    func list(prefix: String) async throws -> StoreListing { try await base.list(prefix: prefix) }
    func currentIndex() async throws -> UInt64 { try await base.currentIndex() }
    func snapshot(prefixes: [String]) async throws -> StoreSnapshot { try await base.snapshot(prefixes: prefixes) }
    func grantLease(ttl: Int64) async throws -> StoreLease { try await base.grantLease(ttl: ttl) }
    func keepAlive(_ lease: StoreLease.ID) async throws { try await base.keepAlive(lease) }
    func revokeLease(_ lease: StoreLease.ID) async throws { try await base.revokeLease(lease) }
    var limits: StoreLimits { base.limits }
    var displayName: String { base.displayName }

    func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64 {
        try await base.waitForChange(prefix: prefix, after: index, timeout: timeout)
    }

    @discardableResult
    func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        let started = ContinuousClock.now
        do {
            let index = try await base.commit(transaction)
            let now = ContinuousClock.now
            commits.record(now - started)
            committed.withLock { committed in
                committed[index] = now
                // Commits no watch saw (prefixes nobody watches) are let go in halves: a scan per 2,048 commits, not per commit.
                if committed.count > 4096 { committed = committed.filter { $0.key > index - min(index, 2048) } }
            }
            return index
        } catch {
            if case StoreError.preconditionFailed = error { preconditionFailures.increment() } else { errors.increment() }
            throw error
        }
    }

    func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error> {
        let feed = base.watch(prefix: prefix, after: index)
        let (stream, continuation) = AsyncThrowingStream.makeStream(of: [StoreEvent].self)
        let task = Task { [self] in
            do {
                for try await batch in feed {
                    if let index = batch.first?.entry.modifyIndex, let at = committed.withLock({ $0.removeValue(forKey: index) }) {
                        watchLag.record(ContinuousClock.now - at)
                    }
                    continuation.yield(batch)
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}

/// The control plane's, the registry's and DNS's figures on `/metrics`: placements, instance
/// exits and deployments as they happen (from the event bus), the queue, apps, instances,
/// deployments, services and nodes every few seconds.
struct ControlMetrics: Service {
    let control: ControlPlane
    let events: EventBus
    let registry: Registry
    let metrics: PrometheusCollectorRegistry

    static let durationBuckets: [Duration] = [
        .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30), .seconds(60), .seconds(120), .seconds(300), .seconds(600), .seconds(1800),
    ]

    func run() async throws {
        let placements = metrics.makeCounter(name: "flotilla_scheduler_placements_total", help: "Instances placed on a node and started there")
        let exits = Dictionary(uniqueKeysWithValues: [TaskState.finished, .failed, .killed, .lost, .error].map { state in
            (state, metrics.makeCounter(name: "flotilla_instances_ended_total", labels: [("state", state.rawValue)], help: "Instances that ended, by final state"))
        })
        let deployments = ["succeeded", "failed"].map { result in
            (metrics.makeCounter(name: "flotilla_deployments_total", labels: [("result", result)], help: "Deployments that ended, by result"),
             metrics.makeDurationHistogram(
                name: "flotilla_deployment_duration_seconds", labels: [("result", result)], buckets: Self.durationBuckets,
                help: "From a deployment's start to its end"))
        }
        let gauges = [
            "flotilla_apps": "Apps", "flotilla_instances": "Live instances", "flotilla_deployments_running": "Deployments under way",
            "flotilla_scheduler_queue_instances": "Instances waiting to be placed (the launch queue)",
            "flotilla_scheduler_queue_apps": "Apps with instances waiting to be placed",
            "flotilla_registry_services": "Service instances in the catalog", "flotilla_registry_passing_services": "Service instances whose checks all pass",
            "flotilla_nodes": "Nodes that are up",
        ].mapValues { $0 }
        let made = Dictionary(uniqueKeysWithValues: gauges.map { ($0.key, metrics.makeGauge(name: $0.key, help: $0.value)) })
        let stream = events.subscribe()
        await withDiscardingTaskGroup { group in
            group.addTask {
                // An instance's first status tells that it was placed (and started on its node).
                var live: Set<String> = []
                for await published in stream {
                    switch published.event {
                    case .statusUpdate(let spec, let status):
                        if status.state.isTerminal {
                            live.remove(spec.id)
                            exits[status.state]?.increment()
                        } else if live.insert(spec.id).inserted {
                            placements.increment()
                        }
                    case .deploymentSuccess(let deployment), .deploymentFailed(let deployment, _):
                        let succeeded = if case .deploymentSuccess = published.event { true } else { false }
                        let (count, duration) = deployments[succeeded ? 0 : 1]
                        count.increment()
                        if let started = Timestamp.parse(deployment.startedAt) {
                            duration.record(.milliseconds(Int64(max(0, published.at.timeIntervalSince(started)) * 1000)))
                        }
                    default:
                        break
                    }
                }
            }
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                let snapshot = await control.snapshot()
                let view = registry.viewBox.current
                made["flotilla_apps"]?.set(Double(snapshot.apps.count))
                made["flotilla_instances"]?.set(Double(snapshot.instances.values.filter { !$0.state.isTerminal }.count))
                made["flotilla_deployments_running"]?.set(Double(snapshot.deployments.count))
                made["flotilla_scheduler_queue_instances"]?.set(Double(snapshot.queue.values.reduce(0) { $0 + $1.count }))
                made["flotilla_scheduler_queue_apps"]?.set(Double(snapshot.queue.count))
                made["flotilla_registry_services"]?.set(Double(view.services.count))
                made["flotilla_registry_passing_services"]?.set(Double(view.services.filter { view.status(of: $0) == .passing }.count))
                made["flotilla_nodes"]?.set(Double(snapshot.nodes.count))
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(5)) }
            }
            group.cancelAll()
        }
    }

    /// DNS answers by transport and response code, in Prometheus' text format.
    static func render(dns counters: DNSCounters, into buffer: inout [UInt8]) {
        var text = "# HELP flotilla_dns_responses_total DNS queries answered, by transport and response code (dropped: given no answer)\n"
        text += "# TYPE flotilla_dns_responses_total counter\n"
        for (transport, code, count) in counters.counts() {
            text += "flotilla_dns_responses_total{transport=\"\(transport)\",rcode=\"\(code)\"} \(count)\n"
        }
        buffer.append(contentsOf: text.utf8)
    }
}
