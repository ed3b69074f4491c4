import FlotillaCore
import FlotillaScheduler
import Testing

@Suite struct ConstraintTests {
    let nodes = [
        NodeInfo(name: "n1", host: "n1", cpus: 8, mem: 8192, disk: 0, portRangeStart: 1, portRangeEnd: 2, attributes: ["rack": "r1", "zone": "a"]),
        NodeInfo(name: "n2", host: "n2", cpus: 8, mem: 8192, disk: 0, portRangeStart: 1, portRangeEnd: 2, attributes: ["rack": "r2", "zone": "a"]),
        NodeInfo(name: "n3", host: "n3", cpus: 8, mem: 8192, disk: 0, portRangeStart: 1, portRangeEnd: 2, attributes: ["rack": "r3"]),
    ]

    func allows(_ constraint: Constraint, on node: Int, siblings: [String] = []) -> Bool {
        ConstraintEvaluator.violation(of: constraint, on: nodes[node], siblingNodes: siblings, nodes: nodes) == nil
    }

    @Test func unique() {
        let unique = Constraint(field: "hostname", op: .unique)
        #expect(allows(unique, on: 0))
        #expect(!allows(unique, on: 0, siblings: ["n1"]))
        #expect(allows(unique, on: 1, siblings: ["n1"]))
        // A missing attribute fails UNIQUE.
        #expect(!allows(Constraint(field: "zone", op: .unique), on: 2))
    }

    @Test func cluster() {
        #expect(allows(Constraint(field: "rack", op: .cluster, value: "r2"), on: 1))
        #expect(!allows(Constraint(field: "rack", op: .cluster, value: "r2"), on: 0))
        // Without a value: wherever the first instance went.
        #expect(!allows(Constraint(field: "rack", op: .cluster), on: 1, siblings: ["n1"]))
        #expect(allows(Constraint(field: "zone", op: .cluster), on: 1, siblings: ["n1"]))
    }

    @Test func groupBySpreadsEvenly() {
        let groupBy = Constraint(field: "rack", op: .groupBy)
        #expect(allows(groupBy, on: 0))
        #expect(!allows(groupBy, on: 0, siblings: ["n1"]))
        #expect(allows(groupBy, on: 1, siblings: ["n1"]))
        #expect(allows(groupBy, on: 0, siblings: ["n1", "n2", "n3"]))
    }

    @Test func likeAndUnlikeMatchWholeValues() {
        #expect(allows(Constraint(field: "rack", op: .like, value: "r[12]"), on: 1))
        #expect(!allows(Constraint(field: "rack", op: .like, value: "r[12]"), on: 2))
        #expect(!allows(Constraint(field: "rack", op: .like, value: "r"), on: 0))  // anchored
        #expect(!allows(Constraint(field: "rack", op: .unlike, value: "r1"), on: 0))
        #expect(allows(Constraint(field: "rack", op: .unlike, value: "r1"), on: 1))
        // A missing attribute matches only UNLIKE.
        #expect(allows(Constraint(field: "zone", op: .unlike, value: "a"), on: 2))
        #expect(!allows(Constraint(field: "zone", op: .like, value: ".*"), on: 2))
    }

    @Test func maxPer() {
        let maxPer = Constraint(field: "zone", op: .maxPer, value: "2")
        #expect(allows(maxPer, on: 0, siblings: ["n2"]))
        #expect(!allows(maxPer, on: 0, siblings: ["n1", "n2"]))
    }

    @Test func isOperator() {
        #expect(allows(Constraint(field: "rack", op: .is, value: "r3"), on: 2))
        #expect(!allows(Constraint(field: "rack", op: .is, value: "r3"), on: 0))
        #expect(allows(Constraint(field: "hostname", op: .is, value: "n2"), on: 1))
    }
}
