import FlotillaCore
@testable import FlotillaRegistry
import Foundation
import Testing

@Suite struct CatalogBuilderTests {
    func instance(
        app: String = "/shop/cart", ports: [Int] = [31001], portDefinitions: [PortDefinition]? = nil, labels: [String: String] = [:],
        env: [String: String] = [:], state: TaskState = .running, draining: Bool = false, standby: Bool = false, health: [HealthResult]? = nil
    ) throws -> Instance {
        var definition = AppDefinition(id: try AppID(app), cmd: "serve")
        definition.portDefinitions = portDefinitions ?? ports.map { _ in PortDefinition(port: 0) }
        definition.labels = labels
        definition.env = env.mapValues { .value($0) }
        if health != nil {
            definition.healthChecks = [try JSONDecoder().decode(HealthCheck.self, from: Data(#"{"protocol": "HTTP"}"#.utf8))]
        }
        let spec = InstanceSpec(
            id: "\(definition.id.flatName).abc", appID: definition.id, version: "v1", configVersion: "v1", definition: definition, node: "n1",
            host: "10.0.0.1", ports: ports, stagedAt: "t", standby: standby)
        return Instance(spec: spec, status: InstanceStatus(id: spec.id, state: state, updatedAt: "t", health: health ?? [], draining: draining))
    }

    @Test func namesTheServiceAfterTheApp() throws {
        let services = CatalogBuilder.services(of: try instance())
        #expect(services.map(\.name) == ["shop-cart"])
        #expect(services.first?.port == 31001)
        #expect(services.first?.address == "10.0.0.1")
        #expect(services.first?.status == .passing)
    }

    @Test func followsRegistratorConventions() throws {
        let named = CatalogBuilder.services(of: try instance(labels: ["SERVICE_NAME": "cart", "SERVICE_TAGS": "urlprefix-/cart, v2"]))
        #expect(named.map(\.name) == ["cart"])
        #expect(named.first?.tags == ["urlprefix-/cart", "v2"])
        // Env works like labels; labels win.
        let fromEnv = CatalogBuilder.services(of: try instance(labels: ["SERVICE_NAME": "label"], env: ["SERVICE_NAME": "env", "SERVICE_TAGS": "a"]))
        #expect(fromEnv.first?.name == "label")
        #expect(fromEnv.first?.tags == ["a"])
        #expect(CatalogBuilder.services(of: try instance(labels: ["SERVICE_IGNORE": "true"])).isEmpty)
    }

    @Test func namesEachPortOfAMultiPortApp() throws {
        let instance = try instance(
            ports: [31001, 31002, 31003],
            portDefinitions: [PortDefinition(port: 0), PortDefinition(port: 9000), PortDefinition(port: 0, name: "admin")],
            labels: ["SERVICE_9000_NAME": "metrics", "SERVICE_ADMIN_IGNORE": "1", "SERVICE_9000_TAGS": "prometheus"])
        let services = CatalogBuilder.services(of: instance)
        #expect(services.map(\.name) == ["shop-cart", "metrics"])
        #expect(services.map(\.port) == [31001, 31002])
        #expect(services.last?.tags == ["prometheus"])
    }

    @Test func drainingAndStandbyInstancesAreInMaintenance() throws {
        for candidate in [try instance(draining: true), try instance(standby: true), try instance(state: .killing)] {
            let service = try #require(CatalogBuilder.services(of: candidate).first)
            #expect(service.status == .critical)
            #expect(service.checks.contains { $0.checkID.hasPrefix("_service_maintenance:") })
        }
    }

    @Test func healthComesFromTheAppsChecks() throws {
        #expect(CatalogBuilder.services(of: try instance(health: [HealthResult(alive: true)])).first?.status == .passing)
        #expect(CatalogBuilder.services(of: try instance(health: [HealthResult(alive: false)])).first?.status == .critical)
        #expect(CatalogBuilder.services(of: try instance(health: [HealthResult()])).first?.status == .critical)
        #expect(CatalogBuilder.services(of: try instance(health: [HealthResult(lastFailure: "t")])).first?.status == .warning)
    }

    @Test func endedOrPortlessInstancesAreNotRegistered() throws {
        #expect(CatalogBuilder.services(of: try instance(state: .failed)).isEmpty)
        #expect(CatalogBuilder.services(of: try instance(state: .staging)).isEmpty)
        #expect(CatalogBuilder.services(of: try instance(ports: [])).isEmpty)
    }

    @Test func ttlChecksExpire() {
        let now = Date(timeIntervalSince1970: 1_000_000)
        let check = ExternalCheck(
            id: "c", name: "ttl", ttlSeconds: 5, http: nil, tcp: nil, intervalSeconds: 10, timeoutSeconds: 1,
            deregisterCriticalServiceAfterSeconds: nil, notes: "", status: .passing, output: "", updatedAt: Timestamp.format(now), criticalSince: nil)
        let service = ExternalService(id: "s", name: "s", tags: [], address: "a", port: 1, meta: [:], node: "n", checks: [check], registeredAt: "t")
        #expect(CatalogBuilder.services(of: service, now: now.addingTimeInterval(4)).status == .passing)
        #expect(CatalogBuilder.services(of: service, now: now.addingTimeInterval(6)).status == .critical)
    }

    @Test func parsesGoDurations() {
        #expect(GoDuration.seconds("10s") == 10)
        #expect(GoDuration.seconds("5m") == 300)
        #expect(GoDuration.seconds("1m30s") == 90)
        #expect(GoDuration.seconds("250ms") == 0.25)
        #expect(GoDuration.seconds("2") == 2)
        #expect(GoDuration.seconds("") == nil)
        #expect(GoDuration.seconds("ten") == nil)
        #expect(GoDuration.seconds("5x") == nil)
        #expect(GoDuration.seconds("-1s") == nil)
    }

    @Test func readsRegistrationsInAnyCase() throws {
        let body: [String: JSONValue] = [
            "name": .string("redis"), "ID": .string("redis-1"), "Tags": .array([.string("primary")]), "port": .number(6379),
            "Check": .object(["TTL": .string("10s"), "DeregisterCriticalServiceAfter": .string("1m")]),
        ]
        let service = try ServiceRegistration.parse(body, node: "n1", address: "127.0.0.1")
        #expect(service.id == "redis-1")
        #expect(service.address == "127.0.0.1")
        #expect(service.checks.first?.ttlSeconds == 10)
        #expect(service.checks.first?.deregisterCriticalServiceAfterSeconds == 60)
        #expect(service.checks.first?.status == .critical)
        #expect(service.checks.first?.id == "service:redis-1")
        #expect(throws: FlotillaError.self) { try ServiceRegistration.parse(["Name": .string("x"), "Check": .object(["HTTP": .string("http://a")])], node: "n", address: "a") }
        #expect(throws: FlotillaError.self) { try ServiceRegistration.parse(["Port": .number(1)], node: "n", address: "a") }
    }
}
