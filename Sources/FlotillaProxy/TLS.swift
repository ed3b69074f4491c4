#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
public import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization

// TLS for the proxy. The proxy's core relays plaintext on its own epoll loops; TLS is SwiftNIO's
// (BoringSSL through swift-nio-ssl), joined to the core by a UNIX socket pair per connection:
// the core takes one end as if it were the client (or the upstream), SwiftNIO relays between the
// other end and the TLS connection. Nothing in the core's request path knows TLS is there, and
// the client's own address travels with the hand-over.

/// Relays bytes between two channels on one event loop (a TLS connection and its end of a
/// socket pair), with backpressure: a side reads only while the other takes writes. When one side
/// closes, the other closes once what was written to it has gone out.
final class Glue: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: Glue?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var lastWrite: EventLoopFuture<Void>?
    private var closing = false

    static func pair() -> (Glue, Glue) {
        let first = Glue(), second = Glue()
        first.partner = second
        second.partner = first
        return (first, second)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // The partner may have wanted to read before this side could take its bytes.
        if context.channel.isWritable { partner?.partnerBecameWritable() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        partner?.partnerWrite(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner?.partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        let partner = self.partner
        self.partner = nil
        partner?.partnerClose()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            // HTTP needs no half-open connections here: the other side is done too.
            partner?.partnerClose()
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partner?.isWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }

    private var isWritable: Bool { !closing && (context?.channel.isWritable ?? false) }

    private func partnerWrite(_ data: ByteBuffer) {
        guard let context, !closing else { return }
        lastWrite = context.write(wrapOutboundOut(data))
    }

    private func partnerFlush() {
        context?.flush()
    }

    private func partnerBecameWritable() {
        guard pendingRead, let context else { return }
        pendingRead = false
        context.read()
    }

    private func partnerClose() {
        guard let context, !closing else { return }
        closing = true
        context.flush()
        guard let lastWrite else {
            context.close(promise: nil)
            return
        }
        lastWrite.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }
}

/// Holds a TLS connection's plaintext until its handshake is done and its glue is in place,
/// then steps aside. `handshakeDone` reports the handshake (or why it failed) once.
final class TLSHandoff: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var held: [ByteBuffer] = []
    private var handshakeDone: ((Result<Void, any Error>) -> Void)?

    init(handshakeDone: @escaping (Result<Void, any Error>) -> Void) {
        self.handshakeDone = handshakeDone
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        held.append(unwrapInboundIn(data))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted = event {
            report(.success(()))
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        report(.failure(error))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        report(.failure(ChannelError.eof))
        context.fireChannelInactive()
    }

    private func report(_ result: Result<Void, any Error>) {
        guard let done = handshakeDone else { return }
        handshakeDone = nil
        done(result)
    }

    /// Puts `glue` after this handler, gives it what was held, and leaves the pipeline.
    func attach(_ glue: Glue, context: ChannelHandlerContext) throws {
        try context.pipeline.syncOperations.addHandler(glue, position: .after(self))
        for buffer in held { context.fireChannelRead(wrapInboundOut(buffer)) }
        if !held.isEmpty { context.fireChannelReadComplete() }
        held = []
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// Joins an established TLS channel to a new socket pair: glue on the TLS side and on the pair's
/// TLS end (on the same event loop); the core's end is returned for the proxy to adopt.
enum TLSJoin {
    static func join(
        _ channel: any Channel, handoff: TLSHandoff, completion: @escaping (Result<Int32, any Error>) -> Void
    ) {
        let loop = channel.eventLoop
        let ends: (core: Int32, tls: Int32)
        do {
            ends = try SocketPair.make()
        } catch {
            completion(.failure(error))
            return
        }
        let (tlsSide, pairSide) = Glue.pair()
        let boundPairSide = NIOLoopBound(pairSide, eventLoop: loop)
        let bootstrap = ClientBootstrap(group: loop).channelInitializer { pairChannel in
            pairChannel.eventLoop.makeCompletedFuture { try pairChannel.pipeline.syncOperations.addHandler(boundPairSide.value) }
        }
        bootstrap.withConnectedSocket(ends.tls).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let pairChannel):
                do {
                    let context = try channel.pipeline.syncOperations.context(handler: handoff)
                    try handoff.attach(tlsSide, context: context)
                    completion(.success(ends.core))
                } catch {
                    pairChannel.close(promise: nil)
                    close(ends.core)
                    completion(.failure(error))
                }
            case .failure(let error):
                // The bootstrap owns (and has closed) the pair's TLS end.
                close(ends.core)
                completion(.failure(error))
            }
        }
    }
}

// MARK: - Certificates by SNI

/// The HTTPS listener's certificates: every `NAME.pem` or `NAME.crt` in a directory with its key
/// in `NAME.key` (or in the same file), served for the DNS names in the certificate's subject
/// alternative names (`*.example.com` covers one label). A client naming no known host gets
/// `default.pem`/`default.crt` if there is one, else the first certificate by file name. The
/// directory is read again when its files change, so renewed certificates are served without a
/// restart; a directory that stops loading keeps the certificates it had.
public final class CertificateDirectory: Sendable {
    struct Entry: Sendable {
        let file: String
        let chain: [NIOSSLCertificate]
        let key: NIOSSLPrivateKey
        let names: [String]
        var override: NIOSSLContextConfigurationOverride {
            var override = NIOSSLContextConfigurationOverride()
            override.certificateChain = chain.map { .certificate($0) }
            override.privateKey = .privateKey(key)
            return override
        }
    }

    struct Table: Sendable {
        var byName: [String: Entry] = [:]
        var fallback: Entry
        var signature: [String]
    }

    public let path: String
    private let table: Mutex<Table>
    /// The directory's state when it last failed to load: not tried again until it changes.
    private let failed = Mutex<[String]?>(nil)

    /// Throws when the directory holds no usable certificate, naming what was wrong.
    public init(path: String) throws {
        self.path = path
        table = Mutex(try Self.load(path))
    }

    /// Host names served, for the log.
    public var summary: String {
        table.withLock { table in
            let names = table.byName.keys.sorted()
            return "\(names.count) name(s)\(names.isEmpty ? "" : ": " + names.prefix(8).joined(separator: ", ") + (names.count > 8 ? ", …" : "")); default \(table.fallback.file)"
        }
    }

    func override(for serverName: String?) -> NIOSSLContextConfigurationOverride {
        table.withLock { table in
            guard let name = serverName?.lowercased(), !name.isEmpty else { return table.fallback.override }
            if let exact = table.byName[name] { return exact.override }
            if let dot = name.firstIndex(of: "."), let wildcard = table.byName["*" + name[dot...]] { return wildcard.override }
            return table.fallback.override
        }
    }

    /// Reads the directory again if its files changed. Returns what was loaded, or throws what
    /// stopped it (the old certificates stay).
    @discardableResult
    public func reloadIfChanged() throws -> Bool {
        let signature = Self.signature(path)
        guard signature != table.withLock({ $0.signature }), signature != failed.withLock({ $0 }) else { return false }
        do {
            let loaded = try Self.load(path)
            table.withLock { $0 = loaded }
            failed.withLock { $0 = nil }
            return true
        } catch {
            failed.withLock { $0 = signature }
            throw error
        }
    }

    /// Names, sizes and modification times of the directory's files.
    static func signature(_ path: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path))?.sorted() ?? []
        return names.map { name in
            var info = stat()
            guard stat(path + "/" + name, &info) == 0 else { return name }
            return "\(name):\(info.st_size):\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)"
        }
    }

    static func load(_ path: String) throws -> Table {
        let signature = signature(path)
        let files: [String]
        do {
            files = try FileManager.default.contentsOfDirectory(atPath: path).sorted()
        } catch {
            throw CertificateError("cannot read the certificate directory \(path): \(error.localizedDescription)")
        }
        var entries: [Entry] = []
        var problems: [String] = []
        for file in files where file.hasSuffix(".pem") || file.hasSuffix(".crt") {
            let base = String(file.dropLast(4))
            if base.hasSuffix("-key") || base.hasSuffix(".key") { continue }
            do {
                let chain = try NIOSSLCertificate.fromPEMFile(path + "/" + file)
                guard let leaf = chain.first else { continue }
                let keyFile = [base + ".key", base + "-key.pem", file].first { FileManager.default.fileExists(atPath: path + "/" + $0) }!
                let key = try NIOSSLPrivateKey(file: path + "/" + keyFile, format: .pem)
                var names: [String] = []
                for name in leaf._subjectAlternativeNames() where name.nameType == .dnsName {
                    names.append(String(decoding: Array(name.contents), as: UTF8.self).lowercased())
                }
                entries.append(Entry(file: file, chain: chain, key: key, names: names))
            } catch {
                problems.append("\(file): \(error)")
            }
        }
        guard !entries.isEmpty else {
            let detail = problems.isEmpty ? "no NAME.pem or NAME.crt with its NAME.key" : problems.joined(separator: "; ")
            throw CertificateError("no usable certificate in \(path) (\(detail))")
        }
        var table = Table(fallback: entries.first { $0.file.hasPrefix("default.") } ?? entries[0], signature: signature)
        for entry in entries {
            for name in entry.names where table.byName[name] == nil { table.byName[name] = entry }
        }
        return table
    }
}

public struct CertificateError: LocalizedError, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
    public var errorDescription: String? { description }
}

// MARK: - The HTTPS listener

/// Terminates TLS on `--proxy-https-port` and hands each connection's plaintext to the core.
final class HTTPSListener: Sendable {
    private let certificates: CertificateDirectory
    private let context: NIOSSLContext
    private let group: any EventLoopGroup
    private let channel = Mutex<(any Channel)?>(nil)
    private let logger: Logger

    init(certificates: CertificateDirectory, group: any EventLoopGroup, logger: Logger) throws {
        self.certificates = certificates
        self.group = group
        self.logger = logger
        let initial = certificates.override(for: nil)
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: initial.certificateChain ?? [], privateKey: initial.privateKey!)
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = ["http/1.1"]
        configuration.sslContextCallback = { values, promise in
            promise.succeed(certificates.override(for: values.serverHostname))
        }
        context = try NIOSSLContext(configuration: configuration)
    }

    /// Listens; `adopt` gets each connection's core end and the client's address. Returns the port.
    func start(host: String, port: Int, adopt: @escaping @Sendable (Int32, String) -> Void) async throws -> Int {
        let context = self.context
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let client = channel.remoteAddress?.ipAddress ?? ""
                    let handoff = TLSHandoff { [weak channel] result in
                        guard let channel else { return }
                        switch result {
                        case .failure(let error):
                            logger.debug("TLS handshake from \(client) failed: \(error)")
                        case .success:
                            Self.join(channel, client: client, adopt: adopt, logger: logger)
                        }
                    }
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    try channel.pipeline.syncOperations.addHandler(handoff)
                }
            }
        let server = try await bootstrap.bind(host: host, port: port).get()
        channel.withLock { $0 = server }
        return server.localAddress?.port ?? port
    }

    private static func join(_ channel: any Channel, client: String, adopt: @escaping @Sendable (Int32, String) -> Void, logger: Logger) {
        guard let handoff = try? channel.pipeline.syncOperations.handler(type: TLSHandoff.self) else { return }
        TLSJoin.join(channel, handoff: handoff) { result in
            switch result {
            case .success(let fd): adopt(fd, client)
            case .failure(let error):
                logger.warning("cannot hand an HTTPS connection from \(client) to the proxy: \(error)")
                channel.close(promise: nil)
            }
        }
    }

    /// Stops accepting; open connections end as the core closes their plaintext ends.
    func stop() async {
        let server = channel.withLock { channel -> (any Channel)? in
            defer { channel = nil }
            return channel
        }
        try? await server?.close()
    }
}

// MARK: - HTTPS to instances

/// How the proxy reaches an instance: plaintext, or TLS (`proto=https`), verified against the
/// system's trust roots and `--proxy-upstream-ca`, or not verified (`tlsskipverify=true`).
public enum UpstreamSecurity: Sendable, Hashable {
    case plaintext
    case tls(verify: Bool)
}

/// Opens TLS connections to instances for `proto=https` routes and hands their plaintext to a loop.
final class UpstreamTLS: Sendable {
    private let verifying: NIOSSLContext
    private let insecure: NIOSSLContext
    private let group: any EventLoopGroup
    private let logger: Logger
    /// When a failing handshake with a target was last logged.
    private let warned = Mutex<[String: ContinuousClock.Instant]>([:])

    init(caFile: String?, group: any EventLoopGroup, logger: Logger) throws {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = ["http/1.1"]
        if let caFile { configuration.additionalTrustRoots = [.file(caFile)] }
        verifying = try NIOSSLContext(configuration: configuration)
        configuration.certificateVerification = .none
        insecure = try NIOSSLContext(configuration: configuration)
        self.group = group
        self.logger = logger
    }

    /// Connects to `address` and completes the handshake (verifying the certificate against the
    /// address's IP unless `verify` is false); `completion` runs on `loop` with the core's stream.
    func connect(
        to address: SocketAddress, verify: Bool, on loop: IOLoop, timeout: TimeAmount,
        completion: @escaping (Result<Stream, SystemCallError>) -> Void
    ) {
        let done = LoopBound(completion)
        let context = verify ? verifying : insecure
        let key = "\(address.ipAddress ?? "?"):\(address.port ?? 0)"
        let logger = self.logger
        let once = Once()
        @Sendable func finish(_ result: Result<Int32, SystemCallError>) {
            guard once.first() else {
                if case .success(let fd) = result { close(fd) }
                return
            }
            loop.execute {
                switch result {
                case .success(let fd):
                    do {
                        done.value(.success(try Stream.accepted(fd: fd, loop: loop)))
                    } catch {
                        done.value(.failure(error as? SystemCallError ?? SystemCallError(errno: EIO, "adopt")))
                    }
                case .failure(let error): done.value(.failure(error))
                }
            }
        }
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handoff = TLSHandoff { result in
                        switch result {
                        case .success:
                            guard let handoff = try? channel.pipeline.syncOperations.handler(type: TLSHandoff.self) else { return }
                            TLSJoin.join(channel, handoff: handoff) { joined in
                                switch joined {
                                case .success(let fd): finish(.success(fd))
                                case .failure(let error):
                                    channel.close(promise: nil)
                                    finish(.failure(SystemCallError(errno: EIO, "TLS to \(key): \(error)")))
                                }
                            }
                        case .failure(let error):
                            self.warnOnce(key: key, "HTTPS to \(key) failed: \(error)\(verify ? " (a private CA: --proxy-upstream-ca; or tlsskipverify=true on the route)" : "")")
                            finish(.failure(SystemCallError(errno: EPROTO, "TLS handshake with \(key)")))
                        }
                    }
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(handoff)
                    // The handshake has the connect timeout too.
                    channel.eventLoop.scheduleTask(in: timeout) {
                        if (try? channel.pipeline.syncOperations.handler(type: TLSHandoff.self)) != nil { channel.close(promise: nil) }
                    }
                }
            }
        bootstrap.connect(to: address).whenFailure { error in
            let code: Int32 = if case ChannelError.connectTimeout = error { ETIMEDOUT } else { (error as? IOError)?.errnoCode ?? ECONNREFUSED }
            logger.debug("connect to \(key) failed: \(error)")
            finish(.failure(SystemCallError(errno: code, "connect")))
        }
    }

    /// True the first time only.
    private final class Once: Sendable {
        private let fired = Atomic<Bool>(false)
        func first() -> Bool { !fired.exchange(true, ordering: .relaxed) }
    }

    private func warnOnce(key: String, _ message: String) {
        let now = ContinuousClock.now
        let due = warned.withLock { warned -> Bool in
            if let last = warned[key], now - last < .seconds(10) { return false }
            if warned.count > 1000 { warned.removeAll() }
            warned[key] = now
            return true
        }
        if due { logger.warning("\(message)") }
    }
}
