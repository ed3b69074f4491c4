import FlotillaCore
@testable import FlotillaRegistry
import Testing

@Suite struct RouteTableBuilderTests {
    func entry(_ id: String, name: String = "web", tags: [String], status: CheckStatus = .passing, port: Int = 8080) -> CatalogService {
        let check = CatalogCheck(
            node: "n", checkID: "c-\(id)", name: "c", status: status, notes: "", output: "", serviceID: id, serviceName: name, serviceTags: tags,
            type: "", createIndex: 1, modifyIndex: 1)
        return CatalogService(id: id, name: name, tags: tags, address: "127.0.0.1", port: port, meta: [:], node: "n", checks: [check], createIndex: 1, modifyIndex: 1)
    }

    func view(_ services: [CatalogService]) -> RegistryView {
        RegistryView(nodes: [], services: services, datacenter: "dc1", localNode: "n", topicIndexes: [:], floorIndex: 1)
    }

    @Test func routesGoToPassingInstancesOnly() throws {
        let table = RouteTableBuilder.build(
            from: view([entry("a", tags: ["urlprefix-/web"]), entry("b", tags: ["urlprefix-/web"], status: .critical), entry("c", tags: ["other"])]), index: 7)
        let route = try #require(table.match(host: "x", path: "/web/page"))
        #expect(route.targets.map(\.serviceID) == ["a"])
        #expect(route.targets.first?.weight == 1)
        #expect(table.index == 7)
    }

    @Test func aRouteWithNothingHealthyStaysKnown() throws {
        let table = RouteTableBuilder.build(from: view([entry("a", tags: ["urlprefix-/web"], status: .critical)]), index: 1)
        let route = try #require(table.match(host: "x", path: "/web"))
        #expect(route.targets.isEmpty)
    }

    @Test func weightsSplitTrafficAcrossVersions() throws {
        let table = RouteTableBuilder.build(
            from: view([
                entry("v1-a", tags: ["urlprefix-/web"]), entry("v1-b", tags: ["urlprefix-/web"]),
                entry("v2-a", name: "web-canary", tags: ["urlprefix-/web weight=0.2"]),
            ]), index: 1)
        let route = try #require(table.match(host: "x", path: "/web"))
        let weights = Dictionary(uniqueKeysWithValues: route.targets.map { ($0.serviceID, $0.weight) })
        #expect(abs(weights["v2-a"]! - 0.2) < 1e-9)
        #expect(abs(weights["v1-a"]! - 0.4) < 1e-9)
        #expect(route.services == ["web", "web-canary"])
    }

    @Test func aWeightIsTheShareOfTheWholeTaggedSet() throws {
        let table = RouteTableBuilder.build(
            from: view([
                entry("canary-a", name: "canary", tags: ["urlprefix-/web weight=0.2"]),
                entry("canary-b", name: "canary", tags: ["urlprefix-/web weight=0.2"]),
                entry("stable", tags: ["urlprefix-/web"]),
            ]), index: 1)
        let route = try #require(table.match(host: "x", path: "/web"))
        let weights = Dictionary(uniqueKeysWithValues: route.targets.map { ($0.serviceID, $0.weight) })
        #expect(abs(weights["canary-a"]! - 0.1) < 1e-9)
        #expect(abs(weights["canary-b"]! - 0.1) < 1e-9)
        #expect(abs(weights["stable"]! - 0.8) < 1e-9)
    }

    @Test func tcpRoutesAreKeyedByPort() throws {
        let table = RouteTableBuilder.build(from: view([entry("db", name: "db", tags: ["urlprefix-:3306 proto=tcp"], port: 5432)]), index: 1)
        #expect(table.tcp[3306]?.targets.map(\.port) == [5432])
        #expect(table.http.isEmpty)
    }
}
