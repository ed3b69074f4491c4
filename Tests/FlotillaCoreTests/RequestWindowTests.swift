import FlotillaCore
import Testing

@Suite("Request windows")
struct RequestWindowTests {
    func buckets(_ counts: [Int: UInt64]) -> [UInt64] {
        (0...RequestWindow.latencyBounds.count).map { counts[$0] ?? 0 }
    }

    @Test("p99 falls linearly within its bucket, as histogram_quantile has it")
    func quantile() {
        // 100 observations: 90 in (0.005, 0.01], 10 in (0.05, 0.1].
        let counts = buckets([4: 90, 7: 10])
        let p99 = RequestWindow.quantile(0.99, of: counts)!
        #expect(abs(p99 - (0.05 + 0.05 * 9 / 10)) < 1e-9)
        let p50 = RequestWindow.quantile(0.5, of: counts)!
        #expect(abs(p50 - (0.005 + 0.005 * 50 / 90)) < 1e-9)
        #expect(RequestWindow.quantile(0.99, of: buckets([:])) == nil)
        // Past the last bound: the last finite bound.
        #expect(RequestWindow.quantile(0.99, of: buckets([RequestWindow.latencyBounds.count: 5])) == 10)
    }

    @Test("figures: rate, error share, p99; no requests means no share and no p99")
    func figures() {
        let window = RequestWindow(seconds: 5, requests: 50, errors: 5, latency: buckets([2: 50]))
        #expect(window.figures.requestsPerSecond == 10)
        #expect(window.figures.errorRate == 0.1)
        #expect(window.figures.p99Seconds != nil)
        let idle = RequestWindow(seconds: 5, requests: 0, errors: 0, latency: buckets([:]))
        #expect(idle.figures.requestsPerSecond == 0)
        #expect(idle.figures.errorRate == nil)
        #expect(idle.figures.p99Seconds == nil)
    }

    @Test("nodes add up by app before rates are worked out")
    func merging() {
        let a = RequestWindow(seconds: 5, requests: 30, errors: 3, latency: buckets([1: 30]))
        let b = RequestWindow(seconds: 5, requests: 20, errors: 0, latency: buckets([3: 20]))
        let merged = AppUsageSummary.requestsByApp([["/web": a], ["/web": b, "/db": a]])
        #expect(merged["/web"]?.requests == 50)
        #expect(merged["/web"]?.errors == 3)
        #expect(merged["/web"]?.latency[1] == 30)
        #expect(merged["/web"]?.latency[3] == 20)
        #expect(merged["/db"] == a)
        let summaries = AppUsageSummary.byApp([], requests: merged, including: ["/idle"])
        #expect(summaries.map(\.app) == ["/db", "/idle", "/web"])
        #expect(summaries[2].requestsPerSecond == 10)
        #expect(summaries[2].errorRate == 0.06)
        #expect(summaries[1].requestsPerSecond == nil)
        #expect(summaries[1].instances == 0)
    }
}
