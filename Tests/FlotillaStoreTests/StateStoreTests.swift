import FlotillaEtcd
import FlotillaStore
import Foundation
import Testing

/// The contract every backend keeps, run against each of them: SQLite, memory, and a real etcd.
@Suite struct StateStoreTests {
    enum Backend: String, CaseIterable, CustomTestStringConvertible {
        case sqlite, memory, etcd
        var testDescription: String { rawValue }

        /// etcd runs where it is installed, and always under scripts/test.sh (which installs it).
        static var available: [Backend] { EtcdTestServer.available ? allCases : [.sqlite, .memory] }
        static let local: [Backend] = [.sqlite, .memory]
    }

    final class Fixture: Sendable {
        let store: any StateStore
        let directory: URL?

        static func make(_ backend: Backend) async throws -> Fixture {
            switch backend {
            case .memory: return Fixture(store: InMemoryStateStore(), directory: nil)
            case .sqlite:
                let directory = FileManager.default.temporaryDirectory.appendingPathComponent("flotilla-store-\(UUID().uuidString)")
                try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
                return Fixture(store: try SQLiteStateStore(path: directory.appendingPathComponent("state.db").path), directory: directory)
            case .etcd:
                return Fixture(store: try await EtcdTestServer.store(), directory: nil)
            }
        }

        private init(store: any StateStore, directory: URL?) {
            self.store = store
            self.directory = directory
        }

        deinit {
            if let directory { try? FileManager.default.removeItem(at: directory) }
            (store as? EtcdStateStore)?.close()
        }
    }

    func data(_ text: String) -> Data { Data(text.utf8) }

    @Test(arguments: Backend.local)
    func localCommitsAdvanceOneIndex(_ backend: Backend) async throws {
        let store = try await Fixture.make(backend).store
        #expect(try await store.currentIndex() == 0)
        let first = try await store.put("apps/a", data("1"))
        let second = try await store.commit(StoreTransaction(mutations: [.put("apps/b", data("2")), .put("apps/c", data("3"))]))
        #expect(first == 1)
        #expect(second == 2)
    }

    @Test(arguments: Backend.available)
    func commitsAdvanceTheIndex(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let start = try await store.currentIndex()
        let first = try await store.put("apps/a", data("1"))
        let second = try await store.commit(StoreTransaction(mutations: [.put("apps/b", data("2")), .put("apps/c", data("3"))]))
        #expect(first > start)
        #expect(second > first)
        let b = try #require(try await store.get("apps/b"))
        #expect(b.createIndex == second && b.modifyIndex == second)
        let third = try await store.put("apps/b", data("22"))
        let updated = try #require(try await store.get("apps/b"))
        #expect(updated.createIndex == second && updated.modifyIndex == third && updated.value == data("22"))
        #expect(try await store.currentIndex() >= third)
    }

    @Test(arguments: Backend.available)
    func listsByPrefixInKeyOrder(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let index = try await store.commit(
            StoreTransaction(mutations: [.put("versions/shop_cart/2", data("")), .put("versions/shop/1", data("")), .put("versions/shop/0", data(""))]))
        let listing = try await store.list(prefix: "versions/shop/")
        #expect(listing.entries.map(\.key) == ["versions/shop/0", "versions/shop/1"])
        #expect(listing.index >= index)
    }

    @Test(arguments: Backend.available)
    func failedPreconditionsWriteNothing(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let written = try await store.put("kv/a", data("1"))
        let index = try await store.currentIndex()
        await #expect(throws: StoreError.preconditionFailed(.absent("kv/a"))) {
            try await store.commit(StoreTransaction(preconditions: [.absent("kv/a")], mutations: [.put("kv/b", self.data("2"))]))
        }
        await #expect(throws: StoreError.self) {
            try await store.commit(StoreTransaction(preconditions: [.modifyIndex("kv/a", equals: 99)], mutations: [.delete("kv/a")]))
        }
        #expect(try await store.get("kv/b") == nil)
        #expect(try await store.get("kv/a") != nil)
        #expect(try await store.list(prefix: "kv/").entries.map(\.modifyIndex) == [written])
        if backend != .etcd { #expect(try await store.currentIndex() == index) }  // etcd's revision is shared
        // The failing condition is the one reported, wherever it is in the list.
        await #expect(throws: StoreError.preconditionFailed(.absent("kv/a"))) {
            try await store.commit(StoreTransaction(preconditions: [.present("kv/a"), .absent("kv/a")], mutations: [.put("kv/b", self.data("2"))]))
        }
        try await store.commit(StoreTransaction(preconditions: [.modifyIndex("kv/a", equals: written), .present("kv/a")], mutations: [.delete("kv/a")]))
        #expect(try await store.get("kv/a") == nil)
    }

    @Test(arguments: Backend.available)
    func deletesAPrefix(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        try await store.commit(StoreTransaction(mutations: [.put("v/a/1", data("")), .put("v/a/2", data("")), .put("v/ab/1", data(""))]))
        try await store.commit(StoreTransaction(mutations: [.deletePrefix("v/a/")]))
        #expect(try await store.list(prefix: "v/").entries.map(\.key) == ["v/ab/1"])
    }

    @Test(arguments: Backend.available)
    func waitingReturnsOnARelevantChange(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let start = try await store.put("other/x", data(""))
        let clock = ContinuousClock()
        let began = clock.now
        let waiter = Task { try await store.waitForChange(prefix: "watched/", after: start, timeout: .seconds(600)) }
        try await Task.sleep(for: .milliseconds(50))
        try await store.put("other/y", data(""))  // not under the prefix: no wake-up
        let relevant = try await store.put("watched/z", data(""))
        let woke = try await waiter.value
        #expect(woke >= relevant)
        // Woken by the change, not by the 600 s timeout (the bound is loose: on a loaded 2-core
        // machine other tests have held the cooperative threads for 40 s).
        #expect(clock.now - began < .seconds(300))
    }

    @Test(arguments: Backend.available)
    func waitingSeesACommitThatCameFirst(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let before = try await store.currentIndex()
        try await store.put("watched/a", data(""))
        if backend == .etcd { try await Task.sleep(for: .milliseconds(200)) }  // the change reaches the feed first
        // The change happened before the wait began: it must return at once, not at the timeout.
        let clock = ContinuousClock()
        let elapsed = try await clock.measure { _ = try await store.waitForChange(prefix: "watched/", after: before, timeout: .seconds(600)) }
        #expect(elapsed < .seconds(300))
    }

    @Test(arguments: Backend.available)
    func waitingTimesOut(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let index = try await store.currentIndex()
        let clock = ContinuousClock()
        let elapsed = try await clock.measure { _ = try await store.waitForChange(prefix: "x/", after: index, timeout: .milliseconds(100)) }
        #expect(elapsed >= .milliseconds(100))
        #expect(elapsed < .seconds(300))  // it ended (loosely bounded, as above)
    }

    @Test func sqliteKeepsEverythingAcrossReopening() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("flotilla-store-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("state.db").path
        do {
            let store = try SQLiteStateStore(path: path)
            try await store.put("apps/a", data("one"))
            try await store.put("apps/b", data("two"))
        }
        let reopened = try SQLiteStateStore(path: path)
        #expect(try await reopened.currentIndex() == 2)
        #expect(try await reopened.get("apps/a")?.value == data("one"))
        // The index continues; it never goes back.
        #expect(try await reopened.put("apps/c", data("three")) == 3)
    }

    @Test(arguments: Backend.available)
    func concurrentCommitsEachGetTheirOwnIndex(_ backend: Backend) async throws {
        let fixture = try await Fixture.make(backend)
        let store = fixture.store
        let start = try await store.put("taken", data("x"))
        // Half the transactions fail their precondition; the others must not notice.
        let results = try await withThrowingTaskGroup(of: (Int, UInt64?).self) { group in
            for number in 0..<64 {
                group.addTask {
                    let transaction = StoreTransaction(
                        preconditions: number % 2 == 0 ? [] : [.absent("taken")], mutations: [.put("k/\(number)", Data("\(number)".utf8))])
                    do {
                        return (number, try await store.commit(transaction))
                    } catch StoreError.preconditionFailed {
                        return (number, nil)
                    }
                }
            }
            return try await group.reduce(into: [(Int, UInt64?)]()) { $0.append($1) }
        }
        let committed = results.compactMap(\.1).sorted()
        #expect(committed.count == 32)
        #expect(Set(committed).count == 32 && committed.allSatisfy { $0 > start })
        if backend != .etcd { #expect(committed == Array(2...33).map(UInt64.init)) }  // etcd's revision is shared
        #expect(results.filter { $0.0 % 2 == 1 }.allSatisfy { $0.1 == nil })
        #expect(try await store.list(prefix: "k/").entries.count == 32)
        #expect(try await store.currentIndex() >= committed.last ?? 0)
    }
}
