import FlotillaCore
import Logging
import NIOCore
import NIOHTTP1

/// What every client connection shares: the live routes, the picker, upstream health, the
/// per-loop upstream pools, the limits and the metrics.
final class ProxyContext: Sendable {
    let routes: RouteTableBox
    let picker: Picker
    let health: UpstreamHealth
    let pools: UpstreamPools
    let readTimeout: TimeAmount
    let retryBufferLimit: Int
    let metrics: ProxyMetrics
    let logger: Logger

    init(routes: RouteTableBox, picker: Picker, health: UpstreamHealth, pools: UpstreamPools, readTimeout: TimeAmount, retryBufferLimit: Int, metrics: ProxyMetrics, logger: Logger) {
        self.routes = routes
        self.picker = picker
        self.health = health
        self.pools = pools
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
final class ProxyHandler: ChannelInboundHandler, UpstreamDelegate {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private struct Exchange {
        var head: HTTPRequestHead
        var route: Route
        var routeLabel: String
        var body: [ByteBuffer] = []
        var bodyBytes = 0
        /// Still holding every body part sent so far, so the request can be sent again.
        var replayable = true
        var ended = false
        var tried: Set<String> = []
        var attempts = 0
        var target: RouteTarget?
        var sentParts = 0
        var endSent = false
        var responseStarted = false
        var upstreamKeepAlive = true
        var clientKeepAlive: Bool
        var started: NIODeadline
    }

    private let shared: ProxyContext
    private var context: ChannelHandlerContext!
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
        clientAddress = context.channel.remoteAddress?.ipAddress ?? ""
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
                context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
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
            if let target = exchange?.target { shared.health.finished(target.key) }
        }
        upstream = nil
        exchange = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func begin(_ head: HTTPRequestHead) {
        let host = head.headers.first(name: "host") ?? ""
        let path = head.uri
        let table = shared.routes.current
        guard let route = table.match(host: host, path: String(path.split(separator: "?", maxSplits: 1).first ?? "/")) else {
            shared.metrics.record(route: "", statusClass: 4, latency: nil)
            respondLocally(.notFound, "no route for \(host)\(path)\n", head: head)
            return
        }
        let label = route.rule.host + route.rule.path
        guard !route.targets.isEmpty else {
            shared.metrics.record(route: label, statusClass: 5, latency: nil)
            respondLocally(.serviceUnavailable, "no healthy instance of \(route.services.joined(separator: ", ")) for \(label)\n", head: head)
            return
        }
        var upstreamHead = head
        upstreamHead.uri = RouteTable.upstreamPath(path, rule: route.rule)
        upstreamHead.headers = Self.forwardedHeaders(head.headers, clientAddress: clientAddress, host: host)
        if upstreamHead.version.major == 1 && upstreamHead.version.minor == 0 {
            upstreamHead.version = .http1_1
        }
        exchange = Exchange(head: upstreamHead, route: route, routeLabel: label, clientKeepAlive: head.isKeepAlive, started: .now())
        connect()
    }

    /// Leases a connection to the next untried healthy target.
    private func connect() {
        guard var current = exchange else { return }
        // Another target if there is one; the same one (on a fresh connection) otherwise.
        guard let target = shared.picker.pick(from: current.route.targets, excluding: current.tried)
            ?? shared.picker.pick(from: current.route.targets)
        else {
            fail(.badGateway, "no instance of \(current.route.services.joined(separator: ", ")) could be reached")
            return
        }
        current.tried.insert(target.key)
        current.attempts += 1
        current.target = nil
        current.sentParts = 0
        current.endSent = false
        exchange = current
        let pool = shared.pools.pool(for: context.eventLoop)
        pool.lease(host: target.host, port: target.port).hop(to: context.eventLoop).whenComplete { [self] result in
            guard exchange != nil else {
                if case .success(let connection) = result { connection.channel.close(promise: nil) }
                return
            }
            switch result {
            case .success(let connection):
                attach(connection, target: target)
            case .failure(let error):
                shared.health.connectFailed(target.key)
                shared.logger.debug("connect to \(target.key) failed: \(error)")
                retryOrFail(.badGateway, "could not connect to \(target.key): \(error)")
            }
        }
    }

    private func attach(_ connection: UpstreamConnection, target: RouteTarget) {
        upstream = connection
        connection.handler.delegate = self
        exchange!.target = target
        shared.health.started(target.key)
        connection.channel.write(HTTPClientRequestPart.head(exchange!.head), promise: nil)
        flushBody(to: connection)
        if exchange!.ended { sendEnd(to: connection) }
        connection.channel.flush()
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
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
        current.responseStarted = true
        current.upstreamKeepAlive = head.isKeepAlive
        exchange = current
        if let target = current.target { shared.health.succeeded(target.key) }
        var response = head
        response.headers = Self.withoutHopByHop(head.headers)
        if response.version.major == 1 && response.version.minor == 0 { response.version = .http1_1 }
        if !current.clientKeepAlive {
            response.headers.replaceOrAdd(name: "connection", value: "close")
            closeAfterResponse = true
        }
        context.write(wrapOutboundOut(.head(response)), promise: nil)
        shared.metrics.record(route: current.routeLabel, statusClass: Int(head.status.code) / 100, latency: .nanoseconds((NIODeadline.now() - current.started).nanoseconds))
    }

    func upstreamBody(_ body: ByteBuffer) {
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
    }

    func upstreamReadComplete() {
        context.flush()
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        context.channel.setOption(ChannelOptions.autoRead, value: writable).whenComplete { _ in }
    }

    func upstreamEnd() {
        guard let current = exchange else { return }
        let connection = upstream
        upstream = nil
        exchange = nil
        if let target = current.target { shared.health.finished(target.key) }
        if let connection {
            connection.handler.delegate = nil
            if current.upstreamKeepAlive && current.endSent {
                shared.pools.pool(for: context.eventLoop).release(connection)
            } else {
                connection.channel.close(promise: nil)
            }
        }
        let close = closeAfterResponse
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { [context] _ in
            if close { context?.close(promise: nil) }
        }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }

    func upstreamFailed(_ error: any Error) {
        guard let current = exchange, upstream != nil else { return }
        readTimeout?.cancel()
        if let target = current.target { shared.health.finished(target.key) }
        upstream = nil
        if current.responseStarted {
            // Half a response cannot be mended: end the client connection so it notices.
            exchange = nil
            context.close(promise: nil)
            return
        }
        retryOrFail(.badGateway, "\(current.target?.key ?? "upstream") closed the connection before answering")
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
        shared.metrics.record(route: current.routeLabel, statusClass: Int(status.code) / 100, latency: nil)
        shared.logger.info("\(status.code) for \(current.head.method) \(current.routeLabel): \(message)")
        if !current.ended { discarding = true }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
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

    static let hopByHop: Set<String> = ["connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"]

    /// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any the Connection header names.
    static func withoutHopByHop(_ headers: HTTPHeaders) -> HTTPHeaders {
        var named = hopByHop
        for value in headers[canonicalForm: "connection"] { named.insert(value.lowercased()) }
        var result = HTTPHeaders()
        for (name, value) in headers where !named.contains(name.lowercased()) { result.add(name: name, value: value) }
        return result
    }

    static func forwardedHeaders(_ headers: HTTPHeaders, clientAddress: String, host: String) -> HTTPHeaders {
        var result = withoutHopByHop(headers)
        if let existing = result.first(name: "x-forwarded-for"), !existing.isEmpty {
            result.replaceOrAdd(name: "X-Forwarded-For", value: existing + ", " + clientAddress)
        } else {
            result.replaceOrAdd(name: "X-Forwarded-For", value: clientAddress)
        }
        result.replaceOrAdd(name: "X-Real-IP", value: clientAddress)
        result.replaceOrAdd(name: "X-Forwarded-Proto", value: "http")
        if !host.isEmpty { result.replaceOrAdd(name: "X-Forwarded-Host", value: host) }
        return result
    }
}
