// Benchmarks of Flotilla's pure scheduler, run by bench/scheduler.sh (release build).
//
//   flotilla-bench placement [--nodes 10000] [--existing 100000] [--apps 1000] [--per-app 20] [--rounds 5]
//
// Builds a snapshot of `--nodes` nodes (100 racks, 3 zones) already holding `--existing`
// instances, then places `--apps` apps of `--per-app` instances each, every app with constraints
// (UNIQUE, GROUP_BY, LIKE, MAX_PER, UNLIKE in turn), through one `PlacementState` as a reconcile
// pass does — indexing the snapshot is inside the timing. Prints one JSON line per round and a
// summary with the median.
import FlotillaCore
import FlotillaScheduler
import Foundation

func option(_ name: String, _ fallback: Int) -> Int {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count, let value = Int(arguments[index + 1]) else { return fallback }
    return value
}

func app(_ id: String, constraints: [Constraint]) -> AppDefinition {
    var definition = AppDefinition(id: try! AppID(id), cmd: "serve", instances: 1)
    definition.cpus = 0.1
    definition.mem = 64
    definition.disk = 0
    definition.constraints = constraints
    definition.portDefinitions = [PortDefinition(port: 0)]
    return definition
}

guard CommandLine.arguments.dropFirst().first == "placement" else {
    FileHandle.standardError.write(Data("usage: flotilla-bench placement [--nodes N] [--existing N] [--apps N] [--per-app N] [--rounds N]\n".utf8))
    exit(2)
}
let nodeCount = option("--nodes", 10_000)
let existingCount = option("--existing", 100_000)
let appCount = option("--apps", 1_000)
let perApp = option("--per-app", 20)
let rounds = option("--rounds", 5)

let nodes = (0..<nodeCount).map { index in
    NodeInfo(
        name: "node-\(index)", host: "10.\(index / 65536).\(index / 256 % 256).\(index % 256)", cpus: 32, mem: 131_072, disk: 1_000_000,
        portRangeStart: 20_000, portRangeEnd: 30_000, attributes: ["hostname": "node-\(index)", "rack": "r\(index % 100)", "zone": "z\(index % 3)"])
}
var generator = SystemRandomNumberGenerator()
let background = app("/background", constraints: [])
let existing = (0..<existingCount).map { index -> Instance in
    let node = nodes[index % nodeCount]
    let spec = InstanceSpec(
        id: "background.\(index)", appID: background.id, version: "v1", configVersion: "v1", definition: background, node: node.name,
        host: node.host, ports: [20_000 + index / nodeCount], stagedAt: "2026-01-01T00:00:00.000Z")
    return Instance(spec: spec, status: InstanceStatus(id: spec.id, state: .running, updatedAt: spec.stagedAt))
}
let constraintSets: [[Constraint]] = [
    [Constraint(field: "hostname", op: .unique)],
    [Constraint(field: "rack", op: .groupBy)],
    [Constraint(field: "zone", op: .like, value: "z[01]")],
    [Constraint(field: "rack", op: .maxPer, value: "2")],
    [Constraint(field: "hostname", op: .unlike, value: "node-9.*"), Constraint(field: "zone", op: .groupBy)],
]
let apps = (0..<appCount).map { index in app("/bench/app-\(index)", constraints: constraintSets[index % constraintSets.count]) }
let snapshot = ClusterSnapshot(nodes: nodes, instances: existing)

var rates: [Double] = []
for round in 1...rounds {
    let started = ContinuousClock.now
    var state = PlacementState(snapshot)
    var placed = 0
    var unplaced = 0
    for definition in apps {
        let result = state.place(definition, count: perApp, using: &generator)
        placed += result.placements.count
        unplaced += result.unplaced
    }
    let elapsed = ContinuousClock.now - started
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    let rate = Double(placed) / seconds
    rates.append(rate)
    print(#"{"round": \#(round), "nodes": \#(nodeCount), "existing": \#(existingCount), "placed": \#(placed), "unplaced": \#(unplaced), "seconds": \#(String(format: "%.3f", seconds)), "placements_per_second": \#(Int(rate))}"#)
}
let median = rates.sorted()[rates.count / 2]
print(#"{"summary": "placement", "nodes": \#(nodeCount), "existing": \#(existingCount), "apps": \#(appCount), "per_app": \#(perApp), "median_placements_per_second": \#(Int(median))}"#)
