public import FlotillaCore
import Foundation
public import Logging
import NIOPosix
public import Prometheus
public import ServiceLifecycle

/// Measures this node and every instance its agent supervises, every `interval`: from the
/// instances' cgroups (CPU, throttling, memory, OOM kills, processes, disk I/O on v2), from their
/// network namespace where they have their own (containers on a bridge), and from `/proc` for the
/// node. Figures go to the Prometheus registry (`/metrics`, labelled `app`, `instance`, `node`)
/// and stay for a few minutes as samples, from which rates over a window are computed for the
/// stats API, `flotilla top`, alerts and autoscaling.
///
/// A round reads a handful of small in-memory files per instance on a driver thread, not on the
/// cooperative pool. Should rounds grow expensive (thousands of instances), the wait between them
/// stretches so that collecting takes at most 2 % of a core.
public actor UsageCollector: Service {
    /// How much history each instance keeps: enough for a 5-minute window at a 5-second interval.
    static let samplesKept = 64
    static let budget = 0.02

    private let agent: NodeAgent
    private let cgroups: Cgroups
    private let registry: PrometheusCollectorRegistry
    private let node: String
    private let dataDirectory: String
    public nonisolated let interval: Duration
    private let logger: Logger
    /// Called after each round with the monotonic time (the proxy samples its request counters).
    private let afterRound: (@Sendable (Double) -> Void)?

    private var instances: [String: UsageHistory] = [:]
    private var nodeSamples: [(time: Double, usage: NodeUsage)] = []
    private var lastRoundSeconds = 0.0
    private let nodeMetrics: NodeMetrics
    private let roundSeconds: Gauge

    public init(
        agent: NodeAgent, cgroups: Cgroups, registry: PrometheusCollectorRegistry, node: String, dataDirectory: String, interval: Duration,
        logger: Logger, afterRound: (@Sendable (Double) -> Void)? = nil
    ) {
        self.afterRound = afterRound
        self.agent = agent
        self.cgroups = cgroups
        self.registry = registry
        self.node = node
        self.dataDirectory = dataDirectory
        self.interval = interval
        self.logger = logger
        nodeMetrics = NodeMetrics(registry: registry, node: node)
        roundSeconds = registry.gauge("flotilla_metrics_collection_seconds", labels: [("node", node)], help: "How long the last round of instance and node measurements took")
    }

    public func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            let started = ContinuousClock.now
            await collect()
            afterRound?(Self.monotonicSeconds())
            let spent = ContinuousClock.now - started
            lastRoundSeconds = spent.seconds
            roundSeconds.set(lastRoundSeconds)
            let wait = max(interval, spent * (1 / Self.budget) - spent)
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: wait) }
        }
    }

    /// One round: measures everything now. Public for tests and for a first sample on demand.
    public func collect() async {
        let supervised = await agent.supervisedInstances()
        let cgroups = self.cgroups
        let dataDirectory = self.dataDirectory
        let ownNamespace = ProcFS.networkNamespace(of: getpid())
        let measured: (NodeUsage, [(SupervisedInstance, CgroupUsage?, (received: UInt64, transmitted: UInt64)?)])
        do {
            measured = try await DriverThreads.pool.runIfActive {
                let nodeUsage = NodeUsage.read(dataDirectory: dataDirectory)
                let usages = supervised.map { instance in
                    (instance, cgroups.usage(instanceID: instance.id), Self.network(of: instance, cgroups: cgroups, hostNamespace: ownNamespace))
                }
                return (nodeUsage, usages)
            }
        } catch {
            return  // the pool is shutting down with the agent
        }
        let now = Self.monotonicSeconds()
        let wallClock = Timestamp.format(Date())
        record(node: measured.0, at: now)
        var seen: Set<String> = []
        for (instance, usage, network) in measured.1 {
            seen.insert(instance.id)
            let tracked = instances[instance.id] ?? UsageHistory(instance: instance, registry: registry, node: node)
            tracked.add(Sample(time: now, wallClock: wallClock, usage: usage ?? CgroupUsage(), network: network))
            instances[instance.id] = tracked
        }
        for (id, tracked) in instances where !seen.contains(id) {
            tracked.unregister(from: registry)
            instances[id] = nil
        }
    }

    private func record(node usage: NodeUsage, at time: Double) {
        nodeSamples.append((time, usage))
        if nodeSamples.count > 2 { nodeSamples.removeFirst(nodeSamples.count - 2) }
        nodeMetrics.update(usage)
    }

    /// The network counters of an instance with a namespace of its own: any process of it that
    /// is not in the agent's namespace (for a container, the runtime is; the container is not).
    nonisolated static func network(
        of instance: SupervisedInstance, cgroups: Cgroups, hostNamespace: String?
    ) -> (received: UInt64, transmitted: UInt64)? {
        guard instance.driver != "exec" else { return nil }
        for pid in cgroups.processes(instanceID: instance.id) where pid != instance.pid {
            guard let namespace = ProcFS.networkNamespace(of: pid), namespace != hostNamespace else { continue }
            return ProcFS.networkBytes(of: pid)
        }
        return nil
    }

    // MARK: - Reading what was measured

    /// Every instance's latest figures, those of one app when `app` is given.
    public func reports(app: AppID? = nil) -> [InstanceUsageReport] {
        instances.values.filter { app == nil || $0.instance.app == app }.compactMap { $0.report(node: node) }.sorted { $0.id < $1.id }
    }

    /// CPU cores an instance used on average over the last `window` (at least one interval), nil
    /// without two samples.
    public func cpuCores(instance id: String, over window: Duration) -> Double? {
        instances[id]?.rate(over: window.seconds, \.cpuSeconds)
    }

    public func nodeReport() async -> NodeUsageReport? {
        guard let latest = nodeSamples.last else { return nil }
        var busy: Double?
        if nodeSamples.count == 2 {
            let first = nodeSamples[0]
            let elapsed = latest.time - first.time
            let idleModes: Set<String> = ["idle", "iowait"]
            func busySeconds(_ usage: NodeUsage) -> Double {
                usage.cpuSeconds.filter { !idleModes.contains($0.key) }.values.reduce(0, +)
            }
            if elapsed > 0 { busy = max(0, (busySeconds(latest.usage) - busySeconds(first.usage)) / elapsed) }
        }
        let usage = latest.usage
        return NodeUsageReport(
            node: node, sampledAt: Timestamp.format(Date()), cpus: usage.cpus, cpuCoresUsed: busy, memoryTotalBytes: usage.memoryTotalBytes,
            memoryAvailableBytes: usage.memoryAvailableBytes, load1: usage.load1, load5: usage.load5, load15: usage.load15,
            diskTotalBytes: usage.diskTotalBytes, diskFreeBytes: usage.diskFreeBytes, instances: instances.count,
            collectionSeconds: lastRoundSeconds, intervalSeconds: interval.seconds)
    }

    static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}

/// An instance the agent supervises, as the collector needs it.
public struct SupervisedInstance: Sendable {
    public let id: String
    public let app: AppID
    /// The supervised process (for a container, its runtime).
    public let pid: Int32
    public let driver: String
}

struct Sample {
    var time: Double
    var wallClock: String
    var usage: CgroupUsage
    var network: (received: UInt64, transmitted: UInt64)?

    var cpuSeconds: Double? { usage.cpuSeconds }
    var received: Double? { network.map { Double($0.received) } }
    var transmitted: Double? { network.map { Double($0.transmitted) } }
}

/// One instance's samples and its Prometheus series. Only the collector actor touches it.
final class UsageHistory {
    let instance: SupervisedInstance
    private(set) var samples: [Sample] = []
    private let metrics: InstanceMetrics

    init(instance: SupervisedInstance, registry: PrometheusCollectorRegistry, node: String) {
        self.instance = instance
        metrics = InstanceMetrics(registry: registry, labels: [("app", instance.app.path), ("instance", instance.id), ("node", node)])
    }

    func add(_ sample: Sample) {
        metrics.update(from: samples.last, to: sample)
        samples.append(sample)
        if samples.count > UsageCollector.samplesKept { samples.removeFirst(samples.count - UsageCollector.samplesKept) }
    }

    func unregister(from registry: PrometheusCollectorRegistry) { metrics.unregister(from: registry) }

    /// The average rate of a cumulative figure over the last `window` seconds (at least the last
    /// two samples apart), nil without two samples that have it.
    func rate(over window: Double, _ figure: KeyPath<Sample, Double?>) -> Double? {
        guard let latest = samples.last, let latestValue = latest[keyPath: figure], samples.count >= 2 else { return nil }
        var earliest = samples[samples.count - 2]
        for sample in samples.dropLast().reversed() {
            if latest.time - sample.time > window { break }
            earliest = sample
        }
        guard let earliestValue = earliest[keyPath: figure], latest.time > earliest.time else { return nil }
        return max(0, latestValue - earliestValue) / (latest.time - earliest.time)
    }

    func report(node: String) -> InstanceUsageReport? {
        guard let latest = samples.last else { return nil }
        var report = InstanceUsageReport(id: instance.id, app: instance.app.path, node: node, sampledAt: latest.wallClock)
        let usage = latest.usage
        report.cpuSeconds = usage.cpuSeconds
        report.cpuCores = rate(over: 0, \.cpuSeconds)
        report.cpuThrottledSeconds = usage.throttledSeconds
        report.cpuThrottledPeriods = usage.throttledPeriods
        report.memoryBytes = usage.memoryBytes
        report.memoryRSSBytes = usage.rssBytes
        report.memoryCacheBytes = usage.cacheBytes
        report.memoryLimitBytes = usage.memoryLimitBytes
        report.oomKills = usage.oomKills
        report.processes = usage.processes
        report.diskReadBytes = usage.diskReadBytes
        report.diskWriteBytes = usage.diskWriteBytes
        if let network = latest.network {
            report.networkReceiveBytes = network.received
            report.networkTransmitBytes = network.transmitted
            report.networkReceiveBytesPerSecond = rate(over: 0, \.received)
            report.networkTransmitBytesPerSecond = rate(over: 0, \.transmitted)
        }
        return report
    }
}

/// An instance's Prometheus series. Cumulative kernel figures are counters that advance by what
/// the kernel's counter advanced; the others are gauges. A series appears with the first sample
/// that has its figure and goes with the instance.
final class InstanceMetrics {
    private let registry: PrometheusCollectorRegistry
    private let labels: [(String, String)]
    private var counters: [String: Counter] = [:]
    private var gauges: [String: Gauge] = [:]

    init(registry: PrometheusCollectorRegistry, labels: [(String, String)]) {
        self.registry = registry
        self.labels = labels
    }

    static let counterHelp: [String: String] = [
        "flotilla_instance_cpu_seconds_total": "CPU time the instance used (user and system)",
        "flotilla_instance_cpu_throttled_seconds_total": "Time the instance was held back by its CPU quota",
        "flotilla_instance_cpu_throttled_periods_total": "CFS periods in which the instance was throttled",
        "flotilla_instance_oom_kills_total": "Processes of the instance the kernel's OOM killer ended",
        "flotilla_instance_network_receive_bytes_total": "Bytes the instance received (its own network namespace only)",
        "flotilla_instance_network_transmit_bytes_total": "Bytes the instance sent (its own network namespace only)",
        "flotilla_instance_disk_read_bytes_total": "Bytes the instance read from block devices",
        "flotilla_instance_disk_write_bytes_total": "Bytes the instance wrote to block devices",
    ]
    static let gaugeHelp: [String: String] = [
        "flotilla_instance_memory_bytes": "Memory the instance uses: usage less inactive file cache (the working set)",
        "flotilla_instance_memory_rss_bytes": "Anonymous memory of the instance",
        "flotilla_instance_memory_cache_bytes": "Page cache charged to the instance",
        "flotilla_instance_memory_limit_bytes": "The instance's memory limit (absent when it has none)",
        "flotilla_instance_processes": "Processes in the instance",
    ]

    func update(from previous: Sample?, to sample: Sample) {
        let usage = sample.usage
        advance("flotilla_instance_cpu_seconds_total", from: previous?.usage.cpuSeconds, to: usage.cpuSeconds)
        advance("flotilla_instance_cpu_throttled_seconds_total", from: previous?.usage.throttledSeconds, to: usage.throttledSeconds)
        advance("flotilla_instance_cpu_throttled_periods_total", from: previous?.usage.throttledPeriods.map { Double($0) }, to: usage.throttledPeriods.map { Double($0) })
        advance("flotilla_instance_oom_kills_total", from: previous?.usage.oomKills.map { Double($0) }, to: usage.oomKills.map { Double($0) })
        advance("flotilla_instance_network_receive_bytes_total", from: previous?.received, to: sample.received)
        advance("flotilla_instance_network_transmit_bytes_total", from: previous?.transmitted, to: sample.transmitted)
        advance("flotilla_instance_disk_read_bytes_total", from: previous?.usage.diskReadBytes.map { Double($0) }, to: usage.diskReadBytes.map { Double($0) })
        advance("flotilla_instance_disk_write_bytes_total", from: previous?.usage.diskWriteBytes.map { Double($0) }, to: usage.diskWriteBytes.map { Double($0) })
        set("flotilla_instance_memory_bytes", usage.memoryBytes.map { Double($0) })
        set("flotilla_instance_memory_rss_bytes", usage.rssBytes.map { Double($0) })
        set("flotilla_instance_memory_cache_bytes", usage.cacheBytes.map { Double($0) })
        set("flotilla_instance_memory_limit_bytes", usage.memoryLimitBytes.map { Double($0) })
        set("flotilla_instance_processes", usage.processes.map { Double($0) })
    }

    private func advance(_ name: String, from previous: Double?, to value: Double?) {
        guard let value else { return }
        let counter = counters[name] ?? {
            let made = registry.counter(name, labels: labels, help: Self.counterHelp[name] ?? "")
            counters[name] = made
            return made
        }()
        // The kernel's counter starts with the cgroup, so the first sample counts whole.
        let delta = value - (previous ?? 0)
        if delta > 0 { counter.increment(by: delta) }
    }

    private func set(_ name: String, _ value: Double?) {
        guard let value else {
            if let gauge = gauges.removeValue(forKey: name) { registry.unregisterGauge(gauge) }
            return
        }
        let gauge = gauges[name] ?? {
            let made = registry.gauge(name, labels: labels, help: Self.gaugeHelp[name] ?? "")
            gauges[name] = made
            return made
        }()
        gauge.set(value)
    }

    func unregister(from registry: PrometheusCollectorRegistry) {
        for counter in counters.values { registry.unregisterCounter(counter) }
        for gauge in gauges.values { registry.unregisterGauge(gauge) }
        counters = [:]
        gauges = [:]
    }
}

/// The node's series (`flotilla_node_*`, labelled `node`), made once.
final class NodeMetrics: @unchecked Sendable {
    // Set only from the collector actor; Prometheus' metric types are atomics inside.
    private let cpuSeconds: [String: Counter]
    private var lastCPU: [String: Double] = [:]
    private let cpus, memoryTotal, memoryAvailable, load1, load5, load15, diskTotal, diskFree: Gauge

    init(registry: PrometheusCollectorRegistry, node: String) {
        var cpu: [String: Counter] = [:]
        for mode in NodeUsageParser.cpuModes {
            cpu[mode] = registry.counter(
                "flotilla_node_cpu_seconds_total", labels: [("node", node), ("mode", mode)], help: "CPU time of the node by mode, over all CPUs")
        }
        cpuSeconds = cpu
        func gauge(_ name: String, _ help: String) -> Gauge { registry.gauge(name, labels: [("node", node)], help: help) }
        cpus = gauge("flotilla_node_cpus", "CPUs of the node")
        memoryTotal = gauge("flotilla_node_memory_total_bytes", "Memory of the node")
        memoryAvailable = gauge("flotilla_node_memory_available_bytes", "Memory available for new work without swapping (MemAvailable)")
        load1 = gauge("flotilla_node_load1", "Load average over 1 minute")
        load5 = gauge("flotilla_node_load5", "Load average over 5 minutes")
        load15 = gauge("flotilla_node_load15", "Load average over 15 minutes")
        diskTotal = gauge("flotilla_node_disk_total_bytes", "Size of the file system of the data directory")
        diskFree = gauge("flotilla_node_disk_free_bytes", "Free space (for unprivileged users) on the file system of the data directory")
    }

    func update(_ usage: NodeUsage) {
        for (mode, seconds) in usage.cpuSeconds {
            let delta = seconds - (lastCPU[mode] ?? 0)
            if delta > 0 { cpuSeconds[mode]?.increment(by: delta) }
            lastCPU[mode] = seconds
        }
        cpus.set(Double(usage.cpus))
        memoryTotal.set(Double(usage.memoryTotalBytes))
        memoryAvailable.set(Double(usage.memoryAvailableBytes))
        load1.set(usage.load1)
        load5.set(usage.load5)
        load15.set(usage.load15)
        diskTotal.set(Double(usage.diskTotalBytes))
        diskFree.set(Double(usage.diskFreeBytes))
    }
}

extension PrometheusCollectorRegistry {
    func counter(_ name: String, labels: [(String, String)], help: String) -> Counter {
        makeCounter(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    func gauge(_ name: String, labels: [(String, String)], help: String) -> Gauge {
        makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }
}

extension Duration {
    var seconds: Double {
        let (whole, fraction) = components
        return Double(whole) + Double(fraction) / 1e18
    }
}
