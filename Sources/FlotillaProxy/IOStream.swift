#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFlotillaIO
import Logging
import NIOCore

/// A connected pair of non-blocking, close-on-exec UNIX stream sockets (TLS connections reach
/// the core through one: see TLS.swift).
enum SocketPair {
    static func make() throws -> (core: Int32, tls: Int32) {
        var fds: [Int32] = [-1, -1]
        let kind = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        guard socketpair(AF_UNIX, kind, 0, &fds) == 0 else { throw SystemCallError(errno: errno, "socketpair") }
        return (fds[0], fds[1])
    }
}

/// What a stream tells its owner. Every call comes on the stream's loop.
protocol StreamDelegate: AnyObject {
    func streamRead(_ bytes: ByteBuffer)
    /// The bytes of one readiness event have all been delivered.
    func streamReadComplete()
    /// The write queue crossed a watermark: stop (false) or resume (true) producing.
    func streamWritabilityChanged(_ writable: Bool)
    /// The stream is closed (the peer's end, an error, or ours); called once.
    func streamClosed(_ error: SystemCallError?)
}

/// A connected, non-blocking TCP socket on a loop: reads delivered to a delegate, writes queued
/// and sent (gathered, with `sendmsg`) after `flush`, reading switchable off for backpressure.
final class Stream: Selectable {
    unowned(unsafe) let loop: IOLoop
    /// Strong while open: the stream is owned by its loop's registry and keeps its delegate; the
    /// link is cut when the stream closes, so the cycle ends with it.
    var delegate: (any StreamDelegate)?
    private var queue = CircularBuffer<ByteBuffer>(initialCapacity: 4)
    private var queuedBytes = 0
    private(set) var isWritable = true
    private var reading = true
    private var writeBlocked = false
    private var shutDownWhenFlushed = false
    private var closeWhenDone = false
    private var flushScheduled = false
    private var outputShut = false
    private var connecting: ((Result<Stream, SystemCallError>) -> Void)?
    private var connectTimer: IOTimer?

    static let highWatermark = 64 * 1024
    static let lowWatermark = 32 * 1024
    private static let maximumIOVecs = 64

    var isOpen: Bool { fd >= 0 }

    init(fd: Int32, loop: IOLoop) {
        self.loop = loop
        super.init(fd: fd)
    }

    /// A non-blocking, close-on-exec TCP socket of `family`, or -1 (errno set).
    static func newSocket(family: Int32) -> Int32 {
        socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    }

    /// Requests and responses are sent whole, each in one write: no Nagle delay.
    private static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Adopts an accepted socket.
    static func accepted(fd: Int32, loop: IOLoop) throws -> Stream {
        setNoDelay(fd)
        let stream = Stream(fd: fd, loop: loop)
        do {
            try loop.register(stream, events: EPOLLIN.rawValue)
        } catch {
            Glibc.close(fd)
            throw error
        }
        return stream
    }

    /// Connects to `address` without blocking; `completion` runs on the loop with the stream,
    /// or the failure (refused, unreachable, or no answer within `timeout`).
    static func connect(
        to address: SocketAddress, on loop: IOLoop, timeout: TimeAmount, completion: @escaping (Result<Stream, SystemCallError>) -> Void
    ) {
        let family: Int32
        switch address {
        case .v4: family = AF_INET
        case .v6: family = AF_INET6
        default:
            completion(.failure(SystemCallError(errno: EAFNOSUPPORT, "connect")))
            return
        }
        let fd = newSocket(family: family)
        guard fd >= 0 else {
            completion(.failure(SystemCallError(errno: errno, "socket")))
            return
        }
        setNoDelay(fd)
        let result = address.withSockAddr { pointer, length in Glibc.connect(fd, pointer, socklen_t(length)) }
        if result != 0 && errno != EINPROGRESS {
            let error = SystemCallError(errno: errno, "connect")
            Glibc.close(fd)
            completion(.failure(error))
            return
        }
        let stream = Stream(fd: fd, loop: loop)
        do {
            try loop.register(stream, events: result == 0 ? EPOLLIN.rawValue : EPOLLOUT.rawValue)
        } catch {
            Glibc.close(fd)
            completion(.failure(error as! SystemCallError))
            return
        }
        if result == 0 {
            completion(.success(stream))
            return
        }
        stream.reading = false
        stream.connecting = completion
        stream.connectTimer = loop.schedule(in: timeout) { [unowned stream] in
            stream.connectFailed(SystemCallError(errno: ETIMEDOUT, "connect"))
        }
    }

    private func connectFailed(_ error: SystemCallError) {
        // `close` reports the failure to the connect's completion.
        close(error)
    }

    private func connectFinished() {
        if let error = socketError() {
            connectFailed(SystemCallError(errno: error, "connect"))
            return
        }
        let completion = connecting
        connecting = nil
        connectTimer?.cancel()
        connectTimer = nil
        reading = true
        updateInterest()
        completion?(.success(self))
    }

    // MARK: Readiness

    override func ready(_ events: UInt32) {
        if connecting != nil {
            connectFinished()
            return
        }
        if events & EPOLLOUT.rawValue != 0 {
            writeBlocked = false
            flushNow()
            if !writeBlocked { updateInterest() }
        }
        guard fd >= 0 else { return }
        if events & (EPOLLIN.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            if reading {
                readNow()
            } else if events & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
                // Reset, or both directions done: nothing more can be sent or kept.
                close(SystemCallError(errno: socketError() ?? ECONNRESET, "recv"))
            }
        }
    }

    /// The socket's pending error, if any.
    private func socketError() -> Int32? {
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0 { return errno }
        return error == 0 ? nil : error
    }

    private func readNow() {
        // Up to four reads per event when each fills the buffer, so a fast sender cannot starve
        // the loop's other sockets, nor pay an epoll round per 16 KiB.
        var delivered = false
        for _ in 0..<4 {
            // Taken out of the loop while in use, so this is its one reference.
            var buffer = loop.receiveBuffer
            loop.receiveBuffer = loop.emptyBuffer
            // Reused when no slice of the last read is held; else `clear` allocates a fresh one.
            buffer.clear(minimumCapacity: IOLoop.receiveSize)
            let fd = self.fd
            let count = buffer.withUnsafeMutableWritableBytes { bytes in recv(fd, bytes.baseAddress, bytes.count, 0) }
            if count > 0 {
                buffer.moveWriterIndex(forwardBy: count)
                let full = count == buffer.capacity
                delivered = true
                delegate?.streamRead(buffer)
                // The delegate's slices of it are gone unless it kept one: then `clear` allocates anew.
                loop.receiveBuffer = buffer
                guard self.fd >= 0, reading, full else { break }
            } else {
                loop.receiveBuffer = buffer
                if count == 0 {
                    // What came before the end is handed on as complete first (a delegate
                    // flushes on it), then the stream closes.
                    if delivered { delegate?.streamReadComplete() }
                    close()
                    return
                }
                let error = errno
                if error == EAGAIN || error == EWOULDBLOCK || error == EINTR { break }
                close(SystemCallError(errno: error, "recv"))
                return
            }
        }
        if self.fd >= 0 { delegate?.streamReadComplete() }
    }

    // MARK: Reading on and off

    func setReading(_ on: Bool) {
        guard reading != on, connecting == nil else { return }
        reading = on
        updateInterest()
    }

    private func updateInterest() {
        guard fd >= 0 else { return }
        var events: UInt32 = 0
        if reading { events |= EPOLLIN.rawValue }
        if writeBlocked { events |= EPOLLOUT.rawValue }
        loop.update(self, events: events)
    }

    // MARK: Writing

    /// Queues bytes; nothing is sent before `flush`.
    func write(_ bytes: ByteBuffer) {
        guard fd >= 0, !outputShut, bytes.readableBytes > 0 else { return }
        queue.append(bytes)
        queuedBytes += bytes.readableBytes
        if isWritable && queuedBytes > Self.highWatermark {
            isWritable = false
            delegate?.streamWritabilityChanged(false)
        }
    }

    /// Sends what is queued, as far as the socket takes it, once the loop has handled the events
    /// at hand; the rest goes when the socket can take it.
    func flush() {
        guard !flushScheduled, !writeBlocked, fd >= 0, !queue.isEmpty else { return }
        flushScheduled = true
        loop.flushLater(self)
    }

    /// The loop's end-of-batch flush.
    func flushDeferred() {
        flushScheduled = false
        guard !writeBlocked, fd >= 0 else { return }
        flushNow()
        if writeBlocked { updateInterest() }
    }

    /// Shuts the sending side once everything queued has been sent (the first half of a
    /// lingering close); a failure closes the stream.
    func shutdownOutputWhenFlushed() {
        guard fd >= 0 else { return }
        shutDownWhenFlushed = true
        flush()
        if queue.isEmpty { shutdownOutputNow() }
    }

    /// Closes the stream once everything queued has been sent.
    func closeWhenFlushed() {
        guard fd >= 0 else { return }
        closeWhenDone = true
        flush()
        if fd >= 0 && queue.isEmpty { close() }
    }

    private func shutdownOutputNow() {
        guard !outputShut, fd >= 0 else { return }
        outputShut = true
        shutDownWhenFlushed = false
        if shutdown(fd, Int32(SHUT_WR)) != 0 { close() }
    }

    private func flushNow() {
        while !queue.isEmpty {
            let sent: Int
            if queue.count == 1 {
                let fd = self.fd
                sent = queue[queue.startIndex].withUnsafeReadableBytes { bytes in send(fd, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL)) }
            } else {
                sent = writeVector()
            }
            if sent < 0 {
                let error = errno
                if error == EAGAIN || error == EWOULDBLOCK {
                    writeBlocked = true
                    return
                }
                if error == EINTR { continue }
                close(SystemCallError(errno: error, "send"))
                return
            }
            consume(sent)
        }
        if closeWhenDone {
            close()
        } else if shutDownWhenFlushed {
            shutdownOutputNow()
        }
    }

    /// One gathered send of the head of the queue.
    private func writeVector() -> Int {
        let count = min(queue.count, Self.maximumIOVecs)
        return withUnsafeTemporaryAllocation(of: iovec.self, capacity: count) { vectors in
            // The buffers stay in the queue, alive, for the call.
            var index = queue.startIndex
            for i in 0..<count {
                queue[index].withUnsafeReadableBytes { bytes in
                    vectors[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
                }
                index = queue.index(after: index)
            }
            // `sendmsg` rather than `writev`: only a socket call takes MSG_NOSIGNAL, and a
            // peer gone mid-response must not raise SIGPIPE.
            var message = msghdr()
            message.msg_iov = vectors.baseAddress
            message.msg_iovlen = count
            return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
        }
    }

    private func consume(_ sent: Int) {
        var left = sent
        queuedBytes -= sent
        while left > 0 {
            let size = queue[queue.startIndex].readableBytes
            if size <= left {
                left -= size
                _ = queue.removeFirst()
            } else {
                queue[queue.startIndex].moveReaderIndex(forwardBy: left)
                left = 0
            }
        }
        if !isWritable && queuedBytes <= Self.lowWatermark {
            isWritable = true
            delegate?.streamWritabilityChanged(true)
        }
    }

    // MARK: Closing

    /// Closes the socket at once (what is queued is dropped) and tells the delegate.
    func close(_ error: SystemCallError? = nil) {
        guard fd >= 0 else { return }
        loop.deregister(self)
        Glibc.close(fd)
        fd = -1
        queue.removeAll()
        queuedBytes = 0
        connectTimer?.cancel()
        connectTimer = nil
        let delegate = self.delegate
        self.delegate = nil
        if let connecting {
            // Closed before the connect finished (it failed, or the loop is stopping).
            self.connecting = nil
            connecting(.failure(error ?? SystemCallError(errno: ECANCELED, "connect")))
        }
        delegate?.streamClosed(error)
    }
}

/// A listening socket shared by every loop: each registers it with `EPOLLEXCLUSIVE`, so one loop
/// wakes per connection, and accepts onto itself.
final class Listener: Selectable {
    unowned(unsafe) let loop: IOLoop
    private let onAccept: (Stream, String) -> Void
    private var pausedUntil: IOTimer?
    /// When a failing accept was last logged (it repeats every pause while descriptors run out).
    private var failureLogged: UInt64?

    init(fd: Int32, loop: IOLoop, onAccept: @escaping (Stream, String) -> Void) {
        self.loop = loop
        self.onAccept = onAccept
        super.init(fd: fd)
    }

    static let interest = EPOLLIN.rawValue | EPOLLEXCLUSIVE.rawValue

    /// A bound, listening, non-blocking socket.
    static func bind(host: String, port: Int, backlog: Int32 = 1024) throws -> (fd: Int32, port: Int) {
        let address = try SocketAddress.makeAddressResolvingHost(host, port: port)
        let family: Int32 = if case .v6 = address { AF_INET6 } else { AF_INET }
        let fd = Stream.newSocket(family: family)
        guard fd >= 0 else { throw SystemCallError(errno: errno, "socket") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = address.withSockAddr { pointer, length in Glibc.bind(fd, pointer, socklen_t(length)) }
        guard bound == 0 else {
            let error = SystemCallError(errno: errno, "bind \(host):\(port)")
            Glibc.close(fd)
            throw error
        }
        guard listen(fd, backlog) == 0 else {
            let error = SystemCallError(errno: errno, "listen")
            Glibc.close(fd)
            throw error
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let actual = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) == 0 ? Self.port(of: $0) : port }
        }
        return (fd, actual)
    }

    override func ready(_ events: UInt32) {
        // An event already gathered for a listener closed earlier in the same batch.
        guard registered else { return }
        for _ in 0..<16 {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let client = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    cflotilla_accept(fd, $0, &length)
                }
            }
            if client < 0 {
                switch errno {
                case EAGAIN, EWOULDBLOCK, EINTR, ECONNABORTED, EPROTO:
                    return
                default:
                    // Out of descriptors (EMFILE, ENFILE) or memory: the socket stays readable, so
                    // stop polling it for a moment rather than spin.
                    let error = SystemCallError(errno: errno, "accept")
                    let now = IOLoop.now()
                    if failureLogged.map({ now - $0 > 10_000_000_000 }) ?? true {
                        failureLogged = now
                        loop.logger.warning("proxy cannot accept connections (\(error)); retrying every 100 ms — if descriptors ran out, raise the open-file limit (ulimit -n)")
                    }
                    pause()
                    return
                }
            }
            let address = withUnsafePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { Self.host(of: $0) }
            }
            guard let stream = try? Stream.accepted(fd: client, loop: loop) else { continue }
            onAccept(stream, address)
        }
    }

    private func pause() {
        guard pausedUntil == nil else { return }
        // Taken out of the epoll set and put back: an `EPOLLEXCLUSIVE` registration cannot be
        // modified.
        loop.deregister(self)
        // The timer holds the listener until it fires or `close` cancels it.
        pausedUntil = loop.schedule(in: .milliseconds(100)) { [self] in
            pausedUntil = nil
            try? loop.register(self, events: Self.interest)
        }
    }

    func close() {
        pausedUntil?.cancel()
        pausedUntil = nil
        loop.deregister(self)
    }

    private static func port(of address: UnsafePointer<sockaddr>) -> Int {
        Int(cflotilla_address_port(address))
    }

    /// The textual IP address of a peer.
    private static func host(of address: UnsafePointer<sockaddr>) -> String {
        withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64) { text in
            guard cflotilla_address_text(address, text.baseAddress!, 64) == 0 else { return "" }
            return String(cString: text.baseAddress!)
        }
    }
}
