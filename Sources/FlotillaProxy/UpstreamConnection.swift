import NIOCore
import NIOHTTP1
import NIOPosix

/// Receives what an upstream connection produces while it is leased to one client request.
protocol UpstreamDelegate: AnyObject {
    func upstreamHead(_ head: HTTPResponseHead)
    func upstreamBody(_ body: ByteBuffer)
    func upstreamEnd()
    func upstreamReadComplete()
    func upstreamWritabilityChanged(_ writable: Bool)
    /// The connection failed or closed before the response ended.
    func upstreamFailed(_ error: any Error)
}

/// One keep-alive connection to an upstream, used by one request at a time on its event loop.
final class UpstreamConnection {
    let channel: any Channel
    let key: String
    fileprivate(set) var handler: UpstreamHandler
    var idleSince: NIODeadline = .now()

    init(channel: any Channel, key: String, handler: UpstreamHandler) {
        self.channel = channel
        self.key = key
        self.handler = handler
    }

    var isUsable: Bool { channel.isActive && !handler.closed }
}

/// The upstream side of the pipeline: response parts go to whoever leased the connection.
final class UpstreamHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    weak var delegate: (any UpstreamDelegate)?
    var closed = false
    /// Told when an idle connection goes away, so the pool forgets it.
    var onClose: (() -> Void)?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): delegate?.upstreamHead(head)
        case .body(let body): delegate?.upstreamBody(body)
        case .end: delegate?.upstreamEnd()
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        delegate?.upstreamReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        delegate?.upstreamWritabilityChanged(context.channel.isWritable)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        let delegate = self.delegate
        self.delegate = nil
        delegate?.upstreamFailed(ChannelError.eof)
        onClose?()
        onClose = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        closed = true
        let delegate = self.delegate
        self.delegate = nil
        delegate?.upstreamFailed(error)
        context.close(promise: nil)
    }
}

/// Idle upstream connections of one event loop, by `host:port`. Touched only on its loop.
final class UpstreamPool {
    let eventLoop: any EventLoop
    let connectTimeout: TimeAmount
    let maximumIdlePerTarget: Int
    private var idle: [String: [UpstreamConnection]] = [:]

    init(eventLoop: any EventLoop, connectTimeout: TimeAmount, maximumIdlePerTarget: Int = 128) {
        self.eventLoop = eventLoop
        self.connectTimeout = connectTimeout
        self.maximumIdlePerTarget = maximumIdlePerTarget
    }

    /// An idle connection to `host:port`, or a new one.
    func lease(host: String, port: Int) -> EventLoopFuture<UpstreamConnection> {
        let key = "\(host):\(port)"
        while var list = idle[key], let connection = list.popLast() {
            idle[key] = list.isEmpty ? nil : list
            if connection.isUsable {
                connection.handler.onClose = nil
                return eventLoop.makeSucceededFuture(connection)
            }
        }
        let handler = UpstreamHandler()
        return ClientBootstrap(group: eventLoop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.allowRemoteHalfClosure, value: false)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Bytes after a 101 belong to the upgraded protocol: keep them for the tunnel.
                    try channel.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .forwardBytes)
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port)
            .map { channel in UpstreamConnection(channel: channel, key: key, handler: handler) }
    }

    /// Returns a connection whose last response ended cleanly; it serves the next request.
    func release(_ connection: UpstreamConnection) {
        connection.handler.delegate = nil
        guard connection.isUsable, (idle[connection.key]?.count ?? 0) < maximumIdlePerTarget else {
            connection.channel.close(promise: nil)
            return
        }
        // A slow client may have paused reading on it: an idle connection must read, both to get
        // the next response and to notice the upstream closing it.
        connection.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        connection.channel.read()
        connection.idleSince = .now()
        connection.handler.onClose = { [weak self, weak connection] in
            guard let self, let connection else { return }
            self.idle[connection.key]?.removeAll { $0 === connection }
        }
        idle[connection.key, default: []].append(connection)
    }

    /// Closes idle connections to targets no longer routed to, and ones idle for too long.
    func prune(keeping live: Set<String>, idleLimit: TimeAmount) {
        let cutoff = NIODeadline.now() - idleLimit
        for (key, connections) in idle {
            var kept: [UpstreamConnection] = []
            for connection in connections {
                if live.contains(key) && connection.idleSince > cutoff && connection.isUsable {
                    kept.append(connection)
                } else {
                    connection.handler.onClose = nil
                    connection.channel.close(promise: nil)
                }
            }
            idle[key] = kept.isEmpty ? nil : kept
        }
    }
}
