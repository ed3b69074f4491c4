import FlotillaCore
import Testing

@testable import FlotillaScheduler

@Suite struct ServicePortsTests {
    func app(_ ports: [PortDefinition]) -> AppDefinition {
        var definition = AppDefinition(id: try! AppID("/web"), cmd: "serve")
        definition.portDefinitions = ports
        return definition
    }

    @Test func zeroPortsGetFreeServicePortsFromTheRange() throws {
        let assigned = try ServicePorts.assign(app([.init(port: 0), .init(port: 0), .init(port: 8080)]), previous: nil, inUse: [10_000, 10_002])
        #expect(assigned.portDefinitions.map(\.port) == [10_001, 10_003, 8080])
    }

    @Test func anAppKeepsItsServicePortsByNameOrIndex() throws {
        let before = app([.init(port: 10_500, name: "http"), .init(port: 10_600, name: "admin")])
        // Reordered and sent as 0 again: each named port keeps its own.
        let after = try ServicePorts.assign(app([.init(port: 0, name: "admin"), .init(port: 0, name: "http")]), previous: before, inUse: [])
        #expect(after.portDefinitions.map(\.port) == [10_600, 10_500])
        let unnamed = try ServicePorts.assign(app([.init(port: 0)]), previous: app([.init(port: 12_345)]), inUse: [])
        #expect(unnamed.portDefinitions.map(\.port) == [12_345])
    }

    @Test func aKeptPortTakenMeanwhileIsReplaced() throws {
        let after = try ServicePorts.assign(app([.init(port: 0)]), previous: app([.init(port: 10_000)]), inUse: [10_000])
        #expect(after.portDefinitions.map(\.port) == [10_001])
    }

    @Test func aFullRangeIsAFieldError() {
        #expect(throws: FlotillaError.self) {
            try ServicePorts.assign(app([.init(port: 0)]), previous: nil, inUse: [10_000], range: 10_000...10_000)
        }
    }
}
