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

    @Test func accessRulesByAddressAndNetwork() throws {
        let allow = try #require(RouteRule.parse("urlprefix-/a allow=ip:10.0.0.0/8,ip:192.168.1.7,fd00::/8")?.access)
        #expect(allow.mode == .allow && !allow.malformed && allow.networks.count == 3)
        #expect(allow.permits("10.200.3.4") && allow.permits("192.168.1.7") && allow.permits("fd12::1") && allow.permits("::ffff:10.1.1.1"))
        #expect(!allow.permits("192.168.1.8") && !allow.permits("11.0.0.1") && !allow.permits("fe80::1") && !allow.permits("not-an-ip"))
        let deny = try #require(RouteRule.parse("urlprefix-/d deny=127.0.0.1")?.access)
        #expect(!deny.permits("127.0.0.1") && deny.permits("127.0.0.2"))
        // Both: allow wins (Fabio's rule), whichever comes first.
        #expect(RouteRule.parse("urlprefix-/b deny=ip:10.0.0.1 allow=ip:10.0.0.0/8")?.access?.mode == .allow)
        #expect(RouteRule.parse("urlprefix-/b allow=ip:10.0.0.0/8 deny=ip:10.0.0.1")?.access?.mode == .allow)
        // A mistyped list refuses everyone rather than guess.
        let typo = try #require(RouteRule.parse("urlprefix-/t allow=ip:10.0.0.0/33")?.access)
        #expect(typo.malformed && !typo.permits("10.0.0.1"))
        #expect(IPNetwork("0.0.0.0/0")?.contains([1, 2, 3, 4]) == true && IPNetwork("10.1.2.0/23")?.contains([10, 1, 3, 255]) == true)
        #expect(IPNetwork("10.1.2.0/23")?.contains([10, 1, 4, 0]) == false)
    }

    @Test func redirectsAndTLSOptions() throws {
        let redirect = try #require(RouteRule.parse("urlprefix-/old redirect=301,https://new.example$path")?.redirect)
        #expect(redirect.status == 301 && redirect.location(for: "/old/a?b=1") == "https://new.example/old/a?b=1")
        #expect(RouteRule.parse("urlprefix-/old redirect=200,https://x") == nil)
        #expect(RouteRule.parse("urlprefix-/old redirect=301") == nil)
        let https = try #require(RouteRule.parse("urlprefix-/s proto=https tlsskipverify=true"))
        #expect(https.proto == .https && https.tlsSkipVerify)
        #expect(RouteRule.parse("urlprefix-/s proto=https tlsskipverify=maybe") == nil)
    }
}
