@testable import FlotillaEtcd
import FlotillaStore
import Foundation
import Testing

/// What a cluster needs of the store — watches with deletes, leases, reads at one index, etcd's
/// transaction rules — run against every backend, etcd among them.
@Suite struct StoreContractTests {
    typealias Backend = StateStoreTests.Backend
    typealias Fixture = StateStoreTests.Fixture

    func data(_ text: String) -> Data { Data(text.utf8) }

    /// Reads batches off a watch until `count` events have arrived (or 30 s pass).
    func collect(_ stream: AsyncThrowingStream<[StoreEvent], any Error>, count: Int) async throws -> [[StoreEvent]] {
        try await withThrowingTaskGroup(of: [[StoreEvent]]?.self) { group in
            group.addTask {
                var batches: [[StoreEvent]] = []
                for try await batch in stream {
                    batches.append(batch)
                    if batches.joined().count >= count { break }
                }
                return batches
            }
            group.addTask {
                try await Task.sleep(for: .seconds(30))
                return nil
            }
            let first = try await group.next()!
            group.cancelAll()
            return try #require(first, "the watch delivered too few events in 30 s")
        }
    }

    @Test(arguments: Backend.available)
    func watchesSeePutsAndDeletesInOrder(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let start = try await store.put("w/a", data("1"))
        let stream = store.watch(prefix: "w/", after: start)
        let second = try await store.commit(StoreTransaction(mutations: [.put("w/b", data("2"), flags: 7), .put("other/x", data(""))]))
        let third = try await store.commit(StoreTransaction(mutations: [.delete("w/a")]))
        let fourth = try await store.commit(StoreTransaction(mutations: [.put("w/c/1", data("")), .put("w/c/2", data(""))]))
        let fifth = try await store.commit(StoreTransaction(mutations: [.deletePrefix("w/c/")]))
        let batches = try await collect(stream, count: 6)
        #expect(batches.map { $0.map(\.index) } == [[second], [third], [fourth, fourth], [fifth, fifth]])
        let events = batches.joined().map { "\($0.kind) \($0.key)" }
        #expect(events == ["put w/b", "delete w/a", "put w/c/1", "put w/c/2", "delete w/c/1", "delete w/c/2"])
        let put = batches[0][0].entry
        #expect(put.value == data("2") && put.flags == 7 && put.createIndex == second)
    }

    @Test(arguments: Backend.available)
    func aWatchReplaysFromAnEarlierIndex(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let first = try await store.put("r/a", data("1"))
        let second = try await store.put("r/b", data("2"))
        // Asked after it happened: the history is replayed from just after `first`.
        let batches = try await collect(store.watch(prefix: "r/", after: first), count: 1)
        #expect(batches.first?.map(\.key) == ["r/b"])
        #expect(batches.first?.first?.index == second)
    }

    @Test func aLocalWatchTooFarBehindIsToldToReadAgain() async throws {
        let store = InMemoryStateStore()
        // The in-memory history holds 4096 commits; one older than that cannot be replayed.
        for number in 0..<4200 { try await store.put("h/\(number % 10)", data("\(number)")) }
        let stream = store.watch(prefix: "h/", after: 1)
        await #expect(throws: StoreError.self) {
            for try await _ in stream {}
        }
    }

    @Test func anEtcdWatchBelowACompactionIsToldToReadAgain() async throws {
        try #require(EtcdTestServer.available, "etcd is not installed")
        let store = try await EtcdTestServer.store(on: .compacting)
        defer { store.close() }
        let old = try await store.put("c/a", data("1"))
        let latest = try await store.put("c/a", data("2"))
        _ = try await EtcdTestServer.etcdctl(on: .compacting, ["compact", "\(latest)"])
        var caught: (any Error)?
        do {
            for try await _ in store.watch(prefix: "c/", after: old - 1) {}
        } catch {
            caught = error
        }
        guard case StoreError.compacted? = caught as? StoreError else {
            Issue.record("expected StoreError.compacted, got \(String(describing: caught))")
            return
        }
    }

    @Test(arguments: Backend.available)
    func snapshotsReadSeveralPrefixesAtOneIndex(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        try await store.commit(StoreTransaction(mutations: [.put("s1/a", data("start")), .put("s2/a", data("start")), .put("s3/a", data("3"))]))
        // Writers change both prefixes all along; every snapshot must see them in step.
        let writer = Task {
            for number in 0..<40 {
                try await store.commit(StoreTransaction(mutations: [.put("s1/a", data("\(number)")), .put("s2/a", data("\(number)"))]))
            }
        }
        for _ in 0..<20 {
            let snapshot = try await store.snapshot(prefixes: ["s1/", "s2/"])
            #expect(snapshot["s1/"].map(\.value) == snapshot["s2/"].map(\.value))
            #expect(snapshot["s1/"].first?.modifyIndex ?? 0 <= snapshot.index)
        }
        try await writer.value
        let last = try await store.snapshot(prefixes: ["s1/", "s3/", "none/"])
        #expect(last["s1/"].first?.value == data("39"))
        #expect(last["s3/"].first?.value == data("3"))
        #expect(last["none/"].isEmpty)
    }

    @Test(arguments: Backend.available)
    func keysUnderALeaseGoWhenItEnds(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        // A TTL far above the renewal period: on a loaded CI machine a write can wait seconds.
        // Times are taken before each call: the lease's expiry counts from then, not from the
        // answer (the commit below can itself wait seconds on a loaded machine).
        let clock = ContinuousClock()
        var renewed = clock.now
        let lease = try await store.grantLease(ttl: 8)
        #expect(lease.ttl == 8)
        let index = try await store.commit(StoreTransaction(mutations: [.put("nodes/a", data("a"), lease: lease.id), .put("nodes/kept", data("k"))]))
        let stream = store.watch(prefix: "nodes/", after: index)
        // Kept alive past its TTL, it stays. A renewal that comes later than the TTL (a starved
        // cooperative pool on a loaded 2-core CI machine has held this task for many seconds) ends
        // the lease rightly: that run checks only the expiry below.
        var keptAlive = true
        for _ in 0..<10 {
            try await Task.sleep(for: .seconds(1))
            if clock.now - renewed >= .seconds(lease.ttl) - .milliseconds(500) {
                keptAlive = false
                break
            }
            let asked = clock.now
            do {
                try await store.keepAlive(lease.id)
            } catch StoreError.leaseNotFound where clock.now - renewed >= .seconds(lease.ttl) - .milliseconds(500) {
                keptAlive = false  // the renewal itself waited past the TTL
                break
            }
            renewed = asked
        }
        if keptAlive { #expect(try await store.get("nodes/a") != nil) }
        // Left alone, it ends within its TTL (etcd checks expiry every 500 ms or so): the watch sees the delete.
        let began = clock.now
        let batches = try await collect(stream, count: 1)
        #expect(batches.first?.map { "\($0.kind) \($0.key)" } == ["delete nodes/a"])
        #expect(clock.now - began < .seconds(60))
        #expect(try await store.get("nodes/a") == nil)
        #expect(try await store.get("nodes/kept") != nil)
        await #expect(throws: StoreError.self) { try await store.keepAlive(lease.id) }
    }

    @Test(arguments: Backend.available)
    func aRevokedLeaseTakesItsKeysAtOnce(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let lease = try await store.grantLease(ttl: 60)
        try await store.commit(StoreTransaction(mutations: [.put("l/a", data(""), lease: lease.id), .put("l/b", data(""), lease: lease.id)]))
        try await store.revokeLease(lease.id)
        #expect(try await store.list(prefix: "l/").entries.isEmpty)
        // A put under a lease that is gone writes nothing.
        await #expect(throws: StoreError.self) {
            try await store.commit(StoreTransaction(mutations: [.put("l/c", self.data(""), lease: lease.id)]))
        }
        #expect(try await store.get("l/c") == nil)
    }

    @Test(arguments: Backend.available)
    func aPrefixDeletedAndRewrittenInOneCommitKeepsTheRewrite(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        try await store.commit(StoreTransaction(mutations: [.put("p/a", data("old")), .put("p/b", data("old")), .put("p/c", data("old"))]))
        // etcd refuses a key twice in a transaction, or a put inside a deleted range: the plan
        // keeps the meaning (in order, the last write wins) in a form it accepts.
        try await store.commit(
            StoreTransaction(mutations: [
                .put("p/a", data("first")), .deletePrefix("p/"), .put("p/b", data("new")), .put("p/b", data("newer")), .delete("p/z"),
            ]))
        let listing = try await store.list(prefix: "p/")
        #expect(listing.entries.map(\.key) == ["p/b"])
        #expect(listing.entries.first?.value == data("newer"))
    }

    @Test(arguments: Backend.available)
    func largeWritesAreSplitWhereTheBackendNeedsIt(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let mutations = (0..<300).map { StoreMutation.put("big/\($0)", Data("\($0)".utf8)) }
        if backend == .etcd {
            // One commit of 300 operations is past etcd's 128: refused whole, nothing written.
            await #expect(throws: StoreError.self) { try await store.commit(StoreTransaction(mutations: mutations)) }
            #expect(try await store.list(prefix: "big/").entries.isEmpty)
        }
        try await store.commitInChunks(mutations)
        #expect(try await store.list(prefix: "big/").entries.count == 300)
    }

    @Test func etcdValuesKeepFlagsAndReadForeignValuesWhole() {
        let plain = EtcdValueCodec.encode(Data("{}".utf8), flags: 0)
        #expect(plain == Data([0]) + Data("{}".utf8))
        #expect(EtcdValueCodec.decode(plain) == (Data("{}".utf8), 0))
        let flagged = EtcdValueCodec.encode(Data("x".utf8), flags: UInt64.max - 1)
        #expect(EtcdValueCodec.decode(flagged) == (Data("x".utf8), UInt64.max - 1))
        // Written by etcdctl, not Flotilla: read as it is.
        #expect(EtcdValueCodec.decode(Data("hello".utf8)) == (Data("hello".utf8), 0))
        #expect(EtcdValueCodec.decode(Data()) == (Data(), 0))
        #expect(EtcdValueCodec.prefixEnd(Data("a/".utf8)) == Data("a0".utf8))
        #expect(EtcdValueCodec.prefixEnd(Data([0x61, 0xFF])) == Data([0x62]))
    }

    @Test func theTransactionPlanCutsDeletedRangesAroundLaterPuts() {
        let prefix = Data("/f/".utf8)
        func key(_ text: String) -> Data { prefix + Data(text.utf8) }
        let plan = EtcdTxnPlan.operations(
            for: [.put("a/1", Data("x".utf8)), .deletePrefix("a/"), .put("a/2", Data("y".utf8)), .delete("b"), .put("b", Data("z".utf8))],
            keyPrefix: prefix)
        #expect(
            plan == [
                .deleteRange(from: key("a/"), end: key("a/2")),
                .deleteRange(from: key("a/2") + Data([0]), end: key("a0")),
                .put(key("a/2"), Data("y".utf8), flags: 0, lease: 0),
                .put(key("b"), Data("z".utf8), flags: 0, lease: 0),
            ])
        // A narrower prefix inside a wider one is covered by it; a delete after a put wins.
        let nested = EtcdTxnPlan.operations(
            for: [.deletePrefix("a/"), .deletePrefix("a/b/"), .put("c", Data()), .delete("c")], keyPrefix: prefix)
        #expect(nested == [.deleteRange(from: key("a/"), end: key("a0")), .delete(key("c"))])
    }
}
