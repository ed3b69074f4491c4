import FlotillaCore
@testable import FlotillaProxy
import NIOHTTP1
import Testing

@Suite struct PickerTests {
    func targets(_ weights: [Double]) -> [RouteTarget] {
        weights.enumerated().map { RouteTarget(serviceID: "s\($0.offset)", service: "web", host: "127.0.0.1", port: 9000 + $0.offset, weight: $0.element) }
    }

    @Test func roundRobinIsEven() {
        let picker = Picker(strategy: .roundRobin, health: UpstreamHealth())
        let all = targets([1 / 3, 1 / 3, 1 / 3])
        var counts: [Int: Int] = [:]
        for _ in 0..<300 { counts[picker.pick(from: all)!.port, default: 0] += 1 }
        #expect(counts.values.allSatisfy { $0 == 100 })
    }

    @Test func weightsShapeTheShares() {
        let picker = Picker(strategy: .roundRobin, health: UpstreamHealth())
        let all = targets([0.2, 0.4, 0.4])
        var counts: [Int: Int] = [:]
        for _ in 0..<10_000 { counts[picker.pick(from: all)!.port, default: 0] += 1 }
        #expect(abs(Double(counts[9000]!) / 10_000 - 0.2) < 0.02)
        #expect(abs(Double(counts[9001]!) / 10_000 - 0.4) < 0.02)
    }

    @Test func ejectedTargetsAreSkippedUntilTheCoolDownEnds() {
        let health = UpstreamHealth(ejectAfter: 3, coolDown: .milliseconds(50))
        let picker = Picker(strategy: .roundRobin, health: health)
        let all = targets([0.5, 0.5])
        for _ in 0..<3 { health.connectFailed("127.0.0.1:9000") }
        #expect((0..<10).allSatisfy { _ in picker.pick(from: all)?.port == 9001 })
        #expect(health.isEjected("127.0.0.1:9000"))
        #expect(!health.isEjected("127.0.0.1:9000", now: .now + .milliseconds(100)))
    }

    @Test func allEjectedStillPicksSomething() {
        let health = UpstreamHealth(ejectAfter: 1)
        let picker = Picker(strategy: .random, health: health)
        let all = targets([1])
        health.connectFailed("127.0.0.1:9000")
        #expect(picker.pick(from: all)?.port == 9000)
        #expect(picker.pick(from: all, excluding: ["127.0.0.1:9000"]) == nil)
    }

    @Test func leastConnectionsPrefersTheIdle() {
        let health = UpstreamHealth()
        let picker = Picker(strategy: .leastConnections, health: health)
        health.started("127.0.0.1:9000")
        #expect(picker.pick(from: targets([0.5, 0.5]))?.port == 9001)
    }
}

@Suite struct HeaderTests {
    @Test func dropsHopByHopHeadersIncludingThoseNamedByConnection() {
        let headers = HTTPHeaders([
            ("Host", "shop"), ("Connection", "keep-alive, X-Secret"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
            ("X-Secret", "1"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Accept", "*/*"),
        ])
        let kept = ProxyHandler.withoutHopByHop(headers)
        #expect(kept.map(\.name).sorted() == ["Accept", "Host"])
    }

    @Test func addsForwardingHeaders() {
        let headers = ProxyHandler.forwardedHeaders(HTTPHeaders([("X-Forwarded-For", "10.0.0.9")]), clientAddress: "127.0.0.1", host: "shop:7680")
        #expect(headers.first(name: "X-Forwarded-For") == "10.0.0.9, 127.0.0.1")
        #expect(headers.first(name: "X-Real-IP") == "127.0.0.1")
        #expect(headers.first(name: "X-Forwarded-Proto") == "http")
        #expect(headers.first(name: "X-Forwarded-Host") == "shop:7680")
    }
}
