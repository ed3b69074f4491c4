import Foundation
import FlotillaCore
import Prometheus
import Testing
@testable import FlotillaAgent

@Suite("Usage parsing")
struct UsageParserTests {
    @Test("cgroup v2 cpu.stat gives CPU seconds and throttling")
    func v2CPU() {
        var usage = CgroupUsage()
        CgroupUsageParser.v2CPU(
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 40\nnr_throttled 7\nthrottled_usec 350000\n", into: &usage)
        #expect(usage.cpuSeconds == 2.5)
        #expect(usage.throttledPeriods == 7)
        #expect(usage.throttledSeconds == 0.35)
    }

    @Test("cgroup v2 memory: the working set leaves inactive file cache out")
    func v2Memory() {
        var usage = CgroupUsage()
        CgroupUsageParser.v2Memory(stat: "anon 1048576\nfile 4194304\ninactive_file 3145728\nactive_file 1048576\n", current: 5_242_880, into: &usage)
        #expect(usage.memoryBytes == 2_097_152)
        #expect(usage.rssBytes == 1_048_576)
        #expect(usage.cacheBytes == 4_194_304)
        // Inactive file larger than usage (read between two updates) floors at zero.
        CgroupUsageParser.v2Memory(stat: "inactive_file 9000\n", current: 100, into: &usage)
        #expect(usage.memoryBytes == 0)
    }

    @Test("cgroup v1 memory.stat: the totals (with a container's child cgroup) win over the cgroup's own")
    func v1Memory() {
        var usage = CgroupUsage()
        let stat = "cache 10\nrss 20\ninactive_file 5\ntotal_cache 4096\ntotal_rss 8192\ntotal_inactive_file 1024\n"
        CgroupUsageParser.v1Memory(stat: stat, usage: 16384, into: &usage)
        #expect(usage.memoryBytes == 15360)
        #expect(usage.rssBytes == 8192)
        #expect(usage.cacheBytes == 4096)
        CgroupUsageParser.v1Memory(stat: "cache 10\nrss 20\ninactive_file 5\n", usage: 100, into: &usage)
        #expect(usage.memoryBytes == 95)
        #expect(usage.rssBytes == 20)
    }

    @Test("limits: max and v1's page-rounded LONG_MAX mean none")
    func limits() {
        #expect(CgroupUsageParser.limit("max\n") == nil)
        #expect(CgroupUsageParser.limit("9223372036854771712\n") == nil)
        #expect(CgroupUsageParser.limit("67108864\n") == 67_108_864)
        #expect(CgroupUsageParser.limit("garbage") == nil)
        #expect(CgroupUsageParser.number(" 42\n") == 42)
        #expect(CgroupUsageParser.number("-1") == nil)
    }

    @Test("v1 throttling and oom_control")
    func v1Throttling() {
        var usage = CgroupUsage()
        CgroupUsageParser.v1Throttling("nr_periods 100\nnr_throttled 3\nthrottled_time 1500000000\n", into: &usage)
        #expect(usage.throttledPeriods == 3)
        #expect(usage.throttledSeconds == 1.5)
        #expect(CgroupUsageParser.keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")["oom_kill"] == 2)
    }

    @Test("io.stat is summed over devices; malformed fields are skipped")
    func v2IO() {
        var usage = CgroupUsage()
        CgroupUsageParser.v2IO("8:0 rbytes=1000 wbytes=200 rios=3 wios=1\n259:0 rbytes=24 wbytes=x dbytes=0\nbroken\n", into: &usage)
        #expect(usage.diskReadBytes == 1024)
        #expect(usage.diskWriteBytes == 200)
    }

    @Test("/proc/stat: seconds by mode over all CPUs, and the CPU count")
    func nodeCPU() {
        var usage = NodeUsage()
        let stat = """
            cpu  1000 20 300 5000 40 0 6 0 0 0
            cpu0 500 10 150 2500 20 0 3 0 0 0
            cpu1 500 10 150 2500 20 0 3 0 0 0
            intr 12345
            ctxt 999
            """
        NodeUsageParser.cpu(stat, into: &usage, ticksPerSecond: 100)
        #expect(usage.cpus == 2)
        #expect(usage.cpuSeconds["user"] == 10)
        #expect(usage.cpuSeconds["idle"] == 50)
        #expect(usage.cpuSeconds["softirq"] == 0.06)
        #expect(Set(usage.cpuSeconds.keys) == Set(NodeUsageParser.cpuModes))
    }

    @Test("meminfo and loadavg")
    func nodeMemoryAndLoad() {
        var usage = NodeUsage()
        NodeUsageParser.memory("MemTotal:       2048 kB\nMemFree:  100 kB\nMemAvailable:   1024 kB\n", into: &usage)
        #expect(usage.memoryTotalBytes == 2_097_152)
        #expect(usage.memoryAvailableBytes == 1_048_576)
        NodeUsageParser.load("0.52 0.40 0.31 2/345 6789\n", into: &usage)
        #expect(usage.load1 == 0.52)
        #expect(usage.load15 == 0.31)
        NodeUsageParser.load("", into: &usage)
        #expect(usage.load5 == 0.40)
    }

    @Test("net/dev: loopback is left out")
    func network() {
        let text = """
            Inter-|   Receive                                                |  Transmit
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
                lo:  999999      10    0    0    0     0          0         0   999999      10    0    0    0     0       0          0
              eth0:    1500      12    0    0    0     0          0         0     700       8    0    0    0     0       0          0
              veth1:     500       2    0    0    0     0          0         0     300       1    0    0    0     0       0          0
            """
        let bytes = NodeUsageParser.network(text)
        #expect(bytes.received == 2000)
        #expect(bytes.transmitted == 1000)
    }

    func instance() throws -> SupervisedInstance {
        SupervisedInstance(id: "web.1", app: try AppID("/web"), pid: 1, driver: "exec")
    }

    func sample(_ time: Double, cpu: Double?, memory: UInt64? = nil) -> Sample {
        var usage = CgroupUsage()
        usage.cpuSeconds = cpu
        usage.memoryBytes = memory
        return Sample(time: time, wallClock: "t\(time)", usage: usage, network: nil)
    }

    @Test("rates come from samples at least two apart and span the window asked for")
    func rates() throws {
        let registry = PrometheusCollectorRegistry()
        let history = UsageHistory(instance: try instance(), registry: registry, node: "n1")
        history.add(sample(0, cpu: 0))
        #expect(history.rate(over: 10, \.cpuSeconds) == nil)
        history.add(sample(5, cpu: 1))
        history.add(sample(10, cpu: 4))
        #expect(history.rate(over: 0, \.cpuSeconds) == 0.6)
        #expect(history.rate(over: 10, \.cpuSeconds) == 0.4)
        // A counter that went back (a new cgroup under the same name) gives zero, not a negative rate.
        history.add(sample(15, cpu: 1))
        #expect(history.rate(over: 0, \.cpuSeconds) == 0)
    }

    @Test("counters advance by the kernel's deltas; a gauge goes when its figure does; unregister removes all")
    func metrics() throws {
        let registry = PrometheusCollectorRegistry()
        let history = UsageHistory(instance: try instance(), registry: registry, node: "n1")
        func render() -> String {
            var buffer = [UInt8]()
            registry.emit(into: &buffer)
            return String(decoding: buffer, as: UTF8.self)
        }
        history.add(sample(0, cpu: 2, memory: 4096))
        history.add(sample(5, cpu: 3.5, memory: 8192))
        var text = render()
        #expect(text.contains(#"flotilla_instance_cpu_seconds_total{app="/web",instance="web.1",node="n1"} 3.5"#))
        #expect(text.contains(#"flotilla_instance_memory_bytes{app="/web",instance="web.1",node="n1"} 8192"#))
        history.add(sample(10, cpu: 1, memory: nil))
        text = render()
        #expect(text.contains(#"flotilla_instance_cpu_seconds_total{app="/web",instance="web.1",node="n1"} 3.5"#))
        #expect(!text.contains("flotilla_instance_memory_bytes{"))
        history.unregister(from: registry)
        #expect(!render().contains("flotilla_instance_"))
    }

    @Test("app summaries add their instances up; the limit only when every instance has one")
    func summaries() {
        var a = InstanceUsageReport(id: "a.1", app: "/a", node: "n1", sampledAt: "now")
        a.cpuCores = 0.5
        a.memoryBytes = 100
        a.memoryLimitBytes = 1000
        a.oomKills = 1
        var b = InstanceUsageReport(id: "a.2", app: "/a", node: "n2", sampledAt: "now")
        b.cpuCores = 0.25
        b.memoryBytes = 50
        b.memoryLimitBytes = 1000
        var c = InstanceUsageReport(id: "b.1", app: "/b", node: "n1", sampledAt: "now")
        c.memoryBytes = 7
        let summaries = AppUsageSummary.byApp([c, a, b])
        #expect(summaries.map(\.app) == ["/a", "/b"])
        #expect(summaries[0].instances == 2)
        #expect(summaries[0].cpuCores == 0.75)
        #expect(summaries[0].memoryBytes == 150)
        #expect(summaries[0].memoryLimitBytes == 2000)
        #expect(summaries[0].oomKills == 1)
        #expect(summaries[1].memoryLimitBytes == nil)
        #expect(summaries[1].cpuCores == 0)
    }
}
