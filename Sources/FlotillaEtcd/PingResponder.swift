import NIOCore
import NIOHTTP2

/// Answers the server's HTTP/2 PINGs itself, below the HTTP/2 handler.
///
/// etcd's gRPC server (grpc-go) measures the connection's bandwidth-delay product with a PING
/// after the data it receives: about one PING per request. SwiftNIO's HTTP/2 handler counts
/// inbound PING and SETTINGS frames as a denial-of-service signal (at most 200 in 30 s) and,
/// past that, closes the connection with `ENHANCE_YOUR_CALM` — so at a few requests a second
/// every call on the connection failed ("Stream unexpectedly closed") and the watches broke.
/// grpc-swift does not expose that limit. This handler sits between the socket (or TLS) and the
/// HTTP/2 handler, takes the server's PING frames out of the byte stream and writes each one's
/// ACK at the next frame boundary of the outgoing stream; every other byte passes unchanged.
final class PingResponder: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    private static let frameHeaderLength = 9
    private static let pingType: UInt8 = 6
    private static let ackFlag: UInt8 = 1

    /// Inbound bytes not yet forming a whole frame.
    private var inbound: ByteBuffer?
    /// Outbound position: the client preface still to pass, the bytes left of the current
    /// frame, and a frame header seen only in part.
    private var prefaceLeft = 24
    private var frameLeft = 0
    private var headerSeen: [UInt8] = []
    /// ACKs waiting for a frame boundary.
    private var pendingAcks: [ByteBuffer] = []

    static func install(on channel: any Channel) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            let http2 = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self)
            try channel.pipeline.syncOperations.addHandler(PingResponder(), position: .before(http2))
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if inbound == nil {
            inbound = incoming
        } else {
            inbound!.writeBuffer(&incoming)
        }
        guard var buffer = inbound else { return }
        var forward = context.channel.allocator.buffer(capacity: buffer.readableBytes)
        while buffer.readableBytes >= Self.frameHeaderLength {
            let start = buffer.readerIndex
            guard let high = buffer.getInteger(at: start, as: UInt8.self), let low = buffer.getInteger(at: start + 1, as: UInt16.self),
                let type = buffer.getInteger(at: start + 3, as: UInt8.self), let flags = buffer.getInteger(at: start + 4, as: UInt8.self)
            else { break }
            let length = Int(high) << 16 | Int(low)
            let total = Self.frameHeaderLength + length
            guard buffer.readableBytes >= total, var frame = buffer.readSlice(length: total) else { break }
            if type == Self.pingType && flags & Self.ackFlag == 0 && length == 8 {
                var ack = context.channel.allocator.buffer(capacity: total)
                ack.writeBytes([0, 0, 8, Self.pingType, Self.ackFlag, 0, 0, 0, 0])
                frame.moveReaderIndex(forwardBy: Self.frameHeaderLength)
                ack.writeBuffer(&frame)
                pendingAcks.append(ack)
            } else {
                forward.writeBuffer(&frame)
            }
        }
        inbound = buffer.readableBytes > 0 ? buffer : nil
        if forward.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(forward)) }
        if !pendingAcks.isEmpty && atBoundary {
            writeAcks(context: context)
            context.flush()
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let chunk = unwrapOutboundIn(data)
        switch chunk {
        case .byteBuffer(let buffer):
            advance(over: buffer)
        case .fileRegion(let region):
            // HTTP/2 writes a file region only as a DATA payload, inside a frame already counted.
            frameLeft = max(0, frameLeft - region.readableBytes)
        }
        context.write(data, promise: promise)
        if !pendingAcks.isEmpty && atBoundary { writeAcks(context: context) }
    }

    func flush(context: ChannelHandlerContext) {
        if !pendingAcks.isEmpty && atBoundary { writeAcks(context: context) }
        context.flush()
    }

    private var atBoundary: Bool { prefaceLeft == 0 && frameLeft == 0 && headerSeen.isEmpty }

    private func writeAcks(context: ChannelHandlerContext) {
        for ack in pendingAcks { context.write(wrapOutboundOut(.byteBuffer(ack)), promise: nil) }
        pendingAcks.removeAll()
    }

    /// Follows the outgoing bytes frame by frame.
    private func advance(over buffer: ByteBuffer) {
        var view = buffer.readableBytesView[...]
        while !view.isEmpty {
            if prefaceLeft > 0 {
                let taken = min(prefaceLeft, view.count)
                prefaceLeft -= taken
                view = view.dropFirst(taken)
            } else if frameLeft > 0 {
                let taken = min(frameLeft, view.count)
                frameLeft -= taken
                view = view.dropFirst(taken)
            } else {
                let taken = min(Self.frameHeaderLength - headerSeen.count, view.count)
                headerSeen += view.prefix(taken)
                view = view.dropFirst(taken)
                if headerSeen.count == Self.frameHeaderLength {
                    frameLeft = Int(headerSeen[0]) << 16 | Int(headerSeen[1]) << 8 | Int(headerSeen[2])
                    headerSeen.removeAll()
                }
            }
        }
    }
}
