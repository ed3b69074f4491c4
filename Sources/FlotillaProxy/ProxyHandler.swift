import FlotillaCore
import Logging
import NIOCore

/// What every client connection shares: the live routes, the picker, upstream health, the
/// limits, the metrics and the access log.
final class ProxyContext: Sendable {
    let routes: ProxyTableBox
    let picker: Picker
    let connectTimeout: TimeAmount
    let readTimeout: TimeAmount
    let idleTimeout: TimeAmount
    let retryBufferLimit: Int
    let metrics: ProxyMetrics
    let noRouteMetrics: RequestCounters
    let ejectAfter: Int
    let coolDown: Duration
    let accessLog: AccessLog?
    /// TLS to `proto=https` instances.
    let upstreamTLS: UpstreamTLS?
    let logger: Logger
    /// Requests in flight per target are counted only for least-connections, the one strategy
    /// that reads them: the counters are shared by every event loop, and an atomic that two
    /// cores write on every request is not free.
    let countsInFlight: Bool

    init(
        routes: ProxyTableBox, picker: Picker, connectTimeout: TimeAmount, readTimeout: TimeAmount,
        idleTimeout: TimeAmount = .seconds(75), retryBufferLimit: Int,
        metrics: ProxyMetrics, ejectAfter: Int = 3, coolDown: Duration = .seconds(10), accessLog: AccessLog? = nil,
        upstreamTLS: UpstreamTLS? = nil, logger: Logger
    ) {
        self.upstreamTLS = upstreamTLS
        self.routes = routes
        self.picker = picker
        self.connectTimeout = connectTimeout
        self.readTimeout = readTimeout
        self.idleTimeout = idleTimeout
        self.retryBufferLimit = retryBufferLimit
        self.metrics = metrics
        self.noRouteMetrics = metrics.forRoute("")
        self.ejectAfter = ejectAfter
        self.coolDown = coolDown
        self.accessLog = accessLog
        self.logger = logger
        countsInFlight = picker.strategy == .leastConnections
    }
}

/// One client connection, as an HTTP/1.1 proxy that relays bytes: each request head is parsed in
/// place, matched to a route and rewritten for the upstream (hop-by-hop headers out, forwarding
/// headers in); bodies go through untouched, chunked framing included, as slices of the buffers
/// they arrived in. Responses come back the same way. Pooled keep-alive connections per event
/// loop; backpressure both ways (a slow reader pauses the other side); nothing is buffered whole.
///
/// A request that could not connect, or whose connection died before any response byte, is tried
/// once more on another target while its body is still held (up to `retryBufferLimit`).
/// Pipelined requests wait their turn. After a 101 both connections become a raw tunnel.
final class ProxyHandler: StreamDelegate, UpstreamDelegate, Draining {

    private enum Input {
        case head
        case body(BodyFramer)
        /// The rest of a body whose request was already answered.
        case discard(BodyFramer)
        case tunnel
        /// Nothing more is read: the connection closes once its answer is out.
        case closing
    }

    /// One request on its way through. A class: it is updated in place on every event, never copied.
    private final class Exchange {
        let id: UInt64
        let upstreamHead: ByteBuffer
        let headRequest: Bool
        let route: RouteRuntime
        let clientKeepAlive: Bool
        let clientHTTP10: Bool
        let started: NIODeadline
        let upgrade: String?
        let connectTimeout: TimeAmount
        let readTimeout: TimeAmount
        var body: [ByteBuffer] = []
        var bodyBytes = 0
        /// Still holding every body part sent so far, so the request can be sent again.
        var replayable = true
        /// Every byte of the request has arrived from the client.
        var requestComplete: Bool
        var lastTried: TargetState?
        var attempts = 0
        var target: TargetState?
        /// Where the answer is counted besides the route: the picked instance's app, or the
        /// route's own app until one is picked.
        var app: RequestCounters?
        var sentParts = 0
        var responseStarted = false
        var status = 0
        var responseBytes = 0
        var upstreamLatency: Double?
        var log: AccessLog.Entry?

        init(
            id: UInt64, upstreamHead: ByteBuffer, headRequest: Bool, route: RouteRuntime, clientKeepAlive: Bool, clientHTTP10: Bool,
            started: NIODeadline, upgrade: String?, connectTimeout: TimeAmount, readTimeout: TimeAmount, requestComplete: Bool, log: AccessLog.Entry?
        ) {
            self.id = id
            self.upstreamHead = upstreamHead
            self.headRequest = headRequest
            self.route = route
            self.clientKeepAlive = clientKeepAlive
            self.clientHTTP10 = clientHTTP10
            self.started = started
            self.upgrade = upgrade
            self.connectTimeout = connectTimeout
            self.readTimeout = readTimeout
            self.requestComplete = requestComplete
            self.log = log
            app = route.soleApp
        }
    }

    static let maximumHeadSize = 64 * 1024
    /// A locally answered request's body is read and dropped up to this size; past it the
    /// connection is closed instead.
    static let discardLimit: Int64 = 64 * 1024

    private let shared: ProxyContext
    private let client: Stream
    private let loop: IOLoop
    private let pool: UpstreamPool
    private let clientAddress: String
    /// The client came over the HTTPS listener.
    private let secure: Bool
    private let allocator: ByteBufferAllocator
    private var clientWritable = true
    private var clientNeedsFlush = false
    private var input = Input.head
    private var pending: ByteBuffer?
    private var scanner = HeadScanner(limit: ProxyHandler.maximumHeadSize)
    private var head = HTTP1Head()
    private let emptyBuffer = ByteBuffer()
    private var exchange: Exchange?
    private var nextExchangeID: UInt64 = 0
    private var upstream: UpstreamConnection?
    private var closeAfterResponse = false
    /// The proxy is shutting down: the request under way is answered, with `Connection: close`,
    /// and the connection closes after it.
    private var draining = false
    /// A response head not written yet: a small body that follows goes out in the same write.
    private var heldHead: ByteBuffer?
    private var readPaused = false
    private var upstreamBlocked = false
    /// Waiting for a response head since; one timer per connection, re-armed lazily.
    private var waitingSince: NIODeadline?
    private var timer: IOTimer?
    private var timerDue = NIODeadline.distantFuture
    private var idleCheck: IOTimer?
    private var readsSinceCheck = 0
    private var writesSinceCheck = 0
    private var closingChecks = 0
    /// When the head now arriving in pieces began, if one is.
    private var headStarted: NIODeadline?

    /// Takes over an accepted client connection.
    init(shared: ProxyContext, loop: IOLoop, client: Stream, clientAddress: String, secure: Bool = false) {
        self.shared = shared
        self.secure = secure
        self.loop = loop
        self.client = client
        self.clientAddress = clientAddress
        pool = loop.pool
        allocator = loop.allocator
        client.delegate = self
        shared.metrics.connectionOpened(shard: loop.index)
        scheduleIdleCheck()
    }

    /// An answer given without an instance: counted on the route and on its app, if it has one.
    private func record(_ route: RouteRuntime, statusClass: Int) {
        route.metrics.record(statusClass: statusClass, latencyNanoseconds: nil, shard: loop.index)
        route.soleApp?.record(statusClass: statusClass, latencyNanoseconds: nil, shard: loop.index)
    }

    private func scheduleIdleCheck() {
        idleCheck = loop.schedule(in: shared.idleTimeout) { [self] in
            idleCheck = nil
            checkIdle()
            if client.isOpen { scheduleIdleCheck() }
        }
    }

    /// Runs every `idleTimeout`, and counts reads and writes rather than reading the clock, so the
    /// request path stays free of it; what it judges goes within one to two periods.
    /// - Between requests, a connection that sent nothing for a whole period is closed, and one
    ///   whose head is late (begun a period ago, or stalled) gets a 408 first (slow loris).
    /// - A response under way that moved no byte either way for a whole period (a stalled
    ///   upstream, or a client that stopped reading) ends both connections, as nginx's
    ///   `proxy_read_timeout` and `send_timeout` do. Waiting for a response head is the read
    ///   timeout's business, and WebSocket tunnels are never cut.
    /// - A connection closing once its last bytes are out, whose client does not take them for a
    ///   period, is closed anyway.
    private func checkIdle() {
        let reads = readsSinceCheck
        let writes = writesSinceCheck
        readsSinceCheck = 0
        writesSinceCheck = 0
        if case .closing = input {
            closingChecks += 1
            if closingChecks >= 2 { client.close() }
            return
        }
        if let current = exchange {
            if !current.requestComplete, reads == 0 {
                // The client stopped in the middle of its upload.
                shared.logger.info("closing a stalled upload to \(current.route.label)")
                if current.responseStarted {
                    abort()
                } else {
                    fail(status: 408, "the request body stopped arriving")
                }
                return
            }
            if current.responseStarted, reads == 0, writes == 0, case .head = input {
                shared.logger.info("closing a stalled response of \(current.route.label) from \(current.target?.key ?? "upstream")")
                abort()
            }
            return
        }
        let partialHead = (pending?.readableBytes ?? 0) > 0
        // A head trickling in byte by byte still counts as reads: it is judged by when it began.
        let headLate = partialHead && headStarted.map { NIODeadline.now() - $0 >= shared.idleTimeout } ?? false
        guard reads == 0 || headLate else { return }
        switch input {
        case .head, .discard:
            if partialHead {
                writeLocal(status: 408, message: "the request head did not arrive in time", close: true, headRequest: false)
            } else {
                input = .closing
                client.close()
            }
        case .body, .tunnel, .closing:
            break
        }
    }

    // MARK: - Reading from the client

    /// Reading pauses while the upstream cannot take more, while a pipelined request waits for
    /// the current response, and while an unreplayable body waits for its upstream connection.
    private func updateReading() {
        var pause = upstreamBlocked
        if let current = exchange {
            if (pending?.readableBytes ?? 0) > 0, case .head = input { pause = true }
            if upstream == nil && !current.replayable { pause = true }
        }
        guard pause != readPaused else { return }
        readPaused = pause
        client.setReading(!pause)
    }

    func streamRead(_ received: ByteBuffer) {
        var bytes = received
        readsSinceCheck &+= 1
        switch input {
        case .tunnel:
            upstream?.handler.send(bytes)
            return
        case .closing:
            return
        default:
            break
        }
        if var held = pending.take(), held.readableBytes > 0 {
            held.writeBuffer(&bytes)
            bytes = held
        }
        process(bytes)
    }

    func streamReadComplete() {
        upstream?.handler.flush()
    }

    /// Works through what the client sent, then sends on whatever it wrote upstream: bytes taken
    /// from `pending` (pipelined requests) arrive with no read, so no `streamReadComplete` flushes
    /// them.
    private func process(_ received: ByteBuffer) {
        consume(received)
        upstream?.handler.flush()
    }

    private func consume(_ received: ByteBuffer) {
        var bytes = received
        while bytes.readableBytes > 0 {
            switch input {
            case .closing:
                return
            case .tunnel:
                upstream?.handler.send(bytes)
                return
            case .head:
                if exchange != nil {
                    // A pipelined request: it waits for the current response.
                    pending = bytes
                    updateReading()
                    return
                }
                // Empty lines before a request line are ignored (RFC 9112 §2.2).
                while let byte = bytes.getInteger(at: bytes.readerIndex, as: UInt8.self), byte == 0x0D || byte == 0x0A {
                    bytes.moveReaderIndex(forwardBy: 1)
                }
                guard bytes.readableBytes > 0 else { return }
                let length: Int
                switch scanner.scan(bytes) {
                case .incomplete:
                    pending = bytes
                    // A head arriving in pieces must be whole within the idle timeout: the clock is
                    // read only on this (rare) path.
                    if headStarted == nil { headStarted = .now() }
                    return
                case .tooLarge:
                    reject(HTTP1Error(status: 431, reason: "request head larger than \(Self.maximumHeadSize / 1024) KiB"))
                    return
                case .complete(let found):
                    length = found
                }
                headStarted = nil
                head.bytes = bytes.readSlice(length: length)!
                do {
                    try HTTP1Parser.parseRequest(&head)
                } catch {
                    reject(error)
                    return
                }
                begin()
                // The head has been rewritten: let go of the read buffer so the loop can reuse it.
                head.bytes = emptyBuffer
            case .body(var framer):
                let taken: Int
                do {
                    taken = try bytes.withUnsafeReadableBytes { bytes throws(HTTP1Error) in try framer.consume(bytes) }
                } catch {
                    bodyFailed(error)
                    return
                }
                let slice = bytes.readSlice(length: taken)!
                input = framer.isComplete ? .head : .body(framer)
                requestBody(slice, complete: framer.isComplete)
            case .discard(var framer):
                let taken: Int
                do {
                    taken = try bytes.withUnsafeReadableBytes { bytes throws(HTTP1Error) in try framer.consume(bytes) }
                } catch {
                    input = .closing
                    client.close()
                    return
                }
                bytes.moveReaderIndex(forwardBy: taken)
                input = framer.isComplete ? .head : .discard(framer)
            }
        }
    }

    /// A request head has been parsed into `head`: route it, or answer it here.
    private func begin() {
        var host = head.hostValue
        var path = head.target
        var absoluteForm = false
        if !path.hasPrefix("/"), let colon = path.firstIndex(of: ":"), path[..<colon].allSatisfy(\.isLetter),
            path[colon...].hasPrefix("://")
        {
            // Absolute form (`GET http://host/path`): the authority is the host.
            let rest = path[path.index(colon, offsetBy: 3)...]
            let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
            host = String(rest[..<slash])
            path = rest[slash...].isEmpty ? "/" : (rest[slash] == "?" ? "/" + rest[slash...] : String(rest[slash...]))
            absoluteForm = true
        }
        let framing: BodyFramer.Framing? = head.chunked ? .chunked : head.contentLength.flatMap { $0 > 0 ? .length($0) : nil }
        let keepAlive = head.keepAlive
        let headRequest = head.isHeadRequest
        let started = NIODeadline.now()
        var log: AccessLog.Entry?
        if shared.accessLog != nil {
            var referer = ""
            var userAgent = ""
            for field in head.fields where field.kind == .other {
                let name = head.name(of: field).lowercased()
                if name == "referer" { referer = head.value(of: field) } else if name == "user-agent" { userAgent = head.value(of: field) }
            }
            log = AccessLog.Entry(
                client: clientAddress, method: head.method, target: head.target, version: head.minorVersion, status: 0, bytes: 0,
                referer: referer, userAgent: userAgent, route: "", upstream: "", upstreamSeconds: nil, totalSeconds: 0)
        }

        if head.methodEnd == 7, head.method == "CONNECT" {
            // Not a forward proxy: a tunnel to an arbitrary host is never routed.
            shared.noRouteMetrics.record(statusClass: 4, latencyNanoseconds: nil, shard: loop.index)
            answer(405, "CONNECT is not supported: this is a reverse proxy", keepAlive: false, headRequest: false, body: framing, log: log, started: started)
            return
        }
        guard let route = pool.table(from: shared.routes).match(host: host, path: path) else {
            shared.noRouteMetrics.record(statusClass: 4, latencyNanoseconds: nil, shard: loop.index)
            answer(404, "no route for \(host)\(path)", keepAlive: keepAlive, headRequest: headRequest, body: framing, log: log, started: started)
            return
        }
        if let access = route.route.rule.access, let refused = refusedAddress(access) {
            record(route, statusClass: 4)
            log?.route = route.label
            answer(
                403, "\(refused) may not use \(route.label)", keepAlive: keepAlive, headRequest: headRequest, body: framing, log: log,
                started: started)
            return
        }
        if let redirect = route.route.rule.redirect {
            record(route, statusClass: 3)
            log?.route = route.label
            let location = redirect.location(for: path)
            answer(
                redirect.status, "moved to \(location)", keepAlive: keepAlive, headRequest: headRequest, body: framing, log: log,
                started: started, location: location)
            return
        }
        guard !route.targets.isEmpty else {
            record(route, statusClass: 5)
            log?.route = route.label
            answer(
                503, "no healthy instance of \(route.services) for \(route.label)", keepAlive: keepAlive, headRequest: headRequest, body: framing,
                log: log, started: started)
            return
        }
        let target: String? = route.rewritesPath ? RouteTable.upstreamPath(path, rule: route.route.rule) : (absoluteForm ? path : nil)
        let upgrade = head.connectionUpgrade ? head.upgradeValue : nil
        let upstreamHead = HeadWriter.upstreamRequest(
            head, target: target, authority: absoluteForm ? host : nil, clientAddress: clientAddress, secure: secure, upgrade: upgrade,
            allocator: allocator)
        log?.route = route.label
        nextExchangeID &+= 1
        exchange = Exchange(
            id: nextExchangeID, upstreamHead: upstreamHead, headRequest: headRequest, route: route, clientKeepAlive: keepAlive,
            clientHTTP10: head.minorVersion == 0, started: started, upgrade: upgrade,
            connectTimeout: route.connectTimeout ?? shared.connectTimeout, readTimeout: route.readTimeout ?? shared.readTimeout,
            requestComplete: framing == nil, log: log)
        if let framing { input = .body(BodyFramer(framing)) }
        connect()
    }

    private func requestBody(_ slice: ByteBuffer, complete: Bool) {
        guard exchange != nil else { return }
        if complete { exchange!.requestComplete = true }
        if slice.readableBytes > 0 {
            exchange!.body.append(slice)
            exchange!.bodyBytes += slice.readableBytes
            if exchange!.bodyBytes > shared.retryBufferLimit { exchange!.replayable = false }
        }
        if let upstream, exchange!.target != nil {
            flushBody(to: upstream)
            // The response is awaited from the moment the whole request is out, however long the
            // upload took.
            if complete && exchange!.status == 0 { startWaiting() }
        }
        updateReading()
    }

    /// The request body's framing is broken: answer 400 if nothing was answered yet, then close.
    private func bodyFailed(_ error: HTTP1Error) {
        input = .closing
        if let current = exchange, !current.responseStarted {
            fail(status: 400, "\(error.reason)")
        } else {
            client.close()
        }
    }

    /// A head that cannot be parsed: a 4xx/5xx and the connection closes (its framing is lost).
    private func reject(_ error: HTTP1Error) {
        shared.noRouteMetrics.record(statusClass: error.status / 100, latencyNanoseconds: nil, shard: loop.index)
        shared.logger.debug("rejected a request from \(clientAddress): \(error.reason)")
        writeLocal(status: error.status, message: error.reason, close: true, headRequest: false)
    }

    /// The first address of this request an `allow=`/`deny=` rule refuses: the connection's, then
    /// each in `X-Forwarded-For`; nil when all pass.
    private func refusedAddress(_ access: RouteAccess) -> String? {
        if !access.permits(clientAddress) { return clientAddress }
        for field in head.fields where field.kind == .xForwardedFor {
            for address in head.value(of: field).split(separator: ",") {
                let blank: (Character) -> Bool = { $0 == " " || $0 == "\t" }
                let trimmed = String(address.drop(while: blank).reversed().drop(while: blank).reversed())
                if !trimmed.isEmpty, !access.permits(trimmed) { return trimmed }
            }
        }
        return nil
    }

    /// Answers a request here (404, 503, 403, a redirect), dropping whatever body comes with it.
    private func answer(
        _ status: Int, _ message: String, keepAlive: Bool, headRequest: Bool, body: BodyFramer.Framing?, log: AccessLog.Entry?, started: NIODeadline,
        location: String? = nil
    ) {
        var close = !keepAlive
        if let body {
            // A client waiting for `100 Continue` may never send its body: the connection's framing
            // would be lost, so it closes rather than waiting to discard.
            if case .length(let length) = body, length <= Self.discardLimit, !head.expectContinue {
                input = .discard(BodyFramer(body))
            } else {
                close = true
            }
        }
        if var log {
            log.status = status
            log.totalSeconds = Self.seconds(since: started)
            shared.accessLog?.record(log)
        }
        writeLocal(status: status, message: message, close: close, headRequest: headRequest, location: location)
    }

    // MARK: - Connecting upstream

    /// Leases a connection to a healthy target: another than the one that just failed, if any.
    private func connect() {
        guard let current = exchange else { return }
        guard let picked = shared.picker.pick(from: current.route, excluding: current.lastTried) ?? shared.picker.pick(from: current.route) else {
            fail(status: 502, "no instance of \(current.route.services) could be reached")
            return
        }
        let state = picked.state
        current.lastTried = state
        if let app = picked.app { current.app = app }
        current.attempts += 1
        current.target = nil
        current.sentParts = 0
        if let connection = pool.takeIdle(state.key) {
            attach(connection, target: state, sentAt: current.attempts == 1 ? current.started : .now())
            return
        }
        let id = current.id
        let attempt = current.attempts
        pool.connect(
            host: state.host, port: state.port, key: state.key, security: state.security, tls: shared.upstreamTLS, timeout: current.connectTimeout
        ) { [self] result in
            guard let now = exchange, now.id == id, now.attempts == attempt, upstream == nil else {
                if case .success(let connection) = result { connection.handler.close() }
                return
            }
            switch result {
            case .success(let connection):
                attach(connection, target: state, sentAt: .now())
            case .failure(let error):
                state.connectFailed(limit: shared.ejectAfter, coolDown: shared.coolDown)
                shared.logger.debug("connect to \(state.key) failed: \(error)")
                retryOrFail(502, "could not connect to \(state.key): \(error)")
            }
        }
    }

    private func attach(_ connection: UpstreamConnection, target: TargetState, sentAt: NIODeadline) {
        upstream = connection
        connection.handler.delegate = self
        exchange!.target = target
        if shared.countsInFlight { target.started() }
        connection.handler.sendRequest(exchange!.upstreamHead, headRequest: exchange!.headRequest)
        flushBody(to: connection)
        connection.handler.flush()
        if clientWritable { connection.handler.resumeReading() } else { connection.handler.pauseReading() }
        upstreamBlocked = !connection.handler.isWritable
        // A request still uploading is not yet waiting for its answer (see `requestBody`).
        if exchange!.requestComplete { startWaiting(since: sentAt) } else { waitingSince = nil }
        updateReading()
    }

    private func flushBody(to connection: UpstreamConnection) {
        guard let current = exchange else { return }
        while current.sentParts < current.body.count {
            connection.handler.send(current.body[current.sentParts])
            current.sentParts += 1
        }
        if !current.replayable {
            // Past the replay limit: stream straight through and let the sent parts go.
            current.body.removeAll()
            current.sentParts = 0
        }
    }

    private func retryOrFail(_ status: Int, _ message: String) {
        guard let current = exchange else { return }
        if current.replayable && current.attempts < 2 {
            shared.metrics.retried(shard: loop.index)
            connect()
        } else {
            fail(status: status, message)
        }
    }

    // MARK: - The read timeout

    private func startWaiting(since now: NIODeadline = .now()) {
        guard let current = exchange else { return }
        waitingSince = now
        let due = now + current.readTimeout
        if timer == nil || timerDue > due { arm(at: due) }
    }

    private func arm(at due: NIODeadline) {
        timer?.cancel()
        timerDue = due
        timer = loop.schedule(at: due) { [self] in
            timer = nil
            timerDue = .distantFuture
            guard let since = waitingSince, let current = exchange else { return }
            let deadline = since + current.readTimeout
            if NIODeadline.now() < deadline {
                arm(at: deadline)
                return
            }
            let target = current.target?.key ?? "the upstream"
            fail(status: 504, "\(target) sent no response within \(current.readTimeout.nanoseconds / 1_000_000) ms")
        }
    }

    // MARK: - Upstream side

    func upstreamInterim(_ response: HTTP1Head) {
        guard exchange != nil else { return }
        exchange!.responseStarted = true
        if !exchange!.clientHTTP10 {
            writeToClient(HeadWriter.clientResponse(response, connection: .interim, allocator: allocator))
            flushClient()
        }
        // After `100 Continue` the client uploads: the wait for the final answer starts when the
        // request is complete. Once it is, interim responses do not extend the wait (an instance
        // sending endless 103s still gets its 504).
        if !exchange!.requestComplete { waitingSince = nil }
    }

    func upstreamHead(_ response: HTTP1Head) {
        guard let current = exchange, let connection = upstream else { return }
        waitingSince = nil
        current.target?.succeeded()
        current.responseStarted = true
        current.status = response.status
        let latency = NIODeadline.now() - current.started
        current.upstreamLatency = Double(latency.nanoseconds) / 1e9
        let nanoseconds = UInt64(max(0, latency.nanoseconds))
        current.route.metrics.record(statusClass: response.status / 100, latencyNanoseconds: nanoseconds, shard: loop.index)
        current.app?.record(statusClass: response.status / 100, latencyNanoseconds: nanoseconds, shard: loop.index)
        if response.status == 101 {
            guard let upgrade = current.upgrade else {
                shared.logger.info("\(current.target?.key ?? "upstream") switched protocols without being asked")
                abort()
                return
            }
            becomeTunnel(response, upgrade: upgrade, connection: connection)
            return
        }
        let close = !current.clientKeepAlive || !current.requestComplete || connection.handler.responseEndsWithClose || draining
        closeAfterResponse = close
        let options: HeadWriter.ClientConnection = close ? .close : (current.clientHTTP10 ? .keepAliveHTTP10 : .persistent)
        let small = response.contentLength.map { $0 <= Self.coalesceLimit } ?? false
        heldHead = HeadWriter.clientResponse(
            response, connection: options, extraCapacity: small ? Int(response.contentLength!) : 0, allocator: allocator)
    }

    /// Bodies up to this size leave in the same write (one syscall, one packet) as their head.
    static let coalesceLimit: Int64 = 8 * 1024

    func upstreamBody(_ body: ByteBuffer) {
        guard exchange != nil, body.readableBytes > 0 else { return }
        exchange!.responseBytes += body.readableBytes
        if var head = heldHead.take() {
            if body.readableBytes <= Self.coalesceLimit {
                head.writeImmutableBuffer(body)
                writeToClient(head)
                return
            }
            writeToClient(head)
        }
        writeToClient(body)
    }

    private func writeHeldHead() {
        if let head = heldHead.take() { writeToClient(head) }
    }

    func upstreamReadComplete() {
        writeHeldHead()
        flushClient()
    }

    private func writeToClient(_ bytes: ByteBuffer) {
        writesSinceCheck &+= 1
        clientNeedsFlush = true
        client.write(bytes)
    }

    private func flushClient() {
        guard clientNeedsFlush else { return }
        clientNeedsFlush = false
        client.flush()
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        upstreamBlocked = !writable
        updateReading()
    }

    func streamWritabilityChanged(_ writable: Bool) {
        // The client reads slowly: stop reading the upstream until it catches up.
        clientWritable = writable
        if clientWritable { upstream?.handler.resumeReading() } else { upstream?.handler.pauseReading() }
    }

    func upstreamEnd(reusable: Bool) {
        guard let current = exchange else { return }
        let connection = upstream
        upstream = nil
        exchange = nil
        if shared.countsInFlight { current.target?.finished() }
        if let connection {
            connection.handler.delegate = nil
            if reusable && current.requestComplete && !draining {
                pool.release(connection)
            } else {
                connection.handler.close()
            }
        }
        logExchange(current, status: current.status, upstream: current.target)
        upstreamBlocked = false
        writeHeldHead()
        if closeAfterResponse || draining {
            finish()
            return
        }
        flushClient()
        updateReading()
        if let next = pending.take(), next.readableBytes > 0 { process(next) }
    }

    func upstreamTunnel(_ bytes: ByteBuffer) {
        writeToClient(bytes)
    }

    func upstreamFailed(_ error: any Error) {
        if case .tunnel = input {
            // The upgraded connection ended upstream: end it for the client too.
            upstream = nil
            finish()
            return
        }
        guard let current = exchange, upstream != nil else { return }
        waitingSince = nil
        if shared.countsInFlight { current.target?.finished() }
        upstream = nil
        upstreamBlocked = false
        if current.responseStarted {
            // Half a response cannot be mended: end the client connection so it notices.
            writeHeldHead()
            abort()
            return
        }
        if let error = error as? HTTP1Error {
            fail(status: 502, "\(current.target?.key ?? "upstream") sent an invalid response: \(error.reason)")
            return
        }
        if case UpstreamError.closedMidResponse? = error as? UpstreamError {
            fail(status: 502, "\(current.target?.key ?? "upstream") closed the connection in the middle of its response head")
            return
        }
        retryOrFail(502, "\(current.target?.key ?? "upstream") closed the connection before answering")
    }

    /// After a 101: forward it, then relay raw bytes both ways (WebSocket and any other upgraded
    /// protocol pass through untouched).
    private func becomeTunnel(_ response: HTTP1Head, upgrade: String, connection: UpstreamConnection) {
        guard let current = exchange else { return }
        if shared.countsInFlight { current.target?.finished() }
        input = .tunnel
        let proto = response.upgradeValue ?? upgrade
        writeToClient(HeadWriter.clientResponse(response, connection: .upgrade(proto), allocator: allocator))
        flushClient()
        logExchange(current, status: 101, upstream: current.target)
        exchange = nil
        if let early = pending.take(), early.readableBytes > 0 {
            connection.handler.send(early)
            connection.handler.flush()
        }
        updateReading()
    }

    /// Lets go of the upstream connection and closes it: at once, or once what was sent to it
    /// has gone out.
    private func dropUpstream(deliveringQueued: Bool = false) {
        if let upstream {
            upstream.handler.delegate = nil
            if deliveringQueued { upstream.handler.closeWhenFlushed() } else { upstream.handler.close() }
            if shared.countsInFlight { exchange?.target?.finished() }
        }
        upstream = nil
        upstreamBlocked = false
    }

    /// Answers the current request with an error.
    private func fail(status: Int, _ message: String) {
        guard let current = exchange else { return }
        dropUpstream()
        exchange = nil
        waitingSince = nil
        current.route.metrics.record(statusClass: status / 100, latencyNanoseconds: nil, shard: loop.index)
        current.app?.record(statusClass: status / 100, latencyNanoseconds: nil, shard: loop.index)
        shared.logger.info("\(status) for \(current.route.label): \(message)")
        logExchange(current, status: status, upstream: current.lastTried)
        // An unfinished body leaves the connection's framing behind the client's: close it.
        let close = !current.clientKeepAlive || !current.requestComplete || draining
        current.body.removeAll()
        writeLocal(status: status, message: message, close: close, headRequest: current.headRequest)
        if !close {
            updateReading()
            if let next = pending.take(), next.readableBytes > 0 { process(next) }
        }
    }

    /// A response the proxy makes itself; with `close`, the connection's last.
    private func writeLocal(status: Int, message: String, close: Bool, headRequest: Bool, location: String? = nil) {
        let response = HeadWriter.localResponse(
            status: status, message: message + "\n", close: close, headRequest: headRequest, location: location, allocator: allocator)
        if close {
            finish(with: response)
        } else {
            client.write(response)
            client.flush()
        }
    }

    /// Ends the connection once what was written before, and `last`, are out.
    private func finish(with last: ByteBuffer? = nil) {
        input = .closing
        if let last { client.write(last) }
        // A lingering close: the sending side first, so a client still uploading reads the answer
        // instead of losing it to a reset; what it still sends is read and dropped (`.closing`)
        // until it closes too, or until the idle check closes the connection.
        client.shutdownOutputWhenFlushed()
    }

    /// Ends both connections in the middle of an exchange: what was sent of a response cannot be
    /// mended, and the client notices the close.
    private func abort() {
        dropUpstream()
        exchange = nil
        input = .closing
        client.close()
    }

    /// The access-log line of an exchange, if the log is on.
    private func logExchange(_ current: Exchange, status: Int, upstream: TargetState?) {
        guard var log = current.log else { return }
        log.status = status
        log.bytes = current.responseBytes
        log.upstream = upstream?.key ?? ""
        log.upstreamSeconds = current.upstreamLatency
        log.totalSeconds = Self.seconds(since: current.started)
        shared.accessLog?.record(log)
    }

    private static func seconds(since start: NIODeadline) -> Double {
        Double((NIODeadline.now() - start).nanoseconds) / 1e9
    }

    // MARK: - Connection end

    /// Shutting down: a connection with nothing under way closes now; one with a request under
    /// way closes once its response is out.
    func drain() {
        draining = true
        if exchange == nil, case .head = input {
            input = .closing
            client.close()
        }
    }

    func streamClosed(_ error: SystemCallError?) {
        shared.metrics.connectionClosed(shard: loop.index)
        timer?.cancel()
        timer = nil
        idleCheck?.cancel()
        idleCheck = nil
        // The client ended an upgraded connection: what it sent still reaches the upstream.
        let tunnel = if case .tunnel = input { true } else { false }
        dropUpstream(deliveringQueued: tunnel)
        exchange = nil
        pending = nil
        heldHead = nil
        input = .closing
    }
}
