import NIOCore

/// Glues two channels: bytes read on one are written to the other. When one side cannot keep up
/// (not writable), the other stops reading; when either closes, both do.
final class TCPRelayHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    var partner: TCPRelayHandler?
    private var context: ChannelHandlerContext?
    private var pending: [ByteBuffer] = []

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        if let partner { partner.send(bytes) } else { pending.append(bytes) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner?.context?.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        partner?.context?.channel.setOption(ChannelOptions.autoRead, value: context.channel.isWritable).whenComplete { _ in }
    }

    func channelInactive(context: ChannelHandlerContext) {
        partner?.context?.close(promise: nil)
        partner = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func send(_ bytes: ByteBuffer) {
        context?.write(wrapOutboundOut(bytes), promise: nil)
    }

    /// Pairs the two sides and hands over what arrived before the pairing.
    static func join(_ client: TCPRelayHandler, _ upstream: TCPRelayHandler) {
        client.partner = upstream
        upstream.partner = client
        for bytes in client.pending { upstream.send(bytes) }
        client.pending.removeAll()
        upstream.context?.flush()
    }
}
