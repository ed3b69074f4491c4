public import Logging
import NIOCore
import NIOPosix
public import ServiceLifecycle
import Synchronization

/// What the DNS server answered, by transport and response code: atomics the event loops add to
/// and `/metrics` reads.
// @unchecked: the cells are atomics, allocated once and freed with the object.
public final class DNSCounters: @unchecked Sendable {
    /// Response codes counted apart (`NOERROR`, `FORMERR`, `SERVFAIL`, `NXDOMAIN`, `NOTIMP`,
    /// `REFUSED`); any other is counted as `other`; `dropped` are packets given no answer.
    public static let codes = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other", "dropped"]
    private let cells: UnsafeMutablePointer<Atomic<UInt64>>

    public init() {
        cells = .allocate(capacity: 2 * Self.codes.count)
        for index in 0..<(2 * Self.codes.count) { (cells + index).initialize(to: Atomic(0)) }
    }

    deinit {
        cells.deinitialize(count: 2 * Self.codes.count)
        cells.deallocate()
    }

    func record(reply: [UInt8]?, udp: Bool) {
        let code: Int
        if let reply, reply.count >= 4 {
            let rcode = Int(reply[3] & 0x0F)
            code = rcode <= 5 ? rcode : 6
        } else {
            code = 7
        }
        (cells + (udp ? 0 : Self.codes.count) + code).pointee.wrappingAdd(1, ordering: .relaxed)
    }

    /// (transport, code, count) for every transport and code.
    public func counts() -> [(transport: String, code: String, count: UInt64)] {
        var result: [(String, String, UInt64)] = []
        for (offset, transport) in [(0, "udp"), (Self.codes.count, "tcp")] {
            for (index, code) in Self.codes.enumerated() {
                result.append((transport, code, (cells + offset + index).pointee.load(ordering: .relaxed)))
            }
        }
        return result
    }
}

/// Serves DNS on one port over UDP and TCP (RFC 1035 length-prefixed). Every packet is answered
/// on the event loop from the registry's latest view; nothing a client sends can stop the server.
public struct DNSServer: Service {
    let host: String
    let port: Int
    let resolver: DNSResolver
    let logger: Logger
    public let counters = DNSCounters()

    public init(host: String, port: Int, resolver: DNSResolver, logger: Logger) {
        self.host = host
        self.port = port
        self.resolver = resolver
        self.logger = logger
    }

    public func run() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let resolver = self.resolver
        let counters = self.counters
        let udp = try await DatagramBootstrap(group: group)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(DNSDatagramHandler(resolver: resolver, counters: counters)) }
            }
            .bind(host: host, port: port).get()
        let tcp: any Channel
        do {
            tcp = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSStreamFrameDecoder()))
                        try channel.pipeline.syncOperations.addHandler(DNSStreamHandler(resolver: resolver, counters: counters))
                    }
                }
                .bind(host: host, port: port).get()
        } catch {
            try? await udp.close()
            throw error
        }
        logger.info("DNS listening on \(host):\(port) (UDP and TCP) for .\(resolver.domain)")
        try? await gracefulShutdown()
        try? await udp.close()
        try? await tcp.close()
    }
}

final class DNSDatagramHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    let resolver: DNSResolver
    let counters: DNSCounters

    init(resolver: DNSResolver, counters: DNSCounters) {
        self.resolver = resolver
        self.counters = counters
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        let packet = Array(envelope.data.readableBytesView.prefix(65_535))
        let reply = resolver.respond(to: packet, udp: true)
        counters.record(reply: reply, udp: true)
        guard let reply else { return }
        let buffer = context.channel.allocator.buffer(bytes: reply)
        context.write(wrapOutboundOut(AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: buffer)), promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A send to a vanished client (ICMP unreachable) must not close the listening socket.
    }
}

/// Splits a TCP stream into DNS messages by their two-byte length prefix.
struct DNSStreamFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self),
            buffer.readableBytes >= 2 + Int(length)
        else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 2)
        let frame = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }
}

final class DNSStreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let resolver: DNSResolver
    let counters: DNSCounters

    init(resolver: DNSResolver, counters: DNSCounters) {
        self.resolver = resolver
        self.counters = counters
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let answer = resolver.respond(to: Array(frame.readableBytesView), udp: false)
        counters.record(reply: answer, udp: false)
        guard let reply = answer else {
            context.close(promise: nil)
            return
        }
        var buffer = context.channel.allocator.buffer(capacity: reply.count + 2)
        buffer.writeInteger(UInt16(reply.count))
        buffer.writeBytes(reply)
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
