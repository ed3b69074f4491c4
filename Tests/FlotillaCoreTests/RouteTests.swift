import FlotillaCore
import Testing

@Suite struct RouteTests {
    @Test func parsesFabioTags() throws {
        #expect(RouteRule.parse("urlprefix-/css") == RouteRule(path: "/css"))
        #expect(RouteRule.parse("urlprefix-I.com/static") == RouteRule(host: "i.com", path: "/static"))
        #expect(RouteRule.parse("urlprefix-i.com:8080/") == RouteRule(host: "i.com", path: "/"))
        #expect(RouteRule.parse("urlprefix-/api strip=/api prepend=/v2 weight=0.2") == RouteRule(path: "/api", strip: "/api", prepend: "/v2", weight: 0.2))
        #expect(RouteRule.parse("urlprefix-:3306 proto=tcp") == RouteRule(path: "", proto: .tcp, tcpPort: 3306))
        #expect(RouteRule.parse("v1") == nil)
        #expect(RouteRule.parse("urlprefix-") == nil)
        #expect(RouteRule.parse("urlprefix-nopath") == nil)
        #expect(RouteRule.parse("urlprefix-/x weight=2") == nil)
        #expect(RouteRule.parse("urlprefix-:99999 proto=tcp") == nil)
    }

    @Test func parsesPerRouteTimeouts() {
        let rule = RouteRule.parse("urlprefix-/slow connecttimeout=250ms readtimeout=1m30s")
        #expect(rule?.connectTimeout == .milliseconds(250))
        #expect(rule?.readTimeout == .seconds(90))
        #expect(RouteRule.parse("urlprefix-/slow readtimeout=0s") == nil)
        #expect(RouteRule.parse("urlprefix-/slow readtimeout=soon") == nil)
        #expect(RouteRule.parse("urlprefix-/")?.readTimeout == nil)
    }

    func route(_ tag: String) -> Route {
        Route(rule: RouteRule.parse(tag)!, targets: [], services: [tag])
    }

    @Test func matchesHostRoutesFirstThenTheLongestPrefix() {
        let table = RouteTable(
            http: [route("urlprefix-/"), route("urlprefix-/api"), route("urlprefix-/api/v2"), route("urlprefix-shop.example/")],
            tcp: [:], index: 1)
        #expect(table.match(host: "other", path: "/api/v2/items")?.services == ["urlprefix-/api/v2"])
        #expect(table.match(host: "other", path: "/api/v1")?.services == ["urlprefix-/api"])
        #expect(table.match(host: "other", path: "/index.html")?.services == ["urlprefix-/"])
        #expect(table.match(host: "Shop.Example:8080", path: "/api")?.services == ["urlprefix-shop.example/"])
        let narrow = RouteTable(http: [route("urlprefix-/api")], tcp: [:], index: 1)
        #expect(narrow.match(host: "x", path: "/other") == nil)
    }

    @Test func rewritesUpstreamPaths() {
        #expect(RouteTable.upstreamPath("/api/items", rule: RouteRule(path: "/api", strip: "/api")) == "/items")
        #expect(RouteTable.upstreamPath("/api", rule: RouteRule(path: "/api", strip: "/api")) == "/")
        #expect(RouteTable.upstreamPath("/api?q=1", rule: RouteRule(path: "/api", strip: "/api")) == "/?q=1")
        #expect(RouteTable.upstreamPath("/items", rule: RouteRule(path: "/", prepend: "/v2")) == "/v2/items")
        #expect(RouteTable.upstreamPath("/", rule: RouteRule(path: "/", prepend: "/v2")) == "/v2")
    }
}
