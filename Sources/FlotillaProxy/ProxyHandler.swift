import FlotillaCore
import Logging
import NIOCore
import NIOHTTP1

/// What every client connection shares: the live routes, the picker, upstream health, the
/// per-loop upstream pools, the limits and the metrics.
final class ProxyContext: Sendable {
    let routes: ProxyTableBox
    let picker: Picker
    let pools: UpstreamPools
    let readTimeout: TimeAmount
    let retryBufferLimit: Int
    let metrics: ProxyMetrics
    let noRouteMetrics: RouteMetrics
    let ejectAfter: Int
    let coolDown: Duration
    let logger: Logger

    init(
        routes: ProxyTableBox, picker: Picker, pools: UpstreamPools, readTimeout: TimeAmount, retryBufferLimit: Int, metrics: ProxyMetrics,
        ejectAfter: Int = 3, coolDown: Duration = .seconds(10), logger: Logger
    ) {
        self.routes = routes
        self.picker = picker
        self.pools = pools
        self.noRouteMetrics = metrics.forRoute("")
        self.ejectAfter = ejectAfter
        self.coolDown = coolDown
        self.readTimeout = readTimeout
        self.retryBufferLimit = retryBufferLimit
        self.metrics = metrics
        self.logger = logger
    }
}

/// One client connection: each request is matched to a route, sent to a healthy target over a
/// pooled keep-alive connection, and the response streamed back as it comes. Bodies stream both
/// ways with backpressure (a slow reader pauses the other side); nothing is buffered whole. A
/// request that could not connect, or whose connection died before any response byte, is tried
/// once more on another target while its body is still held (up to `retryBufferLimit`).
final class ProxyHandler: ChannelInboundHandler, RemovableChannelHandler, UpstreamDelegate {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private struct Exchange {
        var head: HTTPRequestHead
        var route: RouteRuntime
        var body: [ByteBuffer] = []
        var bodyBytes = 0
        /// Still holding every body part sent so far, so the request can be sent again.
        var replayable = true
        var ended = false
        var lastTried: TargetState?
        var attempts = 0
        var target: TargetState?
        var sentParts = 0
        var endSent = false
        var responseStarted = false
        var upstreamKeepAlive = true
        var clientKeepAlive: Bool
        var started: NIODeadline
        /// The protocol a WebSocket-style upgrade asks for; the connection becomes a tunnel on 101.
        var upgrade: String?
        /// The upstream's 101, held until its decoder has finished with the message.
        var switching: HTTPResponseHead?
    }

    private let shared: ProxyContext
    private var context: ChannelHandlerContext!
    private var pool: UpstreamPool!
    /// Whether this handler turned off reading on the client (to wait for the upstream).
    private var clientPaused = false
    private var exchange: Exchange?
    private var upstream: UpstreamConnection?
    private var discarding = false
    private var closeAfterResponse = false
    private var readTimeout: Scheduled<Void>?
    private var clientAddress = ""

    init(shared: ProxyContext) {
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        pool = shared.pools.pool(for: context.eventLoop)
        clientAddress = context.channel.remoteAddress?.ipAddress ?? ""
    }

    private func pauseClient() {
        guard !clientPaused else { return }
        clientPaused = true
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
    }

    private func resumeClient() {
        guard clientPaused else { return }
        clientPaused = false
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }

    // MARK: - Client side

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            begin(head)
        case .body(let body):
            guard !discarding, exchange != nil else { return }
            exchange!.bodyBytes += body.readableBytes
            exchange!.body.append(body)
            if exchange!.bodyBytes > shared.retryBufferLimit { exchange!.replayable = false }
            if let upstream, exchange!.target != nil {
                flushBody(to: upstream)
                if !exchange!.replayable {
                    // Past the replay limit: stream straight through and let the sent parts go.
                    exchange!.body.removeAll()
                    exchange!.sentParts = 0
                }
            } else if !exchange!.replayable {
                // Still connecting and over the limit: stop reading until the upstream is there.
                pauseClient()
            }
        case .end:
            if discarding {
                discarding = false
                return
            }
            guard exchange != nil else { return }
            exchange!.ended = true
            if let upstream, exchange!.target != nil { sendEnd(to: upstream) }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        upstream?.channel.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // The client reads slowly: stop reading the upstream until it catches up.
        upstream?.channel.setOption(ChannelOptions.autoRead, value: context.channel.isWritable).whenComplete { _ in }
    }

    func channelInactive(context: ChannelHandlerContext) {
        readTimeout?.cancel()
        if let upstream {
            upstream.handler.delegate = nil
            upstream.channel.close(promise: nil)
            exchange?.target?.finished()
        }
        upstream = nil
        exchange = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func begin(_ head: HTTPRequestHead) {
        let host = head.headers.first(name: "host") ?? ""
        guard let route = shared.routes.current.match(host: host, path: head.uri) else {
            shared.noRouteMetrics.record(statusClass: 4, latency: nil)
            respondLocally(.notFound, "no route for \(host)\(head.uri)\n", head: head)
            return
        }
        guard !route.targets.isEmpty else {
            route.metrics.record(statusClass: 5, latency: nil)
            respondLocally(.serviceUnavailable, "no healthy instance of \(route.services) for \(route.label)\n", head: head)
            return
        }
        var upstreamHead = head
        if route.route.rule.strip != nil || route.route.rule.prepend != nil {
            upstreamHead.uri = RouteTable.upstreamPath(head.uri, rule: route.route.rule)
        }
        Self.rewriteForUpstream(&upstreamHead.headers, clientAddress: clientAddress, host: host)
        // An upgrade (WebSocket) keeps its hop-by-hop pair: the upstream must see it to answer 101.
        let upgrade = head.headers.first(name: "upgrade").flatMap { value in
            head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" } ? value : nil
        }
        if let upgrade {
            upstreamHead.headers.add(name: "Connection", value: "Upgrade")
            upstreamHead.headers.add(name: "Upgrade", value: upgrade)
        }
        if upstreamHead.version.major == 1 && upstreamHead.version.minor == 0 {
            upstreamHead.version = .http1_1
        }
        exchange = Exchange(head: upstreamHead, route: route, clientKeepAlive: head.isKeepAlive, started: .now(), upgrade: upgrade)
        connect()
    }

    /// Leases a connection to a healthy target: another than the one that just failed, if any.
    private func connect() {
        guard var current = exchange else { return }
        guard let target = shared.picker.pick(from: current.route, excluding: current.lastTried) ?? shared.picker.pick(from: current.route) else {
            fail(.badGateway, "no instance of \(current.route.services) could be reached")
            return
        }
        let state = target.state
        current.lastTried = state
        current.attempts += 1
        current.target = nil
        current.sentParts = 0
        current.endSent = false
        exchange = current
        pool.lease(host: state.host, port: state.port).whenComplete { [self] result in
            guard exchange != nil else {
                if case .success(let connection) = result { connection.channel.close(promise: nil) }
                return
            }
            switch result {
            case .success(let connection):
                attach(connection, target: state)
            case .failure(let error):
                state.connectFailed(limit: shared.ejectAfter, coolDown: shared.coolDown)
                shared.logger.debug("connect to \(state.key) failed: \(error)")
                retryOrFail(.badGateway, "could not connect to \(state.key): \(error)")
            }
        }
    }

    private func attach(_ connection: UpstreamConnection, target: TargetState) {
        upstream = connection
        connection.handler.delegate = self
        exchange!.target = target
        target.started()
        connection.channel.write(HTTPClientRequestPart.head(exchange!.head), promise: nil)
        flushBody(to: connection)
        if exchange!.ended { sendEnd(to: connection) }
        connection.channel.flush()
        resumeClient()
        armReadTimeout()
    }

    private func flushBody(to connection: UpstreamConnection) {
        guard var current = exchange else { return }
        while current.sentParts < current.body.count {
            connection.channel.write(HTTPClientRequestPart.body(.byteBuffer(current.body[current.sentParts])), promise: nil)
            current.sentParts += 1
        }
        exchange = current
    }

    private func sendEnd(to connection: UpstreamConnection) {
        guard exchange?.endSent == false else { return }
        exchange!.endSent = true
        connection.channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
    }

    private func armReadTimeout() {
        readTimeout?.cancel()
        let timeout = shared.readTimeout
        readTimeout = context.eventLoop.scheduleTask(in: timeout) { [self] in
            guard let current = exchange, !current.responseStarted else { return }
            let target = current.target?.key ?? "?"
            dropUpstream()
            fail(.gatewayTimeout, "\(target) sent no response within \(timeout.nanoseconds / 1_000_000) ms")
        }
    }

    // MARK: - Upstream side

    func upstreamHead(_ head: HTTPResponseHead) {
        guard var current = exchange else { return }
        readTimeout?.cancel()
        if head.status == .switchingProtocols, current.upgrade != nil {
            // Switch once the decoder has delivered the whole message (its `.end` comes next).
            exchange!.switching = head
            return
        }
        current.responseStarted = true
        current.upstreamKeepAlive = head.isKeepAlive
        exchange = current
        current.target?.succeeded()
        var response = head
        Self.removeHopByHop(&response.headers)
        if response.version.major == 1 && response.version.minor == 0 { response.version = .http1_1 }
        if !current.clientKeepAlive {
            response.headers.replaceOrAdd(name: "connection", value: "close")
            closeAfterResponse = true
        }
        context.write(wrapOutboundOut(.head(response)), promise: nil)
        current.route.metrics.record(statusClass: Int(head.status.code) / 100, latency: .nanoseconds((NIODeadline.now() - current.started).nanoseconds))
    }

    func upstreamBody(_ body: ByteBuffer) {
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
    }

    func upstreamReadComplete() {
        context.flush()
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        if writable { resumeClient() } else { pauseClient() }
    }

    func upstreamEnd() {
        guard let current = exchange else { return }
        if let switching = current.switching, let connection = upstream {
            becomeTunnel(switching, to: connection)
            return
        }
        let connection = upstream
        upstream = nil
        exchange = nil
        current.target?.finished()
        if let connection {
            connection.handler.delegate = nil
            if current.upstreamKeepAlive && current.endSent {
                pool.release(connection)
            } else {
                connection.channel.close(promise: nil)
            }
        }
        let close = closeAfterResponse
        if close {
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { [context] _ in context?.close(promise: nil) }
        } else {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
        resumeClient()
    }

    func upstreamFailed(_ error: any Error) {
        guard let current = exchange, upstream != nil else { return }
        readTimeout?.cancel()
        current.target?.finished()
        upstream = nil
        if current.responseStarted {
            // Half a response cannot be mended: end the client connection so it notices.
            exchange = nil
            context.close(promise: nil)
            return
        }
        retryOrFail(.badGateway, "\(current.target?.key ?? "upstream") closed the connection before answering")
    }

    /// After a 101: forward it, then drop HTTP from both connections and relay raw bytes both
    /// ways (WebSocket and any other upgraded protocol pass through untouched).
    private func becomeTunnel(_ head: HTTPResponseHead, to connection: UpstreamConnection) {
        guard let current = exchange else { return }
        exchange = nil
        upstream = nil
        connection.handler.delegate = nil
        current.target?.finished()
        current.route.metrics.record(statusClass: 1, latency: .nanoseconds((NIODeadline.now() - current.started).nanoseconds))
        var response = head
        Self.removeHopByHop(&response.headers)
        response.headers.add(name: "Connection", value: "Upgrade")
        response.headers.add(name: "Upgrade", value: head.headers.first(name: "upgrade") ?? current.upgrade ?? "websocket")
        context.write(wrapOutboundOut(.head(response)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)

        // The relays go first in each pipeline, next to the sockets: bytes read go straight to
        // the other side and bytes written go straight out, past the HTTP handlers, which are
        // left idle. The upstream decoder may already hold bytes of the new protocol; removing it
        // hands them on, to a forwarder at the tail.
        let clientRelay = TCPRelayHandler()
        let upstreamRelay = TCPRelayHandler()
        let client = context.pipeline.syncOperations
        let server = connection.channel.pipeline.syncOperations
        do {
            try server.addHandler(upstreamRelay, position: .first)
            try client.addHandler(clientRelay, position: .first)
            TCPRelayHandler.join(clientRelay, upstreamRelay)
            server.removeHandler(connection.handler, promise: nil)
            try server.addHandler(LeftoverForwarder(relay: upstreamRelay))
            server.removeHandler(try server.handler(type: ByteToMessageHandler<HTTPResponseDecoder>.self), promise: nil)
            // The pipelining helper holds reads back while a response is open; it has no more job.
            if let pipelining = try? client.handler(type: HTTPServerPipelineHandler.self) { client.removeHandler(pipelining, promise: nil) }
        } catch {
            shared.logger.warning("could not switch \(current.route.label) to a tunnel: \(error)")
            connection.channel.close(promise: nil)
            context.close(promise: nil)
            return
        }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        connection.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        connection.channel.read()
        context.channel.read()
    }

    private func retryOrFail(_ status: HTTPResponseStatus, _ message: String) {
        guard let current = exchange else { return }
        if current.replayable && current.attempts < 2 {
            shared.metrics.retried()
            connect()
        } else {
            fail(status, message)
        }
    }

    private func dropUpstream() {
        if let upstream {
            upstream.handler.delegate = nil
            upstream.channel.close(promise: nil)
        }
        upstream = nil
    }

    /// Answers the current request with an error, consuming whatever body is still to come.
    private func fail(_ status: HTTPResponseStatus, _ message: String) {
        guard let current = exchange else { return }
        exchange = nil
        current.route.metrics.record(statusClass: Int(status.code) / 100, latency: nil)
        shared.logger.info("\(status.code) for \(current.head.method) \(current.route.label): \(message)")
        if !current.ended { discarding = true }
        resumeClient()
        writeLocal(status, message + "\n", keepAlive: current.clientKeepAlive)
    }

    private func respondLocally(_ status: HTTPResponseStatus, _ message: String, head: HTTPRequestHead) {
        discarding = true
        writeLocal(status, message, keepAlive: head.isKeepAlive)
    }

    private func writeLocal(_ status: HTTPResponseStatus, _ message: String, keepAlive: Bool) {
        var headers = HTTPHeaders([("content-type", "text/plain; charset=utf-8"), ("content-length", "\(message.utf8.count)")])
        if !keepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: message)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { [context] _ in
            if !keepAlive { context?.close(promise: nil) }
        }
    }

    // MARK: - Headers

    static let hopByHop = ["connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"]

    /// Removes hop-by-hop headers in place (RFC 9110 §7.6.1), including any the Connection header names.
    static func removeHopByHop(_ headers: inout HTTPHeaders) {
        let named = headers[canonicalForm: "connection"]
        for name in hopByHop where headers.contains(name: name) { headers.remove(name: name) }
        for name in named where !name.isEmpty { headers.remove(name: String(name)) }
    }

    static func withoutHopByHop(_ headers: HTTPHeaders) -> HTTPHeaders {
        var copy = headers
        removeHopByHop(&copy)
        return copy
    }

    /// Hop-by-hop headers out, forwarding headers in: `X-Forwarded-For` (appended to), `X-Real-IP`,
    /// `X-Forwarded-Proto`, `X-Forwarded-Host`.
    static func rewriteForUpstream(_ headers: inout HTTPHeaders, clientAddress: String, host: String) {
        removeHopByHop(&headers)
        if let existing = headers.first(name: "x-forwarded-for"), !existing.isEmpty {
            headers.replaceOrAdd(name: "X-Forwarded-For", value: existing + ", " + clientAddress)
        } else {
            headers.add(name: "X-Forwarded-For", value: clientAddress)
        }
        headers.replaceOrAdd(name: "X-Real-IP", value: clientAddress)
        headers.replaceOrAdd(name: "X-Forwarded-Proto", value: "http")
        if !host.isEmpty { headers.replaceOrAdd(name: "X-Forwarded-Host", value: host) }
    }

    static func forwardedHeaders(_ headers: HTTPHeaders, clientAddress: String, host: String) -> HTTPHeaders {
        var copy = headers
        rewriteForUpstream(&copy, clientAddress: clientAddress, host: host)
        return copy
    }
}
