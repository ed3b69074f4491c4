#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import NIOCore

/// Receives what an upstream connection produces while it is leased to one client request.
protocol UpstreamDelegate: AnyObject {
    /// A 1xx other than 101 (`100 Continue`, `103 Early Hints`); the final response follows.
    func upstreamInterim(_ head: HTTP1Head)
    /// The final response head, or a 101 (after which bytes arrive through `upstreamTunnel`).
    func upstreamHead(_ head: HTTP1Head)
    func upstreamBody(_ body: ByteBuffer)
    /// The response ended; `reusable` when the connection can serve another request.
    func upstreamEnd(reusable: Bool)
    /// Bytes of an upgraded protocol.
    func upstreamTunnel(_ bytes: ByteBuffer)
    func upstreamReadComplete()
    func upstreamWritabilityChanged(_ writable: Bool)
    /// The connection failed or closed before the response ended.
    func upstreamFailed(_ error: any Error)
}

enum UpstreamError: Error {
    /// The connection ended after part of a response: too late to try another instance.
    case closedMidResponse
    /// The connection ended before any of the response.
    case closed
}

/// A value handed across threads to be used only back on the loop it came from.
struct LoopBound<Value>: @unchecked Sendable {
    let value: Value

    init(_ value: Value) {
        self.value = value
    }
}

/// One keep-alive connection to an upstream, used by one request at a time on its loop.
final class UpstreamConnection {
    let handler: UpstreamHandler
    var idleSince: NIODeadline = .now()

    init(handler: UpstreamHandler) {
        self.handler = handler
    }

    var key: String { handler.key }

    var isUsable: Bool { !handler.closed && handler.isIdle }
}

/// An upstream connection's reader and writer: writes request bytes as given, and parses
/// responses just enough to know their status, their headers and where they end. Reads can be
/// held back (`pauseReading`) while the client is slower than the upstream.
final class UpstreamHandler: StreamDelegate {

    private enum State {
        /// No request outstanding: any byte the upstream sends now is a protocol error.
        case idle
        case head
        case body(BodyFramer)
        case tunnel
    }

    /// The request's handler, while the connection is leased. A strong reference (a weak one
    /// would put every retain of the client handler on the runtime's slow path): it is cleared on
    /// every release and failure, and when the stream closes, so the cycle never outlives them.
    var delegate: (any UpstreamDelegate)?
    var closed: Bool { !stream.isOpen }
    /// Where the connection waits between requests, told when it goes away. Pools live as long as
    /// their event loop.
    var pool: UpstreamPool?
    let key: String
    var isWritable: Bool { stream.isWritable }
    private var needsFlush = false
    private let stream: Stream
    private var state = State.idle
    private var pending: ByteBuffer?
    private var scanner = HeadScanner(limit: UpstreamHandler.maximumHeadSize)
    private var noBody = false
    private var upstreamKeepAlive = true
    /// The current response has neither a length nor chunking: it ends when the connection does.
    private(set) var responseEndsWithClose = false
    private var head = HTTP1Head()
    private let emptyBuffer = ByteBuffer()
    private var readPaused = false
    /// Some of the current response has arrived (perhaps only part of its head): the request
    /// reached the upstream, and must not be sent again elsewhere.
    private(set) var receivedResponseBytes = false

    static let maximumHeadSize = 64 * 1024

    init(key: String, stream: Stream) {
        self.key = key
        self.stream = stream
        stream.delegate = self
    }

    var isIdle: Bool {
        if case .idle = state { return true }
        return false
    }

    // MARK: Used by the client side

    /// Sends a request head; its response is parsed next. `headRequest`: the response has no body.
    func sendRequest(_ bytes: ByteBuffer, headRequest: Bool) {
        state = .head
        noBody = headRequest
        scanner.reset()
        pending = nil
        receivedResponseBytes = false
        send(bytes)
    }

    func send(_ bytes: ByteBuffer) {
        needsFlush = true
        stream.write(bytes)
    }

    /// Flushes what `send` wrote since the last flush, if anything.
    func flush() {
        guard needsFlush else { return }
        needsFlush = false
        stream.flush()
    }

    func pauseReading() {
        guard !readPaused else { return }
        readPaused = true
        stream.setReading(false)
    }

    func resumeReading() {
        guard readPaused else { return }
        readPaused = false
        stream.setReading(true)
    }

    func close() {
        stream.close()
    }

    /// Closes once what was sent has gone out.
    func closeWhenFlushed() {
        stream.closeWhenFlushed()
    }

    // MARK: Channel events

    func streamRead(_ received: ByteBuffer) {
        var bytes = received
        receivedResponseBytes = true
        if var held = pending.take(), held.readableBytes > 0 {
            held.writeBuffer(&bytes)
            bytes = held
        }
        process(bytes)
    }

    private func process(_ input: ByteBuffer) {
        var bytes = input
        while bytes.readableBytes > 0 {
            switch state {
            case .idle:
                // Bytes with no request outstanding (an idle connection that speaks, or bytes after
                // the end of a response): the connection is out of step and serves no one again.
                stream.close()
                return
            case .tunnel:
                delegate?.upstreamTunnel(bytes)
                return
            case .head:
                let length: Int
                switch scanner.scan(bytes) {
                case .incomplete:
                    pending = bytes
                    return
                case .tooLarge:
                    fail(HTTP1Error(status: 502, reason: "response head larger than \(Self.maximumHeadSize / 1024) KiB"))
                    return
                case .complete(let found):
                    length = found
                }
                head.bytes = bytes.readSlice(length: length)!
                do {
                    try HTTP1Parser.parseResponse(&head)
                } catch {
                    fail(error)
                    return
                }
                let proceed = startBody(more: bytes.readableBytes > 0)
                // The head has been handed on: let go of the read buffer so the loop can reuse it.
                head.bytes = emptyBuffer
                if !proceed { return }
            case .body(var framer):
                let taken: Int
                do {
                    taken = try bytes.withUnsafeReadableBytes { bytes throws(HTTP1Error) in try framer.consume(bytes) }
                } catch {
                    fail(error)
                    return
                }
                let slice = bytes.readSlice(length: taken)!
                if framer.isComplete {
                    state = .idle
                    delegate?.upstreamBody(slice)
                    finish(leftover: bytes.readableBytes > 0)
                    return
                }
                state = .body(framer)
                delegate?.upstreamBody(slice)
            }
        }
    }

    /// After a head: interim responses wait for the next head, 101 switches to a tunnel, and a
    /// final response sets up its body. False when processing must stop.
    private func startBody(more: Bool) -> Bool {
        let status = head.status
        if status == 101 {
            state = .tunnel
            delegate?.upstreamHead(head)
            return true
        }
        if status < 200 {
            delegate?.upstreamInterim(head)
            return true
        }
        upstreamKeepAlive = head.keepAlive
        let framing: BodyFramer.Framing
        if noBody || status == 204 || status == 304 {
            framing = .length(0)
        } else if head.hasTransferEncoding {
            framing = head.chunked ? .chunked : .untilClose
        } else if let length = head.contentLength {
            framing = .length(length)
        } else {
            framing = .untilClose
        }
        let framer = BodyFramer(framing)
        responseEndsWithClose = framing == .untilClose
        if responseEndsWithClose { upstreamKeepAlive = false }
        if framer.isComplete {
            state = .idle
            delegate?.upstreamHead(head)
            // Bytes after a response with no body: the upstream is out of step; drop the connection.
            finish(leftover: more)
            return false
        }
        state = .body(framer)
        delegate?.upstreamHead(head)
        return true
    }

    private func finish(leftover: Bool) {
        let reusable = upstreamKeepAlive && !leftover && !closed
        let delegate = self.delegate
        if !reusable {
            // Closing tells `streamClosed`, which must not report this (finished) response.
            self.delegate = nil
            close()
        }
        delegate?.upstreamEnd(reusable: reusable)
    }

    private func fail(_ error: HTTP1Error) {
        let delegate = self.delegate
        self.delegate = nil
        state = .idle
        stream.close()
        delegate?.upstreamFailed(error)
    }

    func streamReadComplete() {
        delegate?.upstreamReadComplete()
    }

    func streamWritabilityChanged(_ writable: Bool) {
        delegate?.upstreamWritabilityChanged(writable)
    }

    func streamClosed(_ error: SystemCallError?) {
        let delegate = self.delegate
        self.delegate = nil
        if case .body(let framer) = state, framer.framing == .untilClose {
            // This response's end is the connection's end.
            state = .idle
            delegate?.upstreamEnd(reusable: false)
        } else if case .idle = state {
            // Nothing outstanding.
        } else {
            state = .idle
            let failure: any Error = receivedResponseBytes ? UpstreamError.closedMidResponse : (error.map { $0 } ?? UpstreamError.closed)
            delegate?.upstreamFailed(failure)
        }
        pool?.forget(self)
        pool = nil
    }
}

/// Idle upstream connections of one loop, by `host:port`. Touched only on its loop.
final class UpstreamPool {
    unowned(unsafe) let loop: IOLoop
    let maximumIdlePerTarget: Int
    private var idle: [String: [UpstreamConnection]] = [:]
    private var table = ProxyTable.empty
    private var tableGeneration: UInt64 = 0

    init(loop: IOLoop, maximumIdlePerTarget: Int = 256) {
        self.loop = loop
        self.maximumIdlePerTarget = maximumIdlePerTarget
    }

    /// The route table as this loop last saw it, refreshed when the box has a newer one.
    func table(from box: ProxyTableBox) -> ProxyTable {
        let generation = box.generation
        if generation != tableGeneration {
            table = box.current
            tableGeneration = generation
        }
        return table
    }

    /// An idle, still open connection to `key`, if there is one.
    func takeIdle(_ key: String) -> UpstreamConnection? {
        // Popped in place: the list is not copied per request.
        while let connection = idle[key]?.popLast() {
            if connection.isUsable { return connection }
        }
        return nil
    }

    /// Drops a closed connection from the idle lists.
    func forget(_ handler: UpstreamHandler) {
        idle[handler.key]?.removeAll { $0.handler === handler }
    }

    /// A new connection to `host:port`; `completion` runs on the loop.
    func connect(
        host: String, port: Int, key: String, security: UpstreamSecurity = .plaintext, tls: UpstreamTLS? = nil, timeout: TimeAmount,
        completion: @escaping (Result<UpstreamConnection, SystemCallError>) -> Void
    ) {
        resolve(host: host, port: port) { [self] address in
            guard let address else {
                completion(.failure(SystemCallError(errno: EHOSTUNREACH, "resolve \(host)")))
                return
            }
            switch security {
            case .plaintext:
                connect(to: address, key: key, timeout: timeout, completion: completion)
            case .tls(let verify):
                guard let tls else {
                    completion(.failure(SystemCallError(errno: EPROTONOSUPPORT, "TLS to \(key)")))
                    return
                }
                tls.connect(to: address, verify: verify, on: loop, timeout: timeout) { [self] result in
                    completion(result.map { stream in adopt(stream, key: key) })
                }
            }
        }
    }

    private func adopt(_ stream: Stream, key: String) -> UpstreamConnection {
        let handler = UpstreamHandler(key: key, stream: stream)
        handler.pool = self
        return UpstreamConnection(handler: handler)
    }

    /// The address of `host:port`, on the loop: an IP address at once; a name is resolved off
    /// the loop (`getaddrinfo` blocks). Nil when the name does not resolve.
    func resolve(host: String, port: Int, completion: @escaping (SocketAddress?) -> Void) {
        if let address = try? SocketAddress(ipAddress: host, port: port) {
            completion(address)
            return
        }
        let loop = self.loop
        let waiting = LoopBound(completion)
        Task.detached {
            let address = try? SocketAddress.makeAddressResolvingHost(host, port: port)
            loop.execute { waiting.value(address) }
        }
    }

    private func connect(to address: SocketAddress, key: String, timeout: TimeAmount, completion: @escaping (Result<UpstreamConnection, SystemCallError>) -> Void) {
        Stream.connect(to: address, on: loop, timeout: timeout) { [self] result in
            completion(result.map { stream in adopt(stream, key: key) })
        }
    }

    /// Returns a connection whose last response ended cleanly; it serves the next request.
    func release(_ connection: UpstreamConnection) {
        connection.handler.delegate = nil
        guard connection.isUsable, (idle[connection.key]?.count ?? 0) < maximumIdlePerTarget else {
            connection.handler.close()
            return
        }
        // An idle connection must read, to notice the upstream closing it.
        connection.handler.resumeReading()
        connection.idleSince = .now()
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
                    connection.handler.pool = nil
                    connection.handler.close()
                }
            }
            idle[key] = kept.isEmpty ? nil : kept
        }
    }
}
