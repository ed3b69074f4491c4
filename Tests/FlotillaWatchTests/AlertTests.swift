@testable import FlotillaWatch
import FlotillaCore
import Foundation
import Testing

@Suite("Alert levels")
struct AlertTrackerTests {
    let rule = AlertRule(name: "hot", metric: .cpu, window: 10, warning: 0.5, critical: 0.9, forSeconds: 0)

    @Test("warning then critical, and back down only past the hysteresis margin")
    func levelsWithHysteresis() {
        var tracker = AlertTracker(now: 0)
        #expect(tracker.observe(0.2, at: 1, rule: rule, warning: 0.5, critical: 0.9) == nil)
        // The window is 10 s: the mean of the samples in it decides.
        let warning = tracker.observe(0.8, at: 2, rule: rule, warning: 0.5, critical: 0.9)
        #expect(warning?.from == .ok && warning?.to == .warning && warning?.threshold == 0.5)
        #expect(tracker.value == 0.5)
        var critical: AlertTransition?
        for time in 3...12 where critical == nil { critical = tracker.observe(1.0, at: Double(time), rule: rule, warning: 0.5, critical: 0.9) }
        #expect(critical?.to == .critical)
        #expect(tracker.level == .critical)
        // Just under critical, within the 10 % margin: still critical.
        var drop: AlertTransition?
        for time in 13...40 { drop = tracker.observe(0.85, at: Double(time), rule: rule, warning: 0.5, critical: 0.9) ?? drop }
        #expect(drop == nil)
        #expect(tracker.level == .critical)
        for time in 41...60 { drop = tracker.observe(0.7, at: Double(time), rule: rule, warning: 0.5, critical: 0.9) ?? drop }
        #expect(drop?.from == .critical && drop?.to == .warning)
        for time in 61...80 { drop = tracker.observe(0.1, at: Double(time), rule: rule, warning: 0.5, critical: 0.9) ?? drop }
        #expect(drop?.to == .ok)
    }

    @Test("forSeconds holds a level back until the value has stayed there that long")
    func forSeconds() {
        let held = AlertRule(name: "hot", metric: .cpu, window: 1, warning: 0.5, critical: nil, forSeconds: 5)
        var tracker = AlertTracker(now: 0)
        #expect(tracker.observe(1, at: 0, rule: held, warning: 0.5, critical: nil) == nil)
        #expect(tracker.pending[.warning] == 0)
        #expect(tracker.observe(1, at: 4, rule: held, warning: 0.5, critical: nil) == nil)
        // A dip (the window is 1 s: the sample at 4 s has left it at 5 s) resets the wait.
        #expect(tracker.observe(0, at: 5, rule: held, warning: 0.5, critical: nil) == nil)
        #expect(tracker.pending.isEmpty)
        #expect(tracker.observe(1, at: 6, rule: held, warning: 0.5, critical: nil) == nil)
        #expect(tracker.observe(1, at: 10, rule: held, warning: 0.5, critical: nil) == nil)
        #expect(tracker.observe(1, at: 11, rule: held, warning: 0.5, critical: nil)?.to == .warning)
    }

    @Test("a jump straight past critical goes to critical; no data is ok")
    func jumpAndNoData() {
        var tracker = AlertTracker(now: 0)
        #expect(tracker.observe(5, at: 1, rule: rule, warning: 0.5, critical: 0.9)?.to == .critical)
        let cleared = tracker.observe(nil, at: 2, rule: rule, warning: 0.5, critical: 0.9)
        #expect(cleared?.to == .ok)
        #expect(tracker.value == nil)
    }

    @Test("a counter's window is its rate")
    func counterRate() {
        let rule = AlertRule(name: "busy", metric: .series("x_total"), window: 10, warning: 5, critical: nil)
        var tracker = AlertTracker(now: 0)
        _ = tracker.observe(100, at: 0, rule: rule, warning: 5, critical: nil, rate: true)
        _ = tracker.observe(130, at: 5, rule: rule, warning: 5, critical: nil, rate: true)
        #expect(tracker.value == 6)
        #expect(tracker.level == .warning)
    }
}

@Suite("Alert rules")
struct AlertRuleTests {
    func decode(_ json: String) throws -> AppDefinition {
        let object = try JSONDecoder().decode([String: JSONValue].self, from: Data(json.utf8))
        return try AppDefinition.decode(object)
    }

    @Test("rules decode with durations and round-trip")
    func decoding() throws {
        let app = try decode(#"{"id": "/web", "cmd": "sleep 100", "mem": 64, "alerts": [{"name": "hot", "metric": "cpu", "window": "2m", "warning": 0.5, "critical": 0.9, "forSeconds": 30}, {"name": "big", "metric": "memory", "warning": 0.8}, {"name": "q", "metric": "flotilla_app_requests_total", "critical": 100}]}"#)
        #expect(app.alerts.count == 3)
        #expect(app.alerts[0].window == 120)
        #expect(app.alerts[1].window == AlertRule.defaultWindow)
        #expect(app.alerts[1].resolved(0.8, memMiB: 64) == 0.8 * 64 * 1_048_576)
        #expect(app.alerts[2].metric == .series("flotilla_app_requests_total"))
        let again = try JSONDecoder().decode(AppDefinition.self, from: JSONEncoder().encode(app))
        #expect(again.alerts == app.alerts)
    }

    @Test("bad rules are refused with the field that is wrong")
    func refusals() {
        func problem(_ alerts: String) -> String {
            do {
                _ = try decode(#"{"id": "/web", "cmd": "sleep 100", "alerts": "# + alerts + "}")
                return "accepted"
            } catch let error as FlotillaError {
                return "\(error)"
            } catch {
                return "\(error)"
            }
        }
        #expect(problem(#"[{"name": "a", "metric": "nope!", "warning": 1}]"#).contains("/alerts/0/metric"))
        #expect(problem(#"[{"name": "a", "metric": "cpu"}]"#).contains("give warning, critical or both"))
        #expect(problem(#"[{"name": "a", "metric": "cpu", "warning": 2, "critical": 1}]"#).contains("/alerts/0/critical"))
        #expect(problem(#"[{"name": "a", "metric": "errorRate", "warning": 5}]"#).contains("share from 0 to 1"))
        #expect(problem(#"[{"name": "a", "metric": "cpu", "warning": 1, "window": "soon"}]"#).contains("/alerts/0/window"))
        #expect(problem(#"[{"name": "a", "metric": "cpu", "warning": 1, "level": 3}]"#).contains("/alerts/0/level"))
        #expect(problem(#"[{"name": "a", "metric": "cpu", "warning": 1}, {"name": "a", "metric": "memory", "warning": 1}]"#).contains("/alerts/1/name"))
        #expect(problem(#"[{"name": "a b", "metric": "cpu", "warning": 1}]"#).contains("/alerts/0/name"))
    }
}

@Suite("Metric sums")
struct MetricSumsTests {
    @Test("series are added up by app, and unlabelled ones as a whole")
    func parsing() {
        let text = """
            # HELP flotilla_instance_memory_bytes Memory
            # TYPE flotilla_instance_memory_bytes gauge
            flotilla_instance_memory_bytes{app="/web",instance="web.1",node="n1"} 100
            flotilla_instance_memory_bytes{app="/web",instance="web.2",node="n1"} 50
            flotilla_instance_memory_bytes{app="/db",instance="db.1",node="n1"} 7
            flotilla_instance_memory_bytes{node="n1",app="/q\\"x"} 3
            flotilla_proxy_open_connections 12
            other_metric 99
            broken line here
            """
        let sums = MetricSums.parse(text, names: ["flotilla_instance_memory_bytes", "flotilla_proxy_open_connections"])
        #expect(sums.value("flotilla_instance_memory_bytes", app: "/web") == 150)
        #expect(sums.value("flotilla_instance_memory_bytes", app: "/db") == 7)
        #expect(sums.value("flotilla_instance_memory_bytes", app: "/q\"x") == 3)
        #expect(sums.value("flotilla_instance_memory_bytes", app: "/none") == nil)
        #expect(sums.value("flotilla_proxy_open_connections", app: "/web") == 12)
        #expect(sums.value("other_metric", app: "/web") == nil)
    }
}

@Suite("Node and cluster rules")
struct ClusterRuleTests {
    func node(_ name: String, cpus: Int, used: Double?, memory: (UInt64, UInt64), disk: (UInt64, UInt64), load: Double) -> NodeUsageReport {
        NodeUsageReport(
            node: name, sampledAt: "now", cpus: cpus, cpuCoresUsed: used, memoryTotalBytes: memory.0, memoryAvailableBytes: memory.1,
            load1: load, load5: 0, load15: 0, diskTotalBytes: disk.0, diskFreeBytes: disk.1, instances: 0, collectionSeconds: 0, intervalSeconds: 5)
    }

    @Test("shares over one node and over all of them")
    func values() {
        let a = node("a", cpus: 4, used: 1, memory: (100, 25), disk: (1000, 900), load: 2)
        let b = node("b", cpus: 4, used: 3, memory: (100, 75), disk: (1000, 100), load: 6)
        #expect(WatchEngine.nodeValue("cpu", of: [a], series: nil) == 0.25)
        #expect(WatchEngine.nodeValue("cpu", of: [a, b], series: nil) == 0.5)
        #expect(WatchEngine.nodeValue("memory", of: [a], series: nil) == 0.75)
        #expect(WatchEngine.nodeValue("memory", of: [a, b], series: nil) == 0.5)
        #expect(WatchEngine.nodeValue("disk", of: [b], series: nil) == 0.9)
        #expect(WatchEngine.nodeValue("load1", of: [a, b], series: nil) == 1)
        #expect(WatchEngine.nodeValue("flotilla_x", of: [a], series: 7) == 7)
        #expect(WatchEngine.nodeValue("cpu", of: [], series: nil) == nil)
        #expect(WatchEngine.nodeValue("cpu", of: [node("c", cpus: 2, used: nil, memory: (1, 1), disk: (1, 1), load: 0)], series: nil) == nil)
    }

    @Test("rules decode with node as the default scope; a share above 1 is refused")
    func decoding() throws {
        let file = try JSONDecoder().decode(ClusterAlertRule.File.self, from: Data(#"{"rules": [{"name": "m", "metric": "memory", "warning": 0.9}, {"name": "down", "scope": "cluster", "metric": "nodesDown", "critical": 1}]}"#.utf8))
        #expect(file.rules[0].scope == .node)
        #expect(file.rules[1].rule.metric == .series("nodesDown"))
        #expect(throws: FlotillaError.self) {
            try JSONDecoder().decode(ClusterAlertRule.File.self, from: Data(#"{"rules": [{"name": "m", "metric": "memory", "warning": 2}]}"#.utf8))
        }
        #expect(throws: FlotillaError.self) {
            try JSONDecoder().decode(ClusterAlertRule.File.self, from: Data(#"{"rules": [{"name": "m", "scope": "node", "metric": "nodesDown", "warning": 1}]}"#.utf8))
        }
    }
}
