import FlotillaCore
@testable import FlotillaProxy
import Foundation
import Testing

@Suite("Proxy metrics")
struct ProxyMetricsTests {
    func render(_ metrics: ProxyMetrics) -> String {
        var buffer: [UInt8] = []
        metrics.render(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }

    @Test("shards written from many threads add up exactly")
    func shardsAddUp() async {
        let counters = ShardedCounters(width: 3, shards: 4)
        await withTaskGroup(of: Void.self) { group in
            for shard in 0..<4 {
                group.addTask {
                    for _ in 0..<10_000 {
                        counters.add(1, at: 0, shard: shard)
                        counters.add(2, at: 2, shard: shard)
                    }
                }
            }
        }
        #expect(counters.sums() == [40_000, 0, 80_000])
    }

    @Test("requests render by route and class; latency as a cumulative histogram")
    func rendering() {
        let metrics = ProxyMetrics(shards: 2)
        let route = metrics.forRoute("example.com/api")
        route.record(statusClass: 2, latencyNanoseconds: 800_000, shard: 0)  // le=0.001
        route.record(statusClass: 2, latencyNanoseconds: 3_000_000, shard: 1)  // le=0.005
        route.record(statusClass: 5, latencyNanoseconds: nil, shard: 1)
        route.record(statusClass: 9, latencyNanoseconds: nil, shard: 0)  // not a class: not counted
        metrics.forRoute("").record(statusClass: 4, latencyNanoseconds: nil, shard: 0)
        metrics.forApp("/web").record(statusClass: 2, latencyNanoseconds: 20_000_000_000, shard: 0)  // past 10 s: +Inf only
        metrics.retried(shard: 1)
        metrics.connectionOpened(shard: 0)
        metrics.connectionOpened(shard: 1)
        metrics.connectionClosed(shard: 0)
        let text = render(metrics)
        #expect(text.contains("# TYPE flotilla_proxy_requests_total counter\n"))
        #expect(text.contains(#"flotilla_proxy_requests_total{route="example.com/api",code="2xx"} 2"#))
        #expect(text.contains(#"flotilla_proxy_requests_total{route="example.com/api",code="5xx"} 1"#))
        #expect(text.contains(#"flotilla_proxy_requests_total{route="(none)",code="4xx"} 1"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_bucket{route="example.com/api",le="0.0005"} 0"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_bucket{route="example.com/api",le="0.001"} 1"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_bucket{route="example.com/api",le="0.005"} 2"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_bucket{route="example.com/api",le="+Inf"} 2"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_count{route="example.com/api"} 2"#))
        #expect(text.contains(#"flotilla_proxy_upstream_latency_seconds_sum{route="example.com/api"} 0.0038"#))
        #expect(text.contains(#"flotilla_app_upstream_latency_seconds_bucket{app="/web",le="10"} 0"#))
        #expect(text.contains(#"flotilla_app_upstream_latency_seconds_bucket{app="/web",le="+Inf"} 1"#))
        #expect(text.contains("flotilla_proxy_retries_total 1\n"))
        #expect(text.contains("flotilla_proxy_open_connections 1\n"))
    }

    @Test("label values are escaped")
    func escaping() {
        #expect(ProxyMetrics.escape(#"a"b\c"#) == #"a\"b\\c"#)
        #expect(ProxyMetrics.escape("plain/path") == "plain/path")
    }

    @Test("windows cover what happened between the last two samples")
    func windows() {
        let metrics = ProxyMetrics(shards: 1)
        let app = metrics.forApp("/web")
        #expect(metrics.requestWindows().isEmpty)
        app.record(statusClass: 2, latencyNanoseconds: 1_000_000, shard: 0)
        metrics.sample(at: 10)
        #expect(metrics.requestWindows().isEmpty)
        for _ in 0..<8 { app.record(statusClass: 2, latencyNanoseconds: 1_000_000, shard: 0) }
        app.record(statusClass: 5, latencyNanoseconds: 1_000_000, shard: 0)
        app.record(statusClass: 5, latencyNanoseconds: nil, shard: 0)
        metrics.sample(at: 12)
        let window = metrics.requestWindows()["/web"]
        #expect(window?.seconds == 2)
        #expect(window?.requests == 10)
        #expect(window?.errors == 2)
        #expect(window?.latency.reduce(0, +) == 9)
        #expect(window?.figures.requestsPerSecond == 5)
    }

    @Test("routes and apps that leave the table leave /metrics; the no-route counters stay")
    func retention() {
        let metrics = ProxyMetrics(shards: 1)
        metrics.forRoute("/old").record(statusClass: 2, latencyNanoseconds: nil, shard: 0)
        metrics.forRoute("").record(statusClass: 4, latencyNanoseconds: nil, shard: 0)
        metrics.forApp("/gone").record(statusClass: 2, latencyNanoseconds: nil, shard: 0)
        metrics.retain(routes: ["/new"], apps: [])
        let text = render(metrics)
        #expect(!text.contains("/old"))
        #expect(!text.contains("/gone"))
        #expect(text.contains(#"route="(none)""#))
    }
}
