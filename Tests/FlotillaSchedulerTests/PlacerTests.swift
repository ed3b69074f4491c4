import FlotillaCore
import FlotillaScheduler
import Testing

@Suite struct PlacerTests {
    func node(_ name: String, cpus: Double = 4, mem: Double = 1024, ports: ClosedRange<Int> = 31000...31009, attributes: [String: String] = [:]) -> NodeInfo {
        NodeInfo(
            name: name, host: "10.0.0.\(name.count)", cpus: cpus, mem: mem, disk: 1000, portRangeStart: ports.lowerBound,
            portRangeEnd: ports.upperBound, attributes: attributes.merging(["hostname": name]) { first, _ in first })
    }

    func app(_ id: String = "/web", cpus: Double = 1, mem: Double = 128, ports: [Int] = [0], constraints: [Constraint] = []) throws -> AppDefinition {
        var definition = AppDefinition(id: try AppID(id), cmd: "serve")
        definition.cpus = cpus
        definition.mem = mem
        definition.portDefinitions = ports.map { PortDefinition(port: $0) }
        definition.constraints = constraints
        return definition
    }

    func running(_ definition: AppDefinition, on node: String, ports: [Int]) -> Instance {
        let spec = InstanceSpec(
            id: InstanceSpec.newID(for: definition.id), appID: definition.id, version: "v1", configVersion: "v1", definition: definition,
            node: node, host: node, ports: ports, stagedAt: "2026-01-01T00:00:00.000Z")
        return Instance(spec: spec, status: InstanceStatus(id: spec.id, state: .running, updatedAt: spec.stagedAt))
    }

    @Test func placesWithinCapacityAndExplainsTheRest() throws {
        var random = SplitMix(seed: 1)
        let snapshot = ClusterSnapshot(nodes: [node("a", cpus: 2.5)], instances: [])
        let result = Placer.place(try app(cpus: 1), count: 4, in: snapshot, using: &random)
        #expect(result.placements.count == 2)
        #expect(result.unplaced == 2)
        #expect(result.rejections[.insufficientCpus] == 1)  // the first instance that does not fit ends the batch
        #expect(result.explanation?.contains("cpus") == true)
    }

    @Test func countsResourcesOfLiveInstancesOnly() throws {
        var random = SplitMix(seed: 2)
        let web = try app(mem: 512)
        var ended = running(web, on: "a", ports: [31000])
        ended.status?.state = .failed
        let snapshot = ClusterSnapshot(nodes: [node("a", mem: 1024)], instances: [running(web, on: "a", ports: [31001]), ended])
        let result = Placer.place(web, count: 2, in: snapshot, using: &random)
        #expect(result.placements.count == 1)
        #expect(result.rejections[.insufficientMemory] == 1)
    }

    @Test func givesDistinctFreePortsFromTheRange() throws {
        var random = SplitMix(seed: 3)
        let web = try app(cpus: 0.1, mem: 1, ports: [0, 0])
        let snapshot = ClusterSnapshot(nodes: [node("a", ports: 31000...31009)], instances: [running(web, on: "a", ports: [31000, 31001])])
        let result = Placer.place(web, count: 10, in: snapshot, using: &random)
        let ports = result.placements.flatMap(\.ports)
        #expect(result.placements.count == 4)  // 8 free ports, 2 per instance
        #expect(Set(ports).count == ports.count)
        #expect(ports.allSatisfy { (31002...31009).contains($0) })
        #expect(result.rejections[.insufficientPorts] == 1)
    }

    @Test func requirePortsTakesExactlyThosePorts() throws {
        var random = SplitMix(seed: 4)
        var web = try app(cpus: 0.1, ports: [8080])
        web.requirePorts = true
        let snapshot = ClusterSnapshot(nodes: [node("a", ports: 8000...9000)], instances: [])
        let result = Placer.place(web, count: 2, in: snapshot, using: &random)
        #expect(result.placements.map(\.ports) == [[8080]])
        #expect(result.unplaced == 1)
    }

    @Test func placesTheSameWayForTheSameSeed() throws {
        let snapshot = ClusterSnapshot(nodes: [node("a", ports: 31000...32000), node("b", ports: 31000...32000)], instances: [])
        var first = SplitMix(seed: 9), second = SplitMix(seed: 9)
        let web = try app(cpus: 0.1, mem: 1)
        #expect(
            Placer.place(web, count: 5, in: snapshot, using: &first).placements
                == Placer.place(web, count: 5, in: snapshot, using: &second).placements)
    }

    @Test func spreadsAcrossNodes() throws {
        var random = SplitMix(seed: 5)
        let snapshot = ClusterSnapshot(nodes: [node("a"), node("b")], instances: [])
        let names = Placer.place(try app(cpus: 0.5, mem: 1), count: 4, in: snapshot, using: &random).placements.map(\.node.name)
        #expect(names.filter { $0 == "a" }.count == 2)
    }
}
