public import FlotillaStore
import Foundation
internal import GRPCCore
internal import GRPCNIOTransportHTTP2
public import Logging
internal import SwiftProtobuf
import Synchronization

/// Where the etcd cluster is and how to reach it.
public struct EtcdConfiguration: Sendable {
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public var description: String { "\(host):\(port)" }
    }

    public var endpoints: [Endpoint]
    /// Every Flotilla key lives under this etcd key prefix (`--etcd-prefix`), so one etcd cluster
    /// can hold several Flotilla clusters, or other tenants.
    public var prefix: String
    /// PEM files: the CA that signed the members' certificates, and a client certificate and key
    /// when the members ask for one (`--client-cert-auth`).
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    /// How long one request may take before the store is called unreachable.
    public var requestTimeout: Duration
    public var limits: StoreLimits

    /// Parses `etcd://host:port[,host:port…]` (the scheme may be left out; the port defaults to 2379).
    public init(
        url: String, prefix: String = "/flotilla", caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil,
        requestTimeout: Duration = .seconds(5), limits: StoreLimits = .etcdDefaults
    ) throws {
        var list = Substring(url)
        if list.hasPrefix("etcd://") { list = list.dropFirst("etcd://".count) }
        var endpoints: [Endpoint] = []
        for part in list.split(separator: ",", omittingEmptySubsequences: true) {
            let item = part.trimmingCharacters(in: .whitespaces)
            let host: String
            let port: Int
            if let colon = item.lastIndex(of: ":") {
                host = String(item[..<colon])
                guard let number = Int(item[item.index(after: colon)...]), (1...65535).contains(number) else {
                    throw StoreError.backend("etcd endpoint '\(item)': the port must be a number from 1 to 65535")
                }
                port = number
            } else {
                host = item
                port = 2379
            }
            guard !host.isEmpty, !host.contains("/") else { throw StoreError.backend("etcd endpoint '\(item)' is not host:port") }
            endpoints.append(Endpoint(host: host, port: port))
        }
        guard !endpoints.isEmpty else { throw StoreError.backend("no etcd endpoint in '\(url)': give etcd://host:port[,host:port…]") }
        guard (certFile == nil) == (keyFile == nil) else {
            throw StoreError.backend("an etcd client certificate needs its key, and a key its certificate")
        }
        var normalized = prefix
        if !normalized.hasPrefix("/") { normalized = "/" + normalized }
        if !normalized.hasSuffix("/") { normalized += "/" }
        self.endpoints = endpoints
        self.prefix = normalized
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.requestTimeout = requestTimeout
        self.limits = limits
    }

    public var displayName: String { "etcd://" + endpoints.map(\.description).joined(separator: ",") + prefix }
}

/// The cluster backend: Flotilla's key space under a prefix in etcd v3, over etcd's gRPC API.
/// The store's index is etcd's revision; commits are etcd transactions; `waitForChange` and
/// `watch` are fed by etcd watches that resume from the last revision they saw when a member
/// restarts or the connection moves to another member.
public final class EtcdStateStore: StateStore {
    typealias Transport = HTTP2ClientTransport.Posix

    private let configuration: EtcdConfiguration
    private let client: GRPCClient<Transport>
    private let kv: EtcdKV.Client<Transport>
    private let watchClient: EtcdWatch.Client<Transport>
    private let leaseClient: EtcdLease.Client<Transport>
    private let notifier = ChangeNotifier()
    private let logger: Logger
    private let tasks = Mutex<[Task<Void, Never>]>([])
    private let prefixBytes: Data

    public var limits: StoreLimits { configuration.limits }
    public var displayName: String { configuration.displayName }

    /// Connects, checks that etcd answers, and starts the watch that feeds `waitForChange`.
    /// - Throws: `StoreError.unavailable` when no member answers within the request timeout.
    public static func connect(_ configuration: EtcdConfiguration, logger: Logger) async throws -> EtcdStateStore {
        let store = try EtcdStateStore(configuration: configuration, logger: logger)
        do {
            let index = try await store.currentIndex()
            store.notifier.start(at: index)
            store.startChangeFeed(after: index)
        } catch {
            store.close()
            throw error
        }
        return store
    }

    private init(configuration: EtcdConfiguration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        self.prefixBytes = Data(configuration.prefix.utf8)
        let addresses = try configuration.endpoints.flatMap { endpoint -> [SocketAddress.IPv4] in
            try Self.resolve(endpoint).map { SocketAddress.IPv4(host: $0, port: endpoint.port) }
        }
        let security: Transport.TransportSecurity
        if configuration.caFile != nil || configuration.certFile != nil {
            var tls = Transport.TransportSecurity.TLS.defaults
            if let ca = configuration.caFile { tls.trustRoots = .certificates([.file(path: ca, format: .pem)]) }
            if let cert = configuration.certFile, let key = configuration.keyFile {
                tls.certificateChain = [.file(path: cert, format: .pem)]
                tls.privateKey = .file(path: key, format: .pem)
            }
            security = .tls(tls)
        } else {
            security = .plaintext
        }
        var transportConfig = Transport.Config.defaults
        // Listings of a big cluster are paged, but one page of large records can pass gRPC's 4 MiB default.
        transportConfig.http2.maxFrameSize = 1 << 20
        transportConfig.backoff = .init(initial: .milliseconds(100), max: .seconds(2), multiplier: 1.6, jitter: 0.2)
        // etcd's bandwidth-probing PINGs would trip SwiftNIO's flood guard (see PingResponder).
        transportConfig.channelDebuggingCallbacks.onCreateTCPConnection = { PingResponder.install(on: $0) }
        let transport = try Transport(
            target: ResolvableTargets.IPv4(addresses: addresses), transportSecurity: security, config: transportConfig,
            serviceConfig: ServiceConfig(loadBalancingConfig: [.roundRobin]))
        client = GRPCClient(transport: transport)
        kv = EtcdKV.Client(wrapping: client)
        watchClient = EtcdWatch.Client(wrapping: client)
        leaseClient = EtcdLease.Client(wrapping: client)
        let client = self.client
        let logger = self.logger
        tasks.withLock {
            $0.append(
                Task.detached {
                    do { try await client.runConnections() } catch { logger.error("etcd client stopped: \(error)") }
                })
        }
    }

    /// Stops the watches and the connections.
    public func close() {
        let running = tasks.withLock { tasks in
            defer { tasks.removeAll() }
            return tasks
        }
        notifier.finishAll(throwing: StoreError.unavailable("the store is closed"))
        client.beginGracefulShutdown()
        for task in running.dropFirst() { task.cancel() }
    }

    deinit {
        close()
    }

    /// Names to IPv4 addresses, once at start (etcd members are usually named by address).
    private static func resolve(_ endpoint: EtcdConfiguration.Endpoint) throws -> [String] {
        var probe = in_addr()
        if inet_pton(AF_INET, endpoint.host, &probe) == 1 { return [endpoint.host] }
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(endpoint.host, nil, &hints, &result) == 0, let first = result else {
            throw StoreError.backend("cannot resolve the etcd endpoint \(endpoint.host) to an IPv4 address")
        }
        defer { freeaddrinfo(first) }
        var addresses: [String] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            if let raw = info.pointee.ai_addr {
                var address = raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
                var buffer = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
                if inet_ntop(AF_INET, &address, &buffer, socklen_t(buffer.count)) != nil {
                    let text = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                    if !addresses.contains(text) { addresses.append(text) }
                }
            }
            cursor = info.pointee.ai_next
        }
        return addresses
    }

    // MARK: Keys and values

    private func etcdKey(_ key: String) -> Data { prefixBytes + Data(key.utf8) }

    private func storeKey(_ key: Data) -> String {
        String(decoding: key.dropFirst(prefixBytes.count), as: UTF8.self)
    }

    private func entry(_ kv: EtcdKeyValue) -> StoreEntry {
        let (value, flags) = EtcdValueCodec.decode(kv.value)
        return StoreEntry(
            key: storeKey(kv.key), value: value, createIndex: UInt64(max(kv.createRevision, 0)),
            modifyIndex: UInt64(max(kv.modRevision, 0)), flags: flags)
    }

    private var options: CallOptions {
        var options = CallOptions.defaults
        options.timeout = configuration.requestTimeout
        // Wait for a member to be reachable (up to the timeout) rather than failing at once while
        // the client moves to another member.
        options.waitForReady = true
        options.maxResponseMessageBytes = 256 << 20
        return options
    }

    /// Runs one request, mapping gRPC's failures onto the store's errors. A request the client
    /// never sent (its connection was being replaced: "subchannel isn't ready") is sent again, and
    /// so is a read or lease call whose stream broke; a commit whose stream broke is not, since
    /// etcd may have applied it (the caller is told it is unconfirmed). Retries stay within the
    /// request timeout.
    private func call<Result: Sendable>(_ what: String, _ body: () async throws -> Result) async throws -> Result {
        let deadline = ContinuousClock.now + configuration.requestTimeout
        let mayRepeat = what != "a commit"
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await body()
            } catch let error as RPCError {
                let unsent = error.code == .unavailable && error.message.contains("isn't ready")
                let broken = error.code == .unavailable && error.message.contains("unexpectedly closed")
                let pause = Duration.milliseconds(min(50 * attempt, 500))
                guard unsent || (broken && mayRepeat), ContinuousClock.now + pause < deadline, !Task.isCancelled else {
                    throw Self.storeError(error, doing: what)
                }
                try await Task.sleep(for: pause)
            }
        }
    }

    static func storeError(_ error: RPCError, doing what: String) -> StoreError {
        switch error.code {
        case .unavailable, .deadlineExceeded, .cancelled:
            return .unavailable("etcd did not answer \(what) (\(error.code): \(error.message))")
        case .notFound where error.message.contains("lease"):
            return .leaseNotFound(0)
        case .invalidArgument where error.message.contains("too many operations") || error.message.contains("too large"):
            return .tooLarge(error.message)
        case .resourceExhausted:
            return .tooLarge(error.message)
        case .outOfRange where error.message.contains("compacted"):
            return .compacted(oldest: 0)
        default:
            return .backend("etcd \(what): \(error.code): \(error.message)")
        }
    }

    // MARK: Reads

    public func get(_ key: String) async throws -> StoreEntry? {
        var request = EtcdRangeRequest()
        request.key = etcdKey(key)
        let response = try await call("a read") { try await kv.range(request, options: options) }
        return response.kvs.first.map(entry)
    }

    public func list(prefix: String) async throws -> StoreListing {
        let snapshot = try await snapshot(prefixes: [prefix])
        return StoreListing(entries: snapshot[prefix], index: snapshot.index)
    }

    public func snapshot(prefixes: [String]) async throws -> StoreSnapshot {
        // The first page fixes the revision and every later page reads at it. A compaction that
        // passes that revision mid-way starts the read again at a new one.
        for attempt in 1... {
            do {
                var revision: UInt64 = 0
                var entries: [String: [StoreEntry]] = [:]
                for prefix in prefixes {
                    let (found, at) = try await range(prefix: prefix, at: revision)
                    entries[prefix] = found
                    revision = at
                }
                if prefixes.isEmpty { revision = try await currentIndex() }
                return StoreSnapshot(entries: entries, index: revision)
            } catch StoreError.compacted where attempt < 5 {
                continue
            }
        }
        fatalError("unreachable")
    }

    /// Every entry under a prefix, paged, all pages at one revision (the first page's, or `at`).
    private func range(prefix: String, at fixed: UInt64) async throws -> ([StoreEntry], UInt64) {
        let start = etcdKey(prefix)
        let end = EtcdValueCodec.prefixEnd(start)
        var revision = Int64(fixed)
        var from = start
        var entries: [StoreEntry] = []
        while true {
            var request = EtcdRangeRequest()
            request.key = from
            request.rangeEnd = end
            request.limit = 2000
            request.revision = revision
            let response = try await call("a listing") { try await kv.range(request, options: options) }
            if revision == 0 { revision = response.header.revision }
            entries += response.kvs.map(entry)
            guard response.more, let last = response.kvs.last else { break }
            from = last.key + Data([0])
        }
        return (entries, UInt64(max(revision, 0)))
    }

    public func currentIndex() async throws -> UInt64 {
        // A count-only read of one key costs etcd nothing and carries the revision in its header.
        var request = EtcdRangeRequest()
        request.key = prefixBytes
        request.countOnly = true
        let response = try await call("a read") { try await kv.range(request, options: options) }
        return UInt64(max(response.header.revision, 0))
    }

    // MARK: Commits

    public func commit(_ transaction: StoreTransaction) async throws -> UInt64 {
        let operations = EtcdTxnPlan.operations(for: transaction.mutations, keyPrefix: prefixBytes)
        let bytes = transaction.mutations.reduce(0) { $0 + StoreChunking.size(of: $1) }
        if operations.count > limits.maxOperations || bytes > limits.maxBytes {
            throw StoreError.tooLarge(
                "\(operations.count) operations, about \(bytes) bytes (etcd takes at most \(limits.maxOperations) operations and \(limits.maxBytes) bytes in one transaction)"
            )
        }
        var request = EtcdTxnRequest()
        for condition in transaction.preconditions {
            var compare = EtcdCompare()
            switch condition {
            case .absent(let key):
                compare.key = etcdKey(key)
                compare.target = .create
                compare.result = .equal
                compare.createRevision = 0
            case .present(let key):
                compare.key = etcdKey(key)
                compare.target = .create
                compare.result = .greater
                compare.createRevision = 0
            case .modifyIndex(let key, let expected):
                compare.key = etcdKey(key)
                compare.target = .mod
                compare.result = .equal
                compare.modRevision = Int64(clamping: expected)
            }
            request.compare.append(compare)
            // On failure, read each checked key so the caller learns which condition failed.
            var read = EtcdRequestOp()
            var range = EtcdRangeRequest()
            range.key = compare.key
            range.keysOnly = true
            read.requestRange = range
            request.failure.append(read)
        }
        for operation in operations {
            var op = EtcdRequestOp()
            switch operation {
            case .put(let key, let value, let flags, let lease):
                var put = EtcdPutRequest()
                put.key = key
                put.value = EtcdValueCodec.encode(value, flags: flags)
                put.lease = lease
                op.requestPut = put
            case .delete(let key):
                var delete = EtcdDeleteRangeRequest()
                delete.key = key
                op.requestDeleteRange = delete
            case .deleteRange(let from, let end):
                var delete = EtcdDeleteRangeRequest()
                delete.key = from
                delete.rangeEnd = end
                op.requestDeleteRange = delete
            }
            request.success.append(op)
        }
        let response: EtcdTxnResponse
        do {
            response = try await call("a commit") { try await kv.txn(request, options: options) }
        } catch StoreError.leaseNotFound {
            let lease = transaction.mutations.lazy.compactMap { mutation -> StoreLease.ID? in
                if case .put(_, _, _, let lease) = mutation, lease != 0 { return lease }
                return nil
            }.first ?? 0
            throw StoreError.leaseNotFound(lease)
        }
        if response.succeeded { return UInt64(max(response.header.revision, 0)) }
        for (condition, result) in zip(transaction.preconditions, response.responses) {
            let found = result.responseRange.kvs.first
            let holds: Bool
            switch condition {
            case .absent: holds = found == nil
            case .present: holds = found != nil
            case .modifyIndex(_, let expected): holds = found.map { UInt64($0.modRevision) == expected } ?? false
            }
            if !holds { throw StoreError.preconditionFailed(condition) }
        }
        // The key changed back between the transaction and our reading of it: report the first.
        throw StoreError.preconditionFailed(transaction.preconditions[0])
    }

    // MARK: Watches

    public func waitForChange(prefix: String, after index: UInt64, timeout: Duration) async throws -> UInt64 {
        await notifier.wait(prefix: prefix, after: index, timeout: timeout)
        return notifier.latestIndex
    }

    public func watch(prefix: String, after index: UInt64) -> AsyncThrowingStream<[StoreEvent], any Error> {
        let (stream, continuation) = AsyncThrowingStream<[StoreEvent], any Error>.makeStream(bufferingPolicy: .bufferingOldest(65536))
        let task = Task {
            do {
                try await self.follow(prefix: prefix, after: index) { batch in
                    if case .dropped = continuation.yield(batch) {
                        throw StoreError.compacted(oldest: batch.first?.index ?? index)
                    }
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    /// Feeds every change under the whole prefix to the notifier that `waitForChange` waits on.
    private func startChangeFeed(after index: UInt64) {
        let task = Task.detached { [weak self] in
            let feed = Mutex(index)
            var seen: UInt64 { feed.withLock { $0 } }
            while !Task.isCancelled {
                guard let self else { return }
                do {
                    try await self.follow(prefix: "", after: seen) { batch in
                        guard let last = batch.last?.index else { return }
                        self.notifier.committed(index: last, events: batch)
                        feed.withLock { $0 = last }
                    }
                } catch StoreError.compacted(let oldest) {
                    // The feed fell behind a compaction: every waiter re-reads, and the feed goes on
                    // from now.
                    let now = (try? await self.currentIndex()) ?? max(oldest, seen)
                    self.logger.warning("etcd compacted past the change feed (at \(seen), oldest \(oldest)): waiters read again")
                    self.notifier.invalidate(at: now)
                    feed.withLock { $0 = now }
                } catch {
                    if Task.isCancelled { return }
                    self.logger.warning("etcd change feed: \(error); retrying")
                    try? await Task.sleep(for: .milliseconds(500))
                }
            }
        }
        tasks.withLock { $0.append(task) }
    }

    /// Follows an etcd watch from `after`, calling `deliver` with each revision's changes, and
    /// resumes from the last revision seen when the stream breaks (member restart, failover).
    /// Returns only when cancelled; throws `StoreError.compacted` when etcd no longer has `after`.
    private func follow(prefix: String, after index: UInt64, deliver: @escaping @Sendable ([StoreEvent]) throws -> Void) async throws {
        let seen = Mutex(index)
        var failures = 0
        var lastAttempt = index
        while !Task.isCancelled {
            do {
                lastAttempt = seen.withLock { $0 }
                try await watchOnce(prefix: prefix, after: lastAttempt) { batch in
                    try deliver(batch)
                    if let last = batch.last?.index { seen.withLock { $0 = last } }
                }
                return
            } catch let error as StoreError {
                if case .compacted = error { throw error }
                if Task.isCancelled { return }
                // A stream that delivered something before it broke starts the count again.
                failures = seen.withLock { $0 } > lastAttempt ? 1 : failures + 1
                if failures == 3 { logger.warning("etcd watch on '\(prefix)' lost its stream (\(error)); reconnecting") }
                try? await Task.sleep(for: .milliseconds(min(100 * failures, 2000)))
            }
        }
    }

    private func watchOnce(prefix: String, after index: UInt64, deliver: @escaping @Sendable ([StoreEvent]) throws -> Void) async throws {
        var create = EtcdWatchCreateRequest()
        create.key = etcdKey(prefix)
        create.rangeEnd = EtcdValueCodec.prefixEnd(create.key)
        create.startRevision = Int64(clamping: index + 1)
        create.progressNotify = true
        var request = EtcdWatchRequest()
        request.createRequest = create
        var options = CallOptions.defaults
        options.waitForReady = true
        options.maxResponseMessageBytes = 256 << 20
        let request0 = request
        do {
            try await watchClient.watch(
                options: options,
                requestProducer: { writer in
                    try await writer.write(request0)
                    // Keep the request side open: etcd ends the watch when the client closes it.
                    while !Task.isCancelled { try await Task.sleep(for: .seconds(3600)) }
                },
                onResponse: { response in
                    for try await message in response.messages {
                        if message.canceled {
                            if message.compactRevision > 0 {
                                throw StoreError.compacted(oldest: UInt64(message.compactRevision))
                            }
                            throw StoreError.unavailable("etcd cancelled the watch: \(message.cancelReason)")
                        }
                        guard !message.events.isEmpty else { continue }
                        var batch: [StoreEvent] = []
                        var revision: Int64 = -1
                        for event in message.events {
                            if event.kv.modRevision != revision, !batch.isEmpty {
                                try deliver(batch)
                                batch.removeAll()
                            }
                            revision = event.kv.modRevision
                            switch event.type {
                            case .delete:
                                batch.append(
                                    StoreEvent(
                                        kind: .delete,
                                        entry: StoreEntry(key: self.storeKey(event.kv.key), value: Data(), createIndex: 0, modifyIndex: UInt64(revision))))
                            default:
                                batch.append(StoreEvent(kind: .put, entry: self.entry(event.kv)))
                            }
                        }
                        if !batch.isEmpty { try deliver(batch) }
                    }
                    throw StoreError.unavailable("the etcd watch stream ended")
                })
        } catch let error as RPCError {
            throw Self.storeError(error, doing: "a watch")
        }
    }

    // MARK: Leases

    public func grantLease(ttl: Int64) async throws -> StoreLease {
        var request = EtcdLeaseGrantRequest()
        request.ttl = max(ttl, 1)
        let response = try await call("a lease grant") { try await leaseClient.leaseGrant(request, options: options) }
        if !response.error.isEmpty { throw StoreError.backend("etcd refused the lease: \(response.error)") }
        return StoreLease(id: response.id, ttl: response.ttl)
    }

    public func keepAlive(_ lease: StoreLease.ID) async throws {
        var request = EtcdLeaseKeepAliveRequest()
        request.id = lease
        let request0 = request
        let ttl = try await call("a lease keep-alive") {
            try await leaseClient.leaseKeepAlive(
                options: options,
                requestProducer: { writer in try await writer.write(request0) },
                onResponse: { response in
                    // Read to the end: the request side is closed, so etcd answers once and ends the
                    // stream. Returning at the first message would reset a stream etcd is still
                    // finishing, and under load that cost the whole connection (every call on it
                    // failing "Stream unexpectedly closed" until it reconnected).
                    var ttl: Int64 = 0
                    for try await message in response.messages { ttl = message.ttl }
                    return ttl
                })
        }
        if ttl <= 0 { throw StoreError.leaseNotFound(lease) }
    }

    public func revokeLease(_ lease: StoreLease.ID) async throws {
        var request = EtcdLeaseRevokeRequest()
        request.id = lease
        do {
            _ = try await call("a lease revoke") { try await leaseClient.leaseRevoke(request, options: options) }
        } catch StoreError.leaseNotFound {
            throw StoreError.leaseNotFound(lease)
        }
    }
}

/// Values in etcd carry Consul's flags ahead of the bytes: one tag byte (0: no flags, 1: eight
/// big-endian bytes of flags follow), then the value as written, so `etcdctl get` shows the JSON
/// an operator expects after one byte. A value without a known tag (written by someone else) is
/// read whole, with no flags.
enum EtcdValueCodec {
    static func encode(_ value: Data, flags: UInt64) -> Data {
        if flags == 0 { return Data([0]) + value }
        var out = Data([1])
        withUnsafeBytes(of: flags.bigEndian) { out.append(contentsOf: $0) }
        return out + value
    }

    static func decode(_ stored: Data) -> (Data, UInt64) {
        guard let tag = stored.first else { return (Data(), 0) }
        switch tag {
        case 0:
            return (Data(stored.dropFirst()), 0)
        case 1 where stored.count >= 9:
            let flags = stored.dropFirst().prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            return (Data(stored.dropFirst(9)), flags)
        default:
            return (stored, 0)
        }
    }

    /// The smallest key after every key that starts with `prefix` (etcd's range end for a prefix).
    static func prefixEnd(_ prefix: Data) -> Data {
        var bytes = [UInt8](prefix)
        while let last = bytes.last {
            if last < 0xFF {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        // Every byte was 0xFF: the range runs to the end of the key space.
        return Data([0])
    }
}

/// The operations one etcd transaction carries for a list of mutations. etcd refuses a transaction
/// that writes a key twice or puts a key inside a range it deletes, which a Flotilla transaction
/// may do (delete a prefix and write a key under it). The plan keeps the mutations' meaning —
/// applied in order, the last write to a key wins — in operations etcd accepts: a put cancels the
/// earlier writes to its key, and a prefix deletion is cut around the keys written after it.
enum EtcdTxnPlan {
    /// Keys are etcd keys: the store's prefix, then the Flotilla key.
    enum Operation: Equatable {
        case put(Data, Data, flags: UInt64, lease: StoreLease.ID)
        case delete(Data)
        /// Keys from `from` up to `end` (exclusive).
        case deleteRange(from: Data, end: Data)
    }

    static func operations(for mutations: [StoreMutation], keyPrefix: Data) -> [Operation] {
        // Walk backwards: a key's final state is decided by its last mutation.
        var decided = Set<String>()
        var puts: [(Int, String, Data, UInt64, StoreLease.ID)] = []
        var deletes: [(Int, String)] = []
        var prefixes: [(Int, String)] = []
        for (position, mutation) in mutations.enumerated().reversed() {
            switch mutation {
            case .put(let key, let value, let flags, let lease):
                if decided.contains(key) || prefixes.contains(where: { key.hasPrefix($0.1) }) { continue }
                decided.insert(key)
                puts.append((position, key, value, flags, lease))
            case .delete(let key):
                if decided.contains(key) || prefixes.contains(where: { key.hasPrefix($0.1) }) { continue }
                decided.insert(key)
                deletes.append((position, key))
            case .deletePrefix(let prefix):
                if prefixes.contains(where: { prefix.hasPrefix($0.1) }) { continue }
                prefixes.append((position, prefix))
            }
        }
        // An earlier deletion of a wider prefix covers a later, narrower one (etcd's ranges must not
        // overlap a put, and one range suffices); single deletes inside a deleted prefix go too.
        let all = prefixes
        prefixes.removeAll { inner in all.contains { $0.1 != inner.1 && inner.1.hasPrefix($0.1) } }
        deletes.removeAll { delete in prefixes.contains { delete.1.hasPrefix($0.1) } }
        var operations: [Operation] = []
        for (_, prefix) in prefixes.sorted(by: { $0.0 < $1.0 }) {
            let start = keyPrefix + Data(prefix.utf8)
            let end = EtcdValueCodec.prefixEnd(start)
            // Keys put after this deletion survive it: delete around them.
            let kept = puts.map(\.1).filter { $0.hasPrefix(prefix) }.map { keyPrefix + Data($0.utf8) }.sorted { $0.lexicographicallyPrecedes($1) }
            var from = start
            for key in kept {
                if from.lexicographicallyPrecedes(key) { operations.append(.deleteRange(from: from, end: key)) }
                from = key + Data([0])
            }
            operations.append(.deleteRange(from: from, end: end))
        }
        for (_, key) in deletes.sorted(by: { $0.0 < $1.0 }) { operations.append(.delete(keyPrefix + Data(key.utf8))) }
        for (_, key, value, flags, lease) in puts.sorted(by: { $0.0 < $1.0 }) {
            operations.append(.put(keyPrefix + Data(key.utf8), value, flags: flags, lease: lease))
        }
        return operations
    }
}
